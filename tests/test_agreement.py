"""Agreement figures on small hand-made data where the right answer is known."""

import krippendorff
import numpy as np
import pytest

from app.db.base import utcnow
from app.db.enums import AssignmentStatus, PromptSetStatus
from app.db.models import Assignment, PromptSet, Task
from app.services.agreement import compute_set_agreement, krippendorff_alpha_ordinal
from tests.factories import annotate, make_prompt_set, make_user, task_with_ids


def _set(session, k=3) -> PromptSet:
    return make_prompt_set(session, k=k, status=PromptSetStatus.draft)


def _task(session, ps: PromptSet, k: int, *, is_gold: bool = False) -> tuple[Task, list[int]]:
    """A task whose responses are shown in sample order; a gold one ranks them in that order."""
    return task_with_ids(session, ps, k=k, is_gold=is_gold, shuffle=False)


def test_two_labelers_who_agree_fully(session):
    ps = _set(session)
    u, v = make_user(session), make_user(session)
    for _ in range(3):
        task, ids = _task(session, ps, 3)
        annotate(session, task, ids, u, [1, 2, 3])
        annotate(session, task, ids, v, [1, 2, 3])
    result = compute_set_agreement(session, prompt_set_id=ps.id)
    assert result.pairwise_agreement == 1.0
    assert result.pairwise_pairs == 9
    assert result.kendall_tau_b == pytest.approx(1.0)
    assert result.alpha_ranks == pytest.approx(1.0)
    assert all(f.consensus_agreement == 1.0 for f in result.labelers)


def test_hand_computed_agreement_with_a_reversal_and_a_tie(session):
    ps = _set(session)
    u, v = make_user(session), make_user(session)
    # Task 1: identical rankings: 3 strict pairs agree.
    t1, ids1 = _task(session, ps, 3)
    annotate(session, t1, ids1, u, [1, 2, 3])
    annotate(session, t1, ids1, v, [1, 2, 3])
    # Task 2: v reverses: 3 strict pairs disagree; tau-b = -1.
    t2, ids2 = _task(session, ps, 3)
    annotate(session, t2, ids2, u, [1, 2, 3])
    annotate(session, t2, ids2, v, [3, 2, 1])
    # Task 3: v ties the first two: pair (0,1) is a tie (left out), (0,2) and (1,2) agree.
    t3, ids3 = _task(session, ps, 3)
    annotate(session, t3, ids3, u, [1, 2, 3])
    annotate(session, t3, ids3, v, [1, 1, 2])
    result = compute_set_agreement(session, prompt_set_id=ps.id)
    assert result.pairwise_pairs == 8
    assert result.pairwise_agreement == pytest.approx(5 / 8)
    assert result.tie_rate == pytest.approx(1 / 9)
    # tau-b task 3: nc=2, nd=0, n0=3, ties t1=0, t2=1 -> 2 / sqrt(3 * 2)
    expected_tau = (1 + -1 + 2 / np.sqrt(6)) / 3
    assert result.kendall_tau_b == pytest.approx(expected_tau)


def test_leave_one_out_consensus_finds_the_odd_labeler(session):
    ps = _set(session)
    a, b, odd = make_user(session), make_user(session), make_user(session)
    for _ in range(4):
        task, ids = _task(session, ps, 3)
        annotate(session, task, ids, a, [1, 2, 3])
        annotate(session, task, ids, b, [1, 2, 3])
        annotate(session, task, ids, odd, [3, 2, 1])
    figures = {f.user_id: f for f in compute_set_agreement(session, prompt_set_id=ps.id).labelers}
    # odd's others (a and b) agree with each other and against odd on every pair.
    # For a, the others are b (+1) and odd (-1): they cancel, so no pair counts.
    assert figures[odd.id].consensus_agreement == 0.0
    assert figures[odd.id].consensus_pairs == 12
    assert figures[a.id].consensus_agreement is None


def test_labeler_figures_time_skips_flags_contradictions(session):
    ps = _set(session)
    u = make_user(session)
    t1, ids1 = _task(session, ps, 3)
    annotate(session, t1, ids1, u, [1, 2, 3], time_s=10, flags=["unclear"])
    t2, ids2 = _task(session, ps, 3)
    # Rated A higher than B but ranked A lower: a contradiction.
    annotate(session, t2, ids2, u, [2, 1, 3], likerts=[7, 3, 1], time_s=30)
    t3, _ = _task(session, ps, 3)
    session.add(Assignment(task_id=t3.id, user_id=u.id, status=AssignmentStatus.skipped, expires_at=utcnow()))
    session.flush()
    f = compute_set_agreement(session, prompt_set_id=ps.id).labelers[0]
    assert f.tasks == 2
    assert f.median_time_s == pytest.approx(20)
    assert f.flag_rate == pytest.approx(0.5)
    assert f.contradiction_rate == pytest.approx(0.5)
    assert f.skip_rate == pytest.approx(1 / 3)
    assert f.rating_histogram == [1, 0, 1, 0, 1, 1, 2]  # likerts 7,6,5 and 7,3,1


