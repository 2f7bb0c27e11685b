"""Automatic figures of an evaluation set, on the responses labelers vote on.

Nothing is sampled: the set's stored responses are read again.

- Reward: the reward model scores every response (normalised as PPO reads it,
  trainer/reward.score). The web app compares the two sides of each task
  (app/services/evaluation.reward_figures): the reward model's win rate per
  pair of models, and its agreement with the human votes.
- KL: for a policy with a reference, the log-ratio of each of its responses,
  sum over tokens of log pi(y_t | x, y_<t) - log ref(y_t | x, y_<t). The
  responses were sampled from the policy, so their mean is a Monte-Carlo
  estimate of KL(pi || ref) on the set's prompts (the estimator PPO's
  penalty uses, summed per response). Log-probs are taken at the set's
  sampling temperature, as PPO takes them; top-p truncation is ignored.
  Responses are stored as text and tokenised again, which gives back the
  sampled tokens for ordinary text; a model that writes fragments of words
  that tokenise otherwise makes the estimate unreliable (it may even come
  out negative).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from trainer.common import Messages, encode_prompt, pad_left, pad_right, prepare_tokenizer, response_logprobs
from trainer.configs import EvalFiguresConfig
from trainer.distributed import runtime
from trainer.models import load_causal_lm, load_tokenizer
from trainer.reward import load_reward_model, score_many

PROMPTS_PER_PASS = 32  # prompts whose responses are scored together (their sequences batched by length)


@dataclass(frozen=True)
class StoredResponse:
    """A response of the set as stored: its prompt, its text, whether it ended with EOS."""

    response_id: int
    messages: Messages
    text: str
    ended: bool


def reward_scores(config: EvalFiguresConfig, responses: Sequence[StoredResponse], *, reward_path: str,
                  on_done: Callable[[int], None] | None = None) -> dict[int, float]:
    """{response_id: normalised reward} of every response; on_done(n) after each pass over PROMPTS_PER_PASS prompts.
    Equal texts to one prompt (models that answer alike) are scored once, so they tie exactly."""
    device = runtime(config.device).device
    model, tokenizer = load_reward_model(reward_path, device)
    by_prompt: dict[str, dict[str, list[int]]] = {}  # prompt -> text -> response ids
    messages_of: dict[str, Messages] = {}
    for r in responses:
        key = repr(r.messages)
        messages_of[key] = r.messages
        by_prompt.setdefault(key, {}).setdefault(r.text, []).append(r.response_id)
    out: dict[int, float] = {}
    keys = list(by_prompt)
    for start in range(0, len(keys), PROMPTS_PER_PASS):
        chunk = keys[start:start + PROMPTS_PER_PASS]
        groups = [(messages_of[key], list(by_prompt[key])) for key in chunk]
        scored = score_many(model, tokenizer, groups, max_length=config.max_length, batch_rows=config.batch_size)
        for key, rewards in zip(chunk, scored, strict=True):  # (C,) each
            for text, value in zip(by_prompt[key], rewards.tolist(), strict=True):
                out.update((response_id, float(value)) for response_id in by_prompt[key][text])
        if on_done is not None:
            on_done(len(out))
    return out


@torch.no_grad()
def log_ratios(config: EvalFiguresConfig, responses: Sequence[StoredResponse], *, policy_path: str,
               reference_path: str, temperature: float,
               on_done: Callable[[int], None] | None = None) -> dict[int, float]:
    """{response_id: sum over the response's tokens of log pi - log ref} of the policy's own responses."""
    device = runtime(config.device).device
    tokenizer = prepare_tokenizer(load_tokenizer(str(policy_path)))
    assert prepare_tokenizer(load_tokenizer(str(reference_path))).get_vocab() == tokenizer.get_vocab(), \
        "the policy and its reference must share a tokenizer: log-probs are compared token for token"
    policy = load_causal_lm(str(policy_path), device, torch.float32).eval()
    reference = load_causal_lm(str(reference_path), device, torch.float32).eval()
    out: dict[int, float] = {}
    for start in range(0, len(responses), config.batch_size):
        chunk = responses[start:start + config.batch_size]
        prompts = [encode_prompt(tokenizer, r.messages) for r in chunk]
        # The tokens the policy produced: the text, then EOS where it stopped by itself.
        answers = [tokenizer(r.text, add_special_tokens=False).input_ids + ([tokenizer.eos_token_id] if r.ended else [])
                   for r in chunk]
        answers = [a or [tokenizer.eos_token_id] for a in answers]  # an empty, unfinished response: nothing to read
        query, query_mask = pad_left(prompts, tokenizer.pad_token_id)  # (C, P)
        answer, answer_mask = pad_right(answers, tokenizer.pad_token_id)  # (C, R)
        ids = torch.cat([query, answer], 1).to(device)  # (C, P + R)
        mask = torch.cat([query_mask, answer_mask], 1).to(device)  # (C, P + R)
        P = query.shape[1]
        logp = response_logprobs(policy, ids, mask, P, temperature)[0]  # (C, R)
        ref_logp = response_logprobs(reference, ids, mask, P, temperature)[0]  # (C, R)
        per_response = ((logp - ref_logp) * answer_mask.to(device)).sum(-1)  # (C,)
        out.update((r.response_id, float(v)) for r, v in zip(chunk, per_response.tolist(), strict=True))
        if on_done is not None:
            on_done(len(out))
    return out
