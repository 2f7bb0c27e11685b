"""Gold tasks: marking with a checked expected answer, the gold rate, gold accuracy."""

import pytest

from app.services import gold
from app.services.agreement import compute_set_agreement
from app.services.errors import Invalid, NotFound
from tests.factories import annotate, make_prompt_set, make_user, task_with_ids


def test_mark_gold_with_an_expected_ranking(session):
    ps = make_prompt_set(session, k=3, overlap=2)
    task, ids = task_with_ids(session, ps)
    marked = gold.mark_gold(session, prompt_set_id=ps.id, task_id=task.id,
                            ranking={ids[0]: "2", str(ids[1]): 1, ids[2]: 3})
    assert marked.is_gold
    assert marked.gold_ranking == {str(ids[0]): 2, str(ids[1]): 1, str(ids[2]): 3}
    assert [g.task.id for g in gold.list_gold_tasks(session, prompt_set_id=ps.id)] == [task.id]


def test_mark_gold_with_an_expected_best_response(session):
    ps = make_prompt_set(session, k=3, overlap=2)
    task, ids = task_with_ids(session, ps)
    marked = gold.mark_gold(session, prompt_set_id=ps.id, task_id=task.id, best_response_id=str(ids[2]))
    assert marked.gold_ranking == {str(ids[0]): 2, str(ids[1]): 2, str(ids[2]): 1}


@pytest.mark.parametrize("ranking, message", [
    ("missing", "rank required"),
    ("zero", "rank must be a whole number 1..3"),
    ("four", "rank must be a whole number 1..3"),
    ("word", "rank must be a whole number 1..3"),
    ("stranger", "is not part of task"),
    ("all tied", "nothing to score"),
])
def test_invalid_expected_rankings_are_refused_with_the_response_named(session, ranking, message):
    ps = make_prompt_set(session, k=3, overlap=2)
    task, ids = task_with_ids(session, ps)
    ranking = {
        "missing": {ids[0]: 1, ids[1]: 2},
        "zero": {ids[0]: 0, ids[1]: 1, ids[2]: 2},
        "four": {ids[0]: 1, ids[1]: 2, ids[2]: 4},
        "word": {ids[0]: "first", ids[1]: 2, ids[2]: 3},
        "stranger": {ids[0]: 1, ids[1]: 2, ids[2]: 3, 999_999: 1},
        "all tied": {ids[0]: 1, ids[1]: 1, ids[2]: 1},
    }[ranking]
    with pytest.raises(Invalid, match=message) as info:
        gold.mark_gold(session, prompt_set_id=ps.id, task_id=task.id, ranking=ranking)
    assert info.value.errors
    session.refresh(task)
    assert not task.is_gold and task.gold_ranking is None


def test_mark_gold_needs_exactly_one_answer_and_the_sets_own_task(session):
    ps, other = make_prompt_set(session, k=3, overlap=2), make_prompt_set(session, k=3, overlap=2)
    task, ids = task_with_ids(session, ps)
    with pytest.raises(Invalid, match="either an expected ranking or an expected best response"):
        gold.mark_gold(session, prompt_set_id=ps.id, task_id=task.id)
    with pytest.raises(Invalid, match="either"):
        gold.mark_gold(session, prompt_set_id=ps.id, task_id=task.id, ranking={ids[0]: 1}, best_response_id=ids[0])
    with pytest.raises(Invalid, match="not one of task"):
        gold.mark_gold(session, prompt_set_id=ps.id, task_id=task.id, best_response_id="12345678")
    with pytest.raises(NotFound):
        gold.mark_gold(session, prompt_set_id=other.id, task_id=task.id, best_response_id=ids[0])


def test_unmark_gold(session):
    ps = make_prompt_set(session, k=3, overlap=2)
    task, ids = task_with_ids(session, ps)
    gold.mark_gold(session, prompt_set_id=ps.id, task_id=task.id, best_response_id=ids[0])
    gold.unmark_gold(session, prompt_set_id=ps.id, task_id=task.id)
    assert not task.is_gold and task.gold_ranking is None
    assert gold.list_gold_tasks(session, prompt_set_id=ps.id) == []


@pytest.mark.parametrize("rate, ok", [("0.05", True), (0, True), (1, True), ("1.5", False), ("-0.1", False),
                                      ("lots", False), ("nan", False)])
def test_gold_rate_is_a_share_between_0_and_1(session, rate, ok):
    ps = make_prompt_set(session, k=3, overlap=2)
    if ok:
        assert gold.set_gold_rate(session, prompt_set_id=ps.id, rate=rate).gold_rate == float(rate)
    else:
        with pytest.raises(Invalid, match="between 0 and 1"):
            gold.set_gold_rate(session, prompt_set_id=ps.id, rate=rate)
        assert ps.gold_rate == 0.0


def test_gold_accuracy_of_marked_tasks(session):
    ps = make_prompt_set(session, k=3, overlap=2)
    good, sloppy, contrary = make_user(session), make_user(session), make_user(session)
    ranked, _ = task_with_ids(session, ps)
    best_only, _ = task_with_ids(session, ps)
    r_ids = [i.response_id for i in ranked.items]
    b_ids = [i.response_id for i in best_only.items]
    gold.mark_gold(session, prompt_set_id=ps.id, task_id=ranked.id, ranking={r_ids[0]: 1, r_ids[1]: 2, r_ids[2]: 3})
    gold.mark_gold(session, prompt_set_id=ps.id, task_id=best_only.id, best_response_id=b_ids[1])
    # ranked task: 3 scored pairs; best-only task: 2 scored pairs (best vs each other).
    annotate(session, ranked, r_ids, good, [1, 2, 3])
    annotate(session, best_only, b_ids, good, [3, 1, 2])      # best on top: 2/2
    annotate(session, ranked, r_ids, sloppy, [1, 3, 2])       # pair (1,2) wrong: 2/3
    annotate(session, best_only, b_ids, sloppy, [1, 2, 3])    # best below response 0: 1/2
    annotate(session, ranked, r_ids, contrary, [3, 2, 1])     # 0/3
    figures = {f.user_id: f for f in compute_set_agreement(session, prompt_set_id=ps.id).labelers}
    assert figures[good.id].gold_accuracy == 1.0 and figures[good.id].gold_tasks == 2
    assert figures[sloppy.id].gold_accuracy == pytest.approx(3 / 5)
    assert figures[contrary.id].gold_accuracy == 0.0 and figures[contrary.id].gold_tasks == 1
    # Unmarked, the tasks count as ordinary tasks again and gold accuracy is gone.
    gold.unmark_gold(session, prompt_set_id=ps.id, task_id=ranked.id)
    gold.unmark_gold(session, prompt_set_id=ps.id, task_id=best_only.id)
    figures = {f.user_id: f for f in compute_set_agreement(session, prompt_set_id=ps.id).labelers}
    assert figures[good.id].gold_accuracy is None and figures[good.id].tasks == 2
