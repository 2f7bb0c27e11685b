"""Synthetic RLHF data with a known rule, for the trainer's learning tests.

Responses are short sequences of words from a small vocabulary; the rule a
labeler follows is "the more times GOOD appears, the better" (equal counts tie).
Every word is one token of the SmolLM2 tokenizer, so a tiny model can learn it.
"""

import random
from pathlib import Path

from trainer.reward import RankedGroup

GOOD = "good"
WORDS = ["apple", "river", "stone", "cloud", "tree", "bread", "lamp", GOOD]
TOPICS = ["the sea", "a city", "winter", "music", "a garden", "trains", "the moon", "coffee", "a library", "rain"]


def prompt(index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Say some words about {TOPICS[index % len(TOPICS)]} (#{index})."}]


def response(rng: random.Random, good: int, length: int) -> str:
    others = [w for w in WORDS if w != GOOD]
    words = [GOOD] * good + [rng.choice(others) for _ in range(length - good)]
    rng.shuffle(words)
    return " ".join(words)


def good_count(text: str) -> int:
    return text.split().count(GOOD)


def ranked_groups(prompt_ids: range, k: int = 4, seed: int = 0, length: int = 8) -> list[RankedGroup]:
    """One ranking per prompt: k responses with random numbers of GOOD, ranked by that number."""
    rng = random.Random(seed)
    groups = []
    for index in prompt_ids:
        counts = [rng.randint(0, 4) for _ in range(k)]
        responses = [response(rng, c, length) for c in counts]
        order = sorted(set(counts), reverse=True)
        ranks = [order.index(c) + 1 for c in counts]  # 1 = most GOOD; equal counts tie
        groups.append(RankedGroup(prompt(index), responses, ranks))
    return groups


def sft_examples(n: int, seed: int = 0) -> list[tuple[list[dict[str, str]], str]]:
    """(prompt, response) demonstrations: random words, GOOD as often as any other word."""
    rng = random.Random(seed)
    out = []
    for index in range(n):
        length = rng.randint(4, 8)
        out.append((prompt(index), " ".join(rng.choice(WORDS) for _ in range(length))))
    return out


def train_sft(model_dir: Path, output_dir: Path, examples, *, steps: int = 30, lr: float = 1e-2, seed: int = 0) -> Path:
    """A few steps of supervised fine-tuning so a random tiny model speaks the word language
    (and ends its responses with EOS): the SFT step of the recipe, in miniature."""
    import torch

    from trainer.common import encode_prompt, encode_response, pad_left, prepare_tokenizer, sequence_nll
    from trainer.models import load_causal_lm, load_tokenizer

    torch.manual_seed(seed)
    tokenizer = prepare_tokenizer(load_tokenizer(str(model_dir)))
    model = load_causal_lm(str(model_dir), torch.device("cpu"), torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    for _ in range(steps):
        batch = rng.sample(examples, 16)
        seqs, masks = [], []
        for messages, text in batch:
            p, r = encode_prompt(tokenizer, messages), encode_response(tokenizer, text)
            seqs.append(p + r)
            masks.append([0] * len(p) + [1] * len(r))
        ids, attention = pad_left(seqs, tokenizer.pad_token_id)  # responses line up at the end
        loss_mask, _ = pad_left(masks, 0)
        loss = sequence_nll(model, ids, attention, loss_mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir
