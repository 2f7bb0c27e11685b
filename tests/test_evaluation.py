"""Evaluation sets: scheduling, blind votes through the labeling services, results
with intervals, the pairwise mode of ranking sets, and the votes export."""

import random
from collections import Counter
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from app.db.enums import ModelKind, PromptSetKind, Split, VoteOutcome
from app.db.models import Comparison, Rating, Vote
from app.services import annotations, assignment, evaluation, export, prompt_sets
from app.services.errors import Invalid
from tests.factories import make_evaluation, make_model, make_prompt_set, make_task, make_user

LEASE_S = 600


def vote(session, user, outcome, strength=None, key=None):
    """Lease the labeler's next task and vote on it; returns (task, submission)."""
    lease = assignment.lease_next_task(session, user=user, lease_s=LEASE_S)
    assert lease is not None
    result = annotations.submit_annotation(
        session, user=user, task_id=lease.task.id, ratings=None, ranks=None, vote=outcome, strength=strength,
        idempotency_key=key or f"vote-key-{user.id}-{lease.task.id}",
    )
    return lease.task, result


# ---- scheduling ------------------------------------------------------------------

@pytest.mark.parametrize("n_models", [2, 3, 4])
def test_round_robin_gives_every_pair_the_same_number_of_prompts_and_balanced_sides(n_models):
    pairs = evaluation.model_pairs(n_models)
    prompts = 10 * len(pairs) + 3
    scheduled = [evaluation.pair_for(r, n_models, seed=7) for r in range(prompts)]
    per_pair = Counter(tuple(sorted(p)) for p in scheduled)
    assert set(per_pair) == set(pairs)
    assert max(per_pair.values()) - min(per_pair.values()) <= 1
    for pair in pairs:
        first_as_a = sum(1 for a, b in scheduled if (a, b) == pair)
        assert abs(2 * first_as_a - per_pair[pair]) <= 1, (pair, first_as_a, per_pair[pair])
    # Deterministic, yet the sides are not one fixed alternation: another seed, other sides.
    assert scheduled == [evaluation.pair_for(r, n_models, seed=7) for r in range(prompts)]
    assert scheduled != [evaluation.pair_for(r, n_models, seed=8) for r in range(prompts)]


# ---- win rates from simulated voters ------------------------------------------------

def test_ties_and_both_bad_count_half():
    rows = [SimpleNamespace(model_a_id=1, model_b_id=2, outcome=o) for o in ("a", "a", "tie", "both_bad")]
    result = evaluation.tally(rows, {1: 0, 2: 1})[(1, 2)]
    assert (result.wins, result.losses, result.ties, result.both_bad) == (2, 0, 1, 1)
    assert result.win_rate == pytest.approx(0.75)
    only_ties = evaluation.tally([SimpleNamespace(model_a_id=2, model_b_id=1, outcome="tie")] * 5, {1: 0, 2: 1})
    assert only_ties[(1, 2)].win_rate == 0.5
    # B winning with the later model shown as A is a win of the first model.
    flipped = evaluation.tally([SimpleNamespace(model_a_id=2, model_b_id=1, outcome="b")], {1: 0, 2: 1})[(1, 2)]
    assert (flipped.wins, flipped.losses, flipped.x_shown_as_a) == (1, 0, 0)


def simulated_votes(rng, truth: dict[tuple[int, int], float], n_models: int, prompts: int, tie_p: float = 0.1):
    """Votes of voters preferring the first model of a pair with the given probability."""
    rows = []
    for r in range(prompts):
        a, b = evaluation.pair_for(r, n_models, seed=rng.randrange(1000))
        x, y = min(a, b), max(a, b)
        u = rng.random()
        if u < tie_p:
            outcome = "tie"
        else:
            x_wins = rng.random() < truth[(x, y)]
            outcome = "a" if (x_wins == (a == x)) else "b"
        rows.append(SimpleNamespace(model_a_id=a, model_b_id=b, outcome=outcome))
    return rows


def test_reported_interval_contains_the_true_win_rate_in_most_seeds():
    truth = {(0, 1): 0.7, (0, 2): 0.8, (1, 2): 0.6}
    tie_p = 0.1
    covered = Counter()
    for seed in range(200):
        rows = simulated_votes(random.Random(seed), truth, 3, prompts=300, tie_p=tie_p)
        for pair, result in evaluation.tally(rows, {0: 0, 1: 1, 2: 2}).items():
            expected = (1 - tie_p) * truth[pair] + tie_p / 2  # a tie counts half
            low, high = result.interval
            covered[pair] += low <= expected <= high
    for pair, n in covered.items():
        assert n >= 180, (pair, n)  # a 95% interval: about 190 of 200


