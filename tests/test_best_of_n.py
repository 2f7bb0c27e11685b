"""Best-of-N: the argmax is kept and never scores below the mean, the analytical KL, the job
writing demonstrations to review (source best_of_n) that SFT can use, and its form and API."""

import math
import random

import pytest
import torch

from app.config import Settings
from app.db.base import utcnow
from app.db.enums import DemonstrationSource, DemonstrationStatus, JobKind, JobStatus, ModelKind, PromptSetKind, Role
from app.db.models import Demonstration, Job
from app.db.session import new_session
from app.services import demonstrations, training
from app.services.errors import Invalid
from tests.factories import add_prompt, make_model, make_prompt_set, make_user, ranked_set, synthetic
from trainer.best_of_n import BestOfNConfig, best_indices, best_of_n, kl_bound
from trainer.reward import load_reward_model, score
from trainer.worker import execute_job


def test_kl_of_best_of_n_by_hand():
    assert kl_bound(1) == 0.0
    assert kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert kl_bound(8) == pytest.approx(2.0794415 - 0.875)
    assert all(kl_bound(n) < kl_bound(n + 1) for n in range(1, 64))  # more samples, further from the policy


def test_the_best_is_the_argmax_and_never_below_the_mean():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 9)
        rewards = torch.tensor([[rng.choice([-1.0, 0.0, 0.5, rng.gauss(0, 1)]) for _ in range(n)]])
        order = best_indices(rewards)[0]
        assert rewards[0, order[0]] == rewards.max()
        assert rewards[0, order[0]] >= rewards.mean()
        assert (rewards[0, order][:-1] >= rewards[0, order][1:]).all()  # best first


def test_best_of_n_keeps_the_response_the_reward_model_scores_highest(tiny_model_dir, reward_dir):
    config = BestOfNConfig(n=6, max_new_tokens=8, temperature=1.0, batch_size=12)
    prompts = [synthetic.prompt(i) for i in range(3)]
    outcomes = best_of_n(config, prompts, policy_path=str(tiny_model_dir), reward_path=str(reward_dir))
    model, tokenizer = load_reward_model(reward_dir)
    assert len(outcomes) == 3
    for messages, outcome in zip(prompts, outcomes):
        assert len(outcome.responses) == 6 and len(set(outcome.responses)) > 1
        again = score(model, tokenizer, messages, outcome.responses)  # scored anew, one prompt at a time
        torch.testing.assert_close(torch.tensor(outcome.rewards), again, atol=1e-4, rtol=1e-4)
        assert outcome.best == int(again.argmax())
        assert outcome.best_reward >= outcome.mean_reward


# ---- the job ---------------------------------------------------------------------------------

def test_best_of_n_job_writes_demonstrations_to_review_that_sft_can_use(committed, tiny_model_dir, reward_dir,
                                                                          tmp_path):
    with new_session() as session:
        engineer, admin = make_user(session, role=Role.engineer), make_user(session, role=Role.admin)
        policy = make_model(session, tiny_model_dir, name="tiny-sft", is_default=True)
        rm = make_model(session, reward_dir, name="tiny-rm", kind=ModelKind.reward)
        demo_set = make_prompt_set(session, kind=PromptSetKind.demonstration)
        for i in range(3):
            add_prompt(session, demo_set, f"Say some words about rain (#{i}).")
        session.commit()
        job = training.start_best_of_n_job(session, user_id=engineer.id, policy_model_id=policy.id,
                                           reward_model_id=rm.id, prompt_set_ids=[demo_set.id],
                                           values={"n": 4, "max_new_tokens": 6, "batch_size": 8})
        ids = {"job": job.id, "set": demo_set.id, "engineer": engineer.id, "admin": admin.id}
    execute_job(ids["job"], settings=Settings(device="cpu", data_dir=tmp_path))
    with new_session() as session:
        job = session.get(Job, ids["job"])
        assert job.status == JobStatus.succeeded, job.traceback
        result = job.result
        assert result["prompts"] == 3 and result["demonstrations"] == 3 and result["n"] == 4
        assert result["kl_bound"] == round(math.log(4) - 0.75, 4)
        assert all(row["best_reward"] >= row["mean_reward"] for row in result["per_prompt"])
        assert result["best_reward"] >= result["mean_reward"]
        waiting = demonstrations.review_queue(session, prompt_set_id=ids["set"])
        assert len(waiting) == 3
        assert all(d.source == DemonstrationSource.best_of_n and d.user_id == ids["engineer"] for d in waiting)
        admin = session.get(type(waiting[0].user), ids["admin"])
        for demo in waiting[:2]:
            demonstrations.accept_demonstration(session, reviewer=admin, demonstration_id=demo.id, now=utcnow())
        params = training.clean_sft_params(session, base_model_id=None, prompt_set_ids=[ids["set"]], values={})
        assert params["prompt_set_ids"] == [ids["set"]]  # two accepted: enough for SFT
        accepted_id = waiting[0].id
    # A second run replaces the earlier best-of-N demonstrations and sends them back to review.
    with new_session() as session:
        again = training.start_best_of_n_job(session, user_id=ids["engineer"], prompt_set_ids=[ids["set"]],
                                             reward_model_id=rm.id, values={"n": 2, "max_new_tokens": 4, "seed": 1})
        again_id = again.id
    execute_job(again_id, settings=Settings(device="cpu", data_dir=tmp_path))
    with new_session() as session:
        assert session.get(Job, again_id).result["demonstrations"] == 3
        assert session.get(Demonstration, accepted_id).status == DemonstrationStatus.submitted
        assert session.query(Demonstration).count() == 3


