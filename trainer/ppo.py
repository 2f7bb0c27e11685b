"""PPO against a reward model with a KL penalty to the SFT reference (step 3 of the InstructGPT recipe).

Per step: sample responses from the policy, score them with the reward model,
reward per token = -beta * KL(policy || reference) with the reward-model score
added at the last token, values from a value model initialised from the reward
model, GAE advantages (whitened), then a few epochs of clipped policy and value
updates over minibatches.

What decides whether it works, after "The N Implementation Details of RLHF
with PPO" (Huang et al. 2023) and TRL's / OpenRLHF's PPO, each marked where it
happens below:
- a pad token distinct from EOS, left-padded prompts, position ids from the mask;
- sampling with top_k=0, top_p=1 and nothing else (never the checkpoint's
  generation_config.json), the logits divided by the temperature before the
  log-probs, so the ratios are those of the distribution sampled;
- responses truncated after their first EOS before scoring, scored as the RM
  was trained (a response cut at the length limit gets EOS appended), and a
  penalty for responses that never end;
- reward-model scores normalised (mean 0, std 1) on the reference's samples
  drawn with the run's own settings, or from the RM's stored normalisation;
  the value head's output normalised alike, so values and rewards share units;
- per-token KL (k1, or k3 as an option) with the score at the last token, and a
  fixed or adaptive (Ziegler et al. 2019) KL coefficient;
- whitened advantages; value head initialised from the reward model; dropout
  off; gradient clipping; learning rate annealed to 0.
TRL's current PPO has neither the adaptive KL controller nor InstructGPT's
pretraining term (ptx); here both are options.
"""

import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trainer.common import (
    Messages,
    add_lora,
    apply_gradient_checkpointing,
    autocast,
    encode_prompt,
    encode_response,
    generate_exactly,
    lr_lambda,
    make_adamw,
    masked_mean,
    masked_whiten,
    pad_left,
    prepare_tokenizer,
    response_logprobs,
    save_checkpoint,
    seed_everything,
    sequence_nll,
    truncate_after_eos,
    unwrap_lora,
)
from trainer.configs import PPOConfig
from trainer.distributed import runtime
from trainer.sampling import SeededSampler, derive_seed
from trainer.models import load_causal_lm, load_tokenizer, pick_dtype
from trainer.reward import load_reward_model, reward_normalisation, sequence_scores, token_scores
from trainer.vllm_engine import VllmRollouts, choose_engine

log = logging.getLogger(__name__)


@dataclass
class PPOResult:
    output_dir: Path
    metrics: dict[str, float]  # the last step's metrics plus validation rewards before/after
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per PPO step
    samples_before: list[dict] = field(default_factory=list)  # {"prompt", "response", "reward", "ended"}
    samples_after: list[dict] = field(default_factory=list)


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2: beta <- beta * (1 + e * n / horizon), e = clip(KL / target - 1, -0.2, 0.2)."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value = kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


def per_token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """KL(policy || reference) estimated per sampled token (http://joschu.net/blog/kl-approx.html)."""
    log_ratio = logprobs - ref_logprobs  # (B, R): log p(x) - log q(x), x sampled from p
    if estimator == "k1":
        return log_ratio
    assert estimator == "k3", estimator
    return (torch.exp(-log_ratio) - 1) + log_ratio  # (q/p - 1) - log(q/p) >= 0


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens. All (B, R); padding has mask 0.

    A padded position has value 0 and reward 0, so the last real token
    bootstraps from 0 (the episode ends there) and padding gets advantage 0.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    R = rewards.shape[1]
    last_gae = torch.zeros_like(rewards[:, 0])  # (B,)
    reversed_advantages = []
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        reversed_advantages.append(last_gae)
    advantages = torch.stack(reversed_advantages[::-1], dim=1) * mask  # (B, R)
    returns = (advantages + values) * mask  # (B, R)
    return advantages, returns


