"""Which labeler labels which task: leases, overlap, skipping.

Rules:
- A labeler holds at most one lease at a time; asking again (a reload) gives the
  same task back until the lease expires (Settings.lease_s, default 30 minutes).
- A task's holders are its submitted assignments plus its active, unexpired
  leases. An ordinary task never gets more holders than its set's overlap, and
  never the same labeler twice (assignments are unique per task and labeler).
  An expired or released lease no longer holds the task; the same labeler may
  lease it again later (their row is reused).
- Tasks with labels already are offered first (finish the overlap before
  starting new tasks), then, in a set ordered by uncertainty, those of smallest
  reward-model margin (app/services/active_learning; tasks not scored yet after
  the scored ones), then the oldest.
- Only tasks of the current generation round of active ranking and evaluation
  sets (TASK_KINDS) the labeler is allowed on (a set listing no labelers is open to all).
- Gold tasks (a known answer, see app/services/gold) measure labelers, so every
  labeler may get each of them once: they ignore the overlap. They are mixed in
  at the set's gold_rate, deterministically per labeler: the (n+1)-th task a
  labeler finishes in a set is gold while their gold count is below
  floor((n+1) * gold_rate) and a gold task is left for them.

Concurrency: the chosen task row is locked with SELECT ... FOR UPDATE SKIP
LOCKED, and its holders are counted again by the statement that writes the lease
(a fresh statement, so it sees every lease committed meanwhile; it writes
nothing when the task has no room). Every path that adds a
holder goes through here, so concurrent labelers never exceed the overlap. A
transaction-scoped advisory lock per labeler serialises one labeler's own
requests (a double click never gives two leases).

Clock: lease times are the database's clock (clock_timestamp()), read after
the task row is locked, never the web process's: replicas whose clocks differ
agree on when a lease ran out, and a submit that waited for a lease being
written reads a clock later than the one that lease was granted by. So a lease
that one labeler found run out is run out for its holder's late submit too
(`lock_for_submit`), and the overlap holds even at the instant a lease expires.
A `now` passed in replaces the clock (tests move time with it).

Reading: a labeler sees a task only through `labeler_task` (a live lease on it,
or their own annotation of it); every other task id is "not found" to them.
"""

import functools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    DateTime,
    Float,
    Integer,
    Interval,
    and_,
    bindparam,
    case,
    exists,
    func,
    literal,
    null,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, aliased, joinedload

from app.db.enums import AssignmentStatus, PromptSetKind, PromptSetStatus, TaskOrder
from app.db.models import (
    Annotation,
    Assignment,
    PromptSet,
    Task,
    TaskResponse,
    TaskScore,
    User,
)
from app.services.errors import Conflict, Invalid, NotAllowed, NotFound
from app.services.labelers import labelable_sets, open_to
from app.services.validation import check_text

# Sets whose tasks (a prompt with responses to judge) are leased here; demonstration
# sets have leases of their own (app/services/demonstrations/leases.py).
TASK_KINDS = (PromptSetKind.ranking, PromptSetKind.evaluation)
# Namespace of the per-labeler advisory lock (any constant int4 of our own).
_LEASE_LOCK_NS = 7_301
_NOT_GIVEN = "You have not been given task {task_id}; open Label to get a task."
# Tasks found full after locking (a stale candidate) before giving up.
_MAX_ATTEMPTS = 50
# Candidates looked at first when picking a task (the whole set only when none of them will do).
_SHORTLIST = 64
MAX_SKIP_REASON = 500
SKIP_REASONS = (
    "I cannot judge this topic",
    "The responses are broken or unreadable",
    "The prompt is harmful or inappropriate",
    "Other",
)


@dataclass
class Lease:
    assignment: Assignment
    task: Task


def holders_clause(now: datetime):
    """SQL: the assignment holds its task (submitted, or leased and not expired)."""
    return or_(
        Assignment.status == AssignmentStatus.submitted,
        and_(Assignment.status == AssignmentStatus.active, Assignment.expires_at > now),
    )


def db_now(session: Session) -> datetime:
    """The database's clock now (not the transaction's start): the one clock of every replica."""
    return session.scalar(select(func.clock_timestamp())).astimezone(UTC)


def lease_clock(session: Session, now: datetime | None) -> datetime:
    """`now` when given (tests move time with it), else the database's clock."""
    return db_now(session) if now is None else now


