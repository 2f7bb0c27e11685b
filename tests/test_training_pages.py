"""The engineer's training pages: the reward-model and PPO forms, the model registry
with lineage and samples side by side, and promoting a model to generate the next round."""

from sqlalchemy import func, select

from app.db.enums import JobKind, JobStatus, ModelKind, PromptSetStatus
from app.db.models import Job, Model
from app.services import models
from tests.factories import make_model, make_user, ranked_set


def jobs_of(session, kind: JobKind) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.kind == kind).order_by(Job.id)))


def test_reward_form_shows_defaults_and_queues_a_run(client, client_as, session, tmp_path):
    token = client_as("engineer").headers["X-CSRF-Token"]
    alice = make_user(session, username="alice")
    base = make_model(session, tmp_path, name="sft-base", is_default=True)
    prompt_set = ranked_set(session, alice, prompts=6, name="ranked")
    session.commit()

    page = client.get("/training/reward")
    assert page.status_code == 200
    assert 'name="learning_rate" value="1e-05"' in page.text and "sft-base" in page.text
    assert "ranked" in page.text and "(6 annotations)" in page.text and "alice" in page.text

    response = client.post("/training/reward", data={
        "csrf_token": token, "base_model_id": str(base.id), "prompt_set_ids": str(prompt_set.id),
        "labeler_ids": str(alice.id), "epochs": "2", "learning_rate": "0.001", "lr_schedule": "linear",
        "warmup_ratio": "0", "batch_size": "4", "gradient_accumulation_steps": "1", "max_length": "128",
        "lora_r": "0", "lora_alpha": "16", "seed": "3", "name": "rm-1"}, follow_redirects=False)
    assert response.status_code == 303
    [job] = jobs_of(session, JobKind.train_reward)
    assert response.headers["location"] == f"/jobs/{job.id}"
    assert job.params["base_model_id"] == base.id and job.params["prompt_set_ids"] == [prompt_set.id]
    assert job.params["labeler_ids"] == [alice.id] and job.params["name"] == "rm-1"
    config = job.params["config"]
    assert (config["epochs"], config["learning_rate"], config["lr_schedule"], config["seed"]) == (2, 1e-3, "linear", 3)
    assert config["mixed_precision"] is False  # an unticked checkbox is off


def test_reward_form_names_each_bad_field_and_queues_nothing(client, client_as, session, tmp_path):
    token = client_as("engineer").headers["X-CSRF-Token"]
    make_model(session, tmp_path, is_default=True)
    session.commit()
    response = client.post("/training/reward", data={"csrf_token": token, "epochs": "0", "learning_rate": "fast",
                                                     "lr_schedule": "sometimes"})
    assert response.status_code == 422
    text = response.text
    assert "choose at least one ranking set" in text and "must be 1..100" in text and "must be a number" in text
    assert "one of cosine, linear, constant" in text
    # From the page (htmx), only the form comes back, with the same messages.
    fragment = client.post("/training/reward", data={"csrf_token": token, "epochs": "0"},
                           headers={"HX-Request": "true"})
    assert fragment.status_code == 422 and fragment.text.lstrip().startswith('<section class="card" id="run-form">')
    assert "must be 1..100" in fragment.text
    ppo_fragment = client.post("/training/ppo", data={"csrf_token": token, "steps": "0"}, headers={"HX-Request": "true"})
    assert ppo_fragment.status_code == 422 and "must be 1..100000" in ppo_fragment.text
    assert jobs_of(session, JobKind.train_reward) == [] and jobs_of(session, JobKind.train_ppo) == []


def test_ppo_form_checks_batch_division_ptx_data_and_queues_a_run(client, client_as, session, tmp_path):
    token = client_as("engineer").headers["X-CSRF-Token"]
    alice = make_user(session)
    policy = make_model(session, tmp_path, name="sft", is_default=True)
    reward = make_model(session, tmp_path, name="rm", kind=ModelKind.reward)
    prompt_set = ranked_set(session, alice, prompts=10)
    session.commit()
    page = client.get("/training/ppo")
    assert page.status_code == 200 and "rm (reward)" in page.text and "(2 rl / 2 validation prompts)" in page.text

    bad = client.post("/training/ppo", data={"csrf_token": token, "prompt_set_ids": str(prompt_set.id),
                                             "batch_size": "6", "mini_batch_size": "4", "ptx_coef": "0.5",
                                             "steps": "3", "value_warmup_steps": "3"})
    assert bad.status_code == 422
    assert "must divide the batch size (6)" in bad.text and "needs demonstration sets" in bad.text
    assert "must be below the number of steps (3)" in bad.text
    assert jobs_of(session, JobKind.train_ppo) == []

    good = client.post("/training/ppo", data={
        "csrf_token": token, "policy_model_id": str(policy.id), "reference_model_id": "",
        "reward_model_id": str(reward.id), "prompt_set_ids": str(prompt_set.id), "steps": "3", "batch_size": "4",
        "mini_batch_size": "2", "kl_coef": "0.1", "adaptive_kl": "1", "kl_estimator": "k3",
        "missing_eos_penalty": "", "whiten_advantages": "1"}, follow_redirects=False)
    assert good.status_code == 303
    [job] = jobs_of(session, JobKind.train_ppo)
    params = job.params
    assert (params["policy_model_id"], params["reference_model_id"], params["reward_model_id"]) == \
        (policy.id, policy.id, reward.id)  # the reference defaults to the policy
    config = params["config"]
    assert config["adaptive_kl"] is True and config["kl_estimator"] == "k3" and config["missing_eos_penalty"] is None
    assert config["whiten_advantages"] is True and config["mixed_precision"] is False and config["steps"] == 3


