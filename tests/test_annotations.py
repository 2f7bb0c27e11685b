"""Submitting annotations: validation, comparisons, idempotency, edits, counts, history."""

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from app.db.enums import AssignmentStatus
from app.db.models import Annotation, Assignment, Comparison, Rating, Task, User
from app.db.session import new_session, session_scope
from app.services import annotations
from app.services.annotations import (
    MAX_TIME_SPENT_S,
    expand_comparisons,
    ranking_contradictions,
)
from app.services.assignment import lease_next_task
from app.services.errors import Conflict, Invalid, NotFound
from tests.factories import make_prompt_set, make_task, make_user

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def leased_task(session, user, *, k=4, overlap=1, **task_kwargs):
    prompt_set = make_prompt_set(session, k=k, overlap=overlap)
    task = make_task(session, prompt_set, **task_kwargs)
    got = lease_next_task(session, user=user, now=NOW, lease_s=1800)
    assert got.task.id == task.id
    return got.task


def ids_of(task):
    return [item.response_id for item in task.items]  # display order A, B, C...


def submit(session, user, task, ratings, ranks, *, key="form-key-0001", now=NOW, **kwargs):
    ids = ids_of(task)
    return annotations.submit_annotation(
        session, user=user, task_id=task.id, ratings=dict(zip(ids, ratings)), ranks=dict(zip(ids, ranks)),
        idempotency_key=key, now=now, **kwargs,
    )


def stored_pairs(session, annotation_id):
    return sorted(session.execute(
        select(Comparison.chosen_response_id, Comparison.rejected_response_id,
               Comparison.rank_margin, Comparison.rating_margin)
        .where(Comparison.annotation_id == annotation_id)
    ).all())


# ---- pure rules ----

def test_full_ranking_expands_to_k_choose_2_pairs_with_margins():
    ratings = {10: 7, 11: 5, 12: 2, 13: 4}
    ranks = {10: 1, 11: 2, 12: 4, 13: 3}
    pairs = {(p.chosen, p.rejected): (p.rank_margin, p.rating_margin) for p in expand_comparisons(ratings, ranks)}
    assert pairs == {
        (10, 11): (1, 2), (10, 13): (2, 3), (10, 12): (3, 5),
        (11, 13): (1, 1), (11, 12): (2, 3), (13, 12): (1, 2),
    }


@pytest.mark.parametrize("k", range(2, 10))
def test_k_fully_ranked_give_k_k_minus_1_over_2(k):
    ranks = {rid: rid + 1 for rid in range(k)}
    assert len(expand_comparisons({rid: 4 for rid in ranks}, ranks)) == k * (k - 1) // 2


def test_ties_give_no_pairs():
    ratings = {1: 6, 2: 6, 3: 3}
    assert [(p.chosen, p.rejected) for p in expand_comparisons(ratings, {1: 1, 2: 1, 3: 2})] == [(1, 3), (2, 3)]
    assert expand_comparisons(ratings, {1: 2, 2: 2, 3: 2}) == []


def test_contradiction_is_higher_rating_with_worse_rank():
    assert ranking_contradictions({1: 6, 2: 4}, {1: 2, 2: 1}) == [(1, 2)]
    assert ranking_contradictions({1: 6, 2: 4}, {1: 1, 2: 2}) == []
    assert ranking_contradictions({1: 5, 2: 5}, {1: 2, 2: 1}) == []  # equal ratings: no contradiction
    assert ranking_contradictions({1: 6, 2: 4}, {1: 1, 2: 1}) == []  # a tie: no contradiction


# ---- submit ----

def test_submit_stores_ratings_comparisons_and_counts_the_label(session):
    labeler = make_user(session)
    task = leased_task(session, labeler)
    a, b, c, d = ids_of(task)
    result = submit(session, labeler, task, [7, 5, 2, 4], [1, 2, 4, 3], time_spent_s=42.5,
                    flags={c: ["hallucination", "harmful_advice"]}, prompt_flags=["unclear"], comment=" ok ")
    assert result.created and result.warnings == []
    annotation = session.get(Annotation, result.annotation.id)
    assert (annotation.time_spent_s, annotation.prompt_flags, annotation.comment) == (42.5, ["unclear"], "ok")
    ratings = {r.response_id: (r.likert, r.rank, r.flags) for r in session.scalars(
        select(Rating).where(Rating.annotation_id == annotation.id))}
    assert ratings == {a: (7, 1, []), b: (5, 2, []), c: (2, 4, ["hallucination", "harmful_advice"]), d: (4, 3, [])}
    assert stored_pairs(session, annotation.id) == sorted([
        (a, b, 1, 2), (a, d, 2, 3), (a, c, 3, 5), (b, d, 1, 1), (b, c, 2, 3), (d, c, 1, 2),
    ])
    assert session.get(Task, task.id).num_labels == 1
    assignment = session.scalar(select(Assignment).where(Assignment.task_id == task.id))
    assert (assignment.status, assignment.finished_at) == (AssignmentStatus.submitted, NOW)