def _holder_count(now: datetime):
    return (
        select(func.count(Assignment.id))
        .where(Assignment.task_id == Task.id, holders_clause(now))
        .correlate(Task)
        .scalar_subquery()
    )


def _eligible_sets(user_id: int):
    """SQL: the task's set is an active ranking or evaluation set, in its current round, open to the labeler."""
    return and_(labelable_sets(user_id, *TASK_KINDS), Task.round == PromptSet.round)


def _with_contents(query):
    """The query's Task loaded with its prompt, set and responses in display order, in
    the same statement (joins, not a query per relationship)."""
    return query.options(
        joinedload(Task.items).joinedload(TaskResponse.response),
        joinedload(Task.prompt),
        joinedload(Task.prompt_set),
    ).execution_options(populate_existing=True)


def load_task(session: Session, task_id: int) -> Task:
    """The task with its prompt, set and responses in display order, unchecked (for
    services; a labeler reads through `labeler_task`). Raises NotFound."""
    # One statement (joins, not a query per relationship): this runs on every "next".
    task = session.scalars(_with_contents(select(Task).where(Task.id == task_id))).unique().first()
    if task is None:
        raise NotFound(f"There is no task {task_id}.")
    return task


def labeler_task(session: Session, *, user: User, task_id: int, now: datetime | None = None) -> Task:
    """The task as the labeler may read it: one they hold a live lease on (active, not run
    out, in a set they may label now) or one they annotated. Raises NotFound for any
    other id, existing or not, so other labelers' tasks cannot be told apart from none."""
    clock = func.clock_timestamp() if now is None else now
    leased = exists().where(
        Assignment.task_id == Task.id, Assignment.user_id == user.id,
        Assignment.status == AssignmentStatus.active, Assignment.expires_at > clock,
    )
    annotated = exists().where(Annotation.task_id == Task.id, Annotation.user_id == user.id)
    found = session.scalar(
        select(Task.id).join(PromptSet, PromptSet.id == Task.prompt_set_id)
        .where(Task.id == task_id, or_(annotated, and_(leased, _eligible_sets(user.id))))
    )
    if found is None:
        raise NotFound(f"You hold no task {task_id}; open Label to get a task.")
    return load_task(session, task_id)


def current_lease(session: Session, *, user: User, now: datetime) -> Lease | None:
    """The labeler's active, unexpired lease on a task they may still label, if any,
    with the task's contents: one statement."""
    row = session.execute(_with_contents(
        select(Assignment, Task)
        .join(Task, Task.id == Assignment.task_id)
        .join(PromptSet, PromptSet.id == Task.prompt_set_id)
        .where(
            Assignment.user_id == user.id,
            Assignment.status == AssignmentStatus.active,
            Assignment.expires_at > now,
            _eligible_sets(user.id),
        )
        .order_by(Assignment.leased_at, Assignment.id)
        .limit(1)
    )).unique().first()
    return None if row is None else Lease(assignment=row[0], task=row[1])


def _gold_due_sets(user_id: int):
    """SQL: the ids of the active sets where the labeler's next task should be gold (see
    the module docstring); a subquery evaluated once per statement."""
    gold_set, labeled = aliased(PromptSet), aliased(Task)

    def done(*where):
        return (
            select(func.count()).select_from(Annotation)
            .join(labeled, labeled.id == Annotation.task_id)
            .where(Annotation.user_id == user_id, labeled.prompt_set_id == gold_set.id, *where)
            .scalar_subquery()
        )

    # 1e-9: (n+1)*rate computed in floats may land just under a whole number.
    return select(gold_set.id).where(
        gold_set.status == PromptSetStatus.active, gold_set.gold_rate > 0,
        done(labeled.is_gold) < func.floor((done() + 1) * gold_set.gold_rate + literal(1e-9, Float)),
    )