def test_registry_shows_lineage_metrics_and_samples_escaped(client, client_as, session, tmp_path):
    client_as("engineer")
    sft = make_model(session, tmp_path, name="sft-0")
    rm = Model(name="rm-0", kind=ModelKind.reward, path=str(tmp_path), source="train_reward", parent_id=sft.id,
               metrics={"val_accuracy": 0.875})
    session.add(rm)
    session.flush()
    policy = Model(name="policy-0", kind=ModelKind.policy, path=str(tmp_path), source="train_ppo", parent_id=sft.id,
                   config={"reward_model_id": rm.id, "reference_model_id": sft.id},
                   metrics={"validation_reward_before": -0.5, "validation_reward_after": 1.25, "kl": 2.0})
    session.add(policy)
    session.flush()
    prompts = [models.PromptRow(None, [{"role": "user", "content": "Say <b>hi</b>"}])]
    models.save_samples(session, model_id=policy.id, stage="before", samples=[
        {"response": "<script>alert(1)</script>", "reward": -0.5, "ended": True}], prompts=prompts)
    models.save_samples(session, model_id=policy.id, stage="after", samples=[
        {"response": "hello there", "reward": 1.25, "ended": False}], prompts=prompts)
    session.commit()

    listing = client.get("/models").text
    assert "val. accuracy 0.875" in listing and "val. reward -0.500 → 1.250" in listing
    assert f'<a href="/models/{rm.id}">rm-0</a>' in listing  # the policy's reward model, in its lineage
    assert "policy-0" not in client.get("/models", params={"kind": "reward"}).text

    page = client.get(f"/models/{policy.id}").text
    assert "sft-0" in page and "rm-0" in page and "Generate the next round" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)" not in page
    assert "Say &lt;b&gt;hi&lt;/b&gt;" in page and "hello there" in page and "cut at the length limit" in page
    assert "1.250" in page
    # A reward model cannot generate: no promotion form on its page.
    assert "Generate the next round" not in client.get(f"/models/{rm.id}").text
    assert client.get("/models/999999").status_code == 404


