"""Reward-model training on rankings (step 2 of the InstructGPT recipe).

A labeler ranks the K responses to one prompt (ties allowed). InstructGPT
(Ouyang et al. 2022, section 3.5) trains on all K(K-1)/2 pairs of one ranking
as a single batch element: the K responses go through the model once and the
loss is the mean over the ranking's pairs of -log sigmoid(r_better - r_worse).
That is K forward passes instead of K(K-1), and it stops the model from
over-fitting to a ranking whose pairs would otherwise be seen K-1 times per
epoch. Tied responses form no pair. Plain pairwise data is the case K = 2.

The model is the SFT model with a scalar head:
AutoModelForSequenceClassification(num_labels=1). We keep that class because
its checkpoint is the standard one (TRL, vLLM, the text-classification
pipeline and our PPO value head all load it in one line) and its backbone
weights have the causal LM's names. We do NOT use its forward's pooling,
which finds the last token as "the last token that is not pad_token_id": with
SmolLM2 (pad == EOS) that skips the EOS ending every response, and any pad
token typed inside a text would confuse it. We run its backbone and its
`score` head ourselves and read the last token of the attention mask. We still
set config.pad_token_id to a pad distinct from EOS, so that HF's own forward
gives the same numbers to anyone who loads the checkpoint elsewhere.

After training the score is shifted and scaled so that the SFT model's
responses have mean 0 and std 1 (N implementation details of RLHF, "reward
normalisation"); PPO reads that normalisation from the checkpoint's config.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from trainer.common import (
    Messages,
    add_lora,
    autocast,
    encode_prompt,
    encode_response,
    last_token_index,
    lr_lambda,
    pad_right,
    position_ids_from,
    prepare_tokenizer,
    read_workbench_json,
    save_checkpoint,
    seed_everything,
    unwrap_lora,
)
from trainer.configs import RewardConfig
from trainer.distributed import Runtime, runtime
from trainer.models import load_tokenizer

log = logging.getLogger(__name__)


class RankedGroup(NamedTuple):
    """One annotation: a prompt, its K responses and their ranks (1 = best; equal ranks are ties)."""

    messages: Messages
    responses: list[str]
    ranks: list[int]


def pairwise(messages: Messages, chosen: str, rejected: str) -> RankedGroup:
    """A plain comparison as a ranked group of two."""
    return RankedGroup(messages, [chosen, rejected], [1, 2])


@dataclass
class RewardResult:
    output_dir: Path
    metrics: dict[str, float]  # final figures: val_accuracy, val_loss, train_loss, reward_mean, reward_std, ...
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per optimizer step / evaluation


class _Encoded(NamedTuple):
    seqs: list[list[int]]  # K token sequences: prompt + response + EOS
    ranks: list[int]


# ---- the model: a causal LM backbone with a scalar head --------------------------

def _backbone_and_head(model):
    core = model.get_base_model() if hasattr(model, "get_base_model") else model  # through a LoRA wrapper
    return core.base_model, core.score


def token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head applied at every position: (N, T). PPO's value head uses this."""
    backbone, head = _backbone_and_head(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from(attention_mask), use_cache=False).last_hidden_state  # (N, T, D)
    return head(hidden).squeeze(-1).float()  # (N, T)


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward of each sequence, read at its last real token (EOS for a finished response): (N,)."""
    scores = token_scores(model, input_ids, attention_mask)  # (N, T)
    last = last_token_index(attention_mask)  # (N,)
    return scores.gather(1, last.unsqueeze(1)).squeeze(1)  # (N,)


def reward_normalisation(model) -> tuple[float, float]:
    """(mean, std) of the raw score over SFT samples, as stored in the checkpoint's config."""
    config = model.config
    return float(getattr(config, "reward_mean", 0.0)), float(getattr(config, "reward_std", 1.0))


def load_reward_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A trained reward model and its tokenizer, in eval mode. Normalisation: reward_normalisation(model)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype)
    assert model.config.num_labels == 1, f"{path} is not a reward model (num_labels={model.config.num_labels})"
    tokenizer = prepare_tokenizer(load_tokenizer(str(path)))
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def score(model, tokenizer, messages: Messages, responses: list[str], *, normalise: bool = True,
          max_length: int = 512) -> torch.Tensor:
    """Rewards of responses to one prompt: (K,), normalised so SFT samples have mean 0 / std 1."""
    seqs = [_join(encode_prompt(tokenizer, messages), encode_response(tokenizer, r), max_length)[0] for r in responses]
    device = next(model.parameters()).device
    ids, mask = pad_right(seqs, tokenizer.pad_token_id)  # (K, T)
    raw = sequence_scores(model, ids.to(device), mask.to(device)).cpu()  # (K,)
    if not normalise:
        return raw
    mean, std = reward_normalisation(model)
    return (raw - mean) / std


