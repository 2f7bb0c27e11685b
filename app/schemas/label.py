"""Schemas of the labeling API and the label form.

Types only: every rule (ratings 1..7, ranks 1..K, known flags) is checked once,
in app.services.annotations, so the API and the pages answer with the same
per-field messages (rating-<response_id>, rank-<response_id>, ...).
"""

import secrets
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field
from starlette.datastructures import FormData

from app.schemas.common import Text
from app.services.validation import small_int


class ResponseOut(BaseModel):
    id: int
    label: str = Field(description="A, B, C... in the task's stored shuffled order.")
    text: str
    finish_reason: str


class FlagOut(BaseModel):
    key: str
    label: str


class LabelTaskOut(BaseModel):
    id: int
    prompt_set_id: int
    prompt_set_name: str
    instructions: str = Field(description="Markdown.")
    messages: list[dict[str, Any]] = Field(description="The conversation; the last turn is the prompt.")
    k: int
    mode: Literal["rank", "vote"] = Field(
        description="rank: rate and rank every response; vote: compare A and B (send `vote`, optional `strength`).")
    top_k: int | None = Field(description="Rank only the best top_k responses (ranks 1..top_k; leave the others "
                                          "out: tied last); null: rank every response.")
    responses: list[ResponseOut]
    lease_expires_at: datetime


class NextTaskOut(BaseModel):
    task: LabelTaskOut | None = Field(description="None when nothing is left for this labeler.")
    today: int
    total: int
    response_flags: list[FlagOut]
    prompt_flags: list[FlagOut]


class SubmitIn(BaseModel):
    idempotency_key: str = Field(max_length=64, description="One per form: a retry with it stores nothing new.")
    ratings: dict[str, Any] = Field(
        default_factory=dict,
        description="{response_id: Likert 1 (very bad) .. 7 (excellent)}, every response (optional when all_bad).")
    ranks: dict[str, Any] = Field(
        default_factory=dict,
        description="{response_id: rank 1 (best) .. K}, every response; ties allowed. With the task's top_k: "
                    "exactly top_k responses ranked 1..top_k, the others left out (tied last). None when all_bad.")
    all_bad: bool = Field(default=False, description="Every response is unacceptable: no ranking, no comparisons.")
    all_bad_reason: Text | None = Field(default=None, description="Why (required with all_bad; at most 500 characters).")
    vote: str | None = Field(default=None, max_length=20, description="Mode vote: a | b | tie | both_bad.")
    strength: str | None = Field(default=None, max_length=20, description=(
        "Mode vote, optional, with a winner: slightly | clearly | much."))
    flags: dict[str, list[str]] = Field(default_factory=dict, description="{response_id: [flag key, ...]}")
    prompt_flags: list[str] = Field(default_factory=list)
    comment: Text = ""
    time_spent_s: float | None = Field(default=None, description="Clamped to 0..2 hours.")


class SubmitOut(BaseModel):
    annotation_id: int
    task_id: int
    created: bool = Field(description="False when this key's annotation was stored before.")
    comparisons: int
    warnings: list[str] = Field(description="Soft warnings: the ranking contradicts the ratings.")


def new_form_key() -> str:
    return secrets.token_urlsafe(18)


class LabelForm:
    """The label form as posted: rating-<id>, rank-<id>, flags-<id> (several),
    prompt_flags (several), comment, all_bad (checkbox), all_bad_reason, skip_reason(_other),
    idempotency_key, started_at."""

    def __init__(self, form: FormData | Mapping[str, Any]):
        self.ratings: dict[int, str] = {}
        self.ranks: dict[int, str] = {}
        self.flags: dict[int, list[str]] = {}
        getlist = form.getlist if isinstance(form, FormData) else lambda k: [form[k]]
        for name in form.keys():
            prefix, _, raw_id = name.partition("-")
            # Only ASCII digits: "²".isdigit() holds, yet int("²") fails.
            rid = small_int(raw_id)
            if rid is None:
                continue
            if prefix == "rating":
                self.ratings[rid] = str(form[name])
            elif prefix == "rank":
                self.ranks[rid] = str(form[name])
            elif prefix == "flags":
                self.flags[rid] = [str(v) for v in getlist(name)]
        self.prompt_flags = [str(v) for v in getlist("prompt_flags")] if "prompt_flags" in form else []
        self.comment = str(form.get("comment", ""))
        self.all_bad = str(form.get("all_bad", ""))
        self.all_bad_reason = str(form.get("all_bad_reason", ""))
        self.skip_reason = str(form.get("skip_reason", ""))
        self.skip_reason_other = str(form.get("skip_reason_other", "")).strip()
        self.idempotency_key = str(form.get("idempotency_key", ""))
        self.vote = str(form.get("vote", ""))
        self.strength = str(form.get("strength", ""))
        self.started_at = str(form.get("started_at", ""))

    def time_spent_s(self, now: datetime) -> float | None:
        """Seconds since the form was rendered (the server wrote started_at); None if unreadable."""
        try:
            return now.timestamp() - float(self.started_at)
        except ValueError:
            return None

    def skip_text(self) -> str:
        if self.skip_reason == "Other" or not self.skip_reason:
            return self.skip_reason_other
        return self.skip_reason

    def values(self) -> dict[str, Any]:
        """What the labeler entered, to show again next to the errors."""
        return {
            "ratings": self.ratings, "ranks": self.ranks, "flags": self.flags,
            "prompt_flags": self.prompt_flags, "comment": self.comment,
            "all_bad": self.all_bad not in ("", "false", "off", "0"), "all_bad_reason": self.all_bad_reason,
            "skip_reason": self.skip_reason, "skip_reason_other": self.skip_reason_other,
            "vote": self.vote, "strength": self.strength,
        }