def test_tied_responses_store_no_comparison(session):
    labeler = make_user(session)
    task = leased_task(session, labeler, k=3)
    a, b, c = ids_of(task)
    result = submit(session, labeler, task, [6, 6, 2], [1, 1, 2])
    assert stored_pairs(session, result.annotation.id) == sorted([(a, c, 1, 4), (b, c, 1, 4)])


def test_submit_returns_the_contradiction_warning_and_still_stores(session):
    labeler = make_user(session)
    task = leased_task(session, labeler, k=2)
    result = submit(session, labeler, task, [7, 3], [2, 1])
    assert result.created
    assert result.warnings == ["A is rated higher than B (7 vs 3) but ranked below it (2 vs 1)."]
    assert stored_pairs(session, result.annotation.id) == [(ids_of(task)[1], ids_of(task)[0], 1, -4)]


def test_invalid_submission_names_each_field_and_stores_nothing(session):
    labeler = make_user(session)
    task = leased_task(session, labeler)
    a, b, c, d = ids_of(task)
    with pytest.raises(Invalid) as err:
        annotations.submit_annotation(
            session, user=labeler, task_id=task.id,
            ratings={a: 7, b: "8", c: "x"}, ranks={a: 1, b: 1, c: 5, d: 0},
            flags={a: ["made_up"]}, prompt_flags=["boring"], idempotency_key="form-key-0002", now=NOW,
        )
    errors = err.value.errors
    assert set(errors) == {f"rating-{b}", f"rating-{c}", f"rating-{d}", f"rank-{c}", f"rank-{d}",
                           f"flags-{a}", "prompt_flags"}
    assert "from 1 to 7" in errors[f"rating-{b}"]
    assert "rate D" in errors[f"rating-{d}"]
    assert "1 to 4" in errors[f"rank-{c}"]
    assert session.scalar(select(func.count(Annotation.id))) == 0
    assert session.get(Task, task.id).num_labels == 0


def test_a_response_of_another_task_is_refused(session):
    labeler = make_user(session)
    task = leased_task(session, labeler, k=2)
    a, b = ids_of(task)
    with pytest.raises(Invalid) as err:
        annotations.submit_annotation(session, user=labeler, task_id=task.id, ratings={a: 5, b: 5, 999999: 5},
                                      ranks={a: 1, b: 2}, idempotency_key="form-key-0003", now=NOW)
    assert "ratings" in err.value.errors


def test_submit_needs_a_lease(session):
    prompt_set = make_prompt_set(session, k=2)
    task = make_task(session, prompt_set)
    with pytest.raises(NotFound):
        submit(session, make_user(session), task, [5, 4], [1, 2])


def test_idempotency_key_is_required(session):
    labeler = make_user(session)
    task = leased_task(session, labeler, k=2)
    with pytest.raises(Invalid) as err:
        submit(session, labeler, task, [5, 4], [1, 2], key="")
    assert "idempotency_key" in err.value.errors


def test_time_spent_is_clamped(session):
    labeler = make_user(session)
    task = leased_task(session, labeler, k=2)
    result = submit(session, labeler, task, [5, 4], [1, 2], time_spent_s=10**7)
    assert result.annotation.time_spent_s == MAX_TIME_SPENT_S
    assert annotations.clamp_time_spent(-5) == 0
    assert annotations.clamp_time_spent("nonsense") == 0


def test_retried_submit_with_the_same_key_returns_the_stored_annotation(session):
    labeler = make_user(session)
    task = leased_task(session, labeler, k=2)
    first = submit(session, labeler, task, [5, 4], [1, 2])
    again = submit(session, labeler, task, [1, 1], [2, 1], now=NOW + timedelta(seconds=3))
    assert not again.created and again.annotation.id == first.annotation.id
    assert session.scalar(select(func.count(Annotation.id))) == 1
    assert session.get(Task, task.id).num_labels == 1
    with pytest.raises(Conflict, match="already submitted"):
        submit(session, labeler, task, [5, 4], [1, 2], key="another-form-key")


