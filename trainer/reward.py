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
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from trainer.common import (
    Messages,
    add_lora,
    apply_gradient_checkpointing,
    autocast,
    encode_prompt,
    encode_response,
    last_token_index,
    lr_lambda,
    make_adamw,
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
from trainer.learning_curve import wilson_interval
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
    return score_many(model, tokenizer, [(messages, responses)], normalise=normalise, max_length=max_length,
                      batch_rows=max(1, len(responses)))[0]


@torch.inference_mode()
def score_many(model, tokenizer, groups: Sequence[tuple[Messages, Sequence[str]]], *, normalise: bool = True,
               max_length: int = 512, batch_rows: int = 32) -> list[torch.Tensor]:
    """score() of many prompts' responses: a (K_i,) tensor per (messages, responses) group. The
    sequences of all groups go through the model batch_rows at a time, those of similar length
    together, so that a prompt's few responses do not each cost a forward pass of their own."""
    if not groups:
        return []
    seqs, sizes = [], []
    for messages, responses in groups:
        prompt = encode_prompt(tokenizer, messages)
        seqs += [_join(prompt, encode_response(tokenizer, r), max_length)[0] for r in responses]
        sizes.append(len(responses))
    device = next(model.parameters()).device
    raw = torch.empty(len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_rows):
        rows = order[start:start + batch_rows]
        ids, mask = pad_right([seqs[i] for i in rows], tokenizer.pad_token_id)  # (B, T)
        raw[rows] = sequence_scores(model, ids.to(device), mask.to(device)).float().cpu()
    if normalise:
        mean, std = reward_normalisation(model)
        raw = (raw - mean) / std
    return list(torch.split(raw, sizes))


# ---- the loss ---------------------------------------------------------------------

def ranking_loss(rewards: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InstructGPT's K-wise loss.

    rewards, ranks, valid: (B, K), K the largest group of the batch; valid
    marks real responses. Returns (loss, correct, pairs): the mean over groups
    of each group's mean pairwise loss, and the counts of correctly ordered and
    of all pairs (ties are no pair). With label_smoothing = e each pair's label
    is taken as right with probability 1 - e: its loss is
    -(1 - e) log sigmoid(margin) - e log sigmoid(-margin).
    """
    better = ranks.unsqueeze(2) < ranks.unsqueeze(1)  # (B, K, K): response i is ranked above response j
    better = better & valid.unsqueeze(2) & valid.unsqueeze(1)
    margin = rewards.unsqueeze(2) - rewards.unsqueeze(1)  # (B, K, K): r_i - r_j
    losses = -F.logsigmoid(margin)
    if label_smoothing > 0:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-margin)
    pair_loss = torch.where(better, losses, torch.zeros_like(margin))  # (B, K, K)
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


def as_ranking_batch(flat: torch.Tensor, groups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence values (N,), the groups' responses one after another, laid out per ranking:
    (values, ranks, valid), each (B, K); `groups` have `.ranks`, shorter ones padded (not valid)."""
    B, K = len(groups), max(len(g.ranks) for g in groups)
    device = flat.device
    values = flat.new_zeros((B, K))
    ranks = torch.zeros((B, K), dtype=torch.long, device=device)
    valid = torch.zeros((B, K), dtype=torch.bool, device=device)
    start = 0
    for row, g in enumerate(groups):
        k = len(g.ranks)
        values[row, :k] = flat[start:start + k]
        ranks[row, :k] = torch.tensor(g.ranks, device=device)
        valid[row, :k] = True
        start += k
    assert start == len(flat)
    return values, ranks, valid


def _forward_groups(model, batch: list[_Encoded], pad_id: int, device: torch.device, mixed_precision: bool):
    """All responses of all groups in one forward pass. Returns (rewards, ranks, valid), each (B, K)."""
    seqs = [s for g in batch for s in g.seqs]
    ids, mask = pad_right(seqs, pad_id)  # (N, T), N = sum of the groups' K
    with autocast(device, mixed_precision):
        flat = sequence_scores(model, ids.to(device), mask.to(device))  # (N,)
    return as_ranking_batch(flat, batch)


@torch.no_grad()
def _evaluate(model, groups: list[_Encoded], pad_id: int, device: torch.device, config: RewardConfig,
              rt: Runtime | None = None) -> dict[str, float]:
    """Loss and accuracy over all groups; with several processes each scores its shard through the
    engine and the sums are reduced."""
    rt = rt if rt is not None else Runtime(1, 0, device)
    losses, correct, pairs = [], 0, 0
    for batch, real in rt.batches(groups, config.eval_batch_size):
        rewards, ranks, valid = rt.run(_forward_groups, model, batch, pad_id, device, config.mixed_precision)
        if not real:
            continue
        loss, c, p = ranking_loss(rewards, ranks, valid)
        losses.append(loss.item() * len(batch))
        correct += int(c)
        pairs += int(p)
    loss_sum = sum(losses)
    if rt.distributed:
        loss_sum, correct, pairs = rt.sum([loss_sum, correct, pairs])
        correct, pairs = int(correct), int(pairs)
    return {"loss": loss_sum / max(1, len(groups)), "accuracy": correct / max(1, pairs), "correct": correct,
            "pairs": pairs}


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


# ---- linear probes on the base model's frozen features -------------------------------
#
# The head is linear on the trunk's last-token hidden state, so with the trunk frozen
# the reward model is a linear Bradley-Terry model on fixed features: fitted in seconds
# once the features are computed (one forward pass over the data). It starts the head
# near its optimum before fine-tuning (LP-FT, Kumar et al. 2022) and makes the learning
# curve cheap: one probe per fraction of the training data.

PROBE_L2 = 1e-2  # ridge penalty on the weights of standardised features
CURVE_FRACTIONS = (0.25, 0.5, 1.0)


class _Features(NamedTuple):
    values: torch.Tensor  # (B, K, D): last-token hidden state of each response
    ranks: torch.Tensor  # (B, K)
    valid: torch.Tensor  # (B, K)


@torch.no_grad()
def _features(model, groups: list[_Encoded], pad_id: int, device: torch.device, config: RewardConfig) -> _Features:
    backbone, head = _backbone_and_head(model)
    D = head.weight.shape[1]
    B, K = len(groups), max(len(g.seqs) for g in groups)
    values = torch.zeros((B, K, D))
    ranks = torch.zeros((B, K), dtype=torch.long)
    valid = torch.zeros((B, K), dtype=torch.bool)
    for start in range(0, B, config.eval_batch_size):
        batch = groups[start:start + config.eval_batch_size]
        ids, mask = pad_right([s for g in batch for s in g.seqs], pad_id)  # (N, T)
        ids, mask = ids.to(device), mask.to(device)
        with autocast(device, config.mixed_precision):
            hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids_from(mask),
                              use_cache=False).last_hidden_state  # (N, T, D)
        last = hidden[torch.arange(len(ids), device=device), last_token_index(mask)].float().cpu()  # (N, D)
        row = 0
        for offset, group in enumerate(batch):
            k = len(group.seqs)
            values[start + offset, :k] = last[row:row + k]
            ranks[start + offset, :k] = torch.tensor(group.ranks)
            valid[start + offset, :k] = True
            row += k
    return _Features(values, ranks, valid)


def fit_probe(features: _Features, label_smoothing: float = 0.0, l2: float = PROBE_L2) -> torch.Tensor:
    """Head weights (D,) minimising the K-wise loss of a linear reward on the features, with a ridge penalty."""
    values = features.values[features.valid]  # (N, D)
    mean, scale = values.mean(0), values.std(0).clamp(min=1e-6)  # (D,) each
    x = (features.values - mean) / scale  # (B, K, D); a shift changes no margin, so the head needs no bias
    w = torch.zeros(x.shape[-1], requires_grad=True)
    optimizer = torch.optim.LBFGS([w], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss, _, _ = ranking_loss(x @ w, features.ranks, features.valid, label_smoothing)
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return (w.detach() / scale).float()  # on the raw features: x . w = (h - mean) / scale . w


def probe_accuracy(weights: torch.Tensor, features: _Features) -> tuple[int, int]:
    """(correctly ordered pairs, pairs) of a linear reward on the features."""
    _, correct, pairs = ranking_loss(features.values @ weights, features.ranks, features.valid)
    return int(correct), int(pairs)


def _subset(features: _Features, rows: list[int]) -> _Features:
    return _Features(features.values[rows], features.ranks[rows], features.valid[rows])


def probe_learning_curve(train: _Features, validation: _Features, seed: int,
                         label_smoothing: float = 0.0) -> list[dict[str, float]]:
    """Validation accuracy of probes fitted on growing shares of the training rankings (nested
    random subsets), one point per share in CURVE_FRACTIONS."""
    order = torch.randperm(len(train.values), generator=torch.Generator().manual_seed(seed)).tolist()
    points, seen = [], set()
    for fraction in CURVE_FRACTIONS:
        n = max(1, round(fraction * len(order)))
        if n in seen:
            continue
        seen.add(n)
        part = _subset(train, order[:n])
        correct, pairs = probe_accuracy(fit_probe(part, label_smoothing), validation)
        points.append({"fraction": fraction, "rankings": n, "pairs": int(_pair_mask(part).sum()),
                       "val_accuracy": correct / max(1, pairs)})
    return points


def _pair_mask(features: _Features) -> torch.Tensor:
    better = features.ranks.unsqueeze(2) < features.ranks.unsqueeze(1)
    return better & features.valid.unsqueeze(2) & features.valid.unsqueeze(1)


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
    rt = runtime(config.device, config.strategy)
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
    model.eval()

    # 2b. linear probes on the frozen base model: the head's start and the learning curve (every process
    # computes the same, so no communication)
    curve: list[dict[str, float]] = []
    if config.probe_init or config.learning_curve:
        train_features = _features(model, train_groups, pad_id, device, config)
        val_features = _features(model, val_groups, pad_id, device, config)
        if config.learning_curve:
            curve = probe_learning_curve(train_features, val_features, config.seed, config.label_smoothing)
            log.info("learning curve (probes): %s", ", ".join(f"{p['rankings']}: {p['val_accuracy']:.3f}"
                                                            for p in curve))
        if config.probe_init:
            weights = fit_probe(train_features, config.label_smoothing)
            with torch.no_grad():
                model.score.weight.copy_(weights.to(device).unsqueeze(0))
        del train_features, val_features
    if config.lora_r > 0:
        model = add_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout, task_type="SEQ_CLS")
    # eval(): dropout off for the whole run (TRL's disable_dropout); gradients flow all the same.
    model.eval()
    apply_gradient_checkpointing(model, config.gradient_checkpointing)

    # 3. optimizer and schedule; the model spread over the processes by the strategy
    micro_batches = -(-len(train_groups) // config.batch_size)
    steps_per_epoch = -(-micro_batches // config.gradient_accumulation_steps)
    total_steps = steps_per_epoch * config.epochs

    def trained() -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def make_optimizer() -> torch.optim.Optimizer:
        head = [p for n, p in trained() if _is_head(n)]
        trunk = [p for n, p in trained() if not _is_head(n)]
        assert head, "the scalar head is not trainable"
        return make_adamw(
            [{"params": trunk, "lr": config.learning_rate},
             {"params": head, "lr": config.learning_rate * config.head_lr_multiplier}],
            lr=config.learning_rate, weight_decay=config.weight_decay, adam_8bit=config.adam_8bit, device=device)

    optimizer = rt.prepare({"model": model}, make_optimizer, max_grad_norm=config.max_grad_norm,
                           accumulation=config.gradient_accumulation_steps)
    named = trained()
    params = [p for _, p in named]
    warmup = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.lr_schedule, warmup, total_steps))
    shuffle = torch.Generator().manual_seed(config.seed)

    # 4. the loop: forward K responses per group, K-wise loss, backward, clip, step, log; evaluate each epoch.
    # Each micro-batch's mean loss is weighed by its share of the rankings in its accumulation window (and,
    # with several processes, each process's by its shard's share), so every optimizer step's gradient is
    # that of the mean loss over the window's rankings, the last, partial window too.
    # Early stopping: the weights of the evaluation with the lowest validation loss are kept (in memory)
    # and restored at the end; with a probe-initialised head the untrained model is the first candidate.
    window_size = config.batch_size * config.gradient_accumulation_steps  # rankings per optimizer step
    step = 0
    best: dict[str, Any] = {"val_loss": math.inf}
    stale = 0

    def consider(epoch: int, val: dict[str, float], train_figures: dict[str, float]) -> bool:
        """Keep the weights if this evaluation is the best so far; True when training should stop."""
        nonlocal stale
        if val["loss"] < best["val_loss"]:
            best.update(val_loss=val["loss"], val=val, epoch=epoch, train=train_figures,
                        weights={n: p.detach().to("cpu", copy=True) for n, p in named})
            stale = 0
            return False
        stale += 1
        return 0 < config.early_stopping_patience <= stale

    if config.probe_init:
        val = _evaluate(model, val_groups, pad_id, device, config, rt)
        report(0, {"epoch": 0, "val_loss": val["loss"], "val_accuracy": val["accuracy"]})
        consider(0, val, {"train_loss": None, "train_accuracy": None})  # the probe: nothing fine-tuned yet
    epochs_run = 0
    for epoch in range(1, config.epochs + 1):
        epochs_run = epoch
        order = torch.randperm(len(train_groups), generator=shuffle).tolist()
        epoch_loss, epoch_correct, epoch_pairs = 0.0, 0, 0
        window_loss, window_correct, window_pairs = 0.0, 0, 0
        for micro in range(micro_batches):
            full = order[micro * config.batch_size:(micro + 1) * config.batch_size]
            window_start = micro // config.gradient_accumulation_steps * window_size
            in_window = len(order[window_start:window_start + window_size])  # fewer in the last window
            batch = [train_groups[i] for i in rt.shard(full)]
            last_micro = micro == micro_batches - 1
            ends_window = (micro + 1) % config.gradient_accumulation_steps == 0 or last_micro
            # A process gets nothing when a last micro-batch is smaller than the number of processes: it
            # passes a stand-in ranking weighed 0 (every process makes the same forward and backward passes).
            stand_in = not batch
            with rt.no_sync(not ends_window):  # the gradients are reduced once per step
                rewards, ranks, valid = rt.run(_forward_groups, model, batch or [train_groups[full[0]]], pad_id,
                                               device, config.mixed_precision)  # (B, K)
                loss, correct, pairs = ranking_loss(rewards, ranks, valid, config.label_smoothing)
                share = 0.0 if stand_in else len(batch) / in_window
                rt.backward(loss * share)
            if not stand_in:
                window_loss += loss.item() * share
                window_correct += int(correct)
                window_pairs += int(pairs)
            if not ends_window:
                continue
            window_loss, window_correct, window_pairs = rt.sum([window_loss, window_correct, window_pairs])
            window_correct, window_pairs = int(window_correct), int(window_pairs)
            grad_norm = rt.clip_grad_norm_(params, config.max_grad_norm)
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
        train_figures = {"train_loss": epoch_loss / len(train_groups),
                         "train_accuracy": epoch_correct / max(1, epoch_pairs)}
        report(step, {"epoch": epoch, **train_figures, "val_loss": val["loss"], "val_accuracy": val["accuracy"]})
        log.info("epoch %d: val accuracy %.3f, val loss %.4f", epoch, val["accuracy"], val["loss"])
        if consider(epoch, val, train_figures):
            log.info("validation loss has not improved for %d epoch(s): stopping", stale)
            break

    # 4b. back to the best evaluation's weights
    with torch.no_grad():
        for name, p in named:
            p.copy_(best["weights"][name].to(p.device))
    val = best["val"]

    # 5. normalise: SFT samples get mean 0, std 1 (PPO reads this from the config)
    if sft_samples:
        sft_seqs = [_join(encode_prompt(tokenizer, m), encode_response(tokenizer, r), config.max_length)[0]
                    for m, r in sft_samples]
    else:
        sft_seqs = [s for g in train_groups for s in g.seqs]
    if rt.distributed:  # each process scores its shard; the statistics are over all of them
        scores = []
        for seqs, real in rt.batches(sft_seqs, config.eval_batch_size * 2):
            part = rt.run(_raw_scores, model, seqs, pad_id, device, config)
            scores += part.tolist() if real else []
        raw = torch.tensor([x for shard in rt.gather(scores) for x in shard], dtype=torch.float32)  # (S,)
    else:
        raw = _raw_scores(model, sft_seqs, pad_id, device, config)  # (S,)
    mean = raw.mean().item()
    std = raw.std().item() if len(raw) > 1 else 1.0
    std = std if std > 1e-6 else 1.0  # a constant reward cannot be scaled; leave it
    model = unwrap_lora(rt.unwrapped("model"))
    model.config.reward_mean = mean
    model.config.reward_std = std

    # 6. save: weights, config (with the normalisation), tokenizer, our settings and metrics
    low, high = wilson_interval(val["correct"], val["pairs"])
    metrics = {
        "val_accuracy": val["accuracy"], "val_loss": val["loss"],
        "val_accuracy_low": low, "val_accuracy_high": high,  # Wilson 95% interval over the validation pairs
        "train_loss": best["train"]["train_loss"], "train_accuracy": best["train"]["train_accuracy"],
        "best_epoch": best["epoch"], "epochs_run": epochs_run,
        "reward_mean": mean, "reward_std": std, "steps": step, "epochs": config.epochs,
        "train_groups": len(train_groups), "train_pairs": sum(_pair_count(g.ranks) for g in train_groups),
        "val_groups": len(val_groups), "val_pairs": val["pairs"],
        "groups_without_preference": dropped + val_dropped, "truncated_sequences": truncated + val_truncated,
        "normalisation_samples": len(sft_seqs), "processes": rt.world, "seconds": time.perf_counter() - started,
    }
    if curve:
        metrics["learning_curve"] = curve
    if rt.main:
        save_checkpoint(model, tokenizer, output_dir, {
            "kind": "reward", "base_model": str(model_path), "config": asdict(config),
            "normalisation": {"mean": mean, "std": std}, "metrics": metrics,
        })
    rt.barrier()  # the checkpoint is in place when any process returns
    return RewardResult(output_dir=Path(output_dir), metrics=metrics, history=history)


def _is_head(name: str) -> bool:
    """The scalar head's parameters ("score.weight", or under a LoRA wrapper "...score.modules_to_save...")."""
    return ".score." in f".{name}"


def _pair_count(ranks: list[int]) -> int:
    return sum(1 for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j])


def read_reward_checkpoint(path: str | Path) -> dict:
    """Our JSON beside a reward checkpoint: its settings, normalisation and metrics."""
    return read_workbench_json(Path(path))
