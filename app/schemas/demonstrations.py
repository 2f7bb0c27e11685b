"""JSON shapes of demonstrations: the labeler's draft and submission, the review, imports."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from app.db.enums import DemonstrationStatus
from app.db.models import Demonstration
from app.schemas.common import Text


class DemonstrationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    prompt_id: int
    prompt_set_id: int
    messages: list[dict[str, Any]]
    instructions: str
    user_id: int
    text: Text
    status: DemonstrationStatus
    edit_mode: bool
    prompt_flags: list[str]
    time_spent_s: float
    expires_at: datetime | None
    reject_reason: str | None
    skip_reason: str | None
    reviewed_by_id: int | None
    reviewed_at: datetime | None
    updated_at: datetime


class NextDemonstrationOut(BaseModel):
    demonstration: DemonstrationOut | None


class DraftIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Text = ""
    prompt_flags: list[str] | None = None
    time_spent_s: float | None = None


class DraftOut(BaseModel):
    demonstration: DemonstrationOut
    saved: bool
    holds_lease: bool


class DemonstrationSubmitIn(DraftIn):
    pass


class DemonstrationSubmitOut(BaseModel):
    demonstration: DemonstrationOut
    already: bool


class SkipIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Text


class RejectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Text


class EditIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Text


class DemonstrationImportOut(BaseModel):
    added: int
    prompts_added: int
    duplicates_in_file: int
    duplicates_existing: int


def demonstration_out(demo: Demonstration) -> DemonstrationOut:
    prompt = demo.prompt
    return DemonstrationOut(
        id=demo.id, prompt_id=demo.prompt_id, prompt_set_id=prompt.prompt_set_id, messages=list(prompt.messages),
        instructions=prompt.prompt_set.instructions, user_id=demo.user_id, text=demo.text, status=demo.status,
        edit_mode=demo.edit_mode, prompt_flags=list(demo.prompt_flags), time_spent_s=demo.time_spent_s or 0.0,
        expires_at=demo.expires_at, reject_reason=demo.reject_reason, skip_reason=demo.skip_reason,
        reviewed_by_id=demo.reviewed_by_id, reviewed_at=demo.reviewed_at, updated_at=demo.updated_at,
    )