def test_concurrent_double_submit_stores_one_annotation(committed):
    with session_scope() as s:
        user = User(username="double", role="labeler", password_hash="-")
        s.add(user)
        s.flush()
        prompt_set = make_prompt_set(s, k=3)
        task = make_task(s, prompt_set)
        lease_next_task(s, user=user, now=datetime.now(UTC), lease_s=1800)
        user_id, task_id, ids = user.id, task.id, ids_of(task)
    barrier = threading.Barrier(8)
    results, errors = [], []

    def click() -> None:
        try:
            barrier.wait()
            with new_session() as s:
                got = annotations.submit_annotation(
                    s, user=s.get(User, user_id), task_id=task_id, ratings=dict(zip(ids, [6, 4, 2])),
                    ranks=dict(zip(ids, [1, 2, 3])), idempotency_key="double-click-key", now=datetime.now(UTC),
                )
                results.append((got.annotation.id, got.created))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=click) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len({aid for aid, _ in results}) == 1
    assert sorted(created for _, created in results) == [False] * 7 + [True]
    with session_scope() as s:
        assert s.scalar(select(func.count(Annotation.id))) == 1
        assert s.scalar(select(func.count(Comparison.id))) == 3
        assert s.get(Task, task_id).num_labels == 1


# ---- edit ----

def test_edit_replaces_ratings_and_comparisons(session):
    labeler = make_user(session)
    task = leased_task(session, labeler, k=3)
    a, b, c = ids_of(task)
    first = submit(session, labeler, task, [7, 4, 1], [1, 2, 3])
    assert len(stored_pairs(session, first.annotation.id)) == 3
    edited = annotations.edit_annotation(
        session, user=labeler, annotation_id=first.annotation.id, ratings={a: 2, b: 6, c: 6},
        ranks={a: 2, b: 1, c: 1}, flags={a: ["moral_judgment"]}, prompt_flags=["harmful"], comment="changed",
        now=NOW + timedelta(hours=23),
    )
    assert edited.annotation.id == first.annotation.id
    assert stored_pairs(session, first.annotation.id) == sorted([(b, a, 1, 4), (c, a, 1, 4)])
    ratings = {r.response_id: (r.likert, r.rank, r.flags) for r in session.scalars(
        select(Rating).where(Rating.annotation_id == first.annotation.id))}
    assert ratings == {a: (2, 2, ["moral_judgment"]), b: (6, 1, []), c: (6, 1, [])}
    annotation = session.get(Annotation, first.annotation.id)
    assert (annotation.comment, annotation.prompt_flags, annotation.updated_at) == \
        ("changed", ["harmful"], NOW + timedelta(hours=23))
    assert session.get(Task, task.id).num_labels == 1


def test_edit_is_refused_after_the_window_or_for_others(session):
    labeler = make_user(session)
    task = leased_task(session, labeler, k=2)
    a, b = ids_of(task)
    first = submit(session, labeler, task, [7, 4], [1, 2])
    values = dict(ratings={a: 1, b: 7}, ranks={a: 2, b: 1})
    with pytest.raises(Conflict, match="no longer be changed"):
        annotations.edit_annotation(session, user=labeler, annotation_id=first.annotation.id,
                                    now=NOW + timedelta(hours=24, seconds=1), **values)
    with pytest.raises(NotFound):
        annotations.edit_annotation(session, user=make_user(session), annotation_id=first.annotation.id,
                                    now=NOW, **values)
    with pytest.raises(Invalid):
        annotations.edit_annotation(session, user=labeler, annotation_id=first.annotation.id,
                                    ratings={a: 1}, ranks={a: 2, b: 1}, now=NOW)
    assert stored_pairs(session, first.annotation.id) == [(a, b, 1, 3)]


# ---- counts and history ----

def test_counts_today_and_total_and_history(session):
    labeler = make_user(session)
    prompt_set = make_prompt_set(session, k=2, name="History set")
    yesterday = NOW - timedelta(days=1)
    days = [yesterday, NOW - timedelta(hours=2), NOW - timedelta(minutes=5)]
    for i, when in enumerate(days):
        task = make_task(session, prompt_set, messages=[{"role": "user", "content": f"question {i}"}])
        assert lease_next_task(session, user=labeler, now=when, lease_s=1800).task.id == task.id
        submit(session, labeler, task, [6, 3], [1, 2], key=f"history-key-{i}", now=when)
    counts = annotations.labeler_counts(session, user=labeler, now=NOW)
    assert (counts.today, counts.total) == (2, 3)
    items = annotations.history(session, user=labeler, now=NOW + timedelta(hours=1))
    assert [i.prompt_text for i in items] == ["question 2", "question 1", "question 0"]
    assert [i.editable for i in items] == [True, True, False]
    assert items[0].prompt_set_name == "History set" and items[0].comparisons == 1
    assert [(r.letter, r.likert, r.rank) for r in items[0].ratings] == [("A", 6, 1), ("B", 3, 2)]
    assert annotations.history(session, user=make_user(session), now=NOW) == []
