"""The JSON API of training runs and the model registry, with bearer tokens."""

import pytest
from sqlalchemy import func, select

from app.db.enums import JobKind, ModelKind, Role
from app.db.models import Job
from app.services import auth, models
from tests.factories import demonstration_set, make_model, make_user, ranked_set


def bearer(client, session):
    user = make_user(session, role=Role.engineer)
    _, raw = auth.create_api_token(session, user=user, name="tests")
    client.headers["Authorization"] = f"Bearer {raw}"
    return user


@pytest.fixture
def data(session, tmp_path):
    alice = make_user(session)
    sft = make_model(session, tmp_path, name="sft", is_default=True)
    rm = make_model(session, tmp_path, name="rm", kind=ModelKind.reward)
    ranked = ranked_set(session, alice, prompts=10)
    demo_set = demonstration_set(session, alice)
    return {"sft": sft.id, "rm": rm.id, "ranked": ranked.id, "demos": demo_set.id, "alice": alice.id}


def job_count(session) -> int:
    return session.scalar(select(func.count(Job.id)))


def test_settings_lists_each_run_kind_with_defaults(client, session):
    bearer(client, session)
    body = client.get("/api/v1/training/settings").json()
    reward = {s["name"]: s for s in body["reward"]}
    assert reward["learning_rate"]["default"] == 1e-5 and reward["lr_schedule"]["choices"] == ["cosine", "linear",
                                                                                                 "constant"]
    assert {s["name"] for s in body["ppo"]} >= {"kl_coef", "adaptive_kl", "target_kl", "ptx_coef", "missing_eos_penalty"}
    assert any(s["name"] == "packing" for s in body["sft"])
    steps = next(s for s in body["ppo"] if s["name"] == "steps")  # as trainer/configs.py's metadata has it
    assert (steps["label"], steps["low"], steps["high"], steps["default"]) == ("Steps", 1, 100_000, 10)
    eos = next(s for s in body["ppo"] if s["name"] == "missing_eos_penalty")
    assert eos["optional"] is True and eos["label"] == "Missing-EOS penalty" and eos["help"] == "blank = none"


def test_each_run_starts_with_a_201_and_its_parameters(client, session, data):
    bearer(client, session)
    sft = client.post("/api/v1/training/sft", json={"prompt_set_ids": [data["demos"]], "config": {"epochs": 2}})
    assert sft.status_code == 201, sft.text
    assert sft.json()["kind"] == "train_sft" and sft.json()["params"]["config"]["epochs"] == 2

    reward = client.post("/api/v1/training/reward", json={
        "prompt_set_ids": [data["ranked"]], "labeler_ids": [data["alice"]], "name": "api rm",
        "config": {"learning_rate": 0.001, "lora_r": 8, "mixed_precision": False}})
    assert reward.status_code == 201, reward.text
    params = reward.json()["params"]
    assert params["base_model_id"] == data["sft"] and params["labeler_ids"] == [data["alice"]]
    assert params["config"]["lora_r"] == 8 and params["config"]["mixed_precision"] is False
    assert params["config"]["lr_schedule"] == "cosine"  # an API caller's omitted settings keep their defaults

    ppo = client.post("/api/v1/training/ppo", json={
        "prompt_set_ids": [data["ranked"]], "sft_set_ids": [data["demos"]],
        "config": {"ptx_coef": 0.5, "steps": 4, "adaptive_kl": True}})
    assert ppo.status_code == 201, ppo.text
    params = ppo.json()["params"]
    assert params["reward_model_id"] == data["rm"] and params["reference_model_id"] == data["sft"]
    assert params["config"]["adaptive_kl"] is True and params["config"]["whiten_advantages"] is True
    kinds = session.scalars(select(Job.kind).order_by(Job.id)).all()
    assert kinds == [JobKind.train_sft, JobKind.train_reward, JobKind.train_ppo]


