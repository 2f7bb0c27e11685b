"""Sampling responses: per-row seeded sampling (SeededSampler), batched with
transformers' generate() or with vLLM. Free of the database and the web app, so the
trainers (PPO's rollouts, SFT's before/after samples) and the generation job share it.

Every response has its own seed. SeededSampler draws each row's next token from
that row's own random stream, so a response depends on its seed only, not on
which other prompts shared its batch.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from trainer.common import generate_exactly
from trainer.models import load_causal_lm, load_tokenizer
from trainer.vllm_engine import choose_engine


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 128

    def as_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens}


@dataclass(frozen=True)
class Sample:
    text: str
    num_tokens: int  # generated tokens, the end-of-sequence token not counted
    finish_reason: str  # "eos" | "length"
    seed: int


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (fits PostgreSQL's bigint)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


_MASK64 = 2**64 - 1
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment


def row_uniform(seed: int, step: int) -> float:
    """Draw number `step` of the stream seeded `seed`, uniform in [0, 1): SplitMix64,
    which is counter-based (any draw is computed from (seed, step) alone, no state)."""
    z = (seed + (step + 1) * _GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((z ^ (z >> 31)) >> 11) / 2**53


class SeededSampler(LogitsProcessor):
    """Temperature + top-p sampling where row i draws from its own stream seeded seeds[i].

    Each step takes one uniform number per row (row_uniform) and inverts the row's
    distribution with it, so a row's tokens depend on its seed and its logits only,
    never on the other rows of the batch. Top-p looks at the most likely tokens
    only (torch.topk), widening the window for the rows whose nucleus does not fit,
    instead of sorting the whole vocabulary. It returns logits that are -inf
    everywhere except at the drawn token, and generate() runs greedy
    (do_sample=False), so it picks exactly that token.
    """

    # Candidates looked at first; widened 8x while some row's nucleus is wider, and to the whole vocabulary
    # (one sort) once the window would hold a 16th of it: flat rows (random models) then cost one sort.
    TOP_P_WINDOW = 64

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        assert temperature > 0 and 0 < top_p <= 1
        self.seeds = list(seeds)
        self.temperature = temperature
        self.top_p = top_p
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        B, V = scores.shape
        assert B == len(self.seeds), f"batch of {B} rows, {len(self.seeds)} seeds"
        probs = (scores.float() / self.temperature).softmax(dim=-1)  # (B, V)
        token_ids = None
        if self.top_p < 1.0:
            probs, token_ids = self._nucleus(probs)  # (B, k) most likely first, 0 outside the nucleus
        cdf = probs.cumsum(dim=-1, dtype=torch.float64)
        total = cdf[:, -1:]
        u = torch.tensor([row_uniform(s, self.step) for s in self.seeds], dtype=torch.float64, device=scores.device)
        self.step += 1
        # The first token whose cumulative probability passes u * total; capped at the last token with any
        # probability, in case rounding makes u * total reach the total.
        picked = torch.searchsorted(cdf, u.unsqueeze(1) * total, right=True)
        picked = torch.minimum(picked, (cdf < total).sum(dim=-1, keepdim=True))  # (B, 1)
        if token_ids is not None:
            picked = token_ids.gather(1, picked)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, picked, 0.0)
        return out

    def _nucleus(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest set of most likely tokens whose probability reaches top_p (as transformers'
        TopPLogitsWarper: a token is kept while the tokens more likely than it hold less than top_p)."""
        V = probs.shape[1]
        k = min(V, self.TOP_P_WINDOW)
        while True:
            top, token_ids = probs.topk(k, dim=-1)  # (B, k), most likely first
            keep = top.cumsum(dim=-1) - top < self.top_p
            if k == V or not keep[:, -1].any():
                return top.masked_fill(~keep, 0.0), token_ids
            k = k * 8 if k * 8 < V // 16 else V


class TransformersSampler:
    """Batched sampling with transformers' generate(): left padding, the model's
    chat template, stop at end of sequence."""

    engine = "transformers"

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype | None = None):
        self.device = device
        self.tokenizer = load_tokenizer(path)
        self.tokenizer.padding_side = "left"  # generation appends on the right
        self.model = load_causal_lm(path, device, dtype).eval()
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.eos_ids = sorted(i for i in eos_ids if i is not None)
        assert self.eos_ids, "the model has no end-of-sequence token"

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.inference_mode()
    def sample(self, conversations: Sequence[list[dict[str, str]]], seeds: Sequence[int],
               settings: SamplingSettings) -> list[Sample]:
        """One response per (conversation, seed) row."""
        assert len(conversations) == len(seeds)
        if not conversations:
            return []
        texts = [self.prompt_text(c) for c in conversations]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        T = enc.input_ids.shape[1]
        config = GenerationConfig(
            max_new_tokens=settings.max_new_tokens, do_sample=False,
            eos_token_id=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id,
        )
        out = generate_exactly(
            self.model, config, **enc,
            logits_processor=LogitsProcessorList([SeededSampler(seeds, settings.temperature, settings.top_p)]),
        )  # (B, T + new): only our sampler shapes the distribution, never the checkpoint's settings
        new_tokens = out[:, T:].tolist()
        samples = []
        for tokens, seed in zip(new_tokens, seeds, strict=True):
            end = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
            body = tokens if end is None else tokens[:end]
            samples.append(Sample(
                text=self.tokenizer.decode(body, skip_special_tokens=True).strip(),
                num_tokens=len(body),
                finish_reason="length" if end is None else "eos",
                seed=seed,
            ))
        return samples


class VllmSampler:
    """The same interface on vLLM, used on CUDA when vLLM is installed (scripts/gpu-check.sh runs it)."""

    engine = "vllm"

    def __init__(self, path: str, dtype: torch.dtype | None = None):
        from vllm import LLM

        # generation_config="vllm": the checkpoint's generation_config.json sets no sampling default.
        self.llm = LLM(model=path, dtype="bfloat16" if dtype == torch.bfloat16 else "auto", generation_config="vllm")
        self.tokenizer = self.llm.get_tokenizer()

    def sample(self, conversations, seeds, settings: SamplingSettings) -> list[Sample]:
        from vllm import SamplingParams

        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                   for c in conversations]
        params = [SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                                 max_tokens=settings.max_new_tokens, seed=s) for s in seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        samples = []
        for output, seed in zip(outputs, seeds, strict=True):
            completion = output.outputs[0]
            n = len(completion.token_ids)
            if completion.finish_reason == "stop" and n and completion.token_ids[-1] == self.tokenizer.eos_token_id:
                n -= 1
            samples.append(Sample(text=completion.text.strip(), num_tokens=n, seed=seed,
                                  finish_reason="length" if completion.finish_reason == "length" else "eos"))
        return samples


def load_sampler(path: str, device: torch.device, dtype: torch.dtype, engine: str = "auto"):
    """vLLM on CUDA when it is installed (engine="auto"), else transformers (trainer/vllm_engine.py).
    Raises ValueError when vLLM is asked for and cannot run here."""
    if choose_engine(engine, device) == "vllm":
        return VllmSampler(path, dtype)
    return TransformersSampler(path, device, dtype)
