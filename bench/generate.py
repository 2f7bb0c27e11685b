"""Generation throughput of the default model: batched versus one prompt at a time.

Usage (from the repository root, after scripts/setup.sh provisioned the model):

    .venv/bin/python -m bench.generate                  # 8 prompts, 48 new tokens
    .venv/bin/python -m bench.generate --prompts 16 --max-new-tokens 64 --device cuda
    .venv/bin/python -m bench.generate --model var/artifacts/models/my-policy

It samples one response per prompt with the generate job's own sampler
(trainer.generate.TransformersSampler: chat template, left padding, per-row
seeds, stop at end of sequence), first all prompts in one batch, then each
prompt alone, with the same seeds, and prints responses/s and tokens/s of both.
Tokens are generated tokens (end-of-sequence not counted). A warm-up call runs
first so model loading and first-call overheads are not timed. On a 2-core CPU
the default settings take about a minute.
"""

import argparse
import time
from pathlib import Path

import torch

from app.config import Settings
from trainer.generate import SamplingSettings, TransformersSampler, derive_seed
from trainer.models import DEFAULT_MODEL_DIR, pick_device, pick_dtype

PROMPTS = [
    "How do I boil an egg?",
    "Give me a tip for sleeping well.",
    "Explain what a prime number is.",
    "Write a haiku about autumn.",
    "What should I pack for a day hike?",
    "Summarise the rules of chess in two sentences.",
    "Why is the sky blue?",
    "Suggest a name for a small bakery.",
]


def run(sampler, conversations, seeds, settings) -> tuple[float, int]:
    started = time.perf_counter()
    samples = sampler.sample(conversations, seeds, settings)
    return time.perf_counter() - started, sum(s.num_tokens for s in samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the provisioned default model)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    args = parser.parse_args()

    model = args.model or str(Settings().artifacts_path / DEFAULT_MODEL_DIR)
    if not Path(model).exists():
        raise SystemExit(f"{model} is missing: run scripts/setup.sh or `rlhf models provision-default`")
    device = pick_device(args.device)
    dtype = pick_dtype(device)
    sampler = TransformersSampler(model, device, dtype)
    conversations = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(args.prompts)]
    seeds = [derive_seed("bench", i) for i in range(args.prompts)]
    settings = SamplingSettings(temperature=0.7, top_p=0.9, max_new_tokens=args.max_new_tokens)

    print(f"model {model}\ndevice {device} ({dtype}), torch threads {torch.get_num_threads()}")
    print(f"{args.prompts} prompts, 1 response each, up to {args.max_new_tokens} new tokens\n")
    run(sampler, conversations[:1], seeds[:1], SamplingSettings(max_new_tokens=4))  # warm-up

    batched_s, batched_tokens = run(sampler, conversations, seeds, settings)
    single_s, single_tokens = 0.0, 0
    for conversation, seed in zip(conversations, seeds, strict=True):
        seconds, tokens = run(sampler, [conversation], [seed], settings)
        single_s += seconds
        single_tokens += tokens

    n = args.prompts
    print(f"{'mode':<22}{'seconds':>9}{'responses/s':>14}{'tokens':>8}{'tokens/s':>11}")
    for name, seconds, tokens in (("batched (1 batch)", batched_s, batched_tokens),
                                  ("one prompt at a time", single_s, single_tokens)):
        print(f"{name:<22}{seconds:>9.2f}{n / seconds:>14.2f}{tokens:>8}{tokens / seconds:>11.1f}")
    print(f"\nbatching speed-up: {single_s / batched_s:.1f}x in responses/s, "
          f"{(batched_tokens / batched_s) / (single_tokens / single_s):.1f}x in tokens/s")


if __name__ == "__main__":
    main()
