"""Writing demonstrations: a labeler saves drafts (autosave renews the lease),
submits, skips a prompt, or starts from the model's answer (edit mode).

Submitting is idempotent: the row is unique per (prompt, labeler), and a
submit of a demonstration already submitted (a double click, a retry) returns
it unchanged.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.enums import DemonstrationStatus
from app.db.models import Demonstration, Response, User
from app.services.annotations import PROMPT_FLAG_KEYS, PROMPT_FLAGS, clamp_time_spent
from app.services.assignment import clean_skip_reason, lease_clock
from app.services.demonstrations.leases import DONE, lock_prompt, own_demonstration, renew_lease
from app.services.errors import Conflict, Invalid, NotFound
from app.services.validation import check_text

MAX_TEXT_CHARS = 20_000
SKIP_REASONS = (
    "I cannot write a good answer on this topic",
    "The prompt is unclear",
    "The prompt is harmful or inappropriate",
    "Other",
)


def clean_text(value: Any, *, field_name: str = "text", required: bool) -> str:
    if not isinstance(value, str):
        raise Invalid("The text must be a string.", errors={field_name: "must be text"})
    value = check_text(value.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", ""), field_name)
    if len(value) > MAX_TEXT_CHARS:
        raise Invalid(f"The text is {len(value):,} characters long; the limit is {MAX_TEXT_CHARS:,}.",
                      errors={field_name: f"at most {MAX_TEXT_CHARS:,} characters"})
    if required and not value.strip():
        raise Invalid("Write a response before submitting.", errors={field_name: "write your response"})
    return value


def _clean_flags(flags: Iterable[str] | str | None) -> list[str]:
    given = [flags] if isinstance(flags, str) else list(flags or [])
    unknown = [f for f in given if f not in PROMPT_FLAG_KEYS]
    if unknown:
        raise Invalid(f"Unknown prompt flag {unknown[0]!r}.", errors={"prompt_flags": f"unknown flag {unknown[0]!r}"})
    return [key for key, _ in PROMPT_FLAGS if key in given]


@dataclass
class SaveResult:
    demonstration: Demonstration
    saved: bool  # False when it was already submitted (a late autosave changes nothing)
    holds_lease: bool  # False when the lease ran out and the prompt went to others (the text is kept)


def save_draft(session: Session, *, user: User, demonstration_id: int, text: str, lease_s: int,
               now: datetime | None = None, time_spent_s: Any = None, edit_mode: bool | None = None,
               prompt_flags: Iterable[str] | None = None) -> SaveResult:
    """Store the draft's text (saving the same text again changes nothing else) and
    renew the lease. A demonstration already submitted is left as it is. Raises
    NotAllowed for someone else's or a set closed to them, Conflict for a skipped
    one, Invalid for a text over the limit. Commits."""
    demo = own_demonstration(session, user=user, demonstration_id=demonstration_id)
    if demo.status != DemonstrationStatus.draft:
        if demo.status == DemonstrationStatus.skipped:
            raise Conflict("You skipped this prompt; its draft can no longer change.")
        session.commit()
        return SaveResult(demo, saved=False, holds_lease=False)
    now = lock_prompt(session, demo, now)
    demo.text = clean_text(text, required=False)
    if edit_mode is not None:
        demo.edit_mode = bool(edit_mode)
    if prompt_flags is not None:
        demo.prompt_flags = _clean_flags(prompt_flags)
    if time_spent_s is not None:
        demo.time_spent_s = max(demo.time_spent_s or 0.0, clamp_time_spent(time_spent_s))
    demo.updated_at = now
    holds = renew_lease(session, demo, now=now, lease_s=lease_s)
    session.commit()
    return SaveResult(demo, saved=True, holds_lease=holds)


@dataclass
class SubmitResult:
    demonstration: Demonstration
    already: bool  # True when it had been submitted before (nothing changed)


def submit_demonstration(session: Session, *, user: User, demonstration_id: int, text: str, lease_s: int,
                         now: datetime | None = None, time_spent_s: Any = None, edit_mode: bool | None = None,
                         prompt_flags: Iterable[str] | None = None) -> SubmitResult:
    """Submit the labeler's response for review, checked with its prompt locked and by
    the database's clock (`now` replaces it in tests). Submitting again returns the
    stored one unchanged. Raises NotFound, NotAllowed (not theirs, or its set is not
    active or open to them any more), Conflict (skipped, or the lease ran out and
    the prompt went to other labelers; the draft is kept), Invalid (empty or too
    long text, unknown flag). Commits."""
    demo = own_demonstration(session, user=user, demonstration_id=demonstration_id)
    if demo.status in DONE:
        session.commit()
        return SubmitResult(demo, already=True)
    if demo.status == DemonstrationStatus.skipped:
        raise Conflict("You skipped this prompt; it cannot be submitted any more.")
    now = lock_prompt(session, demo, now)
    cleaned = clean_text(text, required=True)
    flags = _clean_flags(prompt_flags) if prompt_flags is not None else demo.prompt_flags
    demo.text = cleaned
    if not renew_lease(session, demo, now=now, lease_s=lease_s):
        session.commit()  # keep the text as a draft
        raise Conflict("Your time on this prompt ran out and other labelers took it. Your text is kept as a"
                       " draft; open Write for the next prompt.")
    demo.status = DemonstrationStatus.submitted
    demo.expires_at = None
    demo.prompt_flags = flags
    if edit_mode is not None:
        demo.edit_mode = bool(edit_mode)
    if time_spent_s is not None:
        demo.time_spent_s = max(demo.time_spent_s or 0.0, clamp_time_spent(time_spent_s))
    demo.updated_at = now
    session.commit()
    return SubmitResult(demo, already=False)


def skip_demonstration(session: Session, *, user: User, demonstration_id: int, reason: str,
                       now: datetime | None = None) -> Demonstration:
    """Give the prompt back, never to be offered to this labeler again. Raises
    NotFound, NotAllowed (not theirs, or a set closed to them), Conflict (already
    submitted), then Invalid (no reason). Commits."""
    demo = own_demonstration(session, user=user, demonstration_id=demonstration_id)
    if demo.status in DONE:
        raise Conflict("You already submitted this demonstration; it cannot be skipped any more.")
    reason = clean_skip_reason(reason, what="prompt")
    if demo.status != DemonstrationStatus.skipped:
        demo.status = DemonstrationStatus.skipped
        demo.skip_reason = reason
        demo.expires_at = None
        demo.updated_at = lease_clock(session, now)
    session.commit()
    return demo


def start_from_model_answer(session: Session, *, user: User, demonstration_id: int, lease_s: int,
                            now: datetime | None = None) -> Demonstration:
    """Edit mode: the newest model answer to the prompt becomes the draft's text, and
    the demonstration is recorded as written from it. Raises NotFound when the prompt
    has no model answer, NotAllowed, Conflict (not a draft any more). Commits."""
    demo = own_demonstration(session, user=user, demonstration_id=demonstration_id)
    if demo.status != DemonstrationStatus.draft:
        raise Conflict("This demonstration is no longer a draft.")
    answer = model_answer(session, demo.prompt_id)
    if answer is None:
        raise NotFound("There is no model answer for this prompt to start from.")
    now = lock_prompt(session, demo, now)
    demo.text = answer.text[:MAX_TEXT_CHARS]
    demo.edit_mode = True
    demo.updated_at = now
    renew_lease(session, demo, now=now, lease_s=lease_s)
    session.commit()
    return demo


def model_answer(session: Session, prompt_id: int) -> Response | None:
    """The newest model response to the prompt, for the editor's 'start from the model's answer'."""
    return session.scalar(
        select(Response).where(Response.prompt_id == prompt_id)
        .order_by(Response.round.desc(), Response.created_at.desc(), Response.sample_index).limit(1)
    )


@dataclass
class WriterCounts:
    submitted: int = 0
    accepted: int = 0
    rejected: int = 0


def writer_counts(session: Session, *, user: User) -> WriterCounts:
    """The labeler's own demonstrations by review outcome."""
    rows = dict(session.execute(
        select(Demonstration.status, func.count()).where(Demonstration.user_id == user.id)
        .group_by(Demonstration.status)
    ).all())
    return WriterCounts(
        submitted=sum(rows.get(s, 0) for s in DONE), accepted=rows.get(DemonstrationStatus.accepted, 0),
        rejected=rows.get(DemonstrationStatus.rejected, 0),
    )


def recent_rejections(session: Session, *, user: User, limit: int = 5) -> list[Demonstration]:
    """The labeler's latest rejected demonstrations, so they can read why."""
    return list(session.scalars(
        select(Demonstration).where(Demonstration.user_id == user.id,
                                    Demonstration.status == DemonstrationStatus.rejected)
        .order_by(Demonstration.reviewed_at.desc(), Demonstration.id.desc()).limit(limit)
    ))
