"""Leases: overlap, never twice per labeler, expiry, reload, order, gold mixing, concurrency."""

import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text

from app.db.enums import AssignmentStatus, PromptSetStatus
from app.db.models import Annotation, Assignment, PromptSet, Task, User
from app.db.session import new_session, session_scope
from app.services import annotations
from app.services import assignment as assignment_service
from app.services.assignment import expire_leases, lease_next_task, skip_task
from app.services.errors import Conflict, Invalid, NotAllowed, NotFound
from app.services.labelers import allow_labeler
from app.services.prompt_sets import archive_prompt_set, pause_prompt_set
from tests.factories import make_prompt_set, make_task, make_user

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
LEASE_S = 1800


def lease(session, user, now=NOW):
    got = lease_next_task(session, user=user, now=now, lease_s=LEASE_S)
    return got.task if got else None


def submit(session, user, task, now=NOW, key=None):
    ids = [item.response_id for item in task.items]
    return annotations.submit_annotation(
        session, user=user, task_id=task.id,
        ratings={rid: 7 - i for i, rid in enumerate(ids)}, ranks={rid: i + 1 for i, rid in enumerate(ids)},
        idempotency_key=key or f"key-{user.id}-{task.id}-x", now=now,
    )


def test_reload_gives_back_the_same_leased_task(session):
    prompt_set = make_prompt_set(session, overlap=1)
    tasks = [make_task(session, prompt_set) for _ in range(3)]
    labeler = make_user(session)
    first = lease(session, labeler)
    assert first.id == tasks[0].id
    assert lease(session, labeler, NOW + timedelta(minutes=10)).id == first.id
    assert session.scalar(select(Assignment.expires_at).where(Assignment.user_id == labeler.id)) \
        == NOW + timedelta(seconds=LEASE_S)


def test_a_task_past_the_shortlist_is_found_when_the_first_are_all_leased(session, monkeypatch):
    # Only the first _SHORTLIST candidates are counted at first; full ones there must
    # not hide a free task further down the order.
    monkeypatch.setattr(assignment_service, "_SHORTLIST", 2)
    prompt_set = make_prompt_set(session, overlap=1)
    tasks = [make_task(session, prompt_set) for _ in range(4)]
    got = [lease(session, make_user(session)) for _ in range(4)]
    assert [task.id for task in got] == [task.id for task in tasks]
    assert lease(session, make_user(session)) is None


def test_overlap_respected_and_never_twice_per_labeler(session):
    prompt_set = make_prompt_set(session, overlap=2)
    task = make_task(session, prompt_set)
    a, b, c = (make_user(session) for _ in range(3))
    assert lease(session, a).id == task.id
    assert lease(session, b).id == task.id
    assert lease(session, c) is None  # two holders already
    submit(session, a, task)
    assert lease(session, a) is None  # never the same task twice
    submit(session, b, task)
    assert lease(session, c) is None
    assert session.get(Task, task.id).num_labels == 2
    assert session.scalar(select(Assignment).where(Assignment.task_id == task.id, Assignment.user_id == c.id)) is None


def test_expired_lease_returns_the_task_to_the_pool(session):
    prompt_set = make_prompt_set(session, overlap=1)
    task = make_task(session, prompt_set)
    a, b = make_user(session), make_user(session)
    assert lease(session, a).id == task.id
    assert lease(session, b, NOW + timedelta(seconds=LEASE_S - 1)) is None
    later = NOW + timedelta(seconds=LEASE_S + 1)
    assert lease(session, b, later).id == task.id
    # a's own lease ran out and the task is b's now.
    assert lease(session, a, later) is None
    row = session.scalar(select(Assignment).where(Assignment.user_id == a.id))
    assert row.status == AssignmentStatus.expired
    with pytest.raises(Conflict, match="ran out"):
        submit(session, a, task, now=later)


def test_same_labeler_re_leases_an_expired_task_on_the_same_row(session):
    prompt_set = make_prompt_set(session, overlap=1)
    task = make_task(session, prompt_set)
    a = make_user(session)
    lease(session, a)
    first_id = session.scalar(select(Assignment.id).where(Assignment.user_id == a.id))
    later = NOW + timedelta(hours=2)
    assert lease(session, a, later).id == task.id
    rows = session.scalars(select(Assignment).where(Assignment.user_id == a.id)).all()
    assert [(r.id, r.status, r.expires_at) for r in rows] == [
        (first_id, AssignmentStatus.active, later + timedelta(seconds=LEASE_S))
    ]
    submit(session, a, task, now=later + timedelta(minutes=1))
    assert session.get(Task, task.id).num_labels == 1


