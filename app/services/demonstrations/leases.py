"""Demonstration leases: which labeler writes for which prompt.

A demonstration row is created when a labeler is given a prompt: it is a draft
whose `expires_at` is the lease (Settings.lease_s). The rules are those of
ranking tasks (app/services/assignment):
- a labeler holds at most one lease; asking again (a reload) gives the same
  prompt back, draft text included, until the lease expires;
- a prompt's holders are its submitted and accepted demonstrations plus its
  drafts with an unexpired lease; it never gets more than the set's overlap,
  and never the same labeler twice (the row is unique per prompt and labeler);
- a rejected demonstration no longer holds its prompt (it goes to another
  labeler), a skipped one never did;
- an expired draft keeps its text: its labeler gets it back first if the
  prompt still has room (autosave renews the lease while they write);
- prompts with demonstrations already come first (finish the overlap), then
  the oldest; only active demonstration sets the labeler is allowed on
  (app/services/labelers.open_to).
Concurrency: the prompt row is locked (FOR UPDATE SKIP LOCKED) and its holders
counted again before a lease is written; every path that adds a holder or
renews a lease locks the prompt first and then reads the database's clock (see
"Clock" in app/services/assignment). A per-labeler advisory lock serialises one
labeler's requests, so they always lock in the same order.

Reading: a labeler reads a demonstration only through `labeler_demonstration`
(their own); a submit also re-checks that its set is active and open to them.
"""

from datetime import datetime, timedelta

from sqlalchemy import and_, exists, func, or_, select, text
from sqlalchemy.orm import Session

from app.db.enums import DemonstrationStatus, PromptSetKind, PromptSetStatus
from app.db.models import Demonstration, Prompt, PromptSet, User
from app.services.assignment import lease_clock
from app.services.errors import Invalid, NotAllowed, NotFound
from app.services.labelers import is_allowed, labelable_sets

# Namespace of the per-labeler advisory lock (ranking leases use 7_301).
_LEASE_LOCK_NS = 7_302
_MAX_ATTEMPTS = 50
# Demonstrations that hold their prompt for good, and those a labeler has finished.
HOLDING = (DemonstrationStatus.submitted, DemonstrationStatus.accepted)
DONE = (DemonstrationStatus.submitted, DemonstrationStatus.accepted, DemonstrationStatus.rejected)


def holds(now: datetime):
    """SQL: the demonstration holds its prompt (submitted, accepted, or a draft still leased)."""
    return or_(
        Demonstration.status.in_(HOLDING),
        and_(Demonstration.status == DemonstrationStatus.draft, Demonstration.expires_at > now),
    )


def _writable_sets(user_id: int):
    """SQL: the set is an active demonstration set open to the labeler."""
    return labelable_sets(user_id, PromptSetKind.demonstration)


def load_demonstration(session: Session, demonstration_id: int) -> Demonstration:
    """The demonstration with its prompt and set, unchecked (admins' review; a labeler
    reads through `labeler_demonstration`). Raises NotFound."""
    demo = session.get(Demonstration, demonstration_id, populate_existing=True)
    if demo is None:
        raise NotFound(f"There is no demonstration {demonstration_id}.")
    return demo


def current_demonstration(session: Session, *, user: User, now: datetime) -> Demonstration | None:
    """The labeler's draft under an unexpired lease, on a set they may still write for."""
    return session.scalar(
        select(Demonstration)
        .join(Prompt, Prompt.id == Demonstration.prompt_id)
        .join(PromptSet, PromptSet.id == Prompt.prompt_set_id)
        .where(
            Demonstration.user_id == user.id,
            Demonstration.status == DemonstrationStatus.draft,
            Demonstration.expires_at > now,
            _writable_sets(user.id),
        )
        .order_by(Demonstration.updated_at, Demonstration.id)
        .limit(1)
    )


def _holder_count(session: Session, prompt_id: int, now: datetime, *, except_id: int | None = None) -> int:
    query = select(func.count(Demonstration.id)).where(Demonstration.prompt_id == prompt_id, holds(now))
    if except_id is not None:
        query = query.where(Demonstration.id != except_id)
    return session.scalar(query) or 0


def _pick(session: Session, *, user_id: int, now: datetime, exclude: set[int], skip_locked: bool) -> int | None:
    """Lock and return the id of the best prompt for the labeler, or None."""
    # Every prompt the labeler has a row on is out, except their own expired drafts.
    mine_done = select(Demonstration.prompt_id).where(
        Demonstration.user_id == user_id,
        or_(Demonstration.status != DemonstrationStatus.draft, Demonstration.expires_at > now),
    )
    own_draft = exists().where(
        Demonstration.prompt_id == Prompt.id, Demonstration.user_id == user_id,
        Demonstration.status == DemonstrationStatus.draft,
    )
    holders = (
        select(func.count(Demonstration.id))
        .where(Demonstration.prompt_id == Prompt.id, holds(now))
        .correlate(Prompt)
        .scalar_subquery()
    )
    query = (
        select(Prompt.id)
        .join(PromptSet, PromptSet.id == Prompt.prompt_set_id)
        .where(_writable_sets(user_id), Prompt.id.not_in(mine_done), holders < PromptSet.overlap)
        .order_by(own_draft.desc(), holders.desc(), Prompt.created_at, Prompt.id)
        .limit(1)
        .with_for_update(of=Prompt, skip_locked=skip_locked)
    )
    if exclude:
        query = query.where(Prompt.id.not_in(exclude))
    return session.scalar(query)