# ---- the loss ---------------------------------------------------------------------

def ranking_loss(rewards: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InstructGPT's K-wise loss.

    rewards, ranks, valid: (B, K), K the largest group of the batch; valid
    marks real responses. Returns (loss, correct, pairs): the mean over groups
    of each group's mean pairwise loss, and the counts of correctly ordered and
    of all pairs (ties are no pair).
    """
    better = ranks.unsqueeze(2) < ranks.unsqueeze(1)  # (B, K, K): response i is ranked above response j
    better = better & valid.unsqueeze(2) & valid.unsqueeze(1)
    margin = rewards.unsqueeze(2) - rewards.unsqueeze(1)  # (B, K, K): r_i - r_j
    pair_loss = torch.where(better, -F.logsigmoid(margin), torch.zeros_like(margin))  # (B, K, K)
    pairs_per_group = better.sum((1, 2))  # (B,)
    assert bool((pairs_per_group > 0).all()), "a group without any strict preference reached the loss"
    group_loss = pair_loss.sum((1, 2)) / pairs_per_group  # (B,)
    correct = (better & (margin > 0)).sum()
    return group_loss.mean(), correct, pairs_per_group.sum()


def _join(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], bool]:
    """prompt + response, keeping the LAST max_length tokens: the head reads the end, the prompt's
    start (system prompt first) is what goes. Returns (tokens, truncated)."""
    seq = prompt + response
    return (seq[-max_length:], True) if len(seq) > max_length else (seq, False)


def _encode(tokenizer, groups: list[RankedGroup], max_length: int, name: str) -> tuple[list[_Encoded], int, int]:
    """Tokenise every group once. Returns (encoded, dropped_without_preference, truncated_sequences)."""
    encoded, dropped, truncated = [], 0, 0
    for index, group in enumerate(groups):
        messages, responses, ranks = group
        where = f"{name} group {index}"
        if len(responses) != len(ranks):
            raise ValueError(f"{where}: {len(responses)} responses but {len(ranks)} ranks")
        if len(responses) < 2:
            raise ValueError(f"{where}: a ranking needs at least 2 responses, got {len(responses)}")
        if not messages:
            raise ValueError(f"{where}: the prompt has no messages")
        if len(set(ranks)) < 2:
            dropped += 1  # all tied: no comparison, nothing to learn
            continue
        prompt = encode_prompt(tokenizer, messages)
        seqs = []
        for response in responses:
            seq, cut = _join(prompt, encode_response(tokenizer, response), max_length)
            seqs.append(seq)
            truncated += cut
        encoded.append(_Encoded(seqs, [int(r) for r in ranks]))
    return encoded, dropped, truncated


def _forward_groups(model, batch: list[_Encoded], pad_id: int, device: torch.device, mixed_precision: bool):
    """All responses of all groups in one forward pass. Returns (rewards, ranks, valid), each (B, K)."""
    seqs = [s for g in batch for s in g.seqs]
    ids, mask = pad_right(seqs, pad_id)  # (N, T), N = sum of the groups' K
    with autocast(device, mixed_precision):
        flat = sequence_scores(model, ids.to(device), mask.to(device))  # (N,)
    B, K = len(batch), max(len(g.seqs) for g in batch)
    rewards = flat.new_zeros((B, K))  # (B, K)
    ranks = torch.zeros((B, K), dtype=torch.long, device=device)  # (B, K)
    valid = torch.zeros((B, K), dtype=torch.bool, device=device)  # (B, K)
    start = 0
    for row, group in enumerate(batch):
        k = len(group.seqs)
        rewards[row, :k] = flat[start:start + k]
        ranks[row, :k] = torch.tensor(group.ranks, device=device)
        valid[row, :k] = True
        start += k
    assert start == len(flat)
    return rewards, ranks, valid


@torch.no_grad()
def _evaluate(model, groups: list[_Encoded], pad_id: int, device: torch.device, config: RewardConfig,
              rt: Runtime | None = None) -> dict[str, float]:
    """Loss and accuracy over all groups; with several processes each scores its shard and the sums are reduced."""
    local = rt.shard(groups) if rt is not None else groups
    losses, correct, pairs = [], 0, 0
    for i in range(0, len(local), config.eval_batch_size):
        batch = local[i:i + config.eval_batch_size]
        rewards, ranks, valid = _forward_groups(model, batch, pad_id, device, config.mixed_precision)
        loss, c, p = ranking_loss(rewards, ranks, valid)
        losses.append(loss.item() * len(batch))
        correct += int(c)
        pairs += int(p)
    loss_sum = sum(losses)
    if rt is not None:
        loss_sum, correct, pairs = rt.sum([loss_sum, correct, pairs])
        correct, pairs = int(correct), int(pairs)
    return {"loss": loss_sum / max(1, len(groups)), "accuracy": correct / max(1, pairs), "pairs": pairs}


def evaluate_reward_model(model, tokenizer, groups: list[RankedGroup], *, max_length: int = 512,
                          batch_size: int = 16) -> dict[str, float]:
    """Pairwise accuracy and K-wise loss of a reward model on rankings."""
    encoded, _, _ = _encode(tokenizer, groups, max_length, "evaluation")
    device = next(model.parameters()).device
    config = RewardConfig(eval_batch_size=batch_size, max_length=max_length)
    return _evaluate(model, encoded, tokenizer.pad_token_id, device, config)


@torch.no_grad()
def _raw_scores(model, seqs: list[list[int]], pad_id: int, device: torch.device, config: RewardConfig) -> torch.Tensor:
    out = []
    for i in range(0, len(seqs), config.eval_batch_size * 2):
        ids, mask = pad_right(seqs[i:i + config.eval_batch_size * 2], pad_id)
        with autocast(device, config.mixed_precision):
            out.append(sequence_scores(model, ids.to(device), mask.to(device)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


# ---- training ---------------------------------------------------------------------

def train_reward_model(
    config: RewardConfig,
    train: list[RankedGroup],
    validation: list[RankedGroup],
    *,
    model_path: str | Path,
    output_dir: Path,
    sft_samples: list[tuple[Messages, str]] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RewardResult:
    """Fit a reward model on rankings, validate each epoch, normalise on SFT samples, save to output_dir.

    validation should hold prompts never seen in training (the validation
    split). sft_samples: (prompt, response) pairs sampled from the SFT model
    for the normalisation; by default the responses of the training data.
    Raises ValueError for malformed data, Cancelled when should_stop() says so
    (nothing is saved then). Under a launcher with several processes each
    trains on its shard of every batch (trainer/distributed.py); rank 0 alone
    calls on_step and should_stop and saves.
    """
    started = time.perf_counter()
    history: list[dict[str, float]] = []

    # 0. seed and device; under a multi-process launch, this process's rank and device
    rt = runtime(config.device)
    device = rt.device
    seed_everything(config.seed)  # the same seed everywhere: same head init, same shuffle

    def report(step: int, metrics: dict[str, float]) -> None:
        history.append({"step": step, **metrics})
        if on_step is not None and rt.main:
            on_step(step, metrics)

    # 1. data: every group tokenised once; all-tied groups carry no comparison and are dropped
    tokenizer = prepare_tokenizer(load_tokenizer(str(model_path)))
    pad_id = tokenizer.pad_token_id
    train_groups, dropped, truncated = _encode(tokenizer, train, config.max_length, "train")
    val_groups, val_dropped, val_truncated = _encode(tokenizer, validation, config.max_length, "validation")
    if not train_groups:
        raise ValueError("no training ranking has two responses of different rank")
    if not val_groups:
        raise ValueError("no validation ranking has two responses of different rank")

    # 2. model: the SFT model with a fresh scalar head, float32 weights (autocast does bf16 on CUDA)
    from transformers import AutoModelForSequenceClassification

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report calls the new head "MISSING": that is the point
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(model_path), num_labels=1, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = pad_id
    hidden = model.score.weight.shape[1]
    # std 1/sqrt(d+1), as OpenAI's lm-human-preferences and TRL initialise the reward head.
    torch.nn.init.normal_(model.score.weight, std=1 / (hidden + 1) ** 0.5)
    model.to(device)
    if config.lora_r > 0:
        model = add_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout, task_type="SEQ_CLS")
    # eval(): dropout off for the whole run (TRL's disable_dropout); gradients flow all the same.
    model.eval()
    rt.sync_parameters(model)

    # 3. optimizer and schedule
    micro_batches = -(-len(train_groups) // config.batch_size)
    steps_per_epoch = -(-micro_batches // config.gradient_accumulation_steps)
    total_steps = steps_per_epoch * config.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.lr_schedule, warmup, total_steps))
    shuffle = torch.Generator().manual_seed(config.seed)

    # 4. the loop: forward K responses per group, K-wise loss, backward, clip, step, log; evaluate each epoch.
    # Each micro-batch's mean loss is weighed by its share of the rankings in its accumulation window (and,
    # with several processes, each process's by its shard's share), so every optimizer step's gradient is
    # that of the mean loss over the window's rankings, the last, partial window too.
    window_size = config.batch_size * config.gradient_accumulation_steps  # rankings per optimizer step
    step = 0
    val: dict[str, float] = {}
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(len(train_groups), generator=shuffle).tolist()
        epoch_loss, epoch_correct, epoch_pairs = 0.0, 0, 0
        window_loss, window_correct, window_pairs = 0.0, 0, 0
        for micro in range(micro_batches):
            full = order[micro * config.batch_size:(micro + 1) * config.batch_size]
            window_start = micro // config.gradient_accumulation_steps * window_size
            in_window = len(order[window_start:window_start + window_size])  # fewer in the last window
            batch = [train_groups[i] for i in rt.shard(full)]
            if batch:  # a process gets nothing when a last micro-batch is smaller than the number of processes
                rewards, ranks, valid = _forward_groups(model, batch, pad_id, device, config.mixed_precision)  # (B, K)
                loss, correct, pairs = ranking_loss(rewards, ranks, valid)
                share = len(batch) / in_window
                (loss * share).backward()
                window_loss += loss.item() * share
                window_correct += int(correct)
                window_pairs += int(pairs)
            last_micro = micro == micro_batches - 1
            if (micro + 1) % config.gradient_accumulation_steps != 0 and not last_micro:
                continue
            rt.reduce_gradients(params)
            window_loss, window_correct, window_pairs = rt.sum([window_loss, window_correct, window_pairs])
            window_correct, window_pairs = int(window_correct), int(window_pairs)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            epoch_loss += window_loss * in_window  # a sum over rankings
            epoch_correct += window_correct
            epoch_pairs += window_pairs
            report(step, {"epoch": epoch, "loss": window_loss, "accuracy": window_correct / max(1, window_pairs),
                          "grad_norm": float(grad_norm), "lr": lr})
            window_loss, window_correct, window_pairs = 0.0, 0, 0
            rt.agree_to_stop(should_stop, f"reward training stopped at step {step}")
        val = _evaluate(model, val_groups, pad_id, device, config, rt)
        report(step, {"epoch": epoch, "train_loss": epoch_loss / len(train_groups),
                      "train_accuracy": epoch_correct / max(1, epoch_pairs),
                      "val_loss": val["loss"], "val_accuracy": val["accuracy"]})
        log.info("epoch %d: val accuracy %.3f, val loss %.4f", epoch, val["accuracy"], val["loss"])

    # 5. normalise: SFT samples get mean 0, std 1 (PPO reads this from the config)
    if sft_samples:
        sft_seqs = [_join(encode_prompt(tokenizer, m), encode_response(tokenizer, r), config.max_length)[0]
                    for m, r in sft_samples]
    else:
        sft_seqs = [s for g in train_groups for s in g.seqs]
    if rt.distributed:  # each process scores its shard; the statistics are over all of them
        shards = rt.gather(_raw_scores(model, rt.shard(sft_seqs), pad_id, device, config).tolist())
        raw = torch.tensor([x for shard in shards for x in shard], dtype=torch.float32)  # (S,)
    else:
        raw = _raw_scores(model, sft_seqs, pad_id, device, config)  # (S,)
    mean = raw.mean().item()
    std = raw.std().item() if len(raw) > 1 else 1.0
    std = std if std > 1e-6 else 1.0  # a constant reward cannot be scaled; leave it
    model = unwrap_lora(model)
    model.config.reward_mean = mean
    model.config.reward_std = std

    # 6. save: weights, config (with the normalisation), tokenizer, our settings and metrics
    metrics = {
        "val_accuracy": val["accuracy"], "val_loss": val["loss"],
        "train_loss": history[-1]["train_loss"], "train_accuracy": history[-1]["train_accuracy"],
        "reward_mean": mean, "reward_std": std, "steps": step, "epochs": config.epochs,
        "train_groups": len(train_groups), "train_pairs": sum(_pair_count(g.ranks) for g in train_groups),
        "val_groups": len(val_groups), "val_pairs": val["pairs"],
        "groups_without_preference": dropped + val_dropped, "truncated_sequences": truncated + val_truncated,
        "normalisation_samples": len(sft_seqs), "processes": rt.world, "seconds": time.perf_counter() - started,
    }
    if rt.main:
        save_checkpoint(model, tokenizer, output_dir, {
            "kind": "reward", "base_model": str(model_path), "config": asdict(config),
            "normalisation": {"mean": mean, "std": std}, "metrics": metrics,
        })
    rt.barrier()  # the checkpoint is in place when any process returns
    return RewardResult(output_dir=Path(output_dir), metrics=metrics, history=history)


def _pair_count(ranks: list[int]) -> int:
    return sum(1 for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j])


def read_reward_checkpoint(path: str | Path) -> dict:
    """Our JSON beside a reward checkpoint: its settings, normalisation and metrics."""
    return read_workbench_json(Path(path))