def test_partially_labeled_tasks_are_finished_first(session):
    prompt_set = make_prompt_set(session, overlap=3)
    old = make_task(session, prompt_set, created_at=NOW - timedelta(days=2))
    newer = make_task(session, prompt_set, created_at=NOW - timedelta(days=1))
    first = make_user(session)
    # Someone labeled the newer task already (their lease on `old` is long gone).
    session.add(Assignment(task_id=newer.id, user_id=first.id, expires_at=NOW, status=AssignmentStatus.active,
                           leased_at=NOW - timedelta(hours=1)))
    session.flush()
    submit(session, first, newer, now=NOW - timedelta(minutes=30))
    labeler = make_user(session)
    assert lease(session, labeler).id == newer.id
    # Among unlabeled tasks, the oldest comes first.
    other = make_user(session)
    session.add(Assignment(task_id=newer.id, user_id=other.id, expires_at=NOW, status=AssignmentStatus.skipped))
    session.flush()
    assert lease(session, other).id == old.id


def test_only_active_sets_the_labeler_is_allowed_on(session):
    labeler, someone = make_user(session), make_user(session)
    paused = make_prompt_set(session, status=PromptSetStatus.paused)
    make_task(session, paused)
    closed = make_prompt_set(session, allowed=[someone])
    make_task(session, closed)
    assert lease(session, labeler) is None
    assert lease(session, someone).prompt_set_id == closed.id
    mine = make_prompt_set(session, allowed=[labeler, someone])
    task = make_task(session, mine)
    assert lease(session, labeler).id == task.id


def test_tasks_of_an_earlier_round_are_not_offered(session):
    prompt_set = make_prompt_set(session)
    make_task(session, prompt_set)
    prompt_set.round = 2
    session.flush()
    assert lease(session, make_user(session)) is None


def test_skipped_task_goes_to_others_and_never_back(session):
    prompt_set = make_prompt_set(session, overlap=1)
    task = make_task(session, prompt_set)
    a, b = make_user(session), make_user(session)
    lease(session, a)
    with pytest.raises(Invalid) as err:
        skip_task(session, user=a, task_id=task.id, reason="  ", now=NOW)
    assert "reason" in err.value.errors
    skip_task(session, user=a, task_id=task.id, reason="I cannot judge this topic", now=NOW)
    row = session.scalar(select(Assignment).where(Assignment.user_id == a.id))
    assert (row.status, row.skip_reason) == (AssignmentStatus.skipped, "I cannot judge this topic")
    assert lease(session, a, NOW + timedelta(hours=3)) is None
    assert lease(session, b).id == task.id
    with pytest.raises(NotFound):  # never given it: as if there were no such task
        skip_task(session, user=make_user(session), task_id=task.id, reason="no", now=NOW)


def test_gold_tasks_are_mixed_in_at_the_gold_rate_and_ignore_overlap(session):
    prompt_set = make_prompt_set(session, overlap=1, gold_rate=0.5)
    normal = [make_task(session, prompt_set) for _ in range(4)]
    gold = [make_task(session, prompt_set, is_gold=True) for _ in range(2)]
    a, b = make_user(session), make_user(session)
    got = []
    now = NOW
    for _ in range(5):
        task = lease(session, a, now)
        got.append(task.is_gold)
        submit(session, a, task, now=now)
        now += timedelta(minutes=1)
    # Every second task is gold while gold tasks last; then only ordinary ones.
    assert got == [False, True, False, True, False]
    assert [t.id for t in session.scalars(select(Task).join(Assignment).where(Assignment.user_id == a.id)
                                          .order_by(Assignment.leased_at))] == \
        [normal[0].id, gold[0].id, normal[1].id, gold[1].id, normal[2].id]
    # b gets a gold task a already answered although the overlap is 1.
    sequence = []
    for _ in range(3):
        task = lease(session, b, now)
        sequence.append(task.id if task else None)
        if task:
            submit(session, b, task, now=now)
        now += timedelta(minutes=1)
    assert sequence == [normal[3].id, gold[0].id, None]


def test_gold_tasks_are_not_served_when_the_rate_is_zero(session):
    prompt_set = make_prompt_set(session, gold_rate=0.0)
    make_task(session, prompt_set, is_gold=True)
    assert lease(session, make_user(session)) is None


