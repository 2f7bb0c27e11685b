"""DPO: the losses by hand (listwise = pairwise for K = 2, a K = 3 ranking with a tie), the log-probs
of a batch against single sequences, and learning a known preference rule with each loss."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tests.factories import synthetic
from trainer.common import CONFIG_FILE, Cancelled, encode_prompt, encode_response, prepare_tokenizer
from trainer.dpo import DPOConfig, dpo_loss, encode_group, listwise_loss, ranking_logprobs, train_dpo
from trainer.models import load_causal_lm, load_tokenizer
from trainer.reward import RankedGroup

# ---- the losses by hand ----------------------------------------------------------------


def test_listwise_loss_is_the_sigmoid_loss_for_two_responses():
    logratios = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.4, 0.1]])
    ranks = torch.tensor([[1, 2], [2, 1], [1, 2]])
    valid = torch.ones_like(ranks, dtype=torch.bool)
    listwise, stats = dpo_loss(logratios, ranks, valid, beta=0.5, loss="listwise")
    sigmoid, _ = dpo_loss(logratios, ranks, valid, beta=0.5, loss="sigmoid")
    by_hand = -(F.logsigmoid(torch.tensor(0.5 * 1.5)) + F.logsigmoid(torch.tensor(0.5 * -1.5))
                + F.logsigmoid(torch.tensor(0.5 * -0.5))) / 3
    torch.testing.assert_close(listwise, sigmoid)
    torch.testing.assert_close(listwise, by_hand)
    assert int(stats["pairs"]) == 3 and int(stats["correct"]) == 1


def test_listwise_loss_of_three_responses_with_a_tie_by_hand():
    # Ranks [1, 2, 2]: the first is chosen over both; the tied two are never compared, so they
    # contribute nothing (nothing is ranked strictly below either).
    a, b, c = 1.0, 0.2, -0.5
    rewards = torch.tensor([[a, b, c]])
    loss = listwise_loss(rewards, torch.tensor([[1, 2, 2]]), torch.ones((1, 3), dtype=torch.bool))
    expected = -(a - math.log(math.exp(a) + math.exp(b) + math.exp(c)))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # Ranks [1, 1, 2]: each top one is chosen over the last only, the mean of the two stages.
    loss = listwise_loss(rewards, torch.tensor([[1, 1, 2]]), torch.ones((1, 3), dtype=torch.bool))
    expected = -((a - math.log(math.exp(a) + math.exp(c))) + (b - math.log(math.exp(b) + math.exp(c)))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # A full ranking [2, 3, 1] of K = 3: Plackett-Luce's c, then a, then (b alone: nothing below).
    loss = listwise_loss(rewards, torch.tensor([[2, 3, 1]]), torch.ones((1, 3), dtype=torch.bool))
    expected = -((c - math.log(math.exp(a) + math.exp(b) + math.exp(c))) + (a - math.log(math.exp(a) + math.exp(b)))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_padding_of_a_shorter_ranking_changes_nothing():
    rewards = torch.tensor([[0.4, -0.3, 0.0]])
    alone = listwise_loss(rewards[:, :2], torch.tensor([[1, 2]]), torch.ones((1, 2), dtype=torch.bool))
    padded = listwise_loss(rewards, torch.tensor([[1, 2, 0]]), torch.tensor([[True, True, False]]))
    torch.testing.assert_close(alone, padded)


def test_ipo_loss_by_hand():
    beta = 0.5
    logratios = torch.tensor([[0.3, -1.2]])
    loss, _ = dpo_loss(logratios, torch.tensor([[1, 2]]), torch.ones((1, 2), dtype=torch.bool), beta=beta, loss="ipo")
    assert loss.item() == pytest.approx((1.5 - 1 / (2 * beta)) ** 2)


def test_shared_prompt_log_probs_and_gradients_equal_whole_sequences(tiny_model_dir):
    # Two rankings with prompts of different lengths (left padding) and responses of different
    # lengths (right padding): each prompt runs once, its responses read its keys and values. The
    # log-probs, and the gradients through the shared prompt, are those of each sequence run alone.
    tokenizer = prepare_tokenizer(load_tokenizer(str(tiny_model_dir)))
    model = load_causal_lm(str(tiny_model_dir), torch.device("cpu"), torch.float32).eval()
    groups = [RankedGroup(synthetic.prompt(0), ["good apple", "river stone good lamp tree"], [1, 2]),
              RankedGroup([{"role": "user", "content": "A much longer prompt, about trains and the sea."}],
                          ["lamp", "tree good", "bread bread stone"], [2, 1, 3])]
    encoded = [encode_group(tokenizer, g, 128) for g in groups]
    weights = torch.tensor([0.7, -1.3, 0.4, 2.0, -0.6])
    shared = ranking_logprobs(model, encoded, tokenizer.pad_token_id, torch.device("cpu"))
    (shared * weights).sum().backward()
    shared_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone = []
    for g in encoded:
        for response in g.responses:
            seq = torch.tensor([g.prompt + response])
            logp = torch.log_softmax(model(seq).logits[0, :-1], -1).gather(-1, seq[0, 1:].unsqueeze(-1)).squeeze(-1)
            alone.append(logp[len(g.prompt) - 1:].sum())
    alone = torch.stack(alone)
    (alone * weights).sum().backward()
    torch.testing.assert_close(shared.detach(), alone.detach(), atol=1e-4, rtol=1e-5)
    for got, want in zip(shared_grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-3)


def test_a_ranking_shares_one_prompt_cut_for_its_longest_response(tiny_model_dir):
    tokenizer = prepare_tokenizer(load_tokenizer(str(tiny_model_dir)))
    group = RankedGroup(synthetic.prompt(0), ["good", " ".join(["apple"] * 40)], [1, 2])
    prompt = encode_prompt(tokenizer, group.messages)
    encoded = encode_group(tokenizer, group, 50)
    assert encoded.prompt == prompt[-25:]  # down to half of max_length, the end kept
    assert encoded.responses[0] == encode_response(tokenizer, "good")
    assert len(encoded.responses[1]) == 25 and encoded.ranks == [1, 2]


# ---- learning a known rule ----------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_model(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo-sft")
    return synthetic.train_sft(tiny_model_dir, root / "sft", synthetic.sft_examples(400), steps=40, lr=3e-3)


def _good(samples) -> float:
    return sum(synthetic.good_count(s["response"]) for s in samples) / len(samples)


# The tiny model leaves the word language at a learning rate a few times higher (DPO's known failure: the
# log-probs of chosen and rejected both fall, and the samples with them); IPO's squared loss takes a lower one.
@pytest.mark.parametrize("loss, lr", [("listwise", 2e-4), ("sigmoid", 2e-4), ("ipo", 1e-4)])
def test_each_loss_learns_the_preference_on_held_out_prompts(sft_model, tmp_path, loss, lr):
    config = DPOConfig(loss=loss, beta=0.1, epochs=2, batch_size=8, learning_rate=lr, warmup_ratio=0.0,
                       max_new_tokens=10, temperature=1.0, validation_samples=16, lr_schedule="constant")
    seen = []
    result = train_dpo(config, synthetic.ranked_groups(range(0, 80), seed=1),
                       synthetic.ranked_groups(range(1000, 1030), seed=2), policy_path=sft_model,
                       reference_path=sft_model, output_dir=tmp_path / "policy",
                       validation_prompts=[synthetic.prompt(i) for i in range(2000, 2016)],
                       on_step=lambda step, m: seen.append((step, m)))
    metrics = result.metrics
    assert metrics["val_accuracy_before"] == 0.0  # the policy is the reference: every margin is 0
    assert metrics["val_accuracy"] > 0.9, metrics  # held-out prompts, ordered by the implicit reward
    assert metrics["val_margin"] > 0
    # The rule's score of sampled responses (same draws before and after) rises, near the reference.
    assert _good(result.samples_after) >= _good(result.samples_before) + 0.2, (
        _good(result.samples_before), _good(result.samples_after))
    assert all(s["kl"] == pytest.approx(0.0, abs=1e-4) for s in result.samples_before)
    assert 0 < metrics["kl"] < 5
    steps = [m for s, m in seen if "loss" in m]
    assert len(steps) == metrics["steps"] == 2 * 10
    assert {"accuracy", "margin", "chosen_logp", "rejected_logp", "lr"} <= set(steps[0])
    evaluations = [m for _, m in seen if "val_accuracy" in m]
    assert len(evaluations) == 3 and all("kl" in m for m in evaluations)
    out = result.output_dir
    assert json.loads((out / CONFIG_FILE).read_text())["kind"] == "policy"
    load_causal_lm(str(out), torch.device("cpu"))  # a plain checkpoint


def test_a_ranking_costs_k_policy_sequences(sft_model, tmp_path):
    config = DPOConfig(loss="sigmoid", epochs=1, batch_size=4, learning_rate=1e-4, validation_samples=0)
    train = synthetic.ranked_groups(range(0, 12), k=4, seed=1)
    result = train_dpo(config, train, synthetic.ranked_groups(range(100, 104), seed=2), policy_path=sft_model,
                       reference_path=sft_model, output_dir=tmp_path / "policy")
    usable = [g for g in train if len(set(g.ranks)) > 1]
    assert result.metrics["policy_sequences"] == 4 * len(usable)  # not 2 per comparison


def test_lora_dpo_saves_a_plain_policy_and_stops_when_asked(sft_model, tmp_path):
    config = DPOConfig(epochs=1, batch_size=4, learning_rate=1e-3, lora_r=4, validation_samples=4, max_new_tokens=6)
    data = synthetic.ranked_groups(range(0, 8), seed=1), synthetic.ranked_groups(range(100, 104), seed=2)
    result = train_dpo(config, *data, policy_path=sft_model, reference_path=sft_model, output_dir=tmp_path / "lora",
                       validation_prompts=[synthetic.prompt(i) for i in range(4)])
    assert result.metrics["kl"] >= 0 and all(s["kl"] == pytest.approx(0.0, abs=1e-4) for s in result.samples_before)
    assert not any("lora" in n for n in load_causal_lm(str(result.output_dir), torch.device("cpu")).state_dict())
    with pytest.raises(Cancelled):
        train_dpo(config, *data, policy_path=sft_model, reference_path=sft_model, output_dir=tmp_path / "stopped",
                  should_stop=lambda: True)
    assert not (tmp_path / "stopped").exists()


def test_rankings_without_a_preference_are_refused(sft_model, tmp_path):
    tied = [RankedGroup(synthetic.prompt(0), ["good", "apple"], [1, 1])]
    with pytest.raises(ValueError, match="no training ranking"):
        train_dpo(DPOConfig(validation_samples=0), tied, tied, policy_path=sft_model, reference_path=sft_model,
                  output_dir=tmp_path / "x")


# ---- the train_dpo job, through the service and the worker's own code ---------------------

DPO_VALUES = {"epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "max_length": 96, "validation_samples": 3,
              "max_new_tokens": 6}


def test_dpo_job_registers_a_policy_with_its_reference_data_and_samples(committed, tiny_model_dir, tmp_path):
    from sqlalchemy import select, update

    from app.config import Settings
    from app.db.enums import JobStatus, ModelKind, Role, Split
    from app.db.models import Annotation, Job, JobMetric, Model, Prompt, Task
    from app.db.session import new_session
    from app.services import models, training
    from app.services.prompt_sets import GENERATOR_KINDS
    from tests.factories import make_model, make_user, ranked_set
    from trainer.worker import execute_job

    with new_session() as session:
        engineer, alice = make_user(session, role=Role.engineer), make_user(session)
        sft = make_model(session, tiny_model_dir, name="tiny-sft", is_default=True)
        reference = make_model(session, tiny_model_dir, name="tiny-reference")
        prompt_set = ranked_set(session, alice, prompts=20)
        excluded = session.scalar(select(Annotation.id).join(Task).where(Task.prompt_set_id == prompt_set.id)
                                  .order_by(Annotation.id.desc()).limit(1))
        session.execute(update(Annotation).where(Annotation.id == excluded).values(excluded=True))
        session.commit()
        job = training.start_dpo_job(session, user_id=engineer.id, values=DPO_VALUES | {"loss": "sigmoid"},
                                     prompt_set_ids=[prompt_set.id], reference_model_id=reference.id)
        ids = {"job": job.id, "sft": sft.id, "reference": reference.id, "set": prompt_set.id}
    execute_job(ids["job"], settings=Settings(device="cpu", data_dir=tmp_path))
    with new_session() as session:
        job = session.get(Job, ids["job"])
        assert job.status == JobStatus.succeeded, job.traceback
        policy = session.get(Model, job.model_id)
        assert (policy.kind, policy.parent_id, policy.source) == (ModelKind.policy, ids["sft"], "train_dpo")
        assert models.related_models(session, policy)["reference"].id == ids["reference"]
        data = policy.config["data"]
        assert excluded not in data["annotation_ids"] + data["validation_annotation_ids"]
        validation = set(session.scalars(select(Prompt.id).where(Prompt.prompt_set_id == ids["set"],
                                                                 Prompt.split == Split.validation)))
        assert not {a.prompt_id for a in training.reward_data(session, [ids["set"]])[0]} & validation
        pairs = models.side_by_side(session, policy.id)
        assert len(pairs) == 3 and all(p.before is not None and p.after is not None for p in pairs)
        assert {p.prompt_id for p in pairs} <= validation
        names = {m.name for m in session.scalars(select(JobMetric).where(JobMetric.job_id == ids["job"]))}
        assert {"loss", "accuracy", "margin", "chosen_logp", "rejected_logp", "val_accuracy", "val_margin",
                "kl"} <= names
        assert job.result["loss"] == "sigmoid" and job.result["comparisons"] == data["comparisons"] > 0
        assert job.progress_done == job.progress_total == job.result["steps"]
        assert policy.id in [m.id for m in models.models_of(session, GENERATOR_KINDS)]  # can be promoted


def test_dpo_settings_are_checked_per_field(session, tiny_model_dir):
    from app.db.enums import Role
    from app.services import training
    from app.services.errors import Invalid
    from tests.factories import make_model, make_user, ranked_set

    alice = make_user(session, role=Role.labeler)
    make_model(session, tiny_model_dir, name="tiny-sft", is_default=True)
    prompt_set = ranked_set(session, alice, prompts=6)
    with pytest.raises(Invalid) as caught:
        training.clean_dpo_params(session, values={"loss": "hinge", "beta": 0}, prompt_set_ids=[prompt_set.id])
    assert set(caught.value.errors) == {"loss", "beta"}
    with pytest.raises(Invalid) as caught:
        training.clean_dpo_params(session, values={"learning_rate": 1e-3}, prompt_set_ids=[prompt_set.id],
                                  labeler_ids=[999_999], reference_model_id="x")
    assert set(caught.value.errors) == {"labeler_ids", "reference_model_id"}
    with pytest.raises(Invalid, match="Unknown setting 'betta'"):
        training.clean_dpo_params(session, values={"betta": 0.1}, prompt_set_ids=[prompt_set.id])
    params = training.clean_dpo_params(session, values={}, prompt_set_ids=[prompt_set.id])
    assert params["reference_model_id"] == params["policy_model_id"] and params["config"]["loss"] == "listwise"


# ---- the page and the API ------------------------------------------------------------------

def test_dpo_form_offers_the_losses_queues_a_run_and_names_bad_fields(client, client_as, session, tmp_path):
    from sqlalchemy import select

    from app.db.enums import JobKind
    from app.db.models import Job
    from tests.factories import make_model, make_user, ranked_set

    token = client_as("engineer").headers["X-CSRF-Token"]
    alice = make_user(session, username="alice")
    sft = make_model(session, tmp_path, name="sft-base", is_default=True)
    prompt_set = ranked_set(session, alice, prompts=6, name="ranked")
    session.commit()
    page = client.get("/training/dpo")
    assert page.status_code == 200
    assert 'value="listwise"' in page.text and 'value="ipo"' in page.text and "sft-base" in page.text
    assert "(6 annotations)" in page.text and 'id="policy-methods"' in page.text  # PPO, DPO, best-of-N side by side
    assert 'href="/training/best-of-n"' in page.text
    assert 'name="include_imported"' in page.text  # imported judgements train by choice, as a reward model's
    assert 'name="include_ai"' in page.text  # so do AI labelers' rankings

    bad = client.post("/training/dpo", data={"csrf_token": token, "beta": "0", "loss": "hinge",
                                             "include_imported": "perhaps"}, headers={"HX-Request": "true"})
    assert bad.status_code == 422 and bad.text.lstrip().startswith('<section class="card" id="run-form">')
    assert "choose at least one ranking set" in bad.text and "must be 0.001..100" in bad.text
    assert "one of listwise, sigmoid, ipo" in bad.text and "choose yes or no" in bad.text

    response = client.post("/training/dpo", data={
        "csrf_token": token, "policy_model_id": str(sft.id), "prompt_set_ids": str(prompt_set.id),
        "include_imported": "no", "include_ai": "yes",
        "loss": "sigmoid", "beta": "0.2", "epochs": "2", "learning_rate": "0.0001", "name": "dpo-1"},
        follow_redirects=False)
    assert response.status_code == 303
    [job] = session.scalars(select(Job).where(Job.kind == JobKind.train_dpo)).all()
    assert response.headers["location"] == f"/jobs/{job.id}"
    assert job.params["reference_model_id"] == sft.id and job.params["name"] == "dpo-1"
    assert job.params["include_imported"] is False and job.params["include_ai"] is True
    assert (job.params["config"]["loss"], job.params["config"]["beta"], job.params["config"]["epochs"]) == ("sigmoid", 0.2, 2)


def test_dpo_api_lists_its_settings_and_queues_a_run(client, session, tmp_path):
    from app.db.enums import Role
    from app.services import auth
    from tests.factories import make_model, make_user, ranked_set

    user = make_user(session, role=Role.engineer)
    _, raw = auth.create_api_token(session, user=user, name="tests")
    client.headers["Authorization"] = f"Bearer {raw}"
    alice = make_user(session)
    make_model(session, tmp_path, name="sft", is_default=True)
    prompt_set = ranked_set(session, alice, prompts=6)
    session.commit()
    settings = client.get("/api/v1/training/settings").json()
    loss = next(s for s in settings["dpo"] if s["name"] == "loss")
    assert loss["choices"] == ["listwise", "sigmoid", "ipo"] and loss["default"] == "listwise"
    assert {s["name"] for s in settings["best_of_n"]} >= {"n", "temperature", "max_prompts"}
    created = client.post("/api/v1/training/dpo", json={"prompt_set_ids": [prompt_set.id], "include_imported": False,
                                                        "config": {"beta": 0.5}})
    assert created.status_code == 201 and created.json()["kind"] == "train_dpo"
    assert created.json()["params"]["include_imported"] is False and created.json()["params"]["include_ai"] is False
    with_ai = client.post("/api/v1/training/dpo", json={"prompt_set_ids": [prompt_set.id], "include_ai": True})
    assert with_ai.status_code == 201 and with_ai.json()["params"]["include_ai"] is True
    refused = client.post("/api/v1/training/dpo", json={"prompt_set_ids": [prompt_set.id], "policy_model_id": 999_999,
                                                        "config": {"beta": -1}})
    assert refused.status_code == 422 and set(refused.json()["errors"]) >= {"policy_model_id", "beta"}