def test_bad_runs_are_422_naming_fields_and_queue_nothing(client, session, data):
    bearer(client, session)
    unknown = client.post("/api/v1/training/reward", json={"prompt_set_ids": [data["ranked"]],
                                                          "config": {"learnig_rate": 1}})
    assert unknown.status_code == 422 and "config.learnig_rate" in unknown.json()["errors"]
    wrong_set = client.post("/api/v1/training/reward", json={"prompt_set_ids": [data["demos"]],
                                                            "config": {"epochs": 0}})
    errors = wrong_set.json()["errors"]
    assert wrong_set.status_code == 422 and "not a ranking set" in errors["prompt_set_ids"]
    assert errors["epochs"] == "must be 1..100"
    ppo = client.post("/api/v1/training/ppo", json={"prompt_set_ids": [data["ranked"]], "reward_model_id": data["sft"],
                                                   "config": {"batch_size": 6, "mini_batch_size": 4}})
    assert ppo.status_code == 422
    assert set(ppo.json()["errors"]) == {"reward_model_id", "mini_batch_size"}
    assert client.post("/api/v1/training/sft", json={"prompt_set_ids": []}).status_code == 422
    assert job_count(session) == 0


def test_labelers_cannot_start_runs(client, client_as, session, data):
    token = client_as("labeler").headers["X-CSRF-Token"]  # labelers have no API tokens: a signed-in session
    response = client.post("/api/v1/training/reward", json={"prompt_set_ids": [data["ranked"]]},
                           headers={"X-CSRF-Token": token})
    assert response.status_code == 403
    assert client.get("/api/v1/models").status_code == 403
    assert job_count(session) == 0


def test_models_lineage_samples_and_promotion(client, session, data, tmp_path):
    bearer(client, session)
    policy = make_model(session, tmp_path, name="policy", kind=ModelKind.policy)
    policy.parent_id = data["sft"]
    policy.config = {"reward_model_id": data["rm"], "reference_model_id": data["sft"]}
    models.save_samples(session, model_id=policy.id, stage="after", prompts=[models.PromptRow(
        None, [{"role": "user", "content": "hi"}])], samples=[{"response": "hello", "reward": 0.5, "ended": True}])
    session.commit()

    listed = client.get("/api/v1/models", params={"kind": "policy"}).json()
    assert [m["name"] for m in listed] == ["policy"]
    detail = client.get(f"/api/v1/models/{policy.id}").json()
    assert detail["lineage_ids"] == [data["sft"]] and detail["reward_model_id"] == data["rm"]
    assert client.get(f"/api/v1/models/{data['sft']}").json()["children_ids"] == [policy.id]
    samples = client.get(f"/api/v1/models/{policy.id}/samples").json()
    assert samples == [{"position": 0, "prompt_id": None, "messages": [{"role": "user", "content": "hi"}],
                        "before": None, "after": {"response": "hello", "reward": 0.5, "ended": True}}]

    promoted = client.post(f"/api/v1/models/{policy.id}/promote", json={"prompt_set_id": data["ranked"]})
    assert promoted.status_code == 200, promoted.text
    body = promoted.json()
    assert (body["round"], body["generator_model_id"], body["job"]["kind"]) == (2, policy.id, "generate")
    assert client.get(f"/api/v1/models/{policy.id}").json()["generator_of"] == [data["ranked"]]
    refused = client.post(f"/api/v1/models/{data['rm']}/promote", json={"prompt_set_id": data["ranked"]})
    assert refused.status_code == 422 and "model_id" in refused.json()["errors"]
    assert client.get("/api/v1/models/999999").status_code == 404


def test_the_api_description_builds_and_lists_the_new_endpoints(client):
    paths = client.get("/api/v1/openapi.json").json()["paths"]
    assert {"/api/v1/training/reward", "/api/v1/training/ppo", "/api/v1/training/sft", "/api/v1/models/{model_id}/promote",
            "/api/v1/demonstrations/next", "/api/v1/prompt-sets/{prompt_set_id}/demonstrations"} <= set(paths)
    assert client.get("/api/v1/docs").status_code == 200
