"""Reward-model training: the K-wise loss by hand, the head's pooling, learning a known rule,
normalisation, reproducibility, gradient accumulation, LoRA, cancellation."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

from tests.factories import synthetic
from trainer.common import CONFIG_FILE, Cancelled, pad_left, pad_right, prepare_tokenizer
from trainer.models import load_tokenizer, pick_device, pick_dtype
from trainer.reward import (
    RankedGroup,
    RewardConfig,
    evaluate_reward_model,
    load_reward_model,
    pairwise,
    ranking_loss,
    score,
    score_many,
    sequence_scores,
    train_reward_model,
)


def nll(x: float) -> float:
    """-log sigmoid(x), by hand."""
    return math.log(1 + math.exp(-x))


# ---- the loss, against hand-computed values ----------------------------------------

def test_kwise_loss_equals_mean_of_its_pairwise_losses():
    rewards = torch.tensor([[1.0, 0.5, -0.2]])
    ranks = torch.tensor([[1, 2, 3]])
    loss, correct, pairs = ranking_loss(rewards, ranks, torch.ones(1, 3, dtype=torch.bool))

    expected = (nll(1.0 - 0.5) + nll(1.0 + 0.2) + nll(0.5 + 0.2)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert (int(correct), int(pairs)) == (3, 3)
    # The same three comparisons as plain K = 2 groups: mean over groups of one pair each.
    pair_rewards = torch.tensor([[1.0, 0.5], [1.0, -0.2], [0.5, -0.2]])
    pair_loss, _, _ = ranking_loss(pair_rewards, torch.tensor([[1, 2]] * 3), torch.ones(3, 2, dtype=torch.bool))
    assert pair_loss.item() == pytest.approx(loss.item(), rel=1e-6)


def test_tied_responses_contribute_nothing():
    ranks = torch.tensor([[1, 2, 2]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    loss, correct, pairs = ranking_loss(torch.tensor([[1.0, 0.5, -0.2]]), ranks, valid)
    assert loss.item() == pytest.approx((nll(0.5) + nll(1.2)) / 2, rel=1e-6)
    assert int(pairs) == 2
    # Swapping the tied responses' rewards changes nothing.
    swapped, _, _ = ranking_loss(torch.tensor([[1.0, -0.2, 0.5]]), ranks, valid)
    assert swapped.item() == pytest.approx(loss.item(), rel=1e-6)


def test_groups_of_different_sizes_average_per_group():
    rewards = torch.tensor([[2.0, 0.0, 1.0], [0.3, -0.3, 99.0]])  # 99: a padding slot, must be ignored
    ranks = torch.tensor([[1, 3, 2], [2, 1, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    loss, correct, pairs = ranking_loss(rewards, ranks, valid)
    first = (nll(2.0) + nll(1.0) + nll(1.0)) / 3
    second = nll(-0.6)  # the worse-ranked one scored higher
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-6)
    assert (int(correct), int(pairs)) == (3, 4)


# ---- the head reads the last real token ----------------------------------------------

def _fresh_reward_model(model_dir: Path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1, dtype=torch.float32)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    return model.eval()


def test_scoring_many_prompts_at_once_gives_each_prompts_scores_in_its_order(tiny_reward_dir):
    model, tokenizer = load_reward_model(tiny_reward_dir)
    groups = [([{"role": "user", "content": f"Question {i}?" + " more" * (5 * i)}],
               [f"answer {i}-{j}" + " word" * (7 * j) for j in range(k)]) for i, k in enumerate([4, 2, 9, 3])]
    alone = [score(model, tokenizer, messages, responses) for messages, responses in groups]
    together = score_many(model, tokenizer, groups, batch_rows=5)  # batches cut across prompts
    assert [t.shape for t in together] == [(4,), (2,), (9,), (3,)]
    for one, many in zip(alone, together, strict=True):
        torch.testing.assert_close(many, one, atol=1e-5, rtol=1e-5)
    assert len({round(x, 4) for t in together for x in t.tolist()}) == 18  # distinct: no response swapped
    assert score_many(model, tokenizer, []) == []


def test_reward_head_reads_the_last_real_token_whatever_the_padding(tiny_model_dir):
    model = _fresh_reward_model(tiny_model_dir)
    tokenizer = prepare_tokenizer(load_tokenizer(str(tiny_model_dir)))
    seqs = [[1, 520, 9531, 198, 1123, 3187, 2], [1, 520, 9531, 198, 2], [1, 520, 2]]
    alone = torch.stack([sequence_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
                         for s in seqs])

    with torch.no_grad():
        ids, mask = pad_right(seqs, tokenizer.pad_token_id)
        right = sequence_scores(model, ids, mask)
        junk = ids.masked_fill(mask == 0, 4626)  # other tokens in the padding: the score must not move
        right_junk = sequence_scores(model, junk, mask)
        ids, mask = pad_left(seqs, tokenizer.pad_token_id)
        left = sequence_scores(model, ids, mask)
    torch.testing.assert_close(right, alone.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right_junk, right)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)
    # It is the LAST token that counts: the final EOS, which equals SmolLM2's own pad token.
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    cut = sequence_scores(model, torch.tensor([seqs[0][:-1]]), torch.ones(1, 6, dtype=torch.long))
    assert cut.item() != pytest.approx(alone[0].item())


def test_smollm2_tokenizer_gets_a_pad_token_distinct_from_eos(tiny_model_dir):
    raw = load_tokenizer(str(tiny_model_dir))
    assert raw.pad_token_id == raw.eos_token_id  # as shipped
    tokenizer = prepare_tokenizer(raw)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token == "<|endoftext|>"


# ---- learning ------------------------------------------------------------------------

# On CUDA the trainer computes in bf16 (8-bit mantissa): comparisons of two runs' figures allow for it
# there and stay float32-tight on the CPU, where CI runs.
BF16 = pick_dtype(pick_device()) == torch.bfloat16

FAST = RewardConfig(epochs=1, batch_size=8, learning_rate=1e-3, eval_batch_size=32)


def test_reward_model_learns_a_ranking_rule_on_held_out_prompts(tiny_model_dir, tmp_path):
    train = synthetic.ranked_groups(range(0, 200), k=4, seed=1)
    validation = synthetic.ranked_groups(range(1000, 1040), k=4, seed=2)  # prompts never trained on
    sft_samples = [(synthetic.prompt(i), synthetic.response(random.Random(i), i % 3, 6))
                   for i in range(2000, 2040)]
    steps = []
    result = train_reward_model(FAST, train, validation, model_path=tiny_model_dir, output_dir=tmp_path / "rm",
                                sft_samples=sft_samples, on_step=lambda step, m: steps.append((step, m)))

    assert result.metrics["val_accuracy"] > 0.9
    assert result.metrics["val_pairs"] > 100
    assert any("val_accuracy" in m for _, m in steps) and all("lr" in m for _, m in steps if "loss" in m)
    # The checkpoint: safetensors, config with the normalisation, tokenizer, our JSON.
    out = result.output_dir
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    ours = json.loads((out / CONFIG_FILE).read_text())
    assert ours["kind"] == "reward" and ours["config"]["learning_rate"] == 1e-3
    model, tokenizer = load_reward_model(out)
    prompt = synthetic.prompt(5000)
    rewards = score(model, tokenizer, prompt, ["good good good river lamp", "good river lamp stone tree",
                                               "cloud river lamp stone tree"])
    assert rewards[0] > rewards[1] > rewards[2]
    # Normalised: the SFT samples score mean 0, std 1.
    normalised = torch.cat([score(model, tokenizer, m, [r]) for m, r in sft_samples])
    assert normalised.mean().item() == pytest.approx(0.0, abs=2e-2 if BF16 else 1e-3)
    assert normalised.std().item() == pytest.approx(1.0, abs=2e-2 if BF16 else 1e-3)
    assert evaluate_reward_model(model, tokenizer, validation)["accuracy"] == pytest.approx(
        result.metrics["val_accuracy"], abs=1e-6)


def test_reward_model_learns_a_preference_that_depends_on_the_prompt(tiny_model_dir, tmp_path):
    """Half the prompts ask for GOOD, half for STONE; of two responses, one made of the asked-for word wins.
    A rule that ignores the prompt is right half the time, so held-out accuracy means reading the prompt."""
    def groups(indices: range, seed: int) -> list[RankedGroup]:
        rng = random.Random(seed)
        out = []
        for index in indices:
            wanted, other = ("good", "stone") if index % 2 == 0 else ("stone", "good")
            messages = [{"role": "user", "content": f"Use the word {wanted} (#{index})."}]
            responses = [" ".join([word] * rng.randint(2, 5)) for word in (wanted, other)]
            ranks = [1, 2]
            if rng.random() < 0.5:
                responses, ranks = responses[::-1], ranks[::-1]
            out.append(RankedGroup(messages, responses, ranks))
        return out

    config = RewardConfig(epochs=3, batch_size=8, learning_rate=1e-3, warmup_ratio=0.0)
    result = train_reward_model(config, groups(range(0, 240), seed=1), groups(range(1000, 1040), seed=2),
                                model_path=tiny_model_dir, output_dir=tmp_path / "rm")
    assert result.metrics["val_accuracy"] > 0.8, result.metrics


def test_reward_model_learns_from_plain_pairwise_comparisons(tiny_model_dir, tmp_path):
    def pairs(groups):
        out = []
        for messages, responses, ranks in groups:
            best, worst = min(range(4), key=lambda i: ranks[i]), max(range(4), key=lambda i: ranks[i])
            out.append(pairwise(messages, responses[best], responses[worst]))
        return out

    train = pairs(synthetic.ranked_groups(range(0, 300), seed=3))
    validation = pairs(synthetic.ranked_groups(range(1000, 1040), seed=4))
    result = train_reward_model(FAST, train, validation, model_path=tiny_model_dir, output_dir=tmp_path / "rm")
    assert result.metrics["val_accuracy"] > 0.9
    assert result.metrics["train_pairs"] == len([g for g in train if len(set(g.ranks)) == 2])


def test_same_seed_gives_the_same_loss_curve(tiny_model_dir, tmp_path):
    train = synthetic.ranked_groups(range(0, 48), seed=5)
    validation = synthetic.ranked_groups(range(1000, 1010), seed=6)

    def curve(seed: int, name: str) -> list[float]:
        config = RewardConfig(epochs=1, batch_size=8, learning_rate=1e-3, seed=seed)
        result = train_reward_model(config, train, validation, model_path=tiny_model_dir, output_dir=tmp_path / name)
        return [h["loss"] for h in result.history if "loss" in h] + [result.metrics["val_loss"]]

    first, second = curve(0, "a"), curve(0, "b")
    assert first == second
    assert curve(1, "c") != first  # the seed does reach the head's init and the shuffling


def test_gradient_accumulation_matches_the_bigger_batch_on_the_last_partial_window_too(tiny_model_dir, tmp_path):
    # 28 rankings: windows of 8, 8, 8 and a last one of 4, which accumulation reaches in one micro-batch of 2.
    train = synthetic.ranked_groups(range(0, 28), seed=7)
    validation = synthetic.ranked_groups(range(1000, 1010), seed=8)
    common = dict(epochs=1, learning_rate=1e-3, lr_schedule="constant", warmup_ratio=0.0, probe_init=False,
                  learning_curve=False)
    big = train_reward_model(RewardConfig(batch_size=8, **common), train, validation,
                             model_path=tiny_model_dir, output_dir=tmp_path / "big")
    accumulated = train_reward_model(RewardConfig(batch_size=4, gradient_accumulation_steps=2, **common), train,
                                     validation, model_path=tiny_model_dir, output_dir=tmp_path / "acc")
    assert accumulated.metrics["steps"] == big.metrics["steps"] == 4
    step_losses = [[h["loss"] for h in r.history if "loss" in h] for r in (big, accumulated)]
    rel = 2e-2 if BF16 else 1e-4
    assert step_losses[1] == pytest.approx(step_losses[0], rel=rel)  # the last step's loss is not halved
    assert accumulated.metrics["train_loss"] == pytest.approx(big.metrics["train_loss"], rel=rel)
    assert accumulated.metrics["val_loss"] == pytest.approx(big.metrics["val_loss"], rel=rel)


def test_malformed_ranking_is_refused_with_its_position(tiny_model_dir, tmp_path):
    good = synthetic.ranked_groups(range(2), seed=0)
    bad = [good[0], RankedGroup(synthetic.prompt(1), ["a", "b", "c"], [1, 2])]
    with pytest.raises(ValueError, match="train group 1: 3 responses but 2 ranks"):
        train_reward_model(FAST, bad, good, model_path=tiny_model_dir, output_dir=tmp_path / "rm")
    assert not (tmp_path / "rm").exists()
    with pytest.raises(ValueError, match="batch_size"):
        RewardConfig(batch_size=0)


def test_should_stop_cancels_without_writing_a_checkpoint(tiny_model_dir, tmp_path):
    train = synthetic.ranked_groups(range(0, 32), seed=9)
    with pytest.raises(Cancelled):
        train_reward_model(FAST, train, train[:4], model_path=tiny_model_dir, output_dir=tmp_path / "rm",
                           should_stop=lambda: True)
    assert not (tmp_path / "rm").exists()


def test_lora_reward_model_saves_a_plain_checkpoint(tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    train = synthetic.ranked_groups(range(0, 32), seed=10)
    config = RewardConfig(epochs=1, batch_size=8, learning_rate=1e-3, lora_r=4)
    result = train_reward_model(config, train, train[:8], model_path=tiny_model_dir, output_dir=tmp_path / "rm")
    model, tokenizer = load_reward_model(result.output_dir)  # no peft needed to load it back
    assert not any("lora" in name for name, _ in model.named_parameters())
    rewards = score(model, tokenizer, synthetic.prompt(0), ["good", "river"])
    assert rewards.shape == (2,) and torch.isfinite(rewards).all()


# ---- the small-data recipe -------------------------------------------------------------

def test_label_smoothing_loss_by_hand():
    rewards, ranks, valid = torch.tensor([[1.0, -0.5]]), torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.bool)
    loss, _, _ = ranking_loss(rewards, ranks, valid, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * nll(1.5) + 0.1 * nll(-1.5), rel=1e-6)


def test_early_stopping_saves_the_best_epoch_not_the_last(tiny_model_dir, tmp_path):
    """Validation ranks by the opposite rule: every epoch of learning the training rule makes the
    validation loss worse, so the first epoch is the best and the run stops after `patience` more."""
    train = synthetic.ranked_groups(range(0, 64), seed=11)
    opposite = [RankedGroup(m, r, [max(k) + 1 - x for x in k])
                for m, r, k in synthetic.ranked_groups(range(1000, 1016), seed=12)]
    config = RewardConfig(epochs=6, batch_size=8, learning_rate=1e-3, probe_init=False, learning_curve=False,
                          early_stopping_patience=2, lr_schedule="constant", warmup_ratio=0.0)
    result = train_reward_model(config, train, opposite, model_path=tiny_model_dir, output_dir=tmp_path / "rm")

    per_epoch = [h for h in result.history if "val_loss" in h]
    losses = [h["val_loss"] for h in per_epoch]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert result.metrics["best_epoch"] == per_epoch[best]["epoch"] < result.metrics["epochs_run"]
    assert result.metrics["epochs_run"] == per_epoch[best]["epoch"] + 2 < 6  # stopped early
    model, tokenizer = load_reward_model(result.output_dir)
    saved = evaluate_reward_model(model, tokenizer, opposite)
    # The saved weights are the best epoch's: their loss is that epoch's (to bf16 rounding on CUDA, where
    # training runs under autocast and the loaded model is bf16) and nearer it than any other epoch's.
    assert saved["loss"] == pytest.approx(losses[best], rel=1e-4 if pick_device("auto").type == "cpu" else 5e-3)
    assert min(range(len(losses)), key=lambda i: abs(losses[i] - saved["loss"])) == best
    assert saved["loss"] < losses[-1] - 1e-3  # not the last epoch's weights
    assert result.metrics["val_loss"] == pytest.approx(losses[best])


def test_a_faster_head_learns_where_the_pilot_settings_did_not(tiny_model_dir, tmp_path):
    """The pilot's failure in miniature: a learning rate fit for a pretrained trunk (3e-5) leaves a fresh
    head near where it started after one epoch; the head's own, higher rate gets much further."""
    train = synthetic.ranked_groups(range(0, 96), seed=13)
    validation = synthetic.ranked_groups(range(1000, 1030), seed=14)
    common = dict(epochs=1, batch_size=8, learning_rate=3e-5, probe_init=False, learning_curve=False)
    slow = train_reward_model(RewardConfig(head_lr_multiplier=1.0, **common), train, validation,
                              model_path=tiny_model_dir, output_dir=tmp_path / "slow")
    fast = train_reward_model(RewardConfig(head_lr_multiplier=300.0, **common), train, validation,
                              model_path=tiny_model_dir, output_dir=tmp_path / "fast")
    assert fast.metrics["val_loss"] < slow.metrics["val_loss"] - 0.1, (slow.metrics, fast.metrics)
    assert fast.metrics["val_accuracy"] > slow.metrics["val_accuracy"]