def test_expire_leases_marks_overdue_leases(session):
    prompt_set = make_prompt_set(session, overlap=2)
    make_task(session, prompt_set)
    a, b = make_user(session), make_user(session)
    lease(session, a)
    lease(session, b, NOW + timedelta(minutes=20))
    assert expire_leases(session, now=NOW + timedelta(seconds=LEASE_S)) == 1
    statuses = dict(session.execute(select(Assignment.user_id, Assignment.status)).all())
    assert statuses == {a.id: AssignmentStatus.expired, b.id: AssignmentStatus.active}


def test_fifty_concurrent_labelers_never_exceed_the_overlap(committed):
    with session_scope() as s:
        prompt_set = make_prompt_set(s, overlap=3)
        task_ids = [make_task(s, prompt_set).id for _ in range(10)]
        users = [User(username=f"crowd{i}", role="labeler", password_hash="-") for i in range(50)]
        s.add_all(users)
        s.flush()
        user_ids = [u.id for u in users]
    barrier = threading.Barrier(len(user_ids))
    results: dict[int, int | None] = {}
    errors: list[BaseException] = []
    now = datetime.now(UTC)

    def labeler(user_id: int) -> None:
        try:
            barrier.wait()
            with new_session() as s:
                got = lease_next_task(s, user=s.get(User, user_id), now=now, lease_s=LEASE_S)
                results[user_id] = got.task.id if got else None
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=labeler, args=(uid,)) for uid in user_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    per_task = Counter(tid for tid in results.values() if tid is not None)
    assert max(per_task.values()) <= 3
    # Capacity is 10 tasks x 3: every slot is taken and nobody got two leases.
    assert sum(per_task.values()) == 30
    with session_scope() as s:
        rows = s.execute(select(Assignment.task_id, Assignment.user_id)).all()
        assert len(rows) == 30
        assert len({u for _, u in rows}) == 30
        assert all(n <= 3 for n in Counter(t for t, _ in rows).values())
        assert set(Counter(t for t, _ in rows)) == set(task_ids)
        assert s.get(PromptSet, prompt_set.id).overlap == 3


@pytest.mark.parametrize("change", ["paused", "archived", "restricted to others", "new round"])
def test_submit_is_refused_once_the_labeler_may_no_longer_label_the_task(session, change):
    a, someone = make_user(session), make_user(session)
    prompt_set = make_prompt_set(session, overlap=1)
    task = make_task(session, prompt_set)
    assert lease(session, a).id == task.id
    if change == "paused":
        pause_prompt_set(session, prompt_set=prompt_set)
    elif change == "archived":
        archive_prompt_set(session, prompt_set=prompt_set)
    elif change == "restricted to others":
        # The set was open to all; naming someone on its list shuts `a` out (their lease stays active).
        allow_labeler(session, prompt_set_id=prompt_set.id, user_id=someone.id)
    else:
        prompt_set.round += 1
        session.commit()
    expected = Conflict if change == "new round" else NotAllowed
    with pytest.raises(expected) as err:
        submit(session, a, task)
    assert prompt_set.name not in err.value.message
    assert session.scalar(select(func.count(Annotation.id))) == 0
    assert session.get(Task, task.id).num_labels == 0


def test_lease_times_come_from_the_database_clock(session):
    prompt_set = make_prompt_set(session)
    make_task(session, prompt_set)
    labeler = make_user(session)
    before = session.scalar(select(func.clock_timestamp()))
    got = lease_next_task(session, user=labeler, lease_s=LEASE_S)
    after = session.scalar(select(func.clock_timestamp()))
    # The transaction began before `before`: the lease is stamped with the clock read while leasing.
    assert before <= got.assignment.leased_at <= after
    assert got.assignment.expires_at == got.assignment.leased_at + timedelta(seconds=LEASE_S)


def _db_clock(s) -> datetime:
    return s.scalar(select(func.clock_timestamp()))