def _overlap_of(session: Session, prompt_id: int) -> int:
    return session.scalar(
        select(PromptSet.overlap).join(Prompt, Prompt.prompt_set_id == PromptSet.id).where(Prompt.id == prompt_id)
    )


def _lock_writer(session: Session, user_id: int) -> None:
    session.execute(text("SELECT pg_advisory_xact_lock(CAST(:ns AS integer), CAST(:uid AS integer))"),
                    {"ns": _LEASE_LOCK_NS, "uid": user_id})


def lease_next_demonstration(session: Session, *, user: User, lease_s: int,
                             now: datetime | None = None) -> Demonstration | None:
    """The labeler's current draft, or a new lease on the best prompt they may write
    for; None when nothing is left for them. Times are the database clock's unless
    `now` is given. Commits."""
    if lease_s <= 0:
        raise Invalid("The lease must last at least one second.", errors={"lease_s": "must be positive"})
    user_id = user.id
    _lock_writer(session, user_id)
    start = lease_clock(session, now)
    demo = current_demonstration(session, user=user, now=start)
    if demo is not None:
        session.commit()
        return demo
    tried: set[int] = set()
    for _ in range(_MAX_ATTEMPTS):
        # A savepoint per attempt: rolling it back releases the lock on a prompt found full.
        attempt = session.begin_nested()
        prompt_id = _pick(session, user_id=user_id, now=start, exclude=tried, skip_locked=True)
        if prompt_id is None:
            # Every candidate is being leased by someone right now: wait for one.
            prompt_id = _pick(session, user_id=user_id, now=start, exclude=tried, skip_locked=False)
        if prompt_id is None:
            attempt.rollback()
            break
        now_locked = lease_clock(session, now)  # read under the prompt's row lock
        if _holder_count(session, prompt_id, now_locked) >= _overlap_of(session, prompt_id):
            attempt.rollback()
            tried.add(prompt_id)
            continue
        demo = session.scalar(
            select(Demonstration).where(Demonstration.prompt_id == prompt_id, Demonstration.user_id == user_id)
        )
        if demo is None:
            demo = Demonstration(prompt_id=prompt_id, user_id=user_id, status=DemonstrationStatus.draft,
                                 text="", created_at=now_locked)
            session.add(demo)
        assert demo.status == DemonstrationStatus.draft  # _pick only offers the labeler's own drafts again
        demo.expires_at = now_locked + timedelta(seconds=lease_s)
        demo.updated_at = now_locked
        attempt.commit()
        session.commit()
        return demo
    session.commit()
    return None


def labeler_demonstration(session: Session, *, user: User, demonstration_id: int,
                          lock: bool = False) -> Demonstration:
    """The labeler's own demonstration, the only way a labeler reads one; a draft only
    while its set is active and open to them (`lock`: taken for a change, after the
    labeler's advisory lock). Raises NotFound, or NotAllowed (another labeler's, or
    a draft of a set closed to them)."""
    if lock:
        _lock_writer(session, user.id)
    demo = session.get(Demonstration, demonstration_id, with_for_update=lock, populate_existing=True)
    if demo is None:
        raise NotFound(f"There is no demonstration {demonstration_id}; open Write to get a prompt.")
    if demo.user_id != user.id:
        raise NotAllowed(f"Demonstration {demonstration_id} is not yours; open Write to get a prompt.")
    if demo.status == DemonstrationStatus.draft:
        _check_open(session, demo, user)
    return demo


def own_demonstration(session: Session, *, user: User, demonstration_id: int) -> Demonstration:
    return labeler_demonstration(session, user=user, demonstration_id=demonstration_id, lock=True)


def lock_prompt(session: Session, demo: Demonstration, now: datetime | None) -> datetime:
    """Lock the demonstration's prompt row, as leasing does, and read the clock after it:
    a lease another labeler was granted meanwhile is then seen, and so is its time."""
    session.execute(select(Prompt.id).where(Prompt.id == demo.prompt_id).with_for_update())
    return lease_clock(session, now)


def renew_lease(session: Session, demo: Demonstration, *, now: datetime, lease_s: int) -> bool:
    """Extend the draft's lease (its prompt locked by lock_prompt, `now` read after);
    an expired one only while its prompt still has room. Returns whether the
    labeler holds the prompt now."""
    if demo.expires_at is None or demo.expires_at <= now:
        if _holder_count(session, demo.prompt_id, now, except_id=demo.id) >= _overlap_of(session, demo.prompt_id):
            return False
    demo.expires_at = now + timedelta(seconds=lease_s)
    return True


def _check_open(session: Session, demo: Demonstration, user: User) -> None:
    """Raise NotAllowed unless the demonstration's set is an active demonstration set
    open to the labeler (the set's name is left out of the message)."""
    prompt_set = session.get(PromptSet, demo.prompt.prompt_set_id, populate_existing=True)
    if prompt_set.status != PromptSetStatus.active or prompt_set.kind != PromptSetKind.demonstration:
        raise NotAllowed(f"This prompt's set is {prompt_set.status.value}: its prompts cannot be written now."
                         " Open Write for another prompt.")
    if not is_allowed(session, prompt_set_id=prompt_set.id, user_id=user.id):
        raise NotAllowed("You are no longer among the writers of this prompt's set. Open Write for another prompt.")
