"""Importing demonstrations: JSONL, one demonstration per line, all or nothing
with line-numbered problems (the checks of app/services/prompt_import):
    {"prompt": "Write a haiku about rain.", "response": "Soft rain on the roof..."}
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}]}
`completion` is accepted for `response` (TRL's prompt-completion format), and
`id` and `metadata` as in prompt imports. The prompts are added to the set
(or found there) and the demonstrations stored as the importer's, accepted.
"""

import json
from dataclasses import dataclass, field
from datetime import datetime
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.bulk import insert_new
from app.db.enums import DemonstrationSource, DemonstrationStatus, PromptSetKind, PromptSetStatus
from app.db.models import Demonstration, Prompt, PromptSet, User
from app.services.demonstrations.writing import MAX_TEXT_CHARS
from app.services.errors import Conflict, Invalid
from app.services.prompt_import import (
    LIMITS,
    ImportLimits,
    Problems,
    _provenance,
    check_length,
    check_messages,
    check_text_field,
    decode,
    fail,
    insert_new_prompts,
    json_type,
    prompt_row,
    text_prompt,
)
from app.services.prompt_sets import prompt_hash
from app.services.validation import JsonProblem, load_json


@dataclass
class ParsedDemonstration:
    line: int
    messages: list[dict[str, str]]
    response: str
    external_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemonstrationImportResult:
    added: int = 0
    prompts_added: int = 0
    duplicates_in_file: int = 0
    duplicates_existing: int = 0

    def describe(self) -> str:
        text = (f"Imported {self.added} demonstration{'s' if self.added != 1 else ''}"
                f" ({self.prompts_added} new prompt{'s' if self.prompts_added != 1 else ''}).")
        skipped = self.duplicates_in_file + self.duplicates_existing
        if skipped:
            text += (f" Skipped {skipped} duplicate{'s' if skipped != 1 else ''}"
                     f" ({self.duplicates_in_file} in the file, {self.duplicates_existing} already stored).")
        return text


def _answer(problems: Problems, where: str, name: str, raw: Any) -> str | None:
    """A response given as text or as [{"role": "assistant", "content": ...}]."""
    if isinstance(raw, list):
        if len(raw) != 1 or not isinstance(raw[0], dict) or raw[0].get("role") != "assistant":
            problems.add(f"{where}: {name} must be a string or a list of one assistant message")
            return None
        raw = raw[0].get("content")
        name = f"{name}[0].content"
    if not isinstance(raw, str):
        problems.add(f"{where}: {name} must be a string, not {json_type(raw)}")
        return None
    if not check_text_field(problems, where, name, raw):
        return None
    if len(raw) > MAX_TEXT_CHARS:
        problems.add(f"{where}: {name} is {len(raw):,} characters long; the limit is {MAX_TEXT_CHARS:,}")
        return None
    return raw.replace("\r\n", "\n").replace("\r", "\n")


def _demo_record(problems: Problems, where: str, line: int, obj: Any,
                 limits: ImportLimits) -> ParsedDemonstration | None:
    if not isinstance(obj, dict):
        problems.add(f"{where}: expected an object like {{\"prompt\": \"...\", \"response\": \"...\"}},"
                     f" not {json_type(obj)}")
        return None
    answer_keys = [k for k in ("response", "completion") if k in obj]
    if "messages" in obj:
        if "prompt" in obj or answer_keys:
            problems.add(f"{where}: give either 'messages' or 'prompt' with 'response', not both")
            return None
        raw = obj["messages"]
        if not isinstance(raw, list) or not raw:
            problems.add(f"{where}: 'messages' must be a non-empty list ending with the assistant's answer")
            return None
        last = raw[-1]
        if not isinstance(last, dict) or last.get("role") != "assistant":
            got = last.get("role") if isinstance(last, dict) else json_type(last)
            problems.add(f"{where}: the last message must be the assistant's answer, not {got!r}")
            return None
        if len(raw) < 2:
            problems.add(f"{where}: 'messages' needs a user turn before the assistant's answer")
            return None
        messages = check_messages(problems, where, raw[:-1])
        response = _answer(problems, where, f"'messages'[{len(raw) - 1}].content", last.get("content"))
        name = "'messages'"
    else:
        if "prompt" not in obj:
            problems.add(f"{where}: missing 'prompt' and 'response' (or 'messages' ending with the assistant's answer)")
            return None
        if len(answer_keys) != 1:
            problems.add(f"{where}: missing 'response'" if not answer_keys
                         else f"{where}: give 'response' or 'completion', not both")
            return None
        prompt = obj["prompt"]
        if isinstance(prompt, list):
            messages = check_messages(problems, where, prompt)
        elif isinstance(prompt, str):
            messages = text_prompt(problems, where, prompt)
        else:
            problems.add(f"{where}: 'prompt' must be a string or a list of messages, not {json_type(prompt)}")
            messages = None
        response = _answer(problems, where, f"'{answer_keys[0]}'", obj[answer_keys[0]])
        name = "'prompt'"
    ok = messages is not None and response is not None
    ok = ok and check_length(problems, where, name, messages, limits)
    provenance = _provenance(problems, where, obj, fields=("prompt", "messages", "response", "completion"), ok=ok,
                             limits=limits)
    if provenance is None:
        return None
    assert messages is not None and response is not None
    external_id, meta = provenance
    return ParsedDemonstration(line=line, messages=messages, response=response, external_id=external_id, meta=meta)


