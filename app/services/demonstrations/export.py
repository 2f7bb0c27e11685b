"""Accepted demonstrations as training data, and their export in the SFT formats
TRL reads: `messages` ({"messages": [..., {"role": "assistant", ...}]}) or
`prompt_completion` ({"prompt": [...], "completion": [{"role": "assistant", ...}]}),
one JSON line each.
"""

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.enums import DemonstrationStatus, Split
from app.db.models import Demonstration, Prompt
from app.services.errors import Invalid
from app.services.export import stream_rows
from app.services.prompt_sets import get_prompt_set

EXPORT_FORMATS = ("messages", "prompt_completion")


def _unknown_format(fmt: str) -> Invalid:
    return Invalid(f"Unknown export format '{fmt}'; choose {' or '.join(EXPORT_FORMATS)}.",
                   errors={"format": f"one of {', '.join(EXPORT_FORMATS)}"})


def _check_sets(session: Session, prompt_set_ids: Sequence[int]) -> None:
    """Raises NotFound for an unknown set."""
    for set_id in prompt_set_ids:
        get_prompt_set(session, set_id)


@dataclass(frozen=True)
class AcceptedDemonstration:
    demonstration_id: int
    prompt_id: int
    prompt_set_id: int
    messages: list[dict[str, str]]
    response: str
    split: Split
    user_id: int


def _accepted_query(prompt_set_ids: Sequence[int]):
    return (
        select(Demonstration.id, Demonstration.prompt_id, Prompt.prompt_set_id, Prompt.messages,
               Demonstration.text, Prompt.split, Demonstration.user_id)
        .join(Prompt, Prompt.id == Demonstration.prompt_id)
        .where(Demonstration.status == DemonstrationStatus.accepted, Prompt.prompt_set_id.in_(list(prompt_set_ids)))
        .order_by(Prompt.prompt_set_id, Demonstration.prompt_id, Demonstration.id)
    )


def _iter_accepted(session: Session, prompt_set_ids: Sequence[int]) -> Iterator[AcceptedDemonstration]:
    for d_id, p_id, s_id, messages, text, split, user_id in stream_rows(session, _accepted_query(prompt_set_ids)):
        yield AcceptedDemonstration(d_id, p_id, s_id, list(messages), text, Split(split), user_id)


def accepted_demonstrations(session: Session, *, prompt_set_ids: Sequence[int]) -> list[AcceptedDemonstration]:
    """The training data: accepted demonstrations of the sets, in a stable order. Raises
    NotFound for an unknown set."""
    _check_sets(session, prompt_set_ids)
    return list(_iter_accepted(session, prompt_set_ids))


def export_row(item: AcceptedDemonstration, fmt: str) -> dict[str, Any]:
    """One line of the SFT export; provenance columns are ignored by TRL."""
    answer = {"role": "assistant", "content": item.response}
    if fmt == "messages":
        row: dict[str, Any] = {"messages": [*item.messages, answer]}
    elif fmt == "prompt_completion":
        row = {"prompt": item.messages, "completion": [answer]}
    else:
        raise _unknown_format(fmt)
    return row | {"demonstration_id": item.demonstration_id, "prompt_id": item.prompt_id,
                  "prompt_set_id": item.prompt_set_id, "split": item.split.value, "labeler_id": item.user_id}


def iter_export(session: Session, *, prompt_set_ids: Sequence[int], fmt: str) -> Iterator[str]:
    """JSONL lines of the accepted demonstrations of the sets, streamed from a
    server-side cursor (memory stays flat however many there are). Raises Invalid
    for an unknown format, NotFound for an unknown set, when called: before the
    first line, so a download never starts and then fails."""
    if fmt not in EXPORT_FORMATS:
        raise _unknown_format(fmt)
    _check_sets(session, prompt_set_ids)
    return (json.dumps(export_row(item, fmt), ensure_ascii=False) + "\n"
            for item in _iter_accepted(session, prompt_set_ids))
