"""Direct Preference Optimization on rankings: pairwise (DPO, IPO) and listwise.

DPO (Rafailov et al. 2023) trains the policy on preferences directly, without
a reward model or rollouts: the implicit reward of a response y to a prompt x
is h(y) = beta * (log pi(y|x) - log ref(y|x)), and the Bradley-Terry loss of
the reward model is applied to it. A labeler here ranks K responses (ties
allowed), so we read a ranking the way the reward model does
(trainer/reward.py): its K responses go through the policy together, once,
and every loss is computed from those K log-probabilities:

- `sigmoid`: the DPO paper's -log sigmoid(h_w - h_l), averaged over the
  ranking's K(K-1)/2 pairs (tied responses form no pair): exactly the reward
  model's K-wise loss (reward.ranking_loss) on the implicit rewards;
- `ipo`: IPO's (Azar et al. 2023) squared loss
  ((log-ratio_w - log-ratio_l) - 1 / (2 beta))^2, averaged over the pairs;
- `listwise`: the Plackett-Luce likelihood of the ranking (the DPO paper's
  section 3.1 and appendix A.3): each response is chosen first among itself
  and the responses ranked strictly below it,
      -[h_i - log sum_{j in {i} + worse(i)} exp(h_j)],
  averaged over the responses that have something below them. Ties are
  handled as in the reward model's loss: tied responses are never compared
  (neither is in the other's set). For K = 2 it is the sigmoid loss.

TRL's DPOTrainer takes pairs: a ranking of K costs it K(K-1) policy sequences
(and as many reference ones), each with its prompt; here it costs the prompt
once and K responses after it (the responses attend to the prompt's keys and
values, and gradients flow back through them), and the reference's
log-probabilities are computed once per response before training and cached
for the run (the reference model is then freed unless the KL estimate needs
it). Only the response tokens' logits are computed.

Curves: per step loss, implicit-reward accuracy and margin, the log-probs of
the preferred and dispreferred side of each pair; per evaluation (before
training and after each epoch) the same on the validation rankings (held-out
prompts), and the KL from the reference of samples drawn on validation
prompts (per response, summed over tokens, at the sampling temperature).
"""

import functools
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from trainer.common import (
    Messages,
    add_lora,
    autocast,
    encode_prompt,
    encode_response,
    generate_exactly,
    lr_lambda,
    make_adamw,
    pad_left,
    pad_right,
    position_ids_from,
    prepare_tokenizer,
    response_logprobs,
    save_checkpoint,
    seed_everything,
    truncate_after_eos,
    unwrap_lora,
)
from trainer.configs import DPOConfig
from trainer.distributed import runtime
from trainer.models import load_causal_lm, load_tokenizer
from trainer.ppo import reference_logprobs
from trainer.reward import RankedGroup, as_ranking_batch, ranking_loss

log = logging.getLogger(__name__)

__all__ = ["DPOConfig", "DPOResult", "RankedGroup", "dpo_loss", "listwise_loss", "train_dpo"]


@dataclass
class DPOResult:
    output_dir: Path
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    samples_before: list[dict] = field(default_factory=list)  # {"prompt", "response", "reward": None, "ended", "kl"}
    samples_after: list[dict] = field(default_factory=list)


class Encoded(NamedTuple):
    """One ranking, tokenised: the prompt once, its K responses (each ending with EOS), the ranks."""

    prompt: list[int]
    responses: list[list[int]]
    ranks: list[int]


# ---- the losses --------------------------------------------------------------------

def _better(ranks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, K, K): response i is ranked strictly above response j (ties and padding: False)."""
    return (ranks.unsqueeze(2) < ranks.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)


def listwise_loss(rewards: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Plackett-Luce loss of rankings with ties. rewards, ranks, valid: (B, K). Each response that
    has a response ranked strictly below it contributes -log softmax over itself and those; a
    group's loss is the mean of its contributions, the batch's the mean over groups."""
    better = _better(ranks, valid)  # (B, K, K)
    K = rewards.shape[1]
    eye = torch.eye(K, dtype=torch.bool, device=rewards.device)
    candidates = better | eye  # (B, K, K): row i's choice set, itself and what it beats
    logits = rewards.unsqueeze(1).expand(-1, K, -1).masked_fill(~candidates, float("-inf"))  # (B, K, K)
    terms = rewards - torch.logsumexp(logits, dim=-1)  # (B, K): log-probability of choosing i first
    stages = better.any(-1)  # (B, K): responses with something below them
    per_group = stages.sum(-1)  # (B,)
    assert bool((per_group > 0).all()), "a group without any strict preference reached the loss"
    return (-(terms * stages).sum(-1) / per_group).mean()


