"""PPO: GAE, KL, masking and padding by hand; learning against a reward model with a known rule;
adaptive KL, ptx, LoRA, cancellation; and one slow run of the whole recipe on SmolLM2."""

import json
import shutil

import pytest
import torch

from tests.factories import synthetic
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
from trainer.models import load_causal_lm, load_tokenizer, pick_device, pick_dtype
from trainer.ppo import (
    AdaptiveKLController,
    FixedKLController,
    PPOConfig,
    compute_gae,
    ended_with_eos,
    per_token_kl,
    score_with_penalty,
    train_ppo,
)
from trainer.reward import RewardConfig, load_reward_model, score, train_reward_model

def start_kl(cpu: float) -> float:
    """How far from 0 the KL of a policy from itself may be at the start: on the CPU policy and reference
    are both float32 and agree to `cpu`; on CUDA the frozen reference is held in bf16 while the policy
    trains in float32 under bf16 autocast, so they differ by rounding (an H200 gave |kl| up to 0.02)."""
    return cpu if pick_device("auto").type == "cpu" else 0.05


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


def test_default_adaptive_kl_steers_within_a_short_run():
    # Ziegler et al.'s horizon (10000 samples at batch 512) is ~20 steps; at our batch of 8 the same 10000
    # would move beta by at most 0.016% a step. The default horizon keeps their ~20 steps.
    defaults = PPOConfig()
    assert defaults.kl_horizon / defaults.batch_size == pytest.approx(10000 / 512, rel=0.05)
    rising = AdaptiveKLController(0.05, target=defaults.target_kl, horizon=defaults.kl_horizon)
    for _ in range(12):  # KL far above the target for a 12-step run
        rising.update(10 * defaults.target_kl, n_steps=defaults.batch_size)
    assert rising.value > 0.05 * 1.1


def test_truncation_after_first_eos():
    eos, pad = 2, 0
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    truncated, mask, ended = truncate_after_eos(responses, eos, pad)
    assert truncated.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_cut_responses_are_scored_with_eos_appended_as_the_reward_model_was_trained():
    eos, pad = 2, 0
    responses = torch.tensor([[5, 2, 0], [5, 6, 7]])  # the first ended, the second was cut at the limit
    mask, ended = torch.tensor([[1, 1, 0], [1, 1, 1]]), torch.tensor([True, False])
    ids, scored_mask = ended_with_eos(responses, mask, ended, eos, pad)
    assert ids.tolist() == [[5, 2, 0, 0], [5, 6, 7, 2]]
    assert scored_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


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
    assert seen[0][1]["kl"] == pytest.approx(0.0, abs=start_kl(1e-5))  # policy == reference at the start
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


def test_adaptive_kl_raises_beta_above_the_target_and_lowers_it_below(word_models, tmp_path):
    sft, rm = word_models
    config = PPOConfig(steps=4, batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3,
                       max_new_tokens=8, adaptive_kl=True, target_kl=0.01, kl_horizon=10, kl_estimator="k3",
                       normalisation_prompts=0)
    history = _ppo(config, sft, rm, tmp_path / "policy").history
    coefs, kls = [h["kl_coef"] for h in history], [h["kl"] for h in history]
    assert coefs[0] == 0.05
    # Each step's KL moves the next step's beta: up above the target, down below it.
    moves = [(kl > config.target_kl, after > before) for kl, before, after in zip(kls, coefs, coefs[1:])]
    assert all(above == up for above, up in moves), (kls, coefs)
    assert {above for above, _ in moves} == {True, False}  # both directions seen (KL is 0 at step 1)
    assert all(h["lr"] > 0 for h in history) and history[-1]["lr"] < history[0]["lr"]


def test_a_larger_fixed_beta_keeps_the_policy_closer_to_the_reference(word_models, tmp_path):
    sft, rm = word_models
    final_kl = {}
    for beta in (0.0, 2.0):
        config = PPOConfig(steps=5, batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3,
                           max_new_tokens=6, kl_coef=beta, normalisation_prompts=0)
        history = _ppo(config, sft, rm, tmp_path / f"beta-{beta}", prompts=range(16)).history
        final_kl[beta] = sum(h["kl"] for h in history[-2:]) / 2
    assert final_kl[2.0] < final_kl[0.0], final_kl