def test_excluded_annotations_leave_the_figures(session):
    ps = _set(session)
    u, v = make_user(session), make_user(session)
    task, ids = _task(session, ps, 3)
    annotate(session, task, ids, u, [1, 2, 3])
    annotate(session, task, ids, v, [3, 2, 1], excluded=True)
    result = compute_set_agreement(session, prompt_set_id=ps.id)
    assert result.pairwise_pairs == 0 and result.pairwise_agreement is None
    assert [f.user_id for f in result.labelers] == [u.id]


def test_gold_accuracy(session):
    ps = _set(session)
    good, bad = make_user(session), make_user(session)
    task, ids = _task(session, ps, 3, is_gold=True)
    annotate(session, task, ids, good, [1, 2, 3])
    annotate(session, task, ids, bad, [1, 3, 2])  # (1,2) wrong
    figures = {f.user_id: f for f in compute_set_agreement(session, prompt_set_id=ps.id).labelers}
    assert figures[good.id].gold_accuracy == 1.0
    assert figures[bad.id].gold_accuracy == pytest.approx(2 / 3)
    # Gold tasks are not counted as ordinary tasks or in agreement.
    assert figures[good.id].tasks == 0


def _reliability(units, coders, values):
    """The krippendorff package's layout: coders x units, NaN where missing."""
    u_levels, c_levels = sorted(set(units)), sorted(set(coders))
    data = np.full((len(c_levels), len(u_levels)), np.nan)
    for u, c, v in zip(units, coders, values):
        data[c_levels.index(c), u_levels.index(u)] = v
    return data


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alpha_matches_the_krippendorff_package_on_random_data(seed):
    rng = np.random.default_rng(seed)
    units, coders, values = [], [], []
    for unit in range(40):
        truth = rng.integers(1, 8)
        for coder in rng.choice(5, size=rng.integers(1, 5), replace=False):
            units.append(unit)
            coders.append(coder)
            values.append(int(np.clip(truth + rng.integers(-2, 3), 1, 7)))
    ours = krippendorff_alpha_ordinal(np.array(units), np.array(values), np.array(coders))
    theirs = krippendorff.alpha(reliability_data=_reliability(units, coders, values), level_of_measurement="ordinal")
    assert ours == pytest.approx(theirs, abs=1e-9)


def test_alpha_matches_the_krippendorff_package_on_hand_made_data():
    # Krippendorff's own worked example shape: 3 coders, 6 units, some missing.
    table = [
        [1, 2, 3, 3, 2, 1],
        [1, 2, 3, 3, 2, 2],
        [np.nan, 3, 3, 3, 2, 1],
    ]
    units, coders, values = [], [], []
    for c, row in enumerate(table):
        for u, v in enumerate(row):
            if not np.isnan(v):
                units.append(u), coders.append(c), values.append(int(v))
    ours = krippendorff_alpha_ordinal(np.array(units), np.array(values), np.array(coders))
    theirs = krippendorff.alpha(reliability_data=np.array(table, dtype=float), level_of_measurement="ordinal")
    assert ours == pytest.approx(theirs, abs=1e-9)


def test_alpha_of_set_ratings_matches_the_package(session):
    ps = _set(session, k=4)
    users = [make_user(session) for _ in range(3)]
    rng = np.random.default_rng(7)
    units, coders, values = [], [], []
    for _ in range(6):
        task, ids = _task(session, ps, 4)
        for u in users:
            ranks = list(rng.permutation(4) + 1)
            likerts = [int(x) for x in rng.integers(1, 8, size=4)]
            annotate(session, task, ids, u, [int(r) for r in ranks], likerts)
            for rid, lk in zip(ids, likerts):
                units.append(rid), coders.append(u.id), values.append(lk)
    result = compute_set_agreement(session, prompt_set_id=ps.id)
    theirs = krippendorff.alpha(reliability_data=_reliability(units, coders, values), level_of_measurement="ordinal")
    assert result.alpha_ratings == pytest.approx(theirs, abs=1e-9)
