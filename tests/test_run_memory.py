"""The memory estimate of a run before it is queued: the API, the refusal and the forms."""

import json

import pytest
from sqlalchemy import func, select

from app.config import get_settings
from app.db.enums import ModelKind, Role
from app.db.models import Job
from app.services.errors import Invalid
from tests.factories import demonstration_set, make_model, make_user, ranked_set
from tests.test_api_training import bearer

LLAMA_70B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "num_hidden_layers": 80,
             "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
             "tie_word_embeddings": False}
SMALL = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2,
         "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.fixture
def gpus_of_80_gib(monkeypatch):
    monkeypatch.setenv("RLHF_WORKER_GPU_MEMORY_GIB", "80")
    get_settings.cache_clear()
    yield
    monkeypatch.delenv("RLHF_WORKER_GPU_MEMORY_GIB")
    get_settings.cache_clear()


def checkpoint(tmp_path, name: str, config: dict) -> str:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


@pytest.fixture
def data(session, tmp_path):
    alice = make_user(session)
    small = make_model(session, checkpoint(tmp_path, "small", SMALL), name="small", is_default=True)
    huge = make_model(session, checkpoint(tmp_path, "huge", LLAMA_70B), name="huge")
    make_model(session, tmp_path, name="rm", kind=ModelKind.reward)
    ranked = ranked_set(session, alice, prompts=10)
    demo_set = demonstration_set(session, alice)
    return {"small": small.id, "huge": huge.id, "ranked": ranked.id, "demos": demo_set.id}


def test_the_api_estimates_a_run_per_gpu(client, session, data, gpus_of_80_gib):
    bearer(client, session)
    small = client.post("/api/v1/training/estimate", json={"kind": "reward", "prompt_set_ids": [data["ranked"]]})
    assert small.status_code == 200, small.text
    body = small.json()
    assert body["fits"] and body["device"] == "cuda" and body["limit_gib"] == 80.0 and body["message"] is None
    assert body["per_device_gib"]["total"] > 1.0  # at least the CUDA runtime's own
    assert set(body["per_device_gib"]) == {"weights", "grads", "optimizer", "activations", "runtime", "total"}
    # A bigger batch needs more activations.
    bigger = client.post("/api/v1/training/estimate", json={"kind": "reward", "config": {"batch_size": 64}}).json()
    assert bigger["per_device_gib"]["activations"] > body["per_device_gib"]["activations"]

    # Per GPU of a run of 2 processes: fsdp shards the weights, ddp copies them.
    ddp, fsdp = (client.post("/api/v1/training/estimate", json={
        "kind": "sft", "model_id": data["huge"], "processes": 2, "config": {"strategy": strategy}}).json()
        for strategy in ("ddp", "fsdp"))
    assert fsdp["per_device_gib"]["weights"] < ddp["per_device_gib"]["weights"] / 1.5, (ddp, fsdp)
    huge = client.post("/api/v1/training/estimate", json={"kind": "sft", "model_id": data["huge"]}).json()
    assert not huge["fits"] and "needs about" in huge["message"] and "has 80.0 GiB" in huge["message"]
    assert any("ZeRO-3" in a for a in huge["alternatives"])


def test_a_run_that_cannot_fit_is_refused_with_settings_that_would(client, session, data, gpus_of_80_gib):
    bearer(client, session)
    before = session.scalar(select(func.count(Job.id)))
    refused = client.post("/api/v1/training/sft", json={"base_model_id": data["huge"],
                                                        "prompt_set_ids": [data["demos"]]})
    assert refused.status_code == 422, refused.text
    message = refused.json()["errors"]["memory"]
    assert "needs about" in message and "Settings that would fit" in message and "ZeRO-3" in message
    assert session.scalar(select(func.count(Job.id))) == before
    # The small default model's run is queued.
    queued = client.post("/api/v1/training/sft", json={"prompt_set_ids": [data["demos"]]})
    assert queued.status_code == 201, queued.text


def test_bad_estimate_requests_name_the_field(client, session, data):
    bearer(client, session)
    for body, field in [({"kind": "sft", "config": {"batch_size": 0}}, "batch_size"),
                        ({"kind": "sft", "model_id": 999_999}, "model_id"),
                        ({"kind": "ppo", "reference_model_id": 999_999}, "reference_model_id"),
                        ({"kind": "dpo", "prompt_set_ids": [data["demos"]]}, "prompt_set_ids"),
                        ({"kind": "sft", "config": {"bacth_size": 2}}, "config.bacth_size"),
                        ({"kind": "sft", "processes": 0}, "processes")]:
        response = client.post("/api/v1/training/estimate", json=body)
        assert response.status_code == 422 and field in response.json()["errors"], (body, response.text)
    assert client.post("/api/v1/training/estimate", json={"kind": "best_of_n"}).status_code == 422


def test_only_engineers_estimate(client_as, data):
    client = client_as(Role.labeler)
    assert client.post("/api/v1/training/estimate", json={"kind": "sft"}).status_code == 403


def test_the_forms_show_the_estimate_and_the_refusal(client_as, session, data):
    client = client_as(Role.engineer)
    for path in ("/sft", "/training/reward", "/training/ppo", "/training/dpo"):
        page = client.get(path)
        assert page.status_code == 200 and "Expected peak memory per" in page.text, path
        assert "worker process" in page.text  # no GPU memory set: CPU workers
    from tests.conftest import csrf_of_page

    refused = client.post("/sft", data={"csrf_token": csrf_of_page(client, "/sft"),
                                         "base_model_id": str(data["huge"]),
                                         "prompt_set_ids": [str(data["demos"])]})
    assert refused.status_code == 422 and "this run needs about" in refused.text
    assert "choose a smaller model" in refused.text  # a 70B model on a CPU worker
    assert "too much" in refused.text  # beside the estimate


def test_the_estimate_and_refusal_use_the_runs_strategy_and_processes(session, data, monkeypatch):
    from dataclasses import asdict

    from app.db.models import Model
    from app.services import run_memory
    from trainer.configs import SFTConfig

    huge = session.get(Model, data["huge"])
    per_gpu = {}
    for strategy in ("ddp", "fsdp"):
        config = asdict(SFTConfig(strategy=strategy))
        found = run_memory.estimate_run("sft", huge, config, processes=2,
                                        budget=run_memory.Budget(10**15, "cuda", "each GPU"))
        per_gpu[strategy] = found["per_device_gib"]["total"]
    one = run_memory.estimate_run("sft", huge, asdict(SFTConfig(strategy="fsdp")),
                                  budget=run_memory.Budget(10**15, "cuda", "each GPU"))["per_device_gib"]["total"]
    assert per_gpu["fsdp"] < per_gpu["ddp"] / 1.5 and per_gpu["fsdp"] < one / 1.5, per_gpu  # weights sharded
    # Workers whose GPUs hold the fsdp run but not the ddp one: a checked job's params are refused or not by them.
    monkeypatch.setenv("RLHF_WORKER_GPU_MEMORY_GIB", str((per_gpu["fsdp"] + per_gpu["ddp"]) / 2))
    get_settings.cache_clear()
    try:
        params = {"base_model_id": huge.id, "processes": 2}
        run_memory.check_fits(session, "sft", params | {"config": asdict(SFTConfig(strategy="fsdp"))})
        with pytest.raises(Invalid) as refused:
            run_memory.check_fits(session, "sft", params | {"config": asdict(SFTConfig(strategy="ddp"))})
        assert "needs about" in refused.value.errors["memory"]
    finally:
        monkeypatch.delenv("RLHF_WORKER_GPU_MEMORY_GIB")
        get_settings.cache_clear()