def test_a_submit_held_up_while_its_lease_runs_out_and_goes_to_another_is_refused(committed):
    """Overlap 1. a's submit starts while the lease is live but waits on a's own lock
    (another request of a's); meanwhile the lease runs out by the database's clock and
    b takes the task. a's submit must judge the lease by the clock read after its
    locks: 409, and the task ends with b's annotation only."""
    with session_scope() as s:
        prompt_set = make_prompt_set(s, overlap=1)
        task = make_task(s, prompt_set)
        a, b = (User(username=name, role="labeler", password_hash="-") for name in ("held-a", "quick-b"))
        s.add_all([a, b])
        s.flush()
        a_id, b_id, task_id, ids = a.id, b.id, task.id, [item.response_id for item in task.items]
    ratings, ranks = {r: 4 for r in ids}, {r: i + 1 for i, r in enumerate(ids)}
    with new_session() as s:
        expires_at = lease_next_task(s, user=s.get(User, a_id), lease_s=1).assignment.expires_at
    results: dict[str, object] = {}

    def late_submit() -> None:
        with new_session() as s:
            try:
                annotations.submit_annotation(s, user=s.get(User, a_id), task_id=task_id, ratings=ratings,
                                              ranks=ranks, idempotency_key="held-up-key")
                results["a"] = "stored"
            except Conflict as exc:
                results["a"] = exc.message

    with new_session() as blocker:
        blocker.execute(text("SELECT pg_advisory_xact_lock(CAST(:ns AS integer), CAST(:uid AS integer))"),
                        {"ns": assignment_service._LEASE_LOCK_NS, "uid": a_id})
        thread = threading.Thread(target=late_submit)
        thread.start()
        while _db_clock(blocker) <= expires_at:
            time.sleep(0.05)
        with new_session() as s:
            got = lease_next_task(s, user=s.get(User, b_id), lease_s=LEASE_S)
            assert got is not None and got.task.id == task_id
        assert thread.is_alive() and not results  # a's submit is still waiting
        blocker.commit()
    thread.join(30)
    assert "ran out" in str(results["a"])
    with new_session() as s:
        annotations.submit_annotation(s, user=s.get(User, b_id), task_id=task_id, ratings=ratings, ranks=ranks,
                                      idempotency_key="quick-b-key")
    with session_scope() as s:
        assert s.scalars(select(Annotation.user_id).where(Annotation.task_id == task_id)).all() == [b_id]
        assert s.get(Task, task_id).num_labels == 1


def test_a_lease_running_out_while_another_labeler_leases_never_gives_two_holders(committed):
    """Overlap 1. a's lease (1 s, stamped by the database clock) runs out while a submits
    and b keeps asking for a task: at no instant may both a's annotation and b's lease stand."""
    trials = 3
    with session_scope() as s:
        prompt_set = make_prompt_set(s, overlap=1)
        a = User(username="late-a", role="labeler", password_hash="-")
        b_users = [User(username=f"eager-b{i}", role="labeler", password_hash="-") for i in range(trials)]
        s.add_all([a, *b_users])
        s.flush()
        a_id, b_ids = a.id, [u.id for u in b_users]
    outcomes = []
    for trial, b_id in enumerate(b_ids):
        with session_scope() as s:
            task = make_task(s, s.get(PromptSet, prompt_set.id))
            task_id, ids = task.id, [item.response_id for item in task.items]
        with new_session() as s:
            got = lease_next_task(s, user=s.get(User, a_id), lease_s=1)
            assert got.task.id == task_id
            expires_at = got.assignment.expires_at
        results: dict[str, object] = {}

        def late_submit() -> None:
            with new_session() as s:
                # Aim at the instant the lease runs out (a little before, at, or after it).
                time.sleep(max(0.0, (expires_at - _db_clock(s)).total_seconds() + (trial - 1) * 0.01))
                try:
                    annotations.submit_annotation(
                        s, user=s.get(User, a_id), task_id=task_id, ratings={r: 4 for r in ids},
                        ranks={r: i + 1 for i, r in enumerate(ids)}, idempotency_key=f"late-key-{trial}")
                    results["a"] = "stored"
                except Conflict:
                    results["a"] = "refused"

        def eager_lease() -> None:
            with new_session() as s:
                user = s.get(User, b_id)
                while _db_clock(s) < expires_at + timedelta(seconds=0.5):
                    got = lease_next_task(s, user=user, lease_s=LEASE_S)
                    if got is not None:
                        results["b"] = got.task.id
                        return
                    time.sleep(0.005)

        threads = [threading.Thread(target=late_submit), threading.Thread(target=eager_lease)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        with session_scope() as s:
            annotated = s.scalar(select(func.count(Annotation.id)).where(Annotation.task_id == task_id))
            b_holds = s.scalar(select(func.count(Assignment.id)).where(
                Assignment.task_id == task_id, Assignment.user_id == b_id,
                Assignment.status == AssignmentStatus.active))
        assert annotated + b_holds <= 1, (trial, results)
        assert (results.get("a") == "stored") == (annotated == 1)
        assert (results.get("b") == task_id) == (b_holds == 1)
        outcomes.append(results.get("a"))
    assert set(outcomes) <= {"stored", "refused"}
