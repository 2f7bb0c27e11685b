"""Progress of a set on hand-made data: tasks by state, labels per hour, time to finish."""

from datetime import UTC, datetime, timedelta

import pytest

from app.db.enums import AssignmentStatus
from app.db.models import Assignment
from app.services import gold
from app.services.progress import set_progress
from tests.factories import annotate, make_prompt_set, make_task, make_user, task_with_ids

NOW = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)


def at(hh: int, mm: int) -> datetime:
    return NOW.replace(hour=hh, minute=mm)


def test_tasks_by_state_labels_per_hour_and_eta(session):
    ps = make_prompt_set(session, k=3, overlap=2)
    ann, bob = make_user(session), make_user(session)
    done, d_ids = task_with_ids(session, ps)
    partly, p_ids = task_with_ids(session, ps)
    leased, _ = task_with_ids(session, ps)
    lapsed, _ = task_with_ids(session, ps)
    make_task(session, ps)  # untouched: waiting
    gold_task, g_ids = task_with_ids(session, ps)
    gold.mark_gold(session, prompt_set_id=ps.id, task_id=gold_task.id, best_response_id=g_ids[0])
    annotate(session, done, d_ids, ann, [1, 2, 3], created_at=at(10, 10))
    annotate(session, done, d_ids, bob, [1, 2, 3], created_at=at(11, 20))
    annotate(session, partly, p_ids, ann, [1, 2, 3], created_at=at(12, 5))
    annotate(session, gold_task, g_ids, ann, [1, 2, 3], created_at=at(12, 10))  # not a label towards the set
    session.add_all([
        Assignment(task_id=leased.id, user_id=bob.id, status=AssignmentStatus.active,
                   expires_at=NOW + timedelta(minutes=20)),
        Assignment(task_id=lapsed.id, user_id=bob.id, status=AssignmentStatus.active,
                   expires_at=NOW - timedelta(minutes=1)),  # lease ran out: the task waits again
    ])
    session.flush()

    p = set_progress(session, prompt_set_id=ps.id, now=NOW, hours=4)
    assert (p.tasks, p.done, p.in_progress, p.waiting, p.gold_tasks) == (5, 1, 2, 2, 1)
    assert p.labels_needed == 0 + 1 + 2 + 2 + 2
    assert p.labels_total == 3
    # The first label is 2h20m old, younger than the 24 h window: 3 labels / (7/3) h.
    assert p.rate_window_h == pytest.approx(7 / 3)
    assert p.rate_per_hour == pytest.approx(3 / (7 / 3))
    assert p.eta_hours == pytest.approx(7 / (9 / 7))
    assert [(h.hour.hour, h.labels) for h in p.per_hour] == [(9, 0), (10, 1), (11, 1), (12, 1)]
    assert all(h.hour.tzinfo is not None for h in p.per_hour)


def test_rate_over_the_last_day_once_the_set_is_older(session):
    ps = make_prompt_set(session, k=2, overlap=1)
    ann = make_user(session)
    for hours_ago in (50, 30, 20, 10, 2, 1):  # 4 labels inside the last 24 h
        task, ids = task_with_ids(session, ps)
        annotate(session, task, ids, ann, [1, 2], created_at=NOW - timedelta(hours=hours_ago))
    for _ in range(6):
        make_task(session, ps)
    p = set_progress(session, prompt_set_id=ps.id, now=NOW)
    assert p.rate_window_h == 24
    assert p.rate_per_hour == pytest.approx(4 / 24)
    assert p.eta_hours == pytest.approx(6 / (4 / 24))
    assert len(p.per_hour) == 48 and sum(h.labels for h in p.per_hour) == 5  # 50 h ago is outside


def test_eta_when_finished_and_when_nobody_labels(session):
    ps = make_prompt_set(session, k=2, overlap=1)
    ann = make_user(session)
    task, ids = task_with_ids(session, ps)
    annotate(session, task, ids, ann, [1, 2], created_at=NOW - timedelta(days=3))
    finished = set_progress(session, prompt_set_id=ps.id, now=NOW)
    assert finished.finished and finished.eta_hours == 0.0
    make_task(session, ps)
    stalled = set_progress(session, prompt_set_id=ps.id, now=NOW)
    assert stalled.rate_per_hour == 0.0 and stalled.eta_hours is None and stalled.labels_needed == 1


def test_an_empty_set(session):
    ps = make_prompt_set(session, k=3, overlap=2)
    p = set_progress(session, prompt_set_id=ps.id, now=NOW, hours=3)
    assert (p.tasks, p.done, p.in_progress, p.waiting, p.labels_needed) == (0, 0, 0, 0, 0)
    assert [h.labels for h in p.per_hour] == [0, 0, 0]