@functools.cache
def _pick_statement(*, shortlist: bool, skip_locked: bool, exclude: bool):
    """The statement of `_pick`, built once per variant (building it costs more CPU
    than running it); parameters user_id, now and exclude."""
    user_id = bindparam("user_id", type_=Integer)
    now = bindparam("now", type_=DateTime(timezone=True))
    mine = select(Assignment.task_id).where(
        Assignment.user_id == user_id,
        or_(
            Assignment.status.in_([AssignmentStatus.submitted, AssignmentStatus.skipped]),
            and_(Assignment.status == AssignmentStatus.active, Assignment.expires_at > now),
        ),
    )
    # Unsure first in sets ordered by uncertainty (NULL in others, and for tasks not scored yet: last).
    uncertainty = case((PromptSet.task_order == TaskOrder.uncertainty.value, TaskScore.margin), else_=null())
    order = (Task.is_gold.desc(), Task.num_labels.desc(), uncertainty.asc().nulls_last(), Task.created_at, Task.id)
    # num_labels (kept on the task) counts the submitted holders: a cheap first cut
    # before the leases are counted.
    ordinary = and_(~Task.is_gold, Task.num_labels < PromptSet.overlap)
    gold = and_(Task.is_gold, Task.prompt_set_id.in_(_gold_due_sets(user_id)))
    candidates = (
        select(Task.id)
        .join(PromptSet, PromptSet.id == Task.prompt_set_id)
        .outerjoin(TaskScore, TaskScore.task_id == Task.id)
        .where(_eligible_sets(user_id), Task.id.not_in(mine), or_(ordinary, gold))
    )
    if exclude:
        candidates = candidates.where(Task.id.not_in(bindparam("exclude", expanding=True)))
    has_room = Task.is_gold | (_holder_count(now) < PromptSet.overlap)
    if not shortlist:
        query = candidates.where(has_room)
    else:
        # Counting each candidate's holders is what costs (a subquery per task of
        # the set): count them for the first few in the order only.
        query = (
            select(Task.id)
            .join(PromptSet, PromptSet.id == Task.prompt_set_id)
            .outerjoin(TaskScore, TaskScore.task_id == Task.id)
            .where(Task.id.in_(candidates.order_by(*order).limit(_SHORTLIST)), has_room)
        )
    return query.order_by(*order).limit(1).with_for_update(of=Task, skip_locked=skip_locked)


def _pick(session: Session, *, user_id: int, now: datetime, exclude: set[int], skip_locked: bool,
          shortlist: bool = False) -> int | None:
    """Lock and return the id of the best candidate task, or None. With `shortlist`,
    only the first _SHORTLIST tasks in the order are looked at (see below)."""
    query = _pick_statement(shortlist=shortlist, skip_locked=skip_locked, exclude=bool(exclude))
    params = {"user_id": user_id, "now": now} | ({"exclude": sorted(exclude)} if exclude else {})
    return session.scalar(query, params)


@functools.cache
def _take_statement(*, clock_given: bool):
    """The statement of `_take`, built once; parameters take_task, take_user, lease,
    start and (with clock_given) now (no column's name: those would be read as values
    to write)."""
    task_id, user_id = bindparam("take_task", type_=Integer), bindparam("take_user", type_=Integer)
    clock = select(func.clock_timestamp().label("now")).cte("clock")  # read once per statement
    at = bindparam("now", type_=DateTime(timezone=True)) if clock_given else clock.c.now
    holders = (
        select(func.count(Assignment.id))
        .where(Assignment.task_id == task_id, holders_clause(at))
        .scalar_subquery()
    )
    # Never the row taken below: one statement must not change a row twice.
    table = Assignment.__table__
    ran_out = (
        update(table)
        .where(table.c.user_id == user_id, table.c.task_id != task_id,
               table.c.status == AssignmentStatus.active.value,
               table.c.expires_at <= bindparam("start", type_=DateTime(timezone=True)))
        .values(status=AssignmentStatus.expired.value)
        .cte("ran_out")
    )
    room = (
        select(at.label("now"))
        .select_from(Task)
        .join(PromptSet, PromptSet.id == Task.prompt_set_id)
        .join(clock, text("true"))
        .where(Task.id == task_id, Task.is_gold | (holders < PromptSet.overlap))
        .subquery("room")
    )
    values = {
        "task_id": task_id, "user_id": user_id,
        "status": literal(AssignmentStatus.active.value), "leased_at": room.c.now,
        "expires_at": room.c.now + bindparam("lease", type_=Interval),
        "finished_at": null(), "skip_reason": null(),
    }
    insert_ = pg_insert(table).from_select(list(values), select(*values.values()).select_from(room))
    return insert_.on_conflict_do_update(
        index_elements=[table.c.task_id, table.c.user_id],
        set_={name: insert_.excluded[name] for name in values if name not in ("task_id", "user_id")},
    ).add_cte(ran_out).returning(table.c.id)


