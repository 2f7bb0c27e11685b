"""Best-of-N sampling (rejection sampling) with a reward model.

For each prompt the policy samples N responses, the reward model scores them
(normalised as PPO reads it: the SFT samples have mean 0, std 1) and the best
is kept. Nothing is trained, yet the kept responses come from a distribution
that is provably close to the policy: the KL of best-of-N from the policy is
at most log N - (N - 1) / N (Stiennon et al. 2020, appendix G.3; Beirami et
al. 2024 show it is an upper bound, tight for distinct samples), so a best-of-N
figure can be set beside a PPO or DPO policy at the same KL.

RewardRanker is the scoring both uses share: the best_of_n job here, and a
ranking round generated as the top K of N samples (trainer/generate.py).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer.common import (
    Messages,
    autocast,
    encode_prompt,
    generate_exactly,
    pad_left,
    prepare_tokenizer,
    seed_everything,
    truncate_after_eos,
)
from trainer.configs import BestOfNConfig
from trainer.distributed import runtime
from trainer.models import load_causal_lm, load_tokenizer
from trainer.reward import load_reward_model, score


def kl_bound(n: int) -> float:
    """KL(best-of-N || policy) in nats, analytically: log N - (N - 1) / N."""
    assert n >= 1
    return math.log(n) - (n - 1) / n


def best_indices(rewards: torch.Tensor) -> torch.Tensor:
    """Responses ordered best first by reward: (P, N) -> (P, N) indices (ties: the earlier sample)."""
    return torch.sort(rewards, dim=-1, descending=True, stable=True).indices


class TokenizerMismatch(ValueError):
    """The reward model and the policy do not share a tokenizer."""


class RewardRanker:
    """A reward model ordering the candidate responses of a prompt by reward, best first.
    With the policy's tokenizer, it refuses a reward model of another tokenizer
    (TokenizerMismatch): responses are scored token for token as the policy wrote them."""

    def __init__(self, reward_path: str, device: torch.device, policy_tokenizer=None):
        self.model, self.tokenizer = load_reward_model(reward_path, device)
        if policy_tokenizer is not None and self.tokenizer.get_vocab() != policy_tokenizer.get_vocab():
            raise TokenizerMismatch("the reward model and the policy must share a tokenizer")

    def rank(self, messages: Messages, responses: list[str]) -> tuple[list[float], list[int]]:
        """(normalised rewards, indices best first) of one prompt's responses."""
        rewards = score(self.model, self.tokenizer, messages, responses)  # (N,)
        return rewards.tolist(), best_indices(rewards.unsqueeze(0))[0].tolist()


@dataclass
class PromptOutcome:
    messages: Messages
    responses: list[str]  # the N samples
    rewards: list[float]  # their normalised rewards
    ended: list[bool]
    order: list[int]  # indices best first

    @property
    def best(self) -> int:
        return self.order[0]

    @property
    def best_reward(self) -> float:
        return self.rewards[self.best]

    @property
    def mean_reward(self) -> float:
        return sum(self.rewards) / len(self.rewards)


def best_of_n(config: BestOfNConfig, prompts: list[Messages], *, policy_path: str, reward_path: str,
              on_prompts: Callable[[int], None] | None = None) -> list[PromptOutcome]:
    """Sample config.n responses per prompt from the policy and score them with the reward model.
    on_prompts(done) is called after each batch (progress, and cancellation by raising)."""
    device = runtime(config.device).device
    seed_everything(config.seed)
    tokenizer = prepare_tokenizer(load_tokenizer(str(policy_path)))
    policy = load_causal_lm(str(policy_path), device, torch.float32).eval()
    ranker = RewardRanker(reward_path, device, tokenizer)
    from transformers import GenerationConfig

    generation_config = GenerationConfig(
        do_sample=True, temperature=config.temperature, top_k=0, top_p=config.top_p,
        max_new_tokens=config.max_new_tokens, min_new_tokens=0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    per_batch = max(1, config.batch_size // config.n)  # prompts per generation pass, N sequences each
    outcomes: list[PromptOutcome] = []
    for start in range(0, len(prompts), per_batch):
        chunk = prompts[start:start + per_batch]
        ids = [encode_prompt(tokenizer, m) for m in chunk for _ in range(config.n)]
        query, query_mask = (t.to(device) for t in pad_left(ids, tokenizer.pad_token_id))  # (C * N, P)
        with torch.no_grad(), autocast(device, config.mixed_precision):
            raw = generate_exactly(policy, generation_config, input_ids=query,
                                   attention_mask=query_mask)[:, query.shape[1]:]  # (C * N, R)
        responses, mask, ended = truncate_after_eos(raw, tokenizer.eos_token_id, tokenizer.pad_token_id)
        texts = [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(responses, mask)]
        for row, messages in enumerate(chunk):
            mine = slice(row * config.n, (row + 1) * config.n)
            rewards, order = ranker.rank(messages, texts[mine])
            outcomes.append(PromptOutcome(messages, texts[mine], rewards, ended[mine].tolist(), order))
        if on_prompts is not None:
            on_prompts(len(outcomes))
    return outcomes