def test_best_of_n_settings_and_data_are_checked_per_field(session, tmp_path):
    alice = make_user(session)
    make_model(session, tmp_path, name="sft", is_default=True)
    make_model(session, tmp_path, name="rm", kind=ModelKind.reward)
    ranked = ranked_set(session, alice, prompts=5)
    with pytest.raises(Invalid) as caught:
        training.clean_best_of_n_params(session, values={"n": 1, "top_p": 0}, prompt_set_ids=[ranked.id], use="report",
                                        split="dev")
    assert set(caught.value.errors) == {"n", "top_p", "split"}
    with pytest.raises(Invalid) as caught:  # kept responses become demonstrations: a ranking set cannot take them
        training.clean_best_of_n_params(session, values={}, prompt_set_ids=[ranked.id])
    assert "not a demonstration set" in caught.value.errors["prompt_set_ids"]
    params = training.clean_best_of_n_params(session, values={}, prompt_set_ids=[ranked.id], use="report",
                                             split="validation")
    assert (params["use"], params["split"], params["config"]["n"]) == ("report", "validation", 8)


# ---- the page and the API ---------------------------------------------------------------------

def test_best_of_n_form_queues_a_run_and_names_bad_fields(client, client_as, session, tmp_path):
    token = client_as("engineer").headers["X-CSRF-Token"]
    sft = make_model(session, tmp_path, name="sft-base", is_default=True)
    rm = make_model(session, tmp_path, name="rm-1", kind=ModelKind.reward)
    demo_set = make_prompt_set(session, kind=PromptSetKind.demonstration, name="demos")
    add_prompt(session, demo_set, "Why?")
    session.commit()
    page = client.get("/training/best-of-n")
    assert page.status_code == 200 and "rm-1" in page.text and "demos" in page.text
    assert 'id="policy-methods"' in page.text and 'href="/training/dpo"' in page.text
    bad = client.post("/training/best-of-n", data={"csrf_token": token, "n": "1", "split": "x"},
                      headers={"HX-Request": "true"})
    assert bad.status_code == 422 and "must be 2..256" in bad.text and "choose at least one prompt set" in bad.text
    response = client.post("/training/best-of-n", data={
        "csrf_token": token, "policy_model_id": str(sft.id), "reward_model_id": str(rm.id),
        "prompt_set_ids": str(demo_set.id), "split": "train", "use": "demonstrations", "n": "4"},
        follow_redirects=False)
    assert response.status_code == 303
    job = session.query(Job).filter(Job.kind == JobKind.best_of_n).one()
    assert job.params["config"]["n"] == 4 and job.params["use"] == "demonstrations"


def test_best_of_n_api_queues_a_run_and_refuses_bad_input(client, session, tmp_path):
    from app.services import auth

    user = make_user(session, role=Role.engineer)
    _, raw = auth.create_api_token(session, user=user, name="tests")
    client.headers["Authorization"] = f"Bearer {raw}"
    make_model(session, tmp_path, name="sft", is_default=True)
    make_model(session, tmp_path, name="rm", kind=ModelKind.reward)
    demo_set = make_prompt_set(session, kind=PromptSetKind.demonstration)
    add_prompt(session, demo_set, "Why?")
    session.commit()
    created = client.post("/api/v1/training/best-of-n", json={"prompt_set_ids": [demo_set.id], "config": {"n": 16}})
    assert created.status_code == 201 and created.json()["kind"] == "best_of_n"
    refused = client.post("/api/v1/training/best-of-n", json={"prompt_set_ids": [demo_set.id], "split": "rl"})
    assert refused.status_code == 422 and "no prompt in the rl split" in refused.json()["errors"]["prompt_set_ids"]
    unknown = client.post("/api/v1/training/best-of-n", json={"prompt_set_ids": [demo_set.id], "config": {"k": 2}})
    assert unknown.status_code == 422 and "config.k" in unknown.json()["errors"]


def test_best_of_n_demonstrations_wait_in_the_review_queue_marked_as_such(client, client_as, session):
    client_as("admin")
    engineer = make_user(session, role=Role.engineer)
    demo_set = make_prompt_set(session, kind=PromptSetKind.demonstration, name="demos")
    prompt = add_prompt(session, demo_set, "Why is the sky blue?")
    session.commit()
    stored, left = demonstrations.store_best_of_n(session, user_id=engineer.id, now=utcnow(),
                                                  kept=[(prompt.id, "Rayleigh scattering.")])
    assert (stored, left) == (1, 0)
    page = client.get("/admin/demonstrations")
    assert page.status_code == 200
    assert "Rayleigh scattering." in page.text and 'data-source="best_of_n"' in page.text


def test_job_page_reports_best_against_mean_per_prompt(client, client_as, session):
    from app.services import jobs

    client_as("engineer")
    job = jobs.enqueue_job(session, kind=JobKind.best_of_n, params={"use": "report"})
    job.status, job.started_at, job.finished_at = JobStatus.succeeded, utcnow(), utcnow()
    job.result = {"n": 8, "kl_bound": 1.2044, "best_reward": 1.1, "mean_reward": 0.1,
                  "per_prompt": [{"prompt_id": 7, "best_reward": 1.5, "mean_reward": 0.25}]}
    session.commit()
    page = client.get(f"/jobs/{job.id}")
    assert page.status_code == 200
    assert 'id="job-per-prompt"' in page.text and "at most 1.2044 nats" in page.text
    assert "<td>7</td><td>1.5</td><td>0.25</td>" in page.text
    assert "per_prompt" not in page.text  # the table, not the raw list
