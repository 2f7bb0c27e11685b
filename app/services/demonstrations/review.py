"""Reviewing demonstrations: accept, reject with a reason the labeler reads, or
edit (the admin's text replaces the labeler's and the demonstration is
accepted). Only accepted demonstrations reach training and the export
(app/services/demonstrations/export).
"""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.enums import DemonstrationStatus, PromptSetKind, PromptSetStatus, Role
from app.db.models import Demonstration, Prompt, PromptSet, User
from app.services.demonstrations.leases import DONE
from app.services.demonstrations.writing import clean_text
from app.services.errors import Conflict, Invalid, NotFound
from app.services.validation import check_text

MAX_REASON_CHARS = 2_000


def list_demonstrations(session: Session, *, status: DemonstrationStatus | str = DemonstrationStatus.submitted,
                        prompt_set_id: int | None = None, limit: int = 50, offset: int = 0) -> list[Demonstration]:
    """Demonstrations in one status (of one set), least recently changed first."""
    query = (
        select(Demonstration)
        .join(Prompt, Prompt.id == Demonstration.prompt_id)
        .where(Demonstration.status == DemonstrationStatus(status))
        .order_by(Demonstration.updated_at, Demonstration.id)
        .limit(limit).offset(offset)
    )
    if prompt_set_id is not None:
        query = query.where(Prompt.prompt_set_id == prompt_set_id)
    return list(session.scalars(query))


def review_queue(session: Session, *, prompt_set_id: int | None = None, limit: int = 50) -> list[Demonstration]:
    """Submitted demonstrations waiting for review, oldest first."""
    return list_demonstrations(session, status=DemonstrationStatus.submitted, prompt_set_id=prompt_set_id,
                               limit=limit)


def count_waiting(session: Session, *, prompt_set_id: int | None = None) -> int:
    query = (
        select(func.count(Demonstration.id)).join(Prompt, Prompt.id == Demonstration.prompt_id)
        .where(Demonstration.status == DemonstrationStatus.submitted)
    )
    if prompt_set_id is not None:
        query = query.where(Prompt.prompt_set_id == prompt_set_id)
    return session.scalar(query) or 0


def _reviewable(session: Session, demonstration_id: int) -> Demonstration:
    demo = session.get(Demonstration, demonstration_id, with_for_update=True, populate_existing=True)
    if demo is None:
        raise NotFound(f"There is no demonstration {demonstration_id}.")
    if demo.status not in DONE:
        raise Conflict(f"Demonstration {demonstration_id} is a {demo.status.value} one, not submitted;"
                       " only submitted demonstrations can be reviewed.")
    return demo


def _reviewed(demo: Demonstration, status: DemonstrationStatus, reviewer: User, now: datetime,
              reason: str | None = None) -> None:
    demo.status = status
    demo.reject_reason = reason
    demo.reviewed_by_id = reviewer.id
    demo.reviewed_at = now


def accept_demonstration(session: Session, *, reviewer: User, demonstration_id: int, now: datetime) -> Demonstration:
    """Accept a submitted (or earlier rejected) demonstration: it becomes training data.
    Raises NotFound, Conflict for a draft or skipped one. Commits."""
    demo = _reviewable(session, demonstration_id)
    _reviewed(demo, DemonstrationStatus.accepted, reviewer, now)
    session.commit()
    return demo


def reject_demonstration(session: Session, *, reviewer: User, demonstration_id: int, reason: str,
                         now: datetime) -> Demonstration:
    """Reject with a reason the labeler can read; the prompt goes back to the pool for
    another labeler. Raises Invalid (no reason), NotFound, Conflict. Commits."""
    reason = check_text((reason or "").strip(), "reason")
    if not reason:
        raise Invalid("Say why the demonstration is rejected.", errors={"reason": "required"})
    if len(reason) > MAX_REASON_CHARS:
        raise Invalid(f"The reason is too long ({len(reason):,} characters; at most {MAX_REASON_CHARS:,}).",
                      errors={"reason": f"at most {MAX_REASON_CHARS:,} characters"})
    demo = _reviewable(session, demonstration_id)
    _reviewed(demo, DemonstrationStatus.rejected, reviewer, now, reason)
    session.commit()
    return demo


def edit_demonstration(session: Session, *, reviewer: User, demonstration_id: int, text: str,
                       now: datetime) -> Demonstration:
    """Replace the text with the reviewer's correction and accept it. Raises Invalid
    (empty or too long), NotFound, Conflict. Commits."""
    clean = clean_text(text, required=True)
    demo = _reviewable(session, demonstration_id)
    demo.text = clean
    demo.updated_at = now
    _reviewed(demo, DemonstrationStatus.accepted, reviewer, now)
    session.commit()
    return demo


@dataclass
class ReviewFigures:
    user_id: int
    username: str
    submitted: int = 0  # waiting for review
    accepted: int = 0
    rejected: int = 0
    skipped: int = 0
    time_spent_s: float = 0.0  # over submitted, accepted and rejected ones

    @property
    def reviewed(self) -> int:
        return self.accepted + self.rejected

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / reviewed; None before any review."""
        return self.accepted / self.reviewed if self.reviewed else None

    @property
    def mean_time_s(self) -> float | None:
        n = self.submitted + self.reviewed
        return self.time_spent_s / n if n else None


def acceptance_rates(session: Session, *, prompt_set_id: int | None = None) -> list[ReviewFigures]:
    """Per labeler: demonstrations waiting, accepted, rejected, skipped, and the review
    acceptance rate, by username. Only labeler accounts are listed (an import is
    stored as its admin's)."""
    query = (
        select(User.id, User.username, Demonstration.status, func.count(Demonstration.id),
               func.coalesce(func.sum(Demonstration.time_spent_s), 0.0))
        .join(Demonstration, Demonstration.user_id == User.id)
        .join(Prompt, Prompt.id == Demonstration.prompt_id)
        .where(Demonstration.status != DemonstrationStatus.draft, User.role == Role.labeler)
        .group_by(User.id, User.username, Demonstration.status)
    )
    if prompt_set_id is not None:
        query = query.where(Prompt.prompt_set_id == prompt_set_id)
    figures: dict[int, ReviewFigures] = {}
    for user_id, username, status, n, seconds in session.execute(query):
        f = figures.setdefault(user_id, ReviewFigures(user_id=user_id, username=username))
        setattr(f, DemonstrationStatus(status).value, n)
        if status in DONE:
            f.time_spent_s += float(seconds)
    return sorted(figures.values(), key=lambda f: f.username.lower())


def demonstration_sets(session: Session, *, include_archived: bool = False) -> list[PromptSet]:
    """Demonstration prompt sets, newest first."""
    query = select(PromptSet).where(PromptSet.kind == PromptSetKind.demonstration)
    if not include_archived:
        query = query.where(PromptSet.status != PromptSetStatus.archived)
    return list(session.scalars(query.order_by(PromptSet.created_at.desc(), PromptSet.id.desc())))