def parse_demonstrations(data: bytes | str, *, limits: ImportLimits = LIMITS) -> list[ParsedDemonstration]:
    """Every demonstration of a JSONL file, in order. Raises Invalid listing the
    problems, each with its line and field."""
    text_ = decode(data, limits=limits)
    problems = Problems(limits)
    parsed: list[ParsedDemonstration] = []
    count = 0
    # split("\n"), not splitlines(): U+2028 and friends may sit inside a JSON string.
    for number, line in enumerate(text_.split("\n"), start=1):
        if not line.strip():
            continue
        count += 1
        if count > limits.max_prompts:
            raise fail(f"the file has more than {limits.max_prompts:,} demonstrations; the limit is"
                        f" {limits.max_prompts:,} per import. Split it into smaller files.")
        where = f"line {number}"
        try:
            obj = load_json(line)
        except json.JSONDecodeError as exc:
            hint = " (one JSON object per line: JSONL)" if number == 1 and line.lstrip().startswith("[") else ""
            problems.add(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}){hint}")
            continue
        except JsonProblem as exc:
            problems.add(f"{where}: not accepted: the JSON {exc}")
            continue
        record = _demo_record(problems, where, number, obj, limits)
        if record is not None:
            parsed.append(record)
    problems.raise_if_any()
    if not parsed:
        raise fail("there are no demonstrations in the file.")
    return parsed


def import_demonstrations(session: Session, *, prompt_set: PromptSet, data: bytes | str, user: User,
                          now: datetime, status: DemonstrationStatus | str = DemonstrationStatus.accepted,
                          limits: ImportLimits = LIMITS) -> DemonstrationImportResult:
    """Add the file's demonstrations to a demonstration set in one transaction: their
    prompts are found in the set or added to it, the demonstrations stored as the
    importer's (accepted, or submitted to go through review). A prompt given twice
    in the file, or already holding a demonstration of the importer, is skipped.
    Raises Invalid (nothing stored) when any line is bad, Conflict for an archived
    or ranking set. Commits."""
    if prompt_set.kind != PromptSetKind.demonstration:
        raise Conflict(f"'{prompt_set.name}' is a ranking set; import demonstrations into a demonstration set.")
    if prompt_set.status == PromptSetStatus.archived:
        raise Conflict(f"The prompt set '{prompt_set.name}' is archived; it takes no new demonstrations.")
    if status not in (DemonstrationStatus.accepted, DemonstrationStatus.submitted):
        raise Invalid("Imported demonstrations are either accepted or submitted for review.",
                      errors={"status": "accepted or submitted"})
    status = DemonstrationStatus(status)
    parsed = parse_demonstrations(data, limits=limits)
    result = DemonstrationImportResult()
    by_hash: dict[str, ParsedDemonstration] = {}
    for p in parsed:
        h = prompt_hash(p.messages)
        if h in by_hash:
            result.duplicates_in_file += 1
            continue
        by_hash[h] = p
    rows = [prompt_row(prompt_set, messages=p.messages, text_hash=h, external_id=p.external_id, meta=p.meta)
            for h, p in by_hash.items()]
    added = insert_new_prompts(session, rows)
    result.prompts_added = len(added)
    prompt_ids = dict(session.execute(
        select(Prompt.text_hash, Prompt.id).where(Prompt.prompt_set_id == prompt_set.id,
                                                  Prompt.text_hash.in_(list(by_hash)))
    ).all())
    reviewed = status == DemonstrationStatus.accepted
    demo_rows = [
        {"prompt_id": prompt_ids[h], "user_id": user.id, "text": p.response, "status": status,
         "time_spent_s": 0.0, "reviewed_by_id": user.id if reviewed else None, "reviewed_at": now if reviewed else None,
         "created_at": now, "updated_at": now}
        for h, p in by_hash.items()
    ]
    stored = insert_new(session, Demonstration, demo_rows, conflict=["prompt_id", "user_id"],
                        returning=Demonstration.id)
    result.added = len(stored)
    result.duplicates_existing = len(demo_rows) - len(stored)
    session.commit()
    return result


def store_best_of_n(session: Session, *, user_id: int, kept: Sequence[tuple[int, str]],
                    now: datetime) -> tuple[int, int]:
    """Store best-of-N responses ((prompt id, text) pairs) as the job owner's demonstrations,
    source best_of_n, submitted for review like a labeler's. An earlier best-of-N
    demonstration of the owner on the prompt is replaced and goes back to review; a
    demonstration the owner wrote is left alone. Returns (stored, left alone). Commits."""
    stored, left = 0, 0
    existing = {d.prompt_id: d for d in session.scalars(
        select(Demonstration).where(Demonstration.user_id == user_id,
                                    Demonstration.prompt_id.in_([p for p, _ in kept])).with_for_update())}
    for prompt_id, text in kept:
        demo = existing.get(prompt_id)
        if demo is not None and demo.source != DemonstrationSource.best_of_n:
            left += 1
            continue
        if demo is None:
            demo = Demonstration(prompt_id=prompt_id, user_id=user_id, source=DemonstrationSource.best_of_n,
                                 created_at=now)
            session.add(demo)
        demo.text, demo.status, demo.updated_at = text, DemonstrationStatus.submitted, now
        demo.reviewed_by_id, demo.reviewed_at, demo.reject_reason, demo.expires_at = None, None, None, None
        stored += 1
    session.commit()
    return stored, left