def test_probe_starts_the_head_near_its_optimum_and_draws_the_learning_curve(tiny_model_dir, tmp_path):
    train = synthetic.ranked_groups(range(0, 120), seed=15)
    validation = synthetic.ranked_groups(range(1000, 1030), seed=16)
    config = RewardConfig(epochs=1, batch_size=8, learning_rate=1e-3)
    result = train_reward_model(config, train, validation, model_path=tiny_model_dir, output_dir=tmp_path / "rm")
    [before] = [h for h in result.history if h.get("epoch") == 0]  # the probe-initialised head, untrained trunk
    assert before["val_accuracy"] > 0.8

    curve = result.metrics["learning_curve"]
    assert [p["rankings"] for p in curve] == [30, 60, 120] and [p["fraction"] for p in curve] == [0.25, 0.5, 1.0]
    assert curve[0]["pairs"] < curve[1]["pairs"] < curve[2]["pairs"] == result.metrics["train_pairs"]
    assert all(0 <= p["val_accuracy"] <= 1 for p in curve) and curve[-1]["val_accuracy"] > 0.8
    m = result.metrics
    assert m["val_accuracy_low"] < m["val_accuracy"] < m["val_accuracy_high"]
    off = train_reward_model(RewardConfig(epochs=1, learning_rate=1e-3, learning_curve=False, probe_init=False),
                             train[:16], validation, model_path=tiny_model_dir, output_dir=tmp_path / "off")
    assert "learning_curve" not in off.metrics and not [h for h in off.history if h.get("epoch") == 0]