def test_simulated_labelers_through_the_services_recover_the_preference(session):
    sft = make_model(session, name="secret-sft-name")
    policy = make_model(session, name="secret-policy-name", kind=ModelKind.policy)
    third = make_model(session, name="secret-third-name", kind=ModelKind.policy)
    models = [sft, policy, third]
    prompt_set = make_evaluation(session, models, prompts=90, overlap=1, seed=3)
    truth = {(policy.id, sft.id): 0.8, (policy.id, third.id): 0.7, (sft.id, third.id): 0.5}
    labelers = [make_user(session) for _ in range(3)]
    rng = random.Random(11)
    sides = Counter()
    for i in range(90):
        user = labelers[i % 3]
        lease = assignment.lease_next_task(session, user=user, lease_s=LEASE_S)
        shown = [item.response.model_id for item in lease.task.items]
        sides[tuple(shown)] += 1
        p_first = truth.get(tuple(shown))
        p_first = p_first if p_first is not None else 1 - truth[(shown[1], shown[0])]
        outcome = "a" if rng.random() < p_first else "b"
        annotations.submit_annotation(session, user=user, task_id=lease.task.id, ratings=None, ranks=None,
                                      vote=outcome, strength=rng.choice([None, "slightly", "much"]),
                                      idempotency_key=f"simulated-{i}-{user.id}")
    # Every pair was shown 30 times, each model on each side about half of them.
    for x, y in [(sft.id, policy.id), (sft.id, third.id), (policy.id, third.id)]:
        assert sides[(x, y)] + sides[(y, x)] == 30
        assert abs(sides[(x, y)] - sides[(y, x)]) <= 2
    res = evaluation.results(session, prompt_set_id=prompt_set.id)
    assert res.votes == 90
    by_pair = {(p.model_x, p.model_y): p for p in res.pairs}
    sft_vs_policy = by_pair[(sft.id, policy.id)]
    assert sft_vs_policy.votes == 30
    low, high = sft_vs_policy.interval
    assert low <= 0.2 <= high and sft_vs_policy.win_rate < 0.5
    assert {lab.user_id for lab in res.labelers} == {u.id for u in labelers}
    assert sum(p.votes for lab in res.labelers for p in lab.pairs) == 90
    lengths = {m.model_id: m for m in res.lengths}
    assert lengths[third.id].mean_tokens > lengths[sft.id].mean_tokens
    data = evaluation.results_dict(res)
    assert data["pairs"][0]["model_x"] == "secret-sft-name"


# ---- votes as stored -----------------------------------------------------------------

def test_a_vote_is_stored_with_ranks_a_comparison_and_both_bad_explicitly(session):
    models = [make_model(session), make_model(session, kind=ModelKind.policy)]
    make_evaluation(session, models, prompts=3)
    user = make_user(session)
    task, result = vote(session, user, "b", "much")
    a, b = [item.response_id for item in task.items]
    stored = session.get(Vote, result.annotation.id)
    assert (stored.outcome, stored.strength, stored.response_a_id, stored.response_b_id) == ("b", "much", a, b)
    ranks = dict(session.execute(select(Rating.response_id, Rating.rank)
                                 .where(Rating.annotation_id == result.annotation.id)).all())
    assert ranks == {a: 2, b: 1}
    comparison = session.scalar(select(Comparison).where(Comparison.annotation_id == result.annotation.id))
    assert (comparison.chosen_response_id, comparison.rejected_response_id) == (b, a)
    assert comparison.rating_margin == annotations.STRENGTH_MARGIN["much"] == 3
    task, result = vote(session, user, "both_bad")
    assert session.get(Vote, result.annotation.id).outcome == VoteOutcome.both_bad
    assert session.scalars(select(Comparison).where(Comparison.annotation_id == result.annotation.id)).all() == []
    # A retry with the same key stores nothing new.
    again = annotations.submit_annotation(session, user=user, task_id=task.id, ratings=None, ranks=None,
                                          vote="a", idempotency_key=f"vote-key-{user.id}-{task.id}")
    assert not again.created and session.get(Vote, again.annotation.id).outcome == VoteOutcome.both_bad


@pytest.mark.parametrize(("vote_value", "strength", "field"), [
    (None, None, "vote"), ("", None, "vote"), ("c", None, "vote"), ("tie", "much", "strength"),
    ("a", "enormously", "strength"), (["a"], None, "vote"),
])
def test_bad_votes_are_refused_naming_the_field(session, vote_value, strength, field):
    make_evaluation(session, [make_model(session), make_model(session)], prompts=1)
    user = make_user(session)
    lease = assignment.lease_next_task(session, user=user, lease_s=LEASE_S)
    with pytest.raises(Invalid) as info:
        annotations.submit_annotation(session, user=user, task_id=lease.task.id, ratings=None, ranks=None,
                                      vote=vote_value, strength=strength, idempotency_key="bad-vote-key")
    assert field in info.value.errors


