"""The two judges of an AI labeler, and how their verdicts become a ranking.

- A reward model ranks a task's responses by score; equal scores tie.
- An instruction-following model (any causal LM: the SFT model, a policy) is asked,
  with the set's instructions and written principles (Constitutional AI, Bai et al.
  2022), which of two responses is better. Its preference is read from the
  log-probabilities of the answer tokens "A" and "B" at the first position of its
  answer, never from parsing generated text, and every pair is asked in both orders
  so that a preference for whatever comes first cancels out (Zheng et al. 2023,
  "Judging LLM-as-a-judge", position bias). The pairwise verdicts are aggregated
  into a ranking by Copeland score (wins - losses), equal scores tied.
"""

import itertools
from dataclasses import dataclass

import torch

from trainer.common import Messages, encode_prompt, pad_left

ANSWERS = ("A", "B")
PROMPT = """{instructions}Compare two responses to the conversation below by these principles:
{principles}

Conversation:
{conversation}

Response A:
{a}

Response B:
{b}

Which response is better by the principles? Answer with the letter A or B only."""
DEFAULT_PRINCIPLES = "- Prefer the response that is more helpful, honest and harmless."
MAX_PROMPT_TOKENS = 2048  # longer prompts keep their end (the responses and the question)


@dataclass(frozen=True)
class JudgeConfig:
    # A pair whose order-averaged P(first is better) is within this of 0.5 is a tie.
    tie_margin: float = 0.02


@dataclass(frozen=True)
class PairVerdict:
    i: int  # response indices in the task's display order, i < j
    j: int
    p_ab: float  # P("A") when i is shown as A and j as B
    p_ba: float  # P("A") when j is shown as A and i as B
    p_i: float  # order-averaged probability that i is better: (p_ab + 1 - p_ba) / 2

    def preference(self, tie_margin: float) -> int:
        """+1: i is better, -1: j is better, 0: a tie."""
        if abs(self.p_i - 0.5) <= tie_margin:
            return 0
        return 1 if self.p_i > 0.5 else -1


def dense_ranks(values: list[float]) -> list[int]:
    """1 = highest value; equal values share a rank and the next rank follows on (1, 1, 2)."""
    order = sorted(set(values), reverse=True)
    return [order.index(v) + 1 for v in values]


def copeland_ranks(k: int, preferences: dict[tuple[int, int], int]) -> list[int]:
    """Ranks of k items from pairwise preferences {(i, j): +1 i better | -1 j better | 0 tie}
    by Copeland score (wins - losses); equal scores tie."""
    score = [0] * k
    for (i, j), pref in preferences.items():
        score[i] += pref
        score[j] -= pref
    return dense_ranks([float(s) for s in score])


def conversation_text(messages: Messages) -> str:
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def judge_prompt(messages: Messages, first: str, second: str, *, instructions: str, principles: str) -> Messages:
    """The question put to the judge model, as one user turn."""
    text = PROMPT.format(instructions=f"{instructions.strip()}\n\n" if instructions.strip() else "",
                         principles=principles.strip() or DEFAULT_PRINCIPLES,
                         conversation=conversation_text(messages), a=first, b=second)
    return [{"role": "user", "content": text}]


def answer_token_ids(tokenizer) -> tuple[int, int]:
    """The token ids of the answers "A" and "B" (each must be one token)."""
    ids = [tokenizer(answer, add_special_tokens=False).input_ids for answer in ANSWERS]
    assert all(len(i) == 1 for i in ids), f"the judge's tokenizer splits an answer letter: {ids}"
    return ids[0][0], ids[1][0]


@torch.no_grad()
def judge_pairs(model, tokenizer, messages: Messages, responses: list[str], *, instructions: str,
                principles: str) -> list[PairVerdict]:
    """Every pair of responses asked in both orders, in one batch of K(K-1) prompts."""
    a_id, b_id = answer_token_ids(tokenizer)
    pairs = list(itertools.combinations(range(len(responses)), 2))
    orders = [(i, j) for i, j in pairs] + [(j, i) for i, j in pairs]  # both orders of every pair
    seqs = [encode_prompt(tokenizer, judge_prompt(messages, responses[x], responses[y], instructions=instructions,
                                                  principles=principles), MAX_PROMPT_TOKENS) for x, y in orders]
    device = next(model.parameters()).device
    ids, mask = pad_left(seqs, tokenizer.pad_token_id)  # (2P, T): the answer position is the last column
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                   position_ids=position_ids.to(device)).logits[:, -1, :].float()  # (2P, V)
    logprobs = torch.log_softmax(logits, dim=-1)
    # P("A") among the two answers: sigmoid(log P(A) - log P(B)).  (2P,)
    p_a = torch.sigmoid(logprobs[:, a_id] - logprobs[:, b_id]).cpu().tolist()
    n = len(pairs)
    return [PairVerdict(i, j, p_a[m], p_a[n + m], (p_a[m] + 1 - p_a[n + m]) / 2) for m, (i, j) in enumerate(pairs)]


@torch.no_grad()
def reward_ranks(model, tokenizer, messages: Messages, responses: list[str]) -> tuple[list[int], list[float]]:
    """(ranks, scores) of the responses by the reward model: higher score, better rank; equal scores tie."""
    from trainer.reward import score

    scores = score(model, tokenizer, messages, responses).tolist()
    return dense_ranks(scores), scores
