"""Automatic figures of an evaluation set: the eval_figures job (reward scores of every
response, each policy's KL from its reference), the reward model's win rate and
agreement with the votes read beside them, the results page and the API."""

import pytest
import torch
from sqlalchemy import select

from app.config import Settings
from app.db.base import utcnow
from app.db.enums import JobKind, JobStatus, ModelKind, Role, Split
from app.db.models import Job, Prompt, Response, Task
from app.db.session import new_session
from app.services import annotations, assignment, evaluation
from tests.factories import add_prompt, make_evaluation, make_model, make_prompt_set, make_user
from trainer.worker import execute_job

HX = {"HX-Request": "true"}


def vote_all(session, user, outcomes: dict[int, str]) -> None:
    """The labeler votes on every task they are given: outcomes[task_id] ("a", "b", "tie", "both_bad")."""
    while (lease := assignment.lease_next_task(session, user=user, lease_s=600)) is not None:
        annotations.submit_annotation(session, user=user, task_id=lease.task.id, ratings=None, ranks=None,
                                      vote=outcomes[lease.task.id],
                                      idempotency_key=f"figure-vote-{user.id}-{lease.task.id}")


def finished_figures_job(session, prompt_set, reward, rewards: dict[int, float], kl=()) -> Job:
    """An eval_figures job of the set that succeeded with these rewards (as the worker stores them)."""
    job = Job(kind=JobKind.eval_figures, status=JobStatus.succeeded, prompt_set_id=prompt_set.id,
              params={"prompt_set_id": prompt_set.id, "reward_model_id": reward.id}, finished_at=utcnow(),
              result={"reward_model_id": reward.id, "reward_model": reward.name,
                      "rewards": {str(k): v for k, v in rewards.items()}, "kl": list(kl)})
    session.add(job)
    session.flush()
    return job


def tasks_of(session, prompt_set) -> list[tuple[Task, Response, Response]]:
    """(task, response shown as A, response shown as B) of every task, in prompt order."""
    out = []
    for task in session.scalars(select(Task).where(Task.prompt_set_id == prompt_set.id).order_by(Task.prompt_id)):
        a, b = sorted(task.items, key=lambda i: i.position)
        out.append((task, a.response, b.response))
    return out


# ---- the figures, by hand ---------------------------------------------------------------

def test_reward_model_win_rate_and_agreement_by_hand(session):
    sft = make_model(session, name="fig-sft")
    policy = make_model(session, name="fig-policy", kind=ModelKind.policy)
    reward = make_model(session, name="fig-rm", kind=ModelKind.reward)
    prompt_set = make_evaluation(session, [sft, policy], prompts=5)
    tasks = tasks_of(session, prompt_set)
    # The reward model prefers the policy on every task but task 3, where it scores both the same.
    rewards, votes = {}, {}
    for index, (task, a, b) in enumerate(tasks):
        policy_side, sft_side = (a, b) if a.model_id == policy.id else (b, a)
        rewards[policy_side.id], rewards[sft_side.id] = (1.0, 0.0) if index != 3 else (0.5, 0.5)
        # Labelers: the SFT model on task 1, a tie on task 4, the policy on the others.
        chosen = {1: sft_side, 4: None}.get(index, policy_side)
        votes[task.id] = "tie" if chosen is None else ("a" if chosen.id == a.id else "b")
    vote_all(session, make_user(session), votes)
    finished_figures_job(session, prompt_set, reward, rewards)
    res = evaluation.results(session, prompt_set_id=prompt_set.id)
    (pair,) = res.automatic.pairs
    assert (pair.model_x, pair.model_y) == (sft.id, policy.id)
    # SFT's win rate by the reward model: half a win (task 3) over 5 tasks.
    assert pair.tasks == 5 and pair.win_rate == pytest.approx(0.1)
    # Four votes chose a side (the tie is left out): agreeing on 0 and 2, not on 1, a reward tie (half) on 3.
    assert pair.votes == 4 and pair.agreement == pytest.approx(2.5 / 4)
    # The human figure beside it: SFT won task 1 and tied task 4.
    assert res.pairs[0].win_rate == pytest.approx(1.5 / 5)
    assert res.automatic.reward_model == "fig-rm"


