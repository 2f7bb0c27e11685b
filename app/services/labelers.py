"""Labelers of a prompt set: who may label it, whose annotations count, and the
per-labeler table of the quality page.

Exclusion is a flag on each annotation (annotations.excluded): the data stays
stored, but agreement figures, exports and training data leave it out
(app/services/export.included_annotations is the one rule). Re-including
clears the flag, so everything comes back exactly as it was. Quarantine
(app/services/trust) is exclusion too: annotations stored while their labeler was
quarantined are excluded and marked quarantined.
"""

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.enums import AssignmentStatus, PromptSetKind, PromptSetStatus, Role, UserKind
from app.db.models import Annotation, Assignment, PromptSet, PromptSetLabeler, Task, User
from app.services.agreement import LabelerFigures, SetAgreement, compute_set_agreement
from app.services.errors import Invalid, NotFound
from app.services.prompt_sets import get_prompt_set

LABELING_ROLES = (Role.labeler, Role.admin)


# ---- allowed labelers ---------------------------------------------------------

def allowed_labelers(session: Session, *, prompt_set_id: int) -> list[User]:
    """The labelers allowed on the set, by name; an empty list means open to every labeler."""
    return list(session.scalars(
        select(User)
        .join(PromptSetLabeler, PromptSetLabeler.user_id == User.id)
        .where(PromptSetLabeler.prompt_set_id == prompt_set_id)
        .order_by(User.username)
    ))


def open_to(user_id: int, prompt_set_id: Any = PromptSet.id):
    """SQL: the set lists no labelers (open to every labeler) or lists this one: the one
    rule of who may label a set. `prompt_set_id` is a set's id, or by default the
    PromptSet row of the enclosing query."""
    listed_any = exists().where(PromptSetLabeler.prompt_set_id == prompt_set_id)
    listed_me = exists().where(PromptSetLabeler.prompt_set_id == prompt_set_id, PromptSetLabeler.user_id == user_id)
    return or_(~listed_any, listed_me)


def labelable_sets(user_id: int, *kinds: PromptSetKind):
    """SQL: the set is an active set of one of these kinds, open to the labeler."""
    kind = PromptSet.kind == kinds[0] if len(kinds) == 1 else PromptSet.kind.in_(kinds)
    return and_(PromptSet.status == PromptSetStatus.active, kind, open_to(user_id))


def is_allowed(session: Session, *, prompt_set_id: int, user_id: int) -> bool:
    """True when the set is open to all labelers or lists this one."""
    return bool(session.scalar(select(open_to(user_id, prompt_set_id))))


def _labeler(session: Session, *, user_id: int | None = None, username: str | None = None) -> User:
    if user_id is not None:
        user = session.get(User, user_id)
        if user is None:
            raise NotFound(f"No user with id {user_id}.")
    else:
        name = (username or "").strip()
        if not name:
            raise Invalid("Give the username of the labeler to allow.", errors={"username": "required"})
        user = session.scalar(select(User).where(User.username == name))
        if user is None:
            raise Invalid(f"No user named '{name}'.", errors={"username": "no such user"})
    if user.role not in LABELING_ROLES:
        raise Invalid(
            f"'{user.username}' is a {user.role.value} account; only labelers (and admins) can label.",
            errors={"username": "not a labeler"},
        )
    return user


def allow_labeler(session: Session, *, prompt_set_id: int, user_id: int | None = None,
                  username: str | None = None) -> User:
    """Add a labeler (by id or username) to the set's allowed list; allowing twice is harmless.
    Raises NotFound for an unknown set or id, Invalid for an unknown name or a non-labeler."""
    get_prompt_set(session, prompt_set_id)
    user = _labeler(session, user_id=user_id, username=username)
    if session.get(PromptSetLabeler, (prompt_set_id, user.id)) is None:
        session.add(PromptSetLabeler(prompt_set_id=prompt_set_id, user_id=user.id))
    session.commit()
    return user


def disallow_labeler(session: Session, *, prompt_set_id: int, user_id: int) -> None:
    """Remove a labeler from the allowed list. While the list still names others,
    the labeler's open leases on the set are released at once. Removing the last
    name opens the set to every labeler again."""
    get_prompt_set(session, prompt_set_id)
    session.execute(delete(PromptSetLabeler).where(
        PromptSetLabeler.prompt_set_id == prompt_set_id, PromptSetLabeler.user_id == user_id
    ))
    if not is_allowed(session, prompt_set_id=prompt_set_id, user_id=user_id):
        session.execute(
            update(Assignment)
            .where(
                Assignment.user_id == user_id,
                Assignment.status == AssignmentStatus.active,
                Assignment.task_id.in_(select(Task.id).where(Task.prompt_set_id == prompt_set_id)),
            )
            .values(status=AssignmentStatus.released, finished_at=utcnow())
        )
    session.commit()