def _take(session: Session, *, task_id: int, user_id: int, lease_s: int, start: datetime,
          now: datetime | None) -> int | None:
    """Under the task's row lock, in one new statement (so it sees every lease committed
    meanwhile): read the clock, and if the task has room at that instant, lease it to
    the labeler (their existing row on it is reused); returns the assignment's id, or
    None when the task has no room. The labeler's other leases that ran out by
    `start` are marked expired on the way."""
    params = {"take_task": task_id, "take_user": user_id, "lease": timedelta(seconds=lease_s), "start": start}
    return session.scalar(_take_statement(clock_given=now is not None), params | ({"now": now} if now else {}))


def _lock_labeler(session: Session, user_id: int) -> datetime:
    """Take the labeler's advisory lock; returns the database's clock read right after it."""
    return session.execute(
        text("SELECT pg_advisory_xact_lock(CAST(:ns AS integer), CAST(:uid AS integer)), clock_timestamp()"),
        {"ns": _LEASE_LOCK_NS, "uid": user_id},
    ).one()[1].astimezone(UTC)


def lease_next_task(session: Session, *, user: User, lease_s: int, now: datetime | None = None) -> Lease | None:
    """The labeler's current lease, or a new one on the best task they may take;
    None when nothing is left for them. Times are the database clock's unless
    `now` is given. Commits."""
    if lease_s <= 0:
        raise Invalid("The lease must last at least one second.", errors={"lease_s": "must be positive"})
    user_id = user.id
    locked_at = _lock_labeler(session, user_id)
    start = locked_at if now is None else now
    lease = current_lease(session, user=user, now=start)
    if lease is not None:
        session.commit()
        return lease
    tried: set[int] = set()
    for _ in range(_MAX_ATTEMPTS):
        # One of the first tasks in the order nearly always has room; only when none
        # of them has (all leased or being leased) is the whole set searched.
        task_id = _pick(session, user_id=user_id, now=start, exclude=tried, skip_locked=True, shortlist=True)
        if task_id is None:
            task_id = _pick(session, user_id=user_id, now=start, exclude=tried, skip_locked=True)
        if task_id is None:
            # Every candidate is locked by someone leasing it right now: wait for
            # one, it may still have room once that lease is written.
            task_id = _pick(session, user_id=user_id, now=start, exclude=tried, skip_locked=False)
        if task_id is None:
            break
        # The clock is read again under the row lock (see "Clock" above). A task found
        # full stays locked until the commit: it has no room for anyone else either.
        assignment_id = _take(session, task_id=task_id, user_id=user_id, lease_s=lease_s, start=start, now=now)
        if assignment_id is None:
            tried.add(task_id)
            continue
        # Read before the commit: no second transaction to read it.
        task, assignment = session.execute(_with_contents(
            select(Task, Assignment).join(Assignment, Assignment.task_id == Task.id)
            .where(Assignment.id == assignment_id)
        )).unique().one()
        session.commit()
        return Lease(assignment=assignment, task=task)
    # The labeler's own leases that ran out are marked as such (their rows are reused).
    session.execute(
        update(Assignment)
        .where(Assignment.user_id == user_id, Assignment.status == AssignmentStatus.active,
               Assignment.expires_at <= start)
        .values(status=AssignmentStatus.expired)
    )
    session.commit()
    return None


def clean_skip_reason(reason: str | None, *, what: str) -> str:
    """The skip reason, stripped; raises Invalid when it is empty, too long or not storable
    (shared by skipping a task and a demonstration prompt)."""
    reason = check_text((reason or "").strip(), "reason")
    if not reason:
        raise Invalid(f"Say why you skip this {what}.", errors={"reason": "choose or write a reason"})
    if len(reason) > MAX_SKIP_REASON:
        raise Invalid(f"The reason is too long ({len(reason)} characters; at most {MAX_SKIP_REASON}).",
                      errors={"reason": f"at most {MAX_SKIP_REASON} characters"})
    return reason


def skip_task(session: Session, *, user: User, task_id: int, reason: str,
              now: datetime | None = None) -> Assignment:
    """Give the task back, never to be offered to this labeler again. The labeler
    must have leased it. Raises NotFound (never given it), Conflict (submitted),
    then Invalid (no reason)."""
    assignment = session.scalar(
        select(Assignment)
        .where(Assignment.task_id == task_id, Assignment.user_id == user.id)
        .with_for_update()
    )
    if assignment is None:
        raise NotFound(_NOT_GIVEN.format(task_id=task_id))
    if assignment.status == AssignmentStatus.submitted:
        raise Conflict(f"You already submitted task {task_id}; it cannot be skipped any more.")
    reason = clean_skip_reason(reason, what="task")
    if assignment.status != AssignmentStatus.skipped:
        assignment.status = AssignmentStatus.skipped
        assignment.skip_reason = reason
        assignment.finished_at = lease_clock(session, now)
    session.commit()
    return assignment