def dpo_loss(logratios: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor, *, beta: float,
             loss: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of a batch of rankings from the policy-minus-reference log-probs (B, K), and the
    pair statistics: correct (implicit reward ordered as ranked), pairs, margin_sum."""
    rewards = beta * logratios  # (B, K): DPO's implicit rewards
    better = _better(ranks, valid)  # (B, K, K)
    margins = rewards.unsqueeze(2) - rewards.unsqueeze(1)  # (B, K, K): h_i - h_j
    if loss == "sigmoid":
        value, _, _ = ranking_loss(rewards, ranks, valid)  # the reward model's K-wise loss, on h
    elif loss == "ipo":
        diffs = logratios.unsqueeze(2) - logratios.unsqueeze(1)  # (B, K, K), without beta
        squares = torch.where(better, (diffs - 1 / (2 * beta)) ** 2, torch.zeros_like(diffs))
        value = (squares.sum((1, 2)) / better.sum((1, 2))).mean()
    else:
        assert loss == "listwise", loss
        value = listwise_loss(rewards, ranks, valid)
    stats = {"correct": (better & (margins > 0)).sum(), "pairs": better.sum(),
             "margin_sum": torch.where(better, margins, torch.zeros_like(margins)).sum()}
    return value, stats


# ---- log-probabilities of responses ----------------------------------------------------

def encode_group(tokenizer, group: RankedGroup, max_length: int) -> Encoded:
    """Tokenise a ranking; its responses share one prompt. When prompt + longest response exceed
    max_length, the prompt loses its start (down to half of max_length), then each long response
    its end."""
    prompt = encode_prompt(tokenizer, group.messages)
    responses = [encode_response(tokenizer, text) for text in group.responses]
    keep = min(len(prompt), max(max_length // 2, max_length - max(len(r) for r in responses)))
    return Encoded(prompt[len(prompt) - keep:], [r[:max_length - keep] for r in responses],
                   [int(r) for r in group.ranks])


def _parts(model):
    """(backbone, lm_head) of a causal LM, through a LoRA wrapper."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    return core.base_model, core.get_output_embeddings()


@functools.cache
def _cache_keyword(backbone: type) -> str:
    """Later transformers 5 releases take the cache as `cache` (past_key_values deprecated), earlier ones not."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


def ranking_logprobs(model, groups: list[Encoded], pad_id: int, device: torch.device,
                     mixed_precision: bool = False) -> torch.Tensor:
    """Sum of the response tokens' log-probabilities of every response of the rankings, one
    ranking after the other: (N,). Each ranking's prompt goes through the model once (its keys and
    values are then shared by its K responses, and gradients flow back through them), the
    responses after it; the LM head runs on the response tokens only (a (N, T, V) logits tensor is
    most of the memory otherwise)."""
    counts = torch.tensor([len(g.responses) for g in groups], device=device)  # (B,)
    owner = torch.repeat_interleave(torch.arange(len(groups), device=device), counts)  # (N,): ranking of a response
    prompt_ids, prompt_mask = (t.to(device) for t in pad_left([g.prompt for g in groups], pad_id))  # (B, P)
    ids, mask = (t.to(device) for t in pad_right([r for g in groups for r in g.responses], pad_id))  # (N, R)
    N, R = ids.shape
    backbone, head = _parts(model)
    cache = DynamicCache(config=backbone.config)
    passing = {_cache_keyword(type(backbone)): cache}
    with autocast(device, mixed_precision):
        prompts = backbone(input_ids=prompt_ids, attention_mask=prompt_mask,
                           position_ids=position_ids_from(prompt_mask), use_cache=True, **passing)
        cache.batch_select_indices(owner)  # (N, heads, P, d) per layer: each response reads its ranking's prompt
        positions = prompt_mask.sum(1)[owner].unsqueeze(1) + torch.arange(R, device=device)  # (N, R)
        hidden = backbone(input_ids=ids, attention_mask=torch.cat([prompt_mask[owner], mask], 1),
                          position_ids=positions, use_cache=True, **passing).last_hidden_state  # (N, R, D)
        # the prompt's last state predicts the first response token, response column t the token t + 1
        before = torch.cat([prompts.last_hidden_state[owner, -1:], hidden[:, :-1]], 1)  # (N, R, D)
        real = mask.bool()  # (N, R)
        logits = head(before[real])  # (M, V), M response tokens in all
    nll = F.cross_entropy(logits.float(), ids[real], reduction="none")  # (M,)
    rows = torch.arange(N, device=device).unsqueeze(1).expand(N, R)[real]  # (M,)
    return torch.zeros(N, device=device).index_add(0, rows, -nll)  # (N,)


@torch.no_grad()
def _cached_logprobs(model, groups: list[Encoded], pad_id: int, device: torch.device, config: DPOConfig) -> list[torch.Tensor]:
    """Log-prob of every response of every ranking, (K,) per ranking, on the CPU."""
    out: list[torch.Tensor] = []
    for i in range(0, len(groups), config.eval_batch_size):
        batch = groups[i:i + config.eval_batch_size]
        flat = ranking_logprobs(model, batch, pad_id, device, config.mixed_precision).cpu()
        out.extend(flat.split([len(g.responses) for g in batch]))
    return out


def _pair_figures(logps: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor) -> tuple[float, float]:
    """(sum of the preferred side's log-probs, of the dispreferred side's) over the pairs."""
    better = _better(ranks, valid).float()
    return float((better * logps.unsqueeze(2)).sum()), float((better * logps.unsqueeze(1)).sum())


# ---- training ---------------------------------------------------------------------

def train_dpo(
    config: DPOConfig,
    train: list[RankedGroup],
    validation: list[RankedGroup],
    *,
    policy_path: str | Path,
    reference_path: str | Path,
    output_dir: Path,
    validation_prompts: list[Messages] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DPOResult:
    """Train the policy on the rankings with DPO; save it to output_dir.

    validation: rankings on held-out prompts (accuracy and margins of the
    implicit reward). validation_prompts: held-out prompts sampled before and
    after each epoch (the first config.validation_samples): the samples side
    by side and the KL estimate. Raises ValueError for data without a
    preference, Cancelled when should_stop() says so (nothing saved). Under a
    launcher with several processes each trains on its shard of every step's
    rankings (trainer/distributed.py); rank 0 alone calls on_step and
    should_stop and saves.
    """
    started = time.perf_counter()
    rt = runtime(config.device, config.strategy)
    device = rt.device
    seed_everything(config.seed)  # the same seed everywhere: the same shuffle
    history: list[dict[str, float]] = []

    def report(step: int, metrics: dict[str, float]) -> None:
        history.append({"step": step, **metrics})
        if on_step is not None and rt.main:
            on_step(step, metrics)

    # 1. data: every ranking tokenised once; all-tied rankings compare nothing and are dropped
    tokenizer = prepare_tokenizer(load_tokenizer(str(policy_path)))
    pad_id = tokenizer.pad_token_id
    train_groups = [encode_group(tokenizer, g, config.max_length) for g in train if len(set(g.ranks)) > 1]
    val_groups = [encode_group(tokenizer, g, config.max_length) for g in validation if len(set(g.ranks)) > 1]
    if not train_groups:
        raise ValueError("no training ranking has two responses of different rank")
    if not val_groups:
        raise ValueError("no validation ranking has two responses of different rank")

    # 2. models: the policy (trained); the reference's log-probs of every response, computed once here (in
    # every process, for all rankings: each then reads those of its shard).
    # With LoRA on the reference's own weights the reference is the policy with its adapters off; else a
    # frozen copy, kept only while the KL estimate needs it.
    policy = load_causal_lm(str(policy_path), device, torch.float32)
    same_weights = Path(reference_path).resolve() == Path(policy_path).resolve()
    use_lora = config.lora_r > 0
    prompts = (validation_prompts or [])[:config.validation_samples]
    reference = None
    if not (use_lora and same_weights):
        if same_weights and not prompts:
            reference = policy  # for the cache only: before any step the policy is the reference
        else:
            reference = load_causal_lm(str(reference_path), device, torch.float32).requires_grad_(False).eval()
    cache_model = policy if reference is None else reference  # before any step, the policy is the reference
    cache_model.eval()
    ref_train = _cached_logprobs(cache_model, train_groups, pad_id, device, config)
    ref_val = _cached_logprobs(cache_model, val_groups, pad_id, device, config)
    if reference is policy or not prompts:
        reference = None  # nothing reads it again
    if use_lora:
        policy = add_lora(policy, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                          task_type="CAUSAL_LM")
    policy.eval()  # dropout off throughout (TRL's disable_dropout); gradients flow all the same

    # 3. optimizer and schedule; the policy spread over the processes by the strategy
    steps_per_epoch = -(-len(train_groups) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs

    def make_optimizer() -> torch.optim.Optimizer:
        return make_adamw([p for p in policy.parameters() if p.requires_grad], lr=config.learning_rate,
                          weight_decay=config.weight_decay, adam_8bit=config.adam_8bit, device=device)

    optimizer = rt.prepare({"policy": policy}, make_optimizer, max_grad_norm=config.max_grad_norm)
    params = [p for p in policy.parameters() if p.requires_grad]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.lr_schedule, int(config.warmup_ratio * total_steps), total_steps))
    shuffle = torch.Generator().manual_seed(config.seed)

    prompt_ids = [encode_prompt(tokenizer, m) for m in prompts]
    from transformers import GenerationConfig

    generation_config = GenerationConfig(
        do_sample=True, temperature=config.temperature, top_k=0, top_p=1.0, max_new_tokens=config.max_new_tokens,
        min_new_tokens=0, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id)

    def draw(query: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Responses sampled from the policy to left-padded prompts (B, P), with their KL from the
        reference (log pi - log ref summed over the response's tokens): (responses, mask, ended, kl)."""
        with autocast(device, config.mixed_precision):
            raw = generate_exactly(policy, generation_config, input_ids=query, attention_mask=query_mask,
                                   synced_gpus=rt.shards_weights)[:, query.shape[1]:]  # (B, R)
        responses, response_mask, ended = truncate_after_eos(raw, tokenizer.eos_token_id, pad_id)
        query_response = torch.cat([query, responses], 1)
        attention = torch.cat([query_mask, response_mask], 1)
        P = query.shape[1]
        with autocast(device, config.mixed_precision):
            logprobs, _ = response_logprobs(policy, query_response, attention, P, config.temperature)
            ref = reference_logprobs(policy, reference, query_response, attention, P, config.temperature)
        return responses, response_mask, ended, ((logprobs - ref) * response_mask).sum(1)

    @torch.no_grad()
    def samples() -> list[dict]:
        """The validation prompts sampled from the policy with a fixed seed (per process: each samples
        its shard of the prompts), each with its KL from the reference."""
        out: list[tuple[int, dict]] = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(config.seed + 1 + rt.rank)  # the same draws at every evaluation
            for indices, real in rt.batches(list(range(len(prompt_ids))), config.eval_batch_size):
                query, query_mask = (t.to(device) for t in pad_left([prompt_ids[i] for i in indices], pad_id))
                responses, response_mask, ended, kl = rt.run(draw, query, query_mask)
                if not real:
                    continue
                for row, i in enumerate(indices):
                    tokens = responses[row][response_mask[row].bool()]
                    out.append((i, {"prompt": prompts[i],
                                    "response": tokenizer.decode(tokens, skip_special_tokens=True),
                                    "reward": None, "ended": bool(ended[row]), "kl": float(kl[row])}))
        everyone = [pair for part in rt.gather(out) for pair in part]
        return [sample for _, sample in sorted(everyone, key=lambda pair: pair[0])]

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        loss_sum, correct, pairs, margin, chosen, rejected = 0.0, 0, 0, 0.0, 0.0, 0.0
        # each process its shard of the rankings; the sums over all of them
        for indices, real in rt.batches(list(range(len(val_groups))), config.eval_batch_size):
            batch = [val_groups[i] for i in indices]
            flat = rt.run(ranking_logprobs, policy, batch, pad_id, device, config.mixed_precision)
            if not real:
                continue
            logps, ranks, valid = as_ranking_batch(flat, batch)
            refs, _, _ = as_ranking_batch(torch.cat([ref_val[i] for i in indices]).to(device), batch)
            loss, stats = dpo_loss(logps - refs, ranks, valid, beta=config.beta, loss=config.loss)
            loss_sum += loss.item() * len(batch)
            correct, pairs, margin = correct + int(stats["correct"]), pairs + int(stats["pairs"]), \
                margin + float(stats["margin_sum"])
            c, r = _pair_figures(logps, ranks, valid)
            chosen, rejected = chosen + c, rejected + r
        loss_sum, correct, pairs, margin, chosen, rejected = rt.sum([loss_sum, correct, pairs, margin, chosen,
                                                                    rejected])
        pairs = int(pairs)
        figures = {"val_loss": loss_sum / len(val_groups), "val_accuracy": correct / max(1, pairs),
                   "val_margin": margin / max(1, pairs), "val_chosen_logp": chosen / max(1, pairs),
                   "val_rejected_logp": rejected / max(1, pairs), "val_pairs": pairs}
        drawn = samples() if prompt_ids else []
        if drawn:
            figures["kl"] = sum(s["kl"] for s in drawn) / len(drawn)
        return figures | {"_samples": drawn}

    # 4. the loop: each ranking's prompt once and its K responses after it, in one batch; the loss from their
    # log-probs and the cached reference's, backward, clip, step, log; evaluate before training and after each epoch.
    # With several processes each takes its shard of the step's rankings, its mean loss weighed by the shard's
    # share of them: the step's gradient is that of the mean loss over all of its rankings.
    first = evaluate()
    samples_before = first.pop("_samples")
    report(0, {"epoch": 0, **first})
    step, last_eval = 0, first
    train_loss_sum, train_seen = 0.0, 0
    sequences = 0
    loop_started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(len(train_groups), generator=shuffle).tolist()
        train_loss_sum, train_seen = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            full = order[start:start + config.batch_size]
            indices = rt.shard(full)
            # A process gets nothing when a last batch is smaller than the number of processes: it passes a
            # stand-in ranking weighed 0 (every process makes the same forward and backward passes).
            stand_in = not indices
            indices = indices or full[:1]
            batch = [train_groups[i] for i in indices]
            flat = rt.run(ranking_logprobs, policy, batch, pad_id, device, config.mixed_precision)  # (N,)
            logps, ranks, valid = as_ranking_batch(flat, batch)  # (B, K)
            refs, _, _ = as_ranking_batch(torch.cat([ref_train[i] for i in indices]).to(device), batch)  # (B, K)
            loss, stats = dpo_loss(logps - refs, ranks, valid, beta=config.beta, loss=config.loss)
            share = 0.0 if stand_in else len(batch) / len(full)
            rt.backward(loss * share)
            grad_norm = rt.clip_grad_norm_(params, config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            chosen, rejected = _pair_figures(logps.detach(), ranks, valid) if not stand_in else (0.0, 0.0)
            mine = [] if stand_in else [loss.item() * share, int(stats["correct"]), int(stats["pairs"]),
                                        float(stats["margin_sum"].detach()), chosen, rejected, len(flat)]
            step_loss, correct, pairs, margin, chosen, rejected, seqs = rt.sum(mine or [0.0] * 7)
            sequences += int(seqs)
            pairs = max(1, int(pairs))
            train_loss_sum += step_loss * len(full)
            train_seen += len(full)
            report(step, {"epoch": epoch, "loss": step_loss, "accuracy": correct / pairs, "margin": margin / pairs,
                          "chosen_logp": chosen / pairs, "rejected_logp": rejected / pairs,
                          "grad_norm": float(grad_norm), "lr": lr})
            rt.agree_to_stop(should_stop, f"DPO stopped at step {step}")
        last_eval = evaluate()
        drawn = last_eval.pop("_samples")
        report(step, {"epoch": epoch, "train_loss": train_loss_sum / max(1, train_seen), **last_eval})
        log.info("epoch %d: val accuracy %.3f, val margin %.4f", epoch, last_eval["val_accuracy"],
                 last_eval["val_margin"])
    loop_seconds = time.perf_counter() - loop_started
    samples_after = drawn

    # 5. save a plain checkpoint that samples with our settings
    comparisons = sum(_pair_count(g.ranks) for g in train_groups)
    metrics = {
        "val_accuracy": last_eval["val_accuracy"], "val_loss": last_eval["val_loss"],
        "val_margin": last_eval["val_margin"], "val_accuracy_before": first["val_accuracy"],
        "val_pairs": last_eval["val_pairs"], "train_loss": train_loss_sum / max(1, train_seen),
        "kl": last_eval.get("kl", 0.0), "steps": step, "epochs": config.epochs, "loss": config.loss,
        "train_rankings": len(train_groups), "val_rankings": len(val_groups), "comparisons": comparisons,
        "policy_sequences": sequences, "processes": rt.world,
        "comparisons_per_s": comparisons * config.epochs / max(loop_seconds, 1e-9),
        "seconds": time.perf_counter() - started,
    }
    policy = unwrap_lora(rt.unwrapped("policy"))
    if rt.main:
        policy.generation_config.pad_token_id = pad_id
        policy.generation_config.eos_token_id = tokenizer.eos_token_id
        save_checkpoint(policy, tokenizer, output_dir, {
            "kind": "policy", "policy_path": str(policy_path), "reference_path": str(reference_path),
            "config": asdict(config), "metrics": metrics,
            "sampling": {"temperature": config.temperature, "top_k": 0, "top_p": 1.0,
                         "max_new_tokens": config.max_new_tokens},
        })
    rt.barrier()  # the checkpoint is in place when any process returns
    return DPOResult(output_dir=Path(output_dir), metrics=metrics, history=history,
                     samples_before=samples_before, samples_after=samples_after)


def _pair_count(ranks: list[int]) -> int:
    return sum(1 for a in ranks for b in ranks if a < b)