def score_with_penalty(score: torch.Tensor, ended: torch.Tensor, missing_eos_penalty: float | None) -> torch.Tensor:
    """A response that ran out of tokens without EOS loses missing_eos_penalty (TRL's convention)."""
    if missing_eos_penalty is None:
        return score
    return torch.where(ended, score, score - missing_eos_penalty)


def ended_with_eos(responses: torch.Tensor, response_mask: torch.Tensor, ended: torch.Tensor, eos_id: int,
                   pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The responses as the reward model reads them: (B, R + 1) ids and mask.

    The RM was trained and normalised on responses that all end with EOS
    (encode_response appends it, also to responses cut at the length limit),
    and reads its score there. A rollout cut at the limit gets EOS appended
    for scoring, as OpenRLHF writes EOS over a cut response's last token;
    read at an ordinary token, its score is on no scale the RM learnt (the
    missing-EOS penalty, not the RM, is what judges that it never ended).
    """
    B = responses.shape[0]
    ids = torch.cat([responses, responses.new_full((B, 1), pad_id)], 1)  # (B, R + 1)
    mask = torch.cat([response_mask, response_mask.new_zeros((B, 1))], 1)  # (B, R + 1)
    cut = (~ended).nonzero().squeeze(-1)  # rows that never produced EOS
    end = response_mask.sum(1)[cut]  # the column after their last token
    ids[cut, end] = eos_id
    mask[cut, end] = 1
    return ids, mask


def reference_logprobs(policy, reference, query_response: torch.Tensor, attention: torch.Tensor,
                       context_length: int, temperature: float) -> torch.Tensor:
    """Log-probs of the response tokens under the frozen reference: (B, R). reference None: LoRA on the
    reference's own weights, so the reference is the policy with its adapters switched off."""
    if reference is None:
        with policy.disable_adapter():
            return response_logprobs(policy, query_response, attention, context_length, temperature)[0]
    return response_logprobs(reference, query_response, attention, context_length, temperature)[0]


def _generation_config(config: PPOConfig, tokenizer):
    from transformers import GenerationConfig

    # The tokens are drawn by SeededSampler (plain softmax(logits / T), the distribution the log-probs assume)
    # and picked greedily; generate_exactly keeps the checkpoint's generation_config.json out of it.
    return GenerationConfig(
        do_sample=False, max_new_tokens=config.max_new_tokens, min_new_tokens=0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )


@torch.no_grad()
def _generate(policy, query: torch.Tensor, query_mask: torch.Tensor, generation_config, seeds: list[int],
              temperature: float, synced_gpus: bool = False) -> torch.Tensor:
    """Sampled responses to left-padded prompts: (B, R), R <= max_new_tokens. Row i draws from its own
    stream seeded seeds[i], so its tokens do not depend on the other rows or on the process that samples
    it. synced_gpus: every process steps until all are done (their weights are sharded: each step gathers
    them from every process)."""
    from transformers import LogitsProcessorList

    output = generate_exactly(policy, generation_config, input_ids=query, attention_mask=query_mask,
                              logits_processor=LogitsProcessorList([SeededSampler(seeds, temperature, 1.0)]),
                              synced_gpus=synced_gpus)
    return output[:, query.shape[1]:]  # (B, R)


def train_ppo(
    config: PPOConfig,
    prompts: list[Messages],
    *,
    policy_path: str | Path,
    reference_path: str | Path,
    reward_path: str | Path,
    output_dir: Path,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    sft_data: list[tuple[Messages, str]] | None = None,
    validation_prompts: list[Messages] | None = None,
) -> PPOResult:
    """Optimise the policy against the reward model; save it to output_dir.

    on_step(step, metrics) is called after every PPO step; should_stop() is
    asked after every step and raises Cancelled (nothing saved) when true.
    The first config.validation_samples of validation_prompts (held out: never
    trained on) are sampled before and after training with a fixed seed.

    Under a launcher with N processes, batch_size and mini_batch_size count
    rollouts of all processes together (both must be multiples of N): each
    process samples and scores its share of every step's prompts (rows rank,
    rank + N, ...), every row from its own seed (config.seed, step, row), then
    every process holds the whole batch: advantages, whitening, the KL
    controller and the logged metrics are those of one process. Each
    minibatch is drawn from the whole batch, each process computing the
    losses of its share of it, token means over the whole minibatch. So N
    processes train as one does. Rank 0 alone calls on_step and should_stop
    and saves (trainer/distributed.py).
    """
    if not prompts:
        raise ValueError("PPO needs at least one prompt")
    if config.ptx_coef > 0 and not sft_data:
        raise ValueError("ptx_coef > 0 needs sft_data (SFT demonstrations for the pretraining-loss term)")

    # 0. seed and device; under a multi-process launch, this process's rank and device
    rt = runtime(config.device, config.strategy)
    device = rt.device
    if rt.distributed and (config.batch_size % rt.world or config.mini_batch_size % rt.world):
        raise ValueError(f"with {rt.world} processes, batch_size ({config.batch_size}) and mini_batch_size"
                         f" ({config.mini_batch_size}) must be multiples of {rt.world}: each process takes an"
                         " equal share of every minibatch")
    engine = choose_engine(config.rollout_engine, device)  # before any model is loaded: vLLM may be missing
    seed_everything(config.seed)
    use_lora = config.lora_r > 0

    # 1. models: policy (trained), reference (frozen), reward model (frozen), value model (trained, from the RM)
    tokenizer = prepare_tokenizer(load_tokenizer(str(policy_path)))  # a pad distinct from EOS
    # Trained weights float32 (autocast does bf16 on CUDA); frozen ones (reference, reward model, the base
    # under LoRA) bf16 on CUDA, float32 elsewhere.
    policy = load_causal_lm(str(policy_path), device, pick_dtype(device) if use_lora else torch.float32)
    # With LoRA on the same weights, the reference is the policy with its adapters switched off.
    shared_reference = use_lora and Path(reference_path).resolve() == Path(policy_path).resolve()
    reference = None if shared_reference else load_causal_lm(str(reference_path), device, pick_dtype(device))
    reward_model, reward_tokenizer = load_reward_model(reward_path, device, pick_dtype(device))
    assert reward_tokenizer.get_vocab() == tokenizer.get_vocab(), \
        "the reward model and the policy must share a tokenizer: responses are scored token for token"
    rm_mean, rm_std = reward_normalisation(reward_model)
    # The value head starts as the reward head; its outputs are normalised like the rewards (OpenRLHF's critic),
    # else the RM's arbitrary offset (the ranking loss ignores any shift) takes |offset| / cliprange_value
    # steps to unlearn and biases GAE by position meanwhile.
    value_model, _ = load_reward_model(reward_path, device)
    value_model.config.pad_token_id = tokenizer.pad_token_id
    if use_lora:
        policy = add_lora(policy, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout, task_type="CAUSAL_LM")
        value_model = add_lora(value_model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                               task_type="SEQ_CLS")
    for frozen in (reference, reward_model):
        if frozen is not None:
            frozen.requires_grad_(False)
    # eval() everywhere: dropout off, so the rollout's log-probs and the update's agree (ratio 1 at the start).
    for model in (policy, reference, reward_model, value_model):
        if model is not None:
            model.eval()
    for trained_model in (policy, value_model):
        apply_gradient_checkpointing(trained_model, config.gradient_checkpointing)

    # 2. data: prompts tokenised once; a seeded endless stream of shuffled prompt indices
    prompt_ids = [encode_prompt(tokenizer, m, config.max_prompt_length) for m in prompts]
    shuffle = torch.Generator().manual_seed(config.seed)
    stream = itertools.chain.from_iterable(torch.randperm(len(prompt_ids), generator=shuffle).tolist()
                                           for _ in itertools.count())
    sft_encoded = []
    for messages, text in (sft_data or []) if config.ptx_coef > 0 else []:
        p, r = encode_prompt(tokenizer, messages, config.max_prompt_length), encode_response(tokenizer, text)
        # No longer than a rollout (prompt + response): a long demonstration would cost memory and time
        # out of all proportion, for tokens the policy never produces in a rollout.
        r = r[:config.max_new_tokens]
        sft_encoded.append((p + r, [0] * len(p) + [1] * len(r)))
    generation_config = _generation_config(config, tokenizer)
    # The policy's rollouts on vLLM (trainer/vllm_engine.py) when chosen; the log-probs are the trainer's.
    rollouts = None
    if engine == "vllm":
        rollouts = VllmRollouts(str(policy_path), temperature=config.temperature, max_new_tokens=config.max_new_tokens,
                                pad_id=tokenizer.pad_token_id, seed=config.seed + rt.rank)

    # 3. optimizer over policy and value, spread over the processes by the strategy (the first steps that
    # train the value model alone leave the policy without gradients); lr annealed to 0 over every gradient step
    def trained() -> list[torch.nn.Parameter]:
        return [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]

    optimizer = rt.prepare({"policy": policy, "value": value_model},
                           lambda: make_adamw(trained(), lr=config.learning_rate, eps=1e-5,
                                              weight_decay=config.weight_decay, adam_8bit=config.adam_8bit,
                                              device=device),
                           max_grad_norm=config.max_grad_norm, unused_parameters=config.value_warmup_steps > 0)
    params = trained()
    minibatches = config.batch_size // config.mini_batch_size
    total_updates = config.steps * config.ppo_epochs * minibatches
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.lr_schedule, config.warmup_steps, total_updates))
    kl_controller = (AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
                     if config.adaptive_kl else FixedKLController(config.kl_coef))

    def sample_responses(query: torch.Tensor, query_mask: torch.Tensor, seeds: list[int], model=None) -> dict:
        """Sample responses to left-padded prompts, row i from seeds[i] (from the policy unless told),
        truncate after the first EOS, and the sequences the reward model reads ("scored", "scored_mask":
        query + response + EOS)."""
        query, query_mask = query.to(device), query_mask.to(device)
        if rollouts is not None and model is None:
            responses = rollouts.generate(query, query_mask)  # (B, R)
        else:
            with autocast(device, config.mixed_precision):
                if model is None or model is policy:
                    responses = rt.run(_generate, policy, query, query_mask, generation_config, seeds,
                                       config.temperature, rt.shards_weights)  # (B, R)
                else:
                    responses = _generate(model, query, query_mask, generation_config, seeds,
                                          config.temperature)  # (B, R)
        responses, response_mask, ended = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
        scored, scored_mask = ended_with_eos(responses, response_mask, ended, tokenizer.eos_token_id,
                                             tokenizer.pad_token_id)  # (B, R + 1)
        return {"query": query, "query_mask": query_mask, "responses": responses,
                "response_mask": response_mask, "ended": ended,
                "scored": torch.cat([query, scored], 1), "scored_mask": torch.cat([query_mask, scored_mask], 1)}

    def value_scores(query_response, attention, context_length) -> torch.Tensor:
        """Normalised value of the state before each response token: (B, R)."""
        raw = token_scores(value_model, query_response, attention)[:, context_length - 1:-1]  # (B, R)
        return (raw.float() - rm_mean) / rm_std

    @torch.no_grad()
    def rm_scores(query_response, attention) -> torch.Tensor:
        with autocast(device, config.mixed_precision):
            return sequence_scores(reward_model, query_response, attention)  # (B,)

    validation_prompts = (validation_prompts or [])[:config.validation_samples]

    def validation_samples() -> list[dict]:
        if not validation_prompts:
            return []
        ids = [encode_prompt(tokenizer, m, config.max_prompt_length) for m in validation_prompts]
        samples = []
        for indices, real in rt.batches(list(range(len(ids))), config.batch_size):  # all prompts in one process
            # the same seeds before and after training
            rollout = sample_responses(*pad_left([ids[i] for i in indices], tokenizer.pad_token_id),
                                       [derive_seed(config.seed, "validation", i) for i in indices])
            if not real:
                continue
            raw = rm_scores(rollout["scored"], rollout["scored_mask"])
            for row, i in enumerate(indices):
                tokens = rollout["responses"][row][rollout["response_mask"][row].bool()]
                samples.append((i, {
                    "prompt": validation_prompts[i],
                    "response": tokenizer.decode(tokens, skip_special_tokens=True),
                    "reward": (raw[row].item() - rm_mean) / rm_std,
                    "ended": bool(rollout["ended"][row]),
                }))
        everyone = [pair for part in rt.gather(samples) for pair in part]
        return [sample for _, sample in sorted(everyone, key=lambda pair: pair[0])]

    # 3b. reward normalisation on samples drawn as the rollouts are: the RM's stored one was made on responses
    # sampled with other settings (length, temperature), which shifts every score PPO sees.
    if config.normalisation_prompts > 0:
        order = torch.randperm(len(prompt_ids), generator=torch.Generator().manual_seed(config.seed + 2)).tolist()
        picks = [order[i % len(order)] for i in range(config.normalisation_prompts)]
        raw = []
        for chunk, real in rt.batches(list(range(len(picks))), max(1, config.batch_size // rt.world)):
            rollout = sample_responses(*pad_left([prompt_ids[picks[j]] for j in chunk], tokenizer.pad_token_id),
                                       [derive_seed(config.seed, "normalisation", j) for j in chunk],
                                       model=reference)  # the SFT model; None: the policy without adapters
            raw += rm_scores(rollout["scored"], rollout["scored_mask"]).tolist() if real else []
        raw = torch.tensor([x for part in rt.gather(raw) for x in part])  # (N,)
        rm_mean = raw.mean().item()
        rm_std = raw.std().item() if len(raw) > 1 and raw.std().item() > 1e-6 else 1.0

    samples_before = validation_samples()

    # 4. the loop
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    # B, mb: the rollouts per step and per minibatch, of all processes together
    B, mb = config.batch_size, config.mini_batch_size

    def whole_batch(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every process's rows of the step's batch, in the batch's order (row j was sampled by process
        j % world), the (rows, R) tensors right-padded to the longest response."""
        if not rt.distributed:
            return parts
        everyone = rt.gather({name: t.cpu() for name, t in parts.items()})
        R = max(part["responses"].shape[1] for part in everyone)
        out = {}
        for name in parts:
            pad = tokenizer.pad_token_id if name == "responses" else 0
            rows = [t if t.dim() == 1 else torch.nn.functional.pad(t, (0, R - t.shape[1]), value=pad)
                    for t in (part[name] for part in everyone)]
            out[name] = torch.stack(rows, 1).flatten(0, 1).to(device)  # (B/world, world, ...) -> (B, ...)
        return out

    def token_mean(x: torch.Tensor, m: torch.Tensor, tokens: float) -> torch.Tensor:
        """Mean over the minibatch's real tokens; with several processes, this process's part of
        the mean over all of them (tokens: their count), so the parts add up to it."""
        if not rt.distributed:
            return masked_mean(x, m)
        return (x * m.to(x.dtype)).sum() / max(1.0, tokens)

    for step in range(1, config.steps + 1):
        t0 = time.perf_counter()
        assert not policy.training and not value_model.training, "dropout must stay off"

        # 1. generate: sample responses from the policy for a batch of left-padded prompts, each process
        # its rows of it, row j from a seed of its own
        indices = [next(stream) for _ in range(config.batch_size)]  # the same stream everywhere
        query, query_mask = pad_left([prompt_ids[i] for i in indices], tokenizer.pad_token_id)  # (B, P)
        query, query_mask = query.to(device), query_mask.to(device)
        if rollouts is not None:
            rollouts.sync(policy)  # this step's weights
        rollout = sample_responses(query[rt.rank::rt.world], query_mask[rt.rank::rt.world],
                                   rt.shard([derive_seed(config.seed, "rollout", step, j) for j in range(B)]))
        local_query_response = torch.cat([rollout["query"], rollout["responses"]], 1)  # (B / world, P + R)
        local_attention = torch.cat([rollout["query_mask"], rollout["response_mask"]], 1)  # (B / world, P + R)
        P = query.shape[1]
        t1 = time.perf_counter()

        # 2. score this process's rows: old log-probs, reference log-probs, values and reward-model scores,
        # in minibatch chunks; then every process has the whole batch's
        with torch.no_grad(), autocast(device, config.mixed_precision):
            chunks = [slice(i, i + mb // rt.world) for i in range(0, B // rt.world, mb // rt.world)]
            old = [rt.run(response_logprobs, policy, local_query_response[c], local_attention[c], P,
                          config.temperature, with_entropy=True) for c in chunks]
            batch = whole_batch({
                "responses": rollout["responses"], "response_mask": rollout["response_mask"],
                "ended": rollout["ended"],
                "logprobs": torch.cat([lp for lp, _ in old]).float(),
                "entropy": torch.cat([e for _, e in old]).float(),
                "ref_logprobs": torch.cat([rt.run(reference_logprobs, policy, reference, local_query_response[c],
                                                  local_attention[c], P, config.temperature)
                                           for c in chunks]).float(),
                "values": torch.cat([rt.run(value_scores, local_query_response[c], local_attention[c], P)
                                     for c in chunks]),
                "raw_score": torch.cat([rm_scores(rollout["scored"][c], rollout["scored_mask"][c])
                                        for c in chunks]).float(),
            })
        logprobs, entropy, ref_logprobs = batch["logprobs"], batch["entropy"], batch["ref_logprobs"]  # (B, R) each
        values, raw_score = batch["values"], batch["raw_score"]  # (B, R), (B,)
        responses, response_mask, ended = batch["responses"], batch["response_mask"], batch["ended"]  # (B, R), (B,)
        query_response = torch.cat([query, responses], 1)  # (B, P + R)
        attention = torch.cat([query_mask, response_mask], 1)  # (B, P + R)
        mask = response_mask.bool()  # (B, R)
        score = (raw_score - rm_mean) / rm_std  # (B,): SFT samples have mean 0, std 1
        penalised = score_with_penalty(score, ended, config.missing_eos_penalty)  # (B,)
        t2 = time.perf_counter()

        # 3. compute KL and rewards: -beta * KL at every token, the score added at the last real token
        kl = per_token_kl(logprobs, ref_logprobs, config.kl_estimator).masked_fill(~mask, 0.0)  # (B, R)
        kl_k1 = (logprobs - ref_logprobs).masked_fill(~mask, 0.0)  # (B, R), for logging and the controller
        beta = kl_controller.value
        rewards = -beta * kl  # (B, R)
        last = response_mask.sum(1) - 1  # (B,): the EOS, or the last token of an unfinished response
        rewards[torch.arange(B, device=device), last] += penalised
        values = values.masked_fill(~mask, 0.0)

        # 4. GAE advantages and returns
        advantages, returns = compute_gae(rewards, values, mask, config.gamma, config.lam)  # (B, R) each

        # 5. whiten advantages over the real tokens
        if config.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        # 6. PPO epochs: clipped policy and value losses over shuffled minibatches
        stats = {"policy_loss": [], "value_loss": [], "clip_frac": [], "value_clip_frac": [], "approx_kl": [],
                 "ptx_loss": []}
        lr = scheduler.get_last_lr()[0]
        train_policy = step > config.value_warmup_steps  # the first steps fit the value model alone
        for _ in range(config.ppo_epochs):
            order = torch.randperm(B, generator=shuffle).tolist()
            for start in range(0, B, mb):
                idx = torch.tensor(rt.shard(order[start:start + mb]), device=device)  # this process's share
                m = mask[idx]  # (mb, R)
                if config.ptx_coef > 0 and train_policy:
                    # InstructGPT's PPO-ptx: keep the likelihood of SFT data up while optimising the reward.
                    picks = rt.shard(torch.randint(len(sft_encoded), (config.mini_batch_size,),
                                                   generator=shuffle).tolist())
                    # Left-padded so the responses line up at the end and only their logits are computed.
                    ids, ptx_attention = pad_left([sft_encoded[i][0] for i in picks], tokenizer.pad_token_id)
                    loss_mask, _ = pad_left([sft_encoded[i][1] for i in picks], 0)
                tokens, ptx_tokens = 0.0, 0.0  # the whole minibatch's token counts, with several processes
                if rt.distributed:
                    tokens, ptx_tokens = rt.sum([float(m.sum()),
                                                 float(loss_mask.sum()) if config.ptx_coef > 0 and train_policy else 0.0])
                ptx = config.ptx_coef > 0 and train_policy

                def forward() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
                    """The minibatch's passes through policy and value, in one call of the engine."""
                    with autocast(device, config.mixed_precision):
                        new_logprobs, _ = response_logprobs(policy, query_response[idx], attention[idx], P,
                                                            config.temperature)
                        vpred = value_scores(query_response[idx], attention[idx], P)  # (mb, R)
                        ptx_loss = sequence_nll(policy, ids.to(device), ptx_attention.to(device),
                                                loss_mask.to(device)) if ptx else None
                    return new_logprobs, vpred, ptx_loss

                new_logprobs, vpred, ptx_loss = rt.run(forward)
                vpred_clipped = values[idx] + (vpred - values[idx]).clamp(-config.cliprange_value, config.cliprange_value)
                vf_losses = torch.max((vpred - returns[idx]) ** 2, (vpred_clipped - returns[idx]) ** 2)  # (mb, R)
                value_loss = 0.5 * token_mean(vf_losses, m, tokens)
                log_ratio = (new_logprobs - logprobs[idx]).masked_fill(~m, 0.0)  # (mb, R)
                ratio = torch.exp(log_ratio)
                pg_losses = -advantages[idx] * ratio  # (mb, R)
                pg_losses_clipped = -advantages[idx] * ratio.clamp(1 - config.cliprange, 1 + config.cliprange)
                policy_loss = token_mean(torch.max(pg_losses, pg_losses_clipped), m, tokens)
                loss = config.vf_coef * value_loss + (policy_loss if train_policy else 0.0)
                if ptx:
                    if rt.distributed:  # this process's part of the token mean over every process's picks
                        ptx_loss = ptx_loss * (float(loss_mask.sum()) / max(1.0, ptx_tokens))
                    loss = loss + config.ptx_coef * ptx_loss
                    stats["ptx_loss"].append(ptx_loss.item())
                rt.backward(loss)
                rt.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    stats["policy_loss"].append(policy_loss.item())
                    stats["value_loss"].append(value_loss.item())
                    stats["clip_frac"].append(token_mean((pg_losses_clipped > pg_losses).float(), m, tokens).item())
                    stats["value_clip_frac"].append(
                        token_mean((vf_losses > (vpred - returns[idx]) ** 2).float(), m, tokens).item())
                    stats["approx_kl"].append(0.5 * token_mean(log_ratio ** 2, m, tokens).item())
        if rt.distributed:  # every process's parts of each minibatch's figures, added up
            names = [name for name in stats if stats[name]]
            flat = rt.sum([v for name in names for v in stats[name]])
            for name in names:
                stats[name], flat = flat[:len(stats[name])], flat[len(stats[name]):]
        t3 = time.perf_counter()

        # 7. KL controller: move beta toward the target KL (no-op when fixed)
        mean_kl = kl_k1.sum(1).mean().item()
        kl_controller.update(mean_kl, config.batch_size)

        # 8. log and check for cancellation
        metrics = {
            "reward": score.mean().item(),  # the RM score (normalised), before penalties and KL
            "reward_unnormalised": raw_score.mean().item(),
            "kl": mean_kl,  # nats per response, k1
            "total_reward": (rewards.sum(1)).mean().item(),  # score - penalty - beta * KL, summed per response
            "entropy": masked_mean(entropy, mask).item(),  # per token, at the sampling temperature
            "policy_loss": _mean(stats["policy_loss"]),
            "value_loss": _mean(stats["value_loss"]),
            "clip_frac": _mean(stats["clip_frac"]),
            "value_clip_frac": _mean(stats["value_clip_frac"]),
            "approx_kl": _mean(stats["approx_kl"]),
            "response_length": response_mask.sum(1).float().mean().item(),
            "eos_fraction": ended.float().mean().item(),
            "cut_fraction": 1.0 - ended.float().mean().item(),  # responses cut at max_new_tokens
            "lr": lr,
            "kl_coef": beta,
            "generation_s": t1 - t0, "scoring_s": t2 - t1, "update_s": t3 - t2,
        }
        if stats["ptx_loss"]:
            metrics["ptx_loss"] = _mean(stats["ptx_loss"])
        history.append({"step": step, **metrics})
        if on_step is not None and rt.main:
            on_step(step, metrics)
        log.info("ppo step %d: reward %.3f kl %.3f", step, metrics["reward"], metrics["kl"])
        rt.agree_to_stop(should_stop, f"PPO stopped at step {step}")

    # 5. validation samples after, then save the policy (adapters merged) with its settings and metrics
    samples_after = validation_samples()
    final = dict(history[-1])
    final.pop("step")
    final["steps"] = config.steps
    final["processes"] = rt.world
    final["normalisation_mean"], final["normalisation_std"] = rm_mean, rm_std
    final["seconds"] = time.perf_counter() - started
    if samples_before:  # held-out prompts: what the run generalised, apart from the training "reward"
        before = [s["reward"] for s in samples_before]
        after = [s["reward"] for s in samples_after]
        final["validation_prompts"] = len(before)
        final["validation_reward_before"], final["validation_reward_before_ci"] = mean_and_interval(before)
        final["validation_reward_after"], final["validation_reward_after_ci"] = mean_and_interval(after)
        # paired: the same prompts before and after, so the change's interval is narrower than either's
        final["validation_reward_change"], final["validation_reward_change_ci"] = mean_and_interval(
            [a - b for a, b in zip(after, before, strict=True)])
    policy = unwrap_lora(rt.unwrapped("policy"))
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    if rt.main:
        save_checkpoint(policy, tokenizer, output_dir, {
            "kind": "policy", "policy_path": str(policy_path), "reference_path": str(reference_path),
            "reward_path": str(reward_path), "config": asdict(config), "metrics": final,
            # what the rollouts were drawn with, and nothing else (generate_exactly)
            "sampling": {"temperature": config.temperature, "top_k": 0, "top_p": 1.0,
                         "max_new_tokens": config.max_new_tokens},
        })
    rt.barrier()  # the checkpoint is in place when any process returns
    return PPOResult(output_dir=Path(output_dir), metrics=final, history=history,
                     samples_before=samples_before, samples_after=samples_after)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def mean_and_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% normal interval); the half-width is 0 for fewer than 2 values."""
    mean = _mean(values)
    if len(values) < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, 1.96 * math.sqrt(variance / len(values))