def test_votes_feed_agreement_and_gold_like_rankings(session):
    from app.services.agreement import compute_set_agreement

    prompt_set = make_evaluation(session, [make_model(session), make_model(session)], prompts=4, overlap=2)
    one, two = make_user(session), make_user(session)
    for _ in range(4):
        vote(session, one, "a")
    for outcome in ("a", "a", "b", "tie"):
        vote(session, two, outcome)
    agreement = compute_set_agreement(session, prompt_set_id=prompt_set.id)
    # Strict pairs: 3 shared (the tie is left out), 2 agree.
    assert agreement.pairwise_pairs == 3 and agreement.pairwise_agreement == pytest.approx(2 / 3)
    assert agreement.alpha_ratings is None  # votes have no Likert rating


# ---- creating evaluations --------------------------------------------------------------

def test_create_evaluation_from_validation_prompts_of_ranking_sets(session):
    sft, policy = make_model(session), make_model(session, kind=ModelKind.policy)
    source = make_prompt_set(session)
    for i in range(6):
        make_task(session, source, split=Split.validation if i % 2 else Split.train)
    created = prompt_sets.create_prompt_set(session, name="eval one", kind="evaluation",
                                            model_ids=[str(sft.id), str(policy.id)], source_set_ids=[source.id],
                                            temperature="0.7")
    assert created.kind == PromptSetKind.evaluation and created.pairwise and created.k == 2
    assert [m.id for m in evaluation.set_models(session, created.id)] == [sft.id, policy.id]
    counts = prompt_sets.counts(session, created)
    assert counts.prompts == 3 and counts.prompts_per_split["validation"] == 3


@pytest.mark.parametrize(("values", "field"), [
    ({"model_ids": []}, "model_ids"),
    ({"model_ids": ["1"]}, "model_ids"),
    ({"model_ids": ["x", "y"]}, "model_ids"),
    ({"model_ids": ["999999", "999998"]}, "model_ids"),
    ({"source_set_ids": ["999999"]}, "source_set_ids"),
])
def test_bad_evaluations_are_refused_naming_the_field(session, values, field):
    models = [make_model(session), make_model(session)]
    values = {"model_ids": [m.id for m in models]} | values
    with pytest.raises(Invalid) as info:
        prompt_sets.create_prompt_set(session, name="bad eval", kind="evaluation", **values)
    assert field in info.value.errors


def test_a_reward_model_cannot_be_evaluated(session):
    models = [make_model(session), make_model(session, kind=ModelKind.reward)]
    with pytest.raises(Invalid) as info:
        prompt_sets.create_prompt_set(session, name="rm eval", kind="evaluation", model_ids=[m.id for m in models])
    assert "not an SFT or policy model" in info.value.errors["model_ids"]


# ---- pairwise mode of ranking sets ---------------------------------------------------

def test_pairwise_ranking_set_needs_k_2(session):
    with pytest.raises(Invalid) as info:
        prompt_sets.create_prompt_set(session, name="pw", k="4", pairwise="on")
    assert "pairwise" in info.value.errors
    created = prompt_sets.create_prompt_set(session, name="pw2", k="2", pairwise="on")
    assert created.pairwise
    with pytest.raises(Invalid):
        prompt_sets.update_prompt_set(session, prompt_set=created, k="3")


def test_pairwise_votes_train_reward_models_as_rankings_do(session):
    from app.services.training import reward_data

    prompt_set = make_prompt_set(session, k=2, pairwise=True)
    tasks = [make_task(session, prompt_set, split=Split.validation if i == 0 else Split.train) for i in range(5)]
    user = make_user(session)
    outcomes = ["a", "b", "tie", "a", "both_bad"]
    for outcome in outcomes:
        vote(session, user, outcome, "clearly" if outcome in ("a", "b") else None)
    train, validation = reward_data(session, [prompt_set.id])
    items = train + validation
    assert len(items) == 5
    assert sorted(tuple(i.ranks) for i in items) == sorted([(1, 2), (2, 1), (1, 1), (1, 2), (1, 1)])
    rows = session.execute(export.included_comparisons_query([prompt_set.id])).all()
    assert len(rows) == 3 and {r.rating_margin for r in rows} == {2}
    assert {t.id for t in tasks} >= {r.task_id for r in rows}


# ---- export ---------------------------------------------------------------------------

def test_votes_export_loads_with_datasets(session, tmp_path):
    datasets = pytest.importorskip("datasets")
    models = [make_model(session, name="m-one"), make_model(session, name="m-two", kind=ModelKind.policy)]
    prompt_set = make_evaluation(session, models, prompts=4)
    user = make_user(session)
    for outcome, strength in [("a", "slightly"), ("b", None), ("tie", None), ("both_bad", None)]:
        vote(session, user, outcome, strength)
    filters = export.parse_filters(prompt_set_ids=prompt_set.id)
    plan = export.plan_export(session, kind="votes", fmt="votes", filters=filters)
    out = tmp_path / plan.filename
    meta = export.write_export(session, plan, out)
    assert meta["rows"] == 4
    data = datasets.load_dataset("json", data_files=str(out), split="train")
    assert len(data) == 4 and set(data["outcome"]) == {"a", "b", "tie", "both_bad"}
    assert set(data["model_a"]) | set(data["model_b"]) == {"m-one", "m-two"}
    assert set(data["winner"]) <= {"m-one", "m-two", ""}