def labeler_choices(session: Session, *, prompt_set_id: int) -> list[User]:
    """Active labelers not yet on the set's allowed list, for the 'add' form."""
    listed = select(PromptSetLabeler.user_id).where(PromptSetLabeler.prompt_set_id == prompt_set_id)
    return list(session.scalars(
        select(User)
        .where(User.role == Role.labeler, User.kind == UserKind.human, User.is_active, User.id.not_in(listed))
        .order_by(User.username)
    ))


# ---- exclusion ------------------------------------------------------------------

def set_excluded(session: Session, *, user_id: int, excluded: bool, prompt_set_id: int | None = None) -> int:
    """Exclude (or re-include) a labeler's annotations on one set, or on every set
    when prompt_set_id is None. Nothing is deleted. Returns how many annotations
    changed. Raises NotFound for an unknown user or set."""
    if session.get(User, user_id) is None:
        raise NotFound(f"No user with id {user_id}.")
    # A quarantined annotation (app/services/trust) excluded or included by hand is the
    # admin's decision from then on: lifting the quarantine no longer touches it.
    query = update(Annotation).where(Annotation.user_id == user_id,
                                     or_(Annotation.excluded != excluded, Annotation.quarantined))
    if prompt_set_id is not None:
        get_prompt_set(session, prompt_set_id)
        query = query.where(Annotation.task_id.in_(select(Task.id).where(Task.prompt_set_id == prompt_set_id)))
    changed = session.execute(query.values(excluded=excluded, quarantined=False)).rowcount
    session.commit()
    return changed


def annotation_counts(session: Session, *, prompt_set_id: int, user_id: int) -> tuple[int, int]:
    """(annotations, excluded ones) of the labeler on the set."""
    total, excluded = session.execute(
        select(func.count(Annotation.id), func.count(Annotation.id).filter(Annotation.excluded))
        .join(Task, Task.id == Annotation.task_id)
        .where(Task.prompt_set_id == prompt_set_id, Annotation.user_id == user_id)
    ).one()
    return total, excluded


# ---- the labeler table ----------------------------------------------------------

@dataclass
class LabelerRow:
    """One labeler of a set: account, how much of their work is excluded, and their figures."""

    user_id: int
    username: str
    is_active: bool
    ai: bool  # an AI labeler (app/services/ai_labelers): agreement with the human consensus, outside the set's figures
    annotations: int  # on this set, excluded ones included
    excluded: int  # of those, how many are excluded
    figures: LabelerFigures | None  # None when every annotation is excluded

    @property
    def fully_excluded(self) -> bool:
        return self.annotations > 0 and self.excluded == self.annotations

    @property
    def agreement(self) -> float | None:
        return self.figures.consensus_agreement if self.figures else None

    def below(self, threshold: float) -> bool:
        """Known agreement under the threshold (unknown agreement is not flagged)."""
        return self.agreement is not None and self.agreement < threshold


def labeler_rows(session: Session, *, prompt_set_id: int, agreement: SetAgreement | None = None,
                 user_id: int | None = None) -> list[LabelerRow]:
    """Every labeler with annotations on the set (one, when user_id is given), by
    name, joined with their agreement figures (computed unless given)."""
    get_prompt_set(session, prompt_set_id)
    if agreement is None:
        agreement = compute_set_agreement(session, prompt_set_id=prompt_set_id)
    figures = {f.user_id: f for f in agreement.labelers}
    query = (
        select(User.id, User.username, User.is_active, User.kind == UserKind.ai, func.count(Annotation.id),
               func.count(Annotation.id).filter(Annotation.excluded))
        .join(Annotation, Annotation.user_id == User.id)
        .join(Task, Task.id == Annotation.task_id)
        .where(Task.prompt_set_id == prompt_set_id)
        .group_by(User.id, User.username, User.is_active, User.kind)
        .order_by(User.username)
    )
    if user_id is not None:
        query = query.where(User.id == user_id)
    return [
        LabelerRow(user_id=uid, username=name, is_active=active, ai=ai, annotations=total, excluded=excluded,
                   figures=figures.get(uid))
        for uid, name, active, ai, total, excluded in session.execute(query)
    ]