def test_ptx_keeps_the_demonstrations_likely(word_models, tmp_path):
    from trainer.common import encode_response, sequence_nll

    sft, rm = word_models
    demonstrations = synthetic.sft_examples(16, seed=3)
    nll = {}
    for ptx in (0.0, 1.0):
        config = PPOConfig(steps=3, batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3,
                           max_new_tokens=6, kl_coef=0.0, ptx_coef=ptx, normalisation_prompts=0)
        result = _ppo(config, sft, rm, tmp_path / f"ptx-{ptx}", sft_data=demonstrations if ptx else None)
        if ptx:
            assert all(h["ptx_loss"] > 0 for h in result.history)
        tokenizer = prepare_tokenizer(load_tokenizer(str(result.output_dir)))
        model = load_causal_lm(str(result.output_dir), torch.device("cpu"), torch.float32).eval()
        seqs, masks = [], []
        for messages, text in demonstrations:
            p, r = encode_prompt(tokenizer, messages), encode_response(tokenizer, text)
            seqs.append(p + r)
            masks.append([0] * len(p) + [1] * len(r))
        ids, attention = pad_left(seqs, tokenizer.pad_token_id)
        loss_mask, _ = pad_left(masks, 0)
        with torch.no_grad():
            nll[ptx] = sequence_nll(model, ids, attention, loss_mask).item()
    assert nll[1.0] < nll[0.0], nll


def _ppo(config, sft, rm, out, prompts=range(8), **kwargs):
    return train_ppo(config, [synthetic.prompt(i) for i in prompts], policy_path=sft, reference_path=sft,
                     reward_path=rm, output_dir=out, **kwargs)


def test_values_are_in_reward_units_whatever_offset_the_reward_model_has(word_models, tmp_path):
    """The ranking loss ignores a constant shift of the RM: an RM whose raw scores are 50 higher (and its
    stored normalisation mean too) must give the same first step: value loss, advantages (hence policy
    loss and the update) alike."""
    sft, rm = word_models
    shifted = tmp_path / "rm-plus-50"
    shutil.copytree(rm, shifted)
    config_file = shifted / "config.json"
    rm_config = json.loads(config_file.read_text())
    rm_config["reward_mean"] += 50.0
    config_file.write_text(json.dumps(rm_config))
    config = PPOConfig(steps=1, batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-4,
                       max_new_tokens=8, normalisation_prompts=0)
    plain = _ppo(config, sft, rm, tmp_path / "plain").history[0]

    def plus_50(module, args, output):  # the scalar heads (reward and value) only
        if isinstance(module, torch.nn.Linear) and module.out_features == 1:
            return output + 50.0

    handle = torch.nn.modules.module.register_module_forward_hook(plus_50)
    try:
        offset = _ppo(config, sft, shifted, tmp_path / "offset").history[0]
    finally:
        handle.remove()
    # On CUDA the trainer computes in bf16, whose step near 50 is 0.25; on the CPU (CI) float32 holds it tight.
    bf16 = pick_dtype(pick_device()) == torch.bfloat16
    assert offset["reward_unnormalised"] == pytest.approx(plain["reward_unnormalised"] + 50.0,
                                                          abs=0.5 if bf16 else 1e-3)
    for name in ("reward", "value_loss", "policy_loss", "value_clip_frac", "clip_frac", "total_reward"):
        # A clipped fraction counts tokens: in bf16 one token on the clip's edge may fall either side.
        slack = (0.1 if name.endswith("_frac") else 1e-4) if bf16 else 1e-4
        assert offset[name] == pytest.approx(plain[name], rel=5e-2 if bf16 else 1e-3, abs=slack), name


def test_value_warmup_steps_leave_the_policy_unchanged(word_models, tmp_path):
    sft, rm = word_models
    config = PPOConfig(steps=2, batch_size=2, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-3,
                       max_new_tokens=4, normalisation_prompts=0, value_warmup_steps=1)
    result = _ppo(config, sft, rm, tmp_path / "p")
    assert result.history[0]["kl"] == pytest.approx(0.0, abs=start_kl(1e-5))
    assert result.history[1]["kl"] == pytest.approx(0.0, abs=start_kl(1e-5))  # step 1 trained the value model only
    assert result.history[1]["approx_kl"] == pytest.approx(0.0, abs=1e-6)