def test_promoting_a_policy_opens_a_new_round_generated_by_it(client, client_as, session, tmp_path):
    token = client_as("engineer").headers["X-CSRF-Token"]
    alice = make_user(session)
    sft = make_model(session, tmp_path, name="sft", is_default=True)
    policy = make_model(session, tmp_path, name="policy", kind=ModelKind.policy)
    reward = make_model(session, tmp_path, name="rm", kind=ModelKind.reward)
    active = ranked_set(session, alice, prompts=3)
    active.generator_model_id = sft.id
    archived = ranked_set(session, alice, prompts=2)
    archived.status = PromptSetStatus.archived
    session.commit()

    draft = ranked_set(session, alice, prompts=2, name="not started")
    draft.status = PromptSetStatus.draft
    session.commit()
    page = client.get(f"/models/{policy.id}").text
    assert f'<option value="{active.id}">' in page and f'<option value="{archived.id}">' not in page

    response = client.post(f"/models/{policy.id}/promote", data={"csrf_token": token, "prompt_set_id": str(active.id)},
                           follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == f"/models/{policy.id}"
    session.refresh(active)
    assert (active.generator_model_id, active.round) == (policy.id, 2)
    [job] = jobs_of(session, JobKind.generate)
    assert job.params == {"prompt_set_id": active.id} and job.status == JobStatus.queued
    page = client.get(f"/models/{policy.id}").text
    assert f"Round 2 of &#39;{active.name}&#39; is being generated by &#39;policy&#39;" in page
    assert f'<a href="/jobs/{job.id}" class="generation-job">' in page  # the generation job, from the model's page

    # A set that is not started gets its round when it starts: no job yet.
    later = client.post(f"/models/{policy.id}/promote", data={"csrf_token": token, "prompt_set_id": str(draft.id)},
                        follow_redirects=True)
    assert "Round 2 of &#39;not started&#39; will be generated by &#39;policy&#39; when the set is started" in later.text
    session.refresh(draft)
    assert (draft.generator_model_id, draft.round) == (policy.id, 2)

    refused = client.post(f"/models/{policy.id}/promote", data={"csrf_token": token, "prompt_set_id": str(archived.id)})
    assert refused.status_code == 409 and "archived" in refused.text and 'role="alert"' in refused.text
    not_a_generator = client.post(f"/models/{reward.id}/promote",
                                  data={"csrf_token": token, "prompt_set_id": str(active.id)})
    assert not_a_generator.status_code == 422
    session.refresh(archived)
    session.refresh(active)
    assert archived.round == 1 and (active.generator_model_id, active.round) == (policy.id, 2)
    assert session.scalar(select(func.count(Job.id)).where(Job.kind == JobKind.generate)) == 1


def test_ppo_job_page_leads_with_the_held_out_reward_and_warns_of_cut_responses(client, client_as, session):
    from app.services import jobs

    client_as("engineer")
    result = {"reward": 0.4, "kl": 1.25, "cut_fraction": 0.6, "validation_prompts": 5,
              "validation_note": "the chosen sets have 5 validation-split prompt(s) of the 64 asked for",
              "validation_reward_before": -0.1, "validation_reward_before_ci": 0.3,
              "validation_reward_after": 0.2, "validation_reward_after_ci": 0.25,
              "validation_reward_change": 0.3, "validation_reward_change_ci": 0.1}
    job = jobs.enqueue_job(session, kind=JobKind.train_ppo, params={"config": {}})
    job.status, job.result = JobStatus.succeeded, result
    session.commit()
    page = client.get(f"/jobs/{job.id}")
    assert page.status_code == 200
    text = page.text
    assert "-0.100 ± 0.300" in text and "0.200 ± 0.250" in text and "+0.300 ± 0.100" in text
    assert "1.250 nats per response" in text and "5 of them" in text and "64 asked for" in text
    assert 'id="ppo-cut-warning"' in text and "60%" in text
    job.result = result | {"cut_fraction": 0.1}
    session.commit()
    assert 'id="ppo-cut-warning"' not in client.get(f"/jobs/{job.id}").text


def test_reward_model_page_shows_interval_learning_curve_agreement_and_verdict(client, client_as, session, tmp_path):
    client_as("engineer")
    sft = make_model(session, tmp_path, name="sft-0")
    curve = [{"fraction": 0.25, "rankings": 80, "pairs": 480, "val_accuracy": 0.61},
             {"fraction": 0.5, "rankings": 160, "pairs": 960, "val_accuracy": 0.655},
             {"fraction": 1.0, "rankings": 321, "pairs": 1926, "val_accuracy": 0.702}]
    common = {"val_accuracy": 0.71, "train_groups": 321, "train_pairs": 1926, "val_groups": 40,
              "labeler_agreement": 0.78, "labeler_agreement_pairs": 900, "learning_curve": curve,
              "verdict": "Accuracy still rising (+5 points on the last doubling of the data): label more prompts."}
    narrow = Model(name="rm-narrow", kind=ModelKind.reward, path=str(tmp_path), source="train_reward",
                   parent_id=sft.id, metrics=common | {"val_pairs": 240, "val_accuracy_low": 0.65,
                                                       "val_accuracy_high": 0.765})
    wide = Model(name="rm-wide", kind=ModelKind.reward, path=str(tmp_path), source="train_reward",
                 parent_id=sft.id, metrics=common | {"val_pairs": 24, "val_accuracy_low": 0.51,
                                                     "val_accuracy_high": 0.85})
    session.add_all([narrow, wide])
    session.commit()

    page = client.get(f"/models/{narrow.id}").text
    assert 'id="reward-quality"' in page
    assert "Validation accuracy <strong>71.0%</strong>" in page and "(95% interval 65.0–76.5%)" in page
    assert '<span id="rm-val-pairs">240</span> validation pairs' in page and "78.0%" in page
    assert "label more prompts" in page and 'id="learning-curve"' in page and "learning_curve.js" in page
    points = page.split('id="learning-curve-points"')[1].split("</table>")[0]
    assert all(f"<td>{n}</td>" in points for n in (80, 160, 321)) and "70.2%" in points
    assert "71.0% (fine-tuned model)" in points
    assert 'id="rm-wide-interval"' not in page
    assert "[{" not in page.split('id="model-metrics"')[1].split("</section>")[0]  # the curve is not dumped raw

    page = client.get(f"/models/{wide.id}").text
    assert 'id="rm-wide-interval"' in page and "only 24 pairs" in page
    # A policy's page has no such section.
    assert 'id="reward-quality"' not in client.get(f"/models/{sft.id}").text