@dataclass
class Hold:
    """A labeler's assignment on a task, both rows locked, and what was read after the
    locks: the clock, the task with its items and its set."""
    task: Task
    assignment: Assignment
    now: datetime
    open_to_labeler: bool  # the set is still open to the labeler
    stored_annotation_id: int | None  # the annotation stored under the given idempotency key


def lock_for_submit(session: Session, *, user: User, task_id: int, idempotency_key: str = "",
                    now: datetime | None = None) -> Hold:
    """Lock what a submission changes, in the order leasing takes the locks (the
    labeler's advisory lock, then the task row and their assignment), then read, in
    one new statement, the clock, the task's items and set (a pause committed
    before is seen) and the annotation already stored under `idempotency_key` (a
    retry). Raises NotFound when the labeler was never given the task."""
    _lock_labeler(session, user.id)
    locked = session.execute(
        select(Task.id, Assignment)
        .join(Assignment, and_(Assignment.task_id == Task.id, Assignment.user_id == user.id))
        .where(Task.id == task_id)
        .with_for_update(of=[Task, Assignment])
        .execution_options(populate_existing=True)
    ).first()
    if locked is None:
        raise NotFound(_NOT_GIVEN.format(task_id=task_id))
    clock = select(func.clock_timestamp().label("now")).cte("clock")  # read once, after the locks
    stored = (
        select(Annotation.id).where(Annotation.idempotency_key == idempotency_key).scalar_subquery()
        if idempotency_key else null()
    )
    # The items (response ids and positions) and the set, not the texts: a submission
    # is checked against those only.
    task, read_at, open_to_labeler, stored_id = session.execute(
        select(Task, clock.c.now, open_to(user.id), stored)
        .join(PromptSet, PromptSet.id == Task.prompt_set_id)
        .join(clock, text("true"))
        .where(Task.id == task_id)
        .options(joinedload(Task.items), joinedload(Task.prompt_set))
        .execution_options(populate_existing=True)
    ).unique().one()
    return Hold(task=task, assignment=locked[1], now=read_at.astimezone(UTC) if now is None else now,
                open_to_labeler=open_to_labeler, stored_annotation_id=stored_id)


def check_lease(hold: Hold) -> None:
    """Raise unless the labeler may submit the held task now: Conflict when they
    submitted it already, their lease ran out (it may be another labeler's now) or
    the task is of an earlier round; NotAllowed when its set is not active or no
    longer open to them."""
    task, assignment, prompt_set = hold.task, hold.assignment, hold.task.prompt_set
    if assignment.status == AssignmentStatus.submitted:
        raise Conflict(f"You already submitted task {task.id}; change it from your history instead.")
    if assignment.status != AssignmentStatus.active or assignment.expires_at <= hold.now:
        raise Conflict(f"Your lease on task {task.id} ran out, so it may have gone to another labeler. "
                       "Open Label to get a task.")
    if prompt_set.status != PromptSetStatus.active or prompt_set.kind not in TASK_KINDS:
        # The set's name is left out: a labeler never listed on it must not learn it here.
        raise NotAllowed(f"Task {task.id} cannot be labeled now: its prompt set is {prompt_set.status.value}."
                         " Open Label to get another task.")
    if not hold.open_to_labeler:
        raise NotAllowed(f"You are no longer among the labelers of task {task.id}'s prompt set."
                         " Open Label to get another task.")
    if task.round != prompt_set.round:
        raise Conflict(f"Task {task.id} belongs to an earlier round of its prompt set, which has moved on."
                       " Open Label to get a current task.")


def expire_leases(session: Session, *, now: datetime | None = None) -> int:
    """Mark every lease past its time (by the database's clock unless `now` is given)
    as expired (housekeeping: expired leases already stop holding their task without
    this). Returns how many. Commits."""
    now = lease_clock(session, now)
    count = session.execute(
        update(Assignment)
        .where(Assignment.status == AssignmentStatus.active, Assignment.expires_at <= now)
        .values(status=AssignmentStatus.expired)
    ).rowcount
    session.commit()
    return count