def test_without_a_finished_job_there_are_no_automatic_figures(session):
    sft, policy = make_model(session), make_model(session, kind=ModelKind.policy)
    reward = make_model(session, kind=ModelKind.reward)
    prompt_set = make_evaluation(session, [sft, policy], prompts=2)
    assert evaluation.results(session, prompt_set_id=prompt_set.id).automatic is None
    failed = finished_figures_job(session, prompt_set, reward, {})
    failed.status = JobStatus.failed
    session.flush()
    assert evaluation.results(session, prompt_set_id=prompt_set.id).automatic is None


def test_a_policy_is_held_to_its_runs_reference_else_its_parent(session):
    sft, other = make_model(session), make_model(session)
    by_parent = make_model(session, kind=ModelKind.policy)
    by_parent.parent_id = sft.id
    by_config = make_model(session, kind=ModelKind.policy)
    by_config.parent_id, by_config.config = sft.id, {"reference_model_id": other.id}
    session.flush()
    session.expire_all()
    assert evaluation.reference_of(session, by_parent).id == sft.id
    assert evaluation.reference_of(session, by_config).id == other.id
    assert evaluation.reference_of(session, sft) is None  # an SFT model has no KL figure


# ---- the job, with tiny models -----------------------------------------------------------

@pytest.fixture(scope="module")
def other_dirs(tiny_model_dir, tmp_path_factory):
    """(another tiny model, the tiny model with every weight moved by noise). A freshly initialised
    tiny model spreads its probability almost evenly over the vocabulary and the noisy one does not,
    so any text is far less likely under the noisy one: a policy of the first held to the second has
    a clearly positive KL whatever the text (the test does not hang on how its samples re-tokenise)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    torch.manual_seed(1)
    other = type(base)(base.config)
    noisy = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    paths = []
    for name, model in (("fig-other", other), ("fig-noisy", noisy)):
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return tuple(paths)


def test_job_scores_every_response_and_estimates_each_policys_kl(committed, tiny_model_dir, tiny_reward_dir,
                                                                  other_dirs, tmp_path):
    from tests.test_generate import run_generate
    from tests.workers import load_job
    from trainer.reward import load_reward_model, score

    with new_session() as session:
        sft = make_model(session, tiny_model_dir, name="tiny-sft", is_default=True)
        same = make_model(session, tiny_model_dir, name="tiny-same", kind=ModelKind.policy)
        far = make_model(session, other_dirs[0], name="tiny-far", kind=ModelKind.policy)
        noisy = make_model(session, other_dirs[1], name="tiny-noisy")
        same.parent_id = sft.id  # the same weights as its reference: KL 0
        far.parent_id, far.config = sft.id, {"reference_model_id": noisy.id}  # the run's reference, not the parent
        reward = make_model(session, tiny_reward_dir, name="tiny-rm", kind=ModelKind.reward, is_default=True)
        prompt_set = make_evaluation(session, [sft, same, far], prompts=0, temperature=1.0, top_p=1.0,
                                     max_new_tokens=12, seed=3)
        for i in range(6):
            add_prompt(session, prompt_set, f"Tell me about topic {i}.", split=Split.validation)
        session.commit()
        ids = {"set": prompt_set.id, "sft": sft.id, "same": same.id, "far": far.id, "rm": reward.id,
               "noisy": noisy.id}
    # The generation queues the figures itself: a reward model is promoted.
    generated = load_job(run_generate(ids["set"], batch_size=6))
    assert generated.status == JobStatus.succeeded, generated.traceback
    job_id = generated.result["figures_job_id"]
    with new_session() as session:
        assert session.get(Job, job_id).params["reward_model_id"] == ids["rm"]
        labeler = make_user(session)
        prompt_set = evaluation.get_evaluation(session, ids["set"])
        # Votes for whichever side wrote the longer text (A on a draw), cast after the job was queued:
        # agreement is counted when the figures are read.
        vote_all(session, labeler, {t.id: "a" if len(a.text) >= len(b.text) else "b"
                                    for t, a, b in tasks_of(session, prompt_set)})
    execute_job(job_id, settings=Settings(device="cpu", data_dir=tmp_path))
    model, tokenizer = load_reward_model(tiny_reward_dir)
    with new_session() as session:
        job = session.get(Job, job_id)
        assert job.status == JobStatus.succeeded, job.traceback
        assert job.result["responses_scored"] == 18 and job.progress_done == job.progress_total == 18 + 12
        prompt_set = evaluation.get_evaluation(session, ids["set"])
        res = evaluation.results(session, prompt_set_id=ids["set"])
        # Every reward again, one response at a time; the win rate and agreement recomputed from them.
        rewards = {int(k): v for k, v in job.result["rewards"].items()}
        expected: dict[tuple[int, int], list[float]] = {}
        agree: dict[tuple[int, int], list[float]] = {}
        order = {m.id: i for i, m in enumerate(res.models)}
        for task, a, b in tasks_of(session, prompt_set):
            messages = session.get(Prompt, task.prompt_id).messages
            ra, rb = (score(model, tokenizer, messages, [r.text]).item() for r in (a, b))
            assert (rewards[a.id], rewards[b.id]) == pytest.approx((ra, rb), abs=1e-4)
            a_better = 0.5 if a.text == b.text else float(ra > rb)  # the same text (same weights, same seed) ties
            a_is_x = order[a.model_id] < order[b.model_id]
            pair = (a.model_id, b.model_id) if a_is_x else (b.model_id, a.model_id)
            expected.setdefault(pair, []).append(a_better if a_is_x else 1 - a_better)
            human_a = len(a.text) >= len(b.text)
            agree.setdefault(pair, []).append(a_better if human_a else 1 - a_better)
        assert len(res.automatic.pairs) == 3
        for pair in res.automatic.pairs:
            wins = expected[(pair.model_x, pair.model_y)]
            assert pair.tasks == len(wins) == 2
            assert pair.win_rate == pytest.approx(sum(wins) / len(wins))
            assert pair.votes == 2 and pair.agreement == pytest.approx(sum(agree[(pair.model_x, pair.model_y)]) / 2)
        assert sum(v != 0.5 for vs in expected.values() for v in vs) == 4  # all but the same-weights pair told apart
        kl = res.automatic.kl
        assert set(kl) == {ids["same"], ids["far"]}  # the SFT model has no reference
        assert kl[ids["same"]]["kl"] == pytest.approx(0.0, abs=1e-4)
        assert (kl[ids["same"]]["reference_id"], kl[ids["far"]]["reference_id"]) == (ids["sft"], ids["noisy"])
        assert kl[ids["far"]]["kl"] > 1.0 and kl[ids["far"]]["responses"] == 6
        lengths = {m.model_id: m for m in res.lengths}
        texts = session.scalars(select(Response.text).where(Response.model_id == ids["far"])).all()
        assert lengths[ids["far"]].mean_chars == pytest.approx(sum(map(len, texts)) / len(texts))


# ---- starting it: the page and the API ---------------------------------------------------

def figures_world(session):
    sft = make_model(session, name="page-sft", is_default=True)
    policy = make_model(session, name="page-policy", kind=ModelKind.policy)
    reward = make_model(session, name="page-rm", kind=ModelKind.reward)
    prompt_set = make_evaluation(session, [sft, policy], prompts=2, name="Figures eval")
    session.commit()
    return prompt_set, sft, policy, reward


def test_engineer_starts_the_job_from_the_results_page_and_reads_the_figures(client, client_as, session):
    prompt_set, sft, policy, reward = figures_world(session)
    token = client_as(Role.engineer).headers["X-CSRF-Token"]
    page = client.get(f"/evaluations/{prompt_set.id}")
    assert page.status_code == 200 and 'id="automatic-figures"' in page.text and "Compute figures" in page.text
    assert 'id="reward-pairs"' not in page.text  # nothing computed yet
    bad = client.post(f"/evaluations/{prompt_set.id}/figures", headers=HX,
                      data={"csrf_token": token, "reward_model_id": str(sft.id)})
    assert bad.status_code == 422 and "choose a reward model from the list" in bad.text
    assert 'id="automatic-figures"' in bad.text and "<html" not in bad.text
    started = client.post(f"/evaluations/{prompt_set.id}/figures", follow_redirects=False,
                          data={"csrf_token": token, "reward_model_id": str(reward.id)})
    assert started.status_code == 303 and started.headers["location"] == f"/evaluations/{prompt_set.id}"
    job = session.scalar(select(Job).where(Job.kind == JobKind.eval_figures))
    assert job.prompt_set_id == prompt_set.id and job.params["reward_model_id"] == reward.id
    again = client.post(f"/evaluations/{prompt_set.id}/figures", headers=HX,
                        data={"csrf_token": token, "reward_model_id": str(reward.id)})
    assert again.status_code == 409 and f"Job #{job.id} is already computing" in again.text
    assert 'id="figures-job"' in client.get(f"/evaluations/{prompt_set.id}").text
    # The job finishes: the figures appear beside the human ones, and in the API.
    job.status, job.finished_at = JobStatus.succeeded, utcnow()
    rewards = {r.id: float(r.sample_index) for _, a, b in tasks_of(session, prompt_set) for r in (a, b)}
    job.result = {"reward_model_id": reward.id, "reward_model": reward.name,
                  "rewards": {str(k): v for k, v in rewards.items()},
                  "kl": [{"model_id": policy.id, "model": policy.name, "reference_id": sft.id,
                          "reference": sft.name, "kl": 0.4321, "kl_stderr": 0.05, "responses": 2}]}
    session.commit()
    page = client.get(f"/evaluations/{prompt_set.id}")
    assert 'id="reward-pairs"' in page.text and "page-rm" in page.text
    assert '<td class="rm-win-rate"><strong>0.0%</strong>' in page.text  # the policy (position 1) always scores higher
    assert "0.432 &plusmn; 0.050" in page.text and "Monte-Carlo estimate" in page.text
    api = client.get(f"/api/v1/evaluations/{prompt_set.id}").json()
    auto = api["automatic"]
    assert auto["job_id"] == job.id and auto["reward_model"] == "page-rm"
    assert auto["pairs"][0]["rm_win_rate"] == 0.0 and auto["pairs"][0]["tasks"] == 2
    assert auto["kl"][0]["kl"] == 0.4321 and auto["kl"][0]["reference_id"] == sft.id


def test_api_queues_the_job_and_names_bad_input(client, client_as, session):
    prompt_set, sft, _, reward = figures_world(session)
    client_as(Role.engineer)
    url = f"/api/v1/evaluations/{prompt_set.id}/figures"
    not_rm = client.post(url, json={"reward_model_id": sft.id})
    assert not_rm.status_code == 422 and "reward model" in not_rm.json()["errors"]["reward_model_id"]
    unknown = client.post(url, json={"reward_model_id": reward.id + 1000})
    assert unknown.status_code == 422 and "reward_model_id" in unknown.json()["errors"]
    assert client.post(url, json={"reward_model_id": "x"}).status_code == 422
    # A ranking set (or no set) is no evaluation.
    other = make_prompt_set(session)
    session.commit()
    assert client.post(f"/api/v1/evaluations/{other.id}/figures", json={}).status_code == 404
    assert client.post("/api/v1/evaluations/999999/figures", json={}).status_code == 404
    created = client.post(url)  # no body: the default reward model
    assert created.status_code == 201, created.text
    assert created.json()["kind"] == "eval_figures" and created.json()["params"]["reward_model_id"] == reward.id
    assert client.post(url, json={}).status_code == 409


def test_no_reward_model_or_no_responses_is_named(client, client_as, session):
    sft, policy = make_model(session, name="n-sft"), make_model(session, name="n-pol", kind=ModelKind.policy)
    prompt_set = make_evaluation(session, [sft, policy], prompts=0)
    session.commit()
    client_as(Role.engineer)
    url = f"/api/v1/evaluations/{prompt_set.id}/figures"
    none = client.post(url, json={})
    assert none.status_code == 422
    errors = none.json()["errors"]
    assert "register a reward model first" in errors["reward_model_id"]
    assert "no responses yet" in errors["prompt_set_id"]
    page = client.get(f"/evaluations/{prompt_set.id}")
    assert "Train or register a reward model first." in page.text


def test_labelers_never_see_or_start_the_figures(client, client_as, session):
    prompt_set, _, _, reward = figures_world(session)
    finished_figures_job(session, prompt_set, reward, {})
    session.commit()
    token = client_as(Role.labeler).headers["X-CSRF-Token"]
    assert client.get(f"/evaluations/{prompt_set.id}").status_code == 403
    assert client.get(f"/api/v1/evaluations/{prompt_set.id}").status_code == 403
    assert client.post(f"/api/v1/evaluations/{prompt_set.id}/figures", json={}).status_code == 403
    refused = client.post(f"/evaluations/{prompt_set.id}/figures", data={"csrf_token": token}, follow_redirects=False)
    assert refused.status_code == 403 and "page-rm" not in refused.text
    assert session.scalar(select(Job).where(Job.kind == JobKind.eval_figures, Job.status == JobStatus.queued)) is None