def test_ppo_samples_with_its_own_settings_not_the_checkpoints(word_models, tmp_path):
    """A policy whose generation_config.json sets min_p and a repetition penalty samples exactly as one
    without them; at T = 0.7 the first minibatch's ratio is exactly 1."""
    from transformers import GenerationConfig

    sft, rm = word_models
    leaky = tmp_path / "leaky"
    shutil.copytree(sft, leaky)
    GenerationConfig(do_sample=True, min_p=0.3, repetition_penalty=1.3).save_pretrained(leaky)
    # One minibatch, one epoch: the only update is computed on the rollout's own policy.
    config = PPOConfig(steps=1, batch_size=4, mini_batch_size=4, ppo_epochs=1, learning_rate=1e-4,
                       max_new_tokens=8, temperature=0.7, normalisation_prompts=0)
    validation = [synthetic.prompt(i) for i in range(2000, 2008)]
    runs = []
    for policy in (sft, leaky):
        runs.append(train_ppo(config, [synthetic.prompt(i) for i in range(8)], policy_path=policy,
                              reference_path=policy, reward_path=rm, output_dir=tmp_path / f"out-{len(runs)}",
                              validation_prompts=validation))
    plain, leaked = runs
    assert [s["response"] for s in leaked.samples_before] == [s["response"] for s in plain.samples_before]
    first = leaked.history[0]
    assert first["approx_kl"] == 0.0 and first["clip_frac"] == 0.0  # ratio exactly 1 everywhere
    assert first["kl"] == pytest.approx(0.0, abs=start_kl(1e-6))


def test_step_one_rollouts_score_zero_on_the_normalisation_of_their_own_samples(word_models, tmp_path):
    """The RM normalised on samples of the SFT model drawn with PPO's settings (as the annotation sampler
    stores them: text, cut ones too) must give PPO's first rollouts a mean reward near 0: the rollouts
    are scored as the RM was trained and normalised (EOS appended to a cut response)."""
    from trainer.sampling import SamplingSettings, TransformersSampler

    sft, rm = word_models
    max_new_tokens, temperature = 3, 0.7  # short: most responses are cut at the limit
    sampler = TransformersSampler(str(sft), torch.device("cpu"), torch.float32)
    prompts = [synthetic.prompt(i) for i in range(64)]
    samples = sampler.sample(prompts, list(range(64)), SamplingSettings(temperature, 1.0, max_new_tokens))
    assert sum(s.finish_reason == "length" for s in samples) > 32
    model, tokenizer = load_reward_model(rm)
    raw = torch.cat([score(model, tokenizer, p, [s.text], normalise=False) for p, s in zip(prompts, samples)])
    normalised = tmp_path / "rm"
    shutil.copytree(rm, normalised)
    config_file = normalised / "config.json"
    rm_config = json.loads(config_file.read_text())
    rm_config["reward_mean"], rm_config["reward_std"] = raw.mean().item(), raw.std().item()
    config_file.write_text(json.dumps(rm_config))

    config = PPOConfig(steps=1, batch_size=32, mini_batch_size=32, ppo_epochs=1, learning_rate=1e-6,
                       max_new_tokens=max_new_tokens, temperature=temperature, normalisation_prompts=0)
    first = _ppo(config, sft, normalised, tmp_path / "p", prompts=range(64)).history[0]
    # sampling noise of the mean of 32 rollouts and of the 64 samples' mean, in std units: ~0.22
    assert abs(first["reward"]) < 0.66, first["reward"]


def test_ppo_normalises_the_reward_on_the_references_samples_with_its_settings(word_models, tmp_path):
    sft, rm = word_models
    config = PPOConfig(steps=1, batch_size=32, mini_batch_size=32, ppo_epochs=1, learning_rate=1e-6,
                       max_new_tokens=5, temperature=0.7, normalisation_prompts=64)
    result = _ppo(config, sft, rm, tmp_path / "p", prompts=range(64))
    assert abs(result.history[0]["reward"]) < 0.66, result.history[0]["reward"]
    stored_mean = load_reward_model(rm)[0].config.reward_mean
    assert result.metrics["normalisation_mean"] != pytest.approx(stored_mean, abs=1e-3)


