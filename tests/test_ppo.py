"""PPO: GAE, KL, masking and padding by hand; learning against a reward model with a known rule;
adaptive KL, ptx, LoRA, cancellation; and one slow run of the whole recipe on SmolLM2."""

import json

import pytest
import torch

from tests import synthetic
from trainer.common import (
    CONFIG_FILE,
    Cancelled,
    encode_prompt,
    masked_whiten,
    pad_left,
    prepare_tokenizer,
    response_logprobs,
    truncate_after_eos,
)
from trainer.models import load_causal_lm, load_tokenizer
from trainer.ppo import (
    AdaptiveKLController,
    FixedKLController,
    PPOConfig,
    compute_gae,
    per_token_kl,
    score_with_penalty,
    train_ppo,
)
from trainer.reward import RewardConfig, train_reward_model

STEP_METRICS = {"reward", "kl", "total_reward", "entropy", "policy_loss", "value_loss", "clip_frac", "approx_kl",
                "response_length", "lr", "kl_coef"}


# ---- hand-computed pieces ------------------------------------------------------------

def test_gae_on_a_hand_worked_example():
    # One response of two real tokens and one pad; gamma 0.9, lambda 0.5.
    rewards = torch.tensor([[0.0, 1.0, 5.0]])  # 5.0 sits on padding: ignored
    values = torch.tensor([[0.5, 0.2, 9.0]])  # so is 9.0
    mask = torch.tensor([[1, 1, 0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t=1: delta = 1 + 0.9*0 - 0.2 = 0.8, A1 = 0.8 (the episode ends at the last real token)
    # t=0: delta = 0 + 0.9*0.2 - 0.5 = -0.32, A0 = -0.32 + 0.9*0.5*0.8 = 0.04
    torch.testing.assert_close(advantages, torch.tensor([[0.04, 0.8, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.54, 1.0, 0.0]]))


def test_kl_estimators_by_hand():
    logprobs = torch.log(torch.tensor([[0.5]]))
    ref_logprobs = torch.log(torch.tensor([[0.25]]))
    assert per_token_kl(logprobs, ref_logprobs, "k1").item() == pytest.approx(0.693147, abs=1e-5)  # log 2
    assert per_token_kl(logprobs, ref_logprobs, "k3").item() == pytest.approx(-0.5 + 0.693147, abs=1e-5)
    assert per_token_kl(ref_logprobs, logprobs, "k3").item() >= 0  # k3 is never negative


def test_adaptive_kl_controller_follows_ziegler():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    controller.update(6.6, n_steps=100)  # error 0.1: beta * (1 + 0.1 * 100 / 10000)
    assert controller.value == pytest.approx(0.1 * 1.001)
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    controller.update(30.0, n_steps=100)  # error clipped to +0.2
    assert controller.value == pytest.approx(0.1 * 1.002)
    controller.update(0.0, n_steps=100)  # error clipped to -0.2
    assert controller.value == pytest.approx(0.1 * 1.002 * 0.998)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=100)
    assert fixed.value == 0.05


def test_truncation_after_first_eos():
    eos, pad = 2, 0
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    truncated, mask, ended = truncate_after_eos(responses, eos, pad)
    assert truncated.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_missing_eos_penalty_applies_only_to_unfinished_responses():
    score = torch.tensor([0.5, 0.5])
    ended = torch.tensor([True, False])
    assert score_with_penalty(score, ended, 1.0).tolist() == [0.5, -0.5]
    assert score_with_penalty(score, ended, None).tolist() == [0.5, 0.5]


def test_whitening_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    whitened = masked_whiten(x, mask)
    real = whitened[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.std().item() == pytest.approx(1.0, abs=1e-4)
    assert whitened[~mask.bool()].abs().sum() == 0


def test_left_padded_batch_gives_the_log_probs_of_single_sequences(tiny_model_dir):
    tokenizer = prepare_tokenizer(load_tokenizer(str(tiny_model_dir)))
    model = load_causal_lm(str(tiny_model_dir), torch.device("cpu"), torch.float32).eval()
    prompts = [encode_prompt(tokenizer, synthetic.prompt(0)), [1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198]]
    responses = [[1123, 3187, 2], [4626, 2, 0]]  # the second ended early: EOS then one pad
    temperature = 0.7
    query, query_mask = pad_left(prompts, tokenizer.pad_token_id)
    batch = torch.cat([query, torch.tensor(responses)], 1)
    attention = torch.cat([query_mask, torch.tensor([[1, 1, 1], [1, 1, 0]])], 1)
    with torch.no_grad():
        logprobs, entropy = response_logprobs(model, batch, attention, query.shape[1], temperature, with_entropy=True)
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            n = 3 if row == 0 else 2
            alone = torch.tensor([prompt + response[:n]])
            logits = model(alone).logits[0, len(prompt) - 1:-1] / temperature  # divided by T, then log-softmax
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response[:n]).unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(logprobs[row, :n], expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(logprobs).all() and torch.isfinite(entropy).all()


# ---- learning --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def word_models(tiny_model_dir, tmp_path_factory):
    """The recipe in miniature: SFT a tiny model on word soup, then a reward model (from the SFT
    model) on rankings that prefer more "good"."""
    root = tmp_path_factory.mktemp("word-models")
    sft = synthetic.train_sft(tiny_model_dir, root / "sft", synthetic.sft_examples(400), steps=40, lr=3e-3)
    result = train_reward_model(
        RewardConfig(epochs=1, batch_size=8, learning_rate=1e-3),
        synthetic.ranked_groups(range(0, 200), seed=1), synthetic.ranked_groups(range(1000, 1040), seed=2),
        model_path=sft, output_dir=root / "rm")
    assert result.metrics["val_accuracy"] > 0.9
    return sft, result.output_dir


def test_ppo_raises_the_reward_within_a_bounded_kl(word_models, tmp_path):
    sft, rm = word_models
    config = PPOConfig(steps=15, batch_size=16, mini_batch_size=8, learning_rate=3e-4, max_new_tokens=16,
                       temperature=1.0, kl_coef=0.05)
    seen = []
    result = train_ppo(config, [synthetic.prompt(i) for i in range(100)], policy_path=sft, reference_path=sft,
                       reward_path=rm, output_dir=tmp_path / "policy",
                       validation_prompts=[synthetic.prompt(i) for i in range(2000, 2032)],
                       on_step=lambda step, metrics: seen.append((step, metrics)))

    assert [s for s, _ in seen] == list(range(1, 16))
    assert all(STEP_METRICS <= set(m) for _, m in seen)
    assert seen[0][1]["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the start
    before, after = result.metrics["validation_reward_before"], result.metrics["validation_reward_after"]
    assert after - before > 0.5, (before, after)  # in units of the SFT samples' reward std
    assert max(m["kl"] for _, m in seen) < 10.0  # nats per response: the penalty keeps it near the reference
    assert len(result.samples_before) == len(result.samples_after) == 32
    good_before = sum(synthetic.good_count(s["response"]) for s in result.samples_before)
    good_after = sum(synthetic.good_count(s["response"]) for s in result.samples_after)
    assert good_after > good_before
    out = result.output_dir
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert json.loads((out / CONFIG_FILE).read_text())["kind"] == "policy"
    load_causal_lm(str(out), torch.device("cpu"))  # a plain checkpoint


def test_ppo_with_adaptive_kl_k3_and_ptx(word_models, tmp_path):
    sft, rm = word_models
    config = PPOConfig(steps=3, batch_size=4, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-4,
                       max_new_tokens=8, adaptive_kl=True, target_kl=0.01, kl_horizon=10, kl_estimator="k3",
                       ptx_coef=0.5)
    result = train_ppo(config, [synthetic.prompt(i) for i in range(8)], policy_path=sft, reference_path=sft,
                       reward_path=rm, output_dir=tmp_path / "policy", sft_data=synthetic.sft_examples(16))
    coefs = [h["kl_coef"] for h in result.history]
    assert coefs[0] == 0.05 and coefs[-1] != coefs[0]  # the controller moved beta
    assert all(h["ptx_loss"] > 0 for h in result.history)
    assert all(h["lr"] > 0 for h in result.history) and result.history[-1]["lr"] < result.history[0]["lr"]


def test_ppo_refuses_bad_settings_and_stops_when_asked(word_models, tmp_path):
    sft, rm = word_models
    with pytest.raises(ValueError, match="mini_batch_size"):
        PPOConfig(batch_size=6, mini_batch_size=4)
    with pytest.raises(ValueError, match="sft_data"):
        train_ppo(PPOConfig(ptx_coef=1.0), [synthetic.prompt(0)], policy_path=sft, reference_path=sft,
                  reward_path=rm, output_dir=tmp_path / "p")
    with pytest.raises(Cancelled):
        train_ppo(PPOConfig(steps=5, batch_size=2, mini_batch_size=2, max_new_tokens=4), [synthetic.prompt(0)],
                  policy_path=sft, reference_path=sft, reward_path=rm, output_dir=tmp_path / "p",
                  should_stop=lambda: True)
    assert not (tmp_path / "p").exists()


def test_ppo_with_lora_uses_the_policy_without_adapters_as_reference(word_models, tmp_path):
    pytest.importorskip("peft")
    sft, rm = word_models
    config = PPOConfig(steps=2, batch_size=4, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-3,
                       max_new_tokens=8, lora_r=4)
    result = train_ppo(config, [synthetic.prompt(i) for i in range(4)], policy_path=sft, reference_path=sft,
                       reward_path=rm, output_dir=tmp_path / "policy")
    assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # fresh adapters: policy == reference
    model = load_causal_lm(str(result.output_dir), torch.device("cpu"))
    assert not any("lora" in name for name, _ in model.named_parameters())


# ---- the whole recipe on the real default model ---------------------------------------

@pytest.mark.slow
def test_reward_model_then_ppo_on_the_default_model(tmp_path):
    from tests.conftest import default_model_dir

    base = default_model_dir()
    # As small as it gets: the point is that the real model goes through every code path.
    reward = train_reward_model(
        RewardConfig(epochs=1, batch_size=4, learning_rate=1e-5, max_length=64),
        synthetic.ranked_groups(range(0, 4), k=2, seed=1), synthetic.ranked_groups(range(1000, 1002), k=2, seed=2),
        model_path=base, output_dir=tmp_path / "rm")
    assert reward.metrics["steps"] == 1 and reward.metrics["reward_std"] > 0
    config = PPOConfig(steps=2, batch_size=2, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-6, max_new_tokens=8)
    result = train_ppo(config, [synthetic.prompt(i) for i in range(2)], policy_path=base, reference_path=base,
                       reward_path=reward.output_dir, output_dir=tmp_path / "policy",
                       validation_prompts=[synthetic.prompt(100)])
    assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert all(STEP_METRICS <= set(h) for h in result.history)
    assert result.samples_after and result.samples_after[0]["response"]
    assert (result.output_dir / "model.safetensors").exists()