# ---- generation --------------------------------------------------------------------

def test_generate_samples_one_response_per_prompt_and_model_with_the_same_seed(committed, tiny_model_dir):
    from app.db.enums import JobStatus
    from app.db.models import Prompt, Response, Task
    from app.db.session import new_session
    from tests.factories import add_prompt
    from tests.test_generate import run_generate
    from tests.workers import load_job

    with new_session() as session:
        # The same weights under two registry names: the same seed must give the same text.
        one = make_model(session, tiny_model_dir, name="tiny-a")
        two = make_model(session, tiny_model_dir, name="tiny-b", kind=ModelKind.policy)
        three = make_model(session, tiny_model_dir, name="tiny-c", kind=ModelKind.policy)
        prompt_set = make_evaluation(session, [one, two, three], prompts=0, max_new_tokens=8, seed=5)
        for i in range(7):
            add_prompt(session, prompt_set, f"Tell me about topic {i}.", split=Split.validation)
        session.commit()
        set_id = prompt_set.id
    job = load_job(run_generate(set_id, batch_size=4))
    assert job.status == JobStatus.succeeded, job.traceback
    assert job.result["responses"] == 21 and job.result["tasks"] == 7
    with new_session() as session:
        responses = session.scalars(select(Response).join(Prompt).where(Prompt.prompt_set_id == set_id)).all()
        by_prompt: dict[int, dict[int, Response]] = {}
        for r in responses:
            by_prompt.setdefault(r.prompt_id, {})[r.sample_index] = r
        for per_model in by_prompt.values():
            assert sorted(per_model) == [0, 1, 2]
            assert {r.model_id for r in per_model.values()} == {one.id, two.id, three.id}
            assert len({r.seed for r in per_model.values()}) == 1
            assert len({r.text for r in per_model.values()}) == 1
        tasks = session.scalars(select(Task).where(Task.prompt_set_id == set_id).order_by(Task.prompt_id)).all()
        shown = [tuple(item.response.sample_index for item in t.items) for t in tasks]
        assert shown == [evaluation.pair_for(r, 3, 5) for r in range(7)]
    # Nothing left to do: a second run adds nothing.
    again = load_job(run_generate(set_id))
    assert again.status == JobStatus.succeeded and again.result["responses"] == 0


def test_a_vote_can_be_changed_within_the_edit_window(session):
    from app.db.base import utcnow

    make_evaluation(session, [make_model(session), make_model(session)], prompts=1)
    user = make_user(session)
    task, result = vote(session, user, "a", "slightly")
    a, b = [item.response_id for item in task.items]
    edited = annotations.edit_annotation(session, user=user, annotation_id=result.annotation.id, ratings=None,
                                         ranks=None, vote="b", strength="clearly", now=utcnow())
    session.expire_all()
    stored = session.get(Vote, edited.annotation.id)
    assert (stored.outcome, stored.strength) == ("b", "clearly")
    pairs = session.execute(select(Comparison.chosen_response_id, Comparison.rejected_response_id,
                                   Comparison.rating_margin)
                            .where(Comparison.annotation_id == result.annotation.id)).all()
    assert pairs == [(b, a, 2)]
    values = annotations.submission_values(session.get(type(edited.annotation), edited.annotation.id))
    assert values["vote"] == "b" and values["strength"] == "clearly"
    annotations.edit_annotation(session, user=user, annotation_id=result.annotation.id, ratings=None, ranks=None,
                                vote="tie", now=utcnow())
    session.expire_all()
    assert session.get(Vote, result.annotation.id).outcome == VoteOutcome.tie
    assert session.scalars(select(Comparison).where(Comparison.annotation_id == result.annotation.id)).all() == []


def test_model_and_source_ids_that_are_not_ids_are_named_by_field(session):
    errors: dict[str, str] = {}
    assert evaluation.clean_models(errors, session, ["1", "x", "1"]) == []
    assert errors == {"model_ids": "'x' is not a model id"}
    errors = {}
    assert evaluation.clean_sources(errors, session, ["2", "y"]) == []
    assert errors == {"source_set_ids": "'y' is not a prompt set id"}
    errors = {}
    assert evaluation.clean_models(errors, session, ["1", "1"]) == []  # repeats count once
    assert errors == {"model_ids": "choose at least 2 different models"}