def test_ppo_applies_only_the_weight_decay_it_is_given(word_models, tmp_path, monkeypatch):
    sft, rm = word_models
    seen = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.param_groups[0]["weight_decay"])

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    config = PPOConfig(steps=1, batch_size=2, mini_batch_size=2, ppo_epochs=1, max_new_tokens=2,
                       normalisation_prompts=0)
    _ppo(config, sft, rm, tmp_path / "default")
    _ppo(PPOConfig(**{**config.__dict__, "weight_decay": 0.1}), sft, rm, tmp_path / "chosen")
    assert seen == [0.0, 0.1]  # torch's own default (0.01) is nobody's choice


def test_ptx_demonstrations_are_cut_to_the_policys_input_length(word_models, tmp_path, monkeypatch):
    import trainer.ppo

    sft, rm = word_models
    widths = []
    original = trainer.ppo.sequence_nll

    def recording_nll(model, input_ids, attention_mask, loss_mask):
        widths.append(input_ids.shape[1])
        return original(model, input_ids, attention_mask, loss_mask)

    monkeypatch.setattr(trainer.ppo, "sequence_nll", recording_nll)
    config = PPOConfig(steps=1, batch_size=2, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4,
                       max_prompt_length=64, normalisation_prompts=0, ptx_coef=1.0)
    long_demonstrations = [(synthetic.prompt(i), " ".join(["river"] * 600)) for i in range(4)]
    _ppo(config, sft, rm, tmp_path / "p", sft_data=long_demonstrations)
    assert widths and max(widths) <= config.max_prompt_length + config.max_new_tokens


def test_ppo_refuses_bad_settings_and_stops_when_asked(word_models, tmp_path):
    sft, rm = word_models
    with pytest.raises(ValueError, match="mini_batch_size"):
        PPOConfig(batch_size=6, mini_batch_size=4)
    with pytest.raises(ValueError, match="sft_data"):
        train_ppo(PPOConfig(ptx_coef=1.0), [synthetic.prompt(0)], policy_path=sft, reference_path=sft,
                  reward_path=rm, output_dir=tmp_path / "p")
    with pytest.raises(Cancelled):
        train_ppo(PPOConfig(steps=5, batch_size=2, mini_batch_size=2, max_new_tokens=4, normalisation_prompts=0),
                  [synthetic.prompt(0)],
                  policy_path=sft, reference_path=sft, reward_path=rm, output_dir=tmp_path / "p",
                  should_stop=lambda: True)
    assert not (tmp_path / "p").exists()


def test_lora_reference_is_the_policy_without_its_adapters(word_models):
    pytest.importorskip("peft")
    from trainer.common import add_lora
    from trainer.ppo import reference_logprobs

    sft, _ = word_models
    tokenizer = prepare_tokenizer(load_tokenizer(str(sft)))
    plain = load_causal_lm(str(sft), torch.device("cpu"), torch.float32).eval()
    policy = add_lora(load_causal_lm(str(sft), torch.device("cpu"), torch.float32), r=4, alpha=16, dropout=0.0,
                      task_type="CAUSAL_LM").eval()
    torch.manual_seed(0)
    with torch.no_grad():  # adapters that change the policy (fresh ones are zero: no test at all)
        for name, parameter in policy.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn_like(parameter) * 0.5)
    prompt = encode_prompt(tokenizer, synthetic.prompt(0))
    ids = torch.tensor([prompt + encode_prompt(tokenizer, synthetic.prompt(1))[:6]])
    attention = torch.ones_like(ids)
    with torch.no_grad():
        expected = response_logprobs(plain, ids, attention, len(prompt), 0.7)[0]
        adapted = response_logprobs(policy, ids, attention, len(prompt), 0.7)[0]
        reference = reference_logprobs(policy, None, ids, attention, len(prompt), 0.7)
    assert (adapted - expected).abs().max() > 1e-3  # the adapters moved the policy
    torch.testing.assert_close(reference, expected)  # but not its reference


def test_ppo_with_lora_saves_a_plain_policy(word_models, tmp_path):
    pytest.importorskip("peft")
    sft, rm = word_models
    config = PPOConfig(steps=2, batch_size=4, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-3,
                       max_new_tokens=8, lora_r=4, normalisation_prompts=4)  # sampled by the adapter-free policy
    result = train_ppo(config, [synthetic.prompt(i) for i in range(4)], policy_path=sft, reference_path=sft,
                       reward_path=rm, output_dir=tmp_path / "policy")
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
