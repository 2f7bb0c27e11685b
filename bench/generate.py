"""Generation throughput of the default model: batched versus one prompt at a time.

Usage (from the repository root, after scripts/setup.sh provisioned the model):

    .venv/bin/python -m bench.generate                  # 8 prompts, 48 new tokens
    .venv/bin/python -m bench.generate --prompts 16 --max-new-tokens 64 --device cuda
    .venv/bin/python -m bench.generate --model var/artifacts/models/my-policy

It samples one response per prompt with the generate job's own sampler
(trainer.sampling.TransformersSampler: chat template, left padding, per-row
seeds, stop at end of sequence), first all prompts in one batch, then each
prompt alone, with the same seeds, and prints responses/s and tokens/s of both.
Tokens are generated tokens (end-of-sequence not counted). A warm-up call runs
first so model loading and first-call overheads are not timed. On a 2-core CPU
the default settings take about a minute.

It also prints what the hardware allows, measured in the same run. A decoding
step reads every weight once, whatever the batch, so at memory bandwidth BW it
yields at most BW / weight bytes x batch tokens per second (the memory bound);
it also does about 2 x parameters floating-point operations per token, and the
prompt's tokens (padded to the longest in a batch) cost 2 x the parameters
outside the embedding each, so at the matrix-multiply throughput measured for
the model's own shapes at this batch the run takes at least their total / that
throughput (the compute bound, in tokens/s of the run). The lower of the two is
the bound, and each mode's share of it is printed. On a CPU with few cores a
large batch is bound by compute, not by memory. Attention over the cache is not
counted: short prompts and 48 new tokens make it small.
"""

import argparse
import time
from pathlib import Path

import torch

from app.config import Settings
from trainer.sampling import SamplingSettings, TransformersSampler, derive_seed
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


def memory_bandwidth(device: torch.device, mib: int = 256) -> float:
    """Bytes per second that copying a buffer much larger than the caches moves (read + write), best of 5."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        sync(device)
        started = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * src.numel() * src.element_size() / best


def matmul_throughput(model, batch: int, device: torch.device, dtype: torch.dtype) -> float:
    """Floating-point operations per second of the model's MLP projections at this batch (a decoding
    step's bulk), best of 5."""
    hidden, intermediate = model.config.hidden_size, model.config.intermediate_size
    x = torch.randn(batch, hidden, device=device, dtype=dtype)
    w = torch.randn(hidden, intermediate, device=device, dtype=dtype)
    reps, best = 20, float("inf")
    for _ in range(6):
        sync(device)
        started = time.perf_counter()
        for _ in range(reps):
            x @ w
        sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * batch * hidden * intermediate * reps / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


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

    # What the hardware allows, measured now (under the same load as the runs above).
    params = {p.data_ptr(): p for p in sampler.model.parameters()}.values()  # tied weights once
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    n_params = sum(p.numel() for p in params)
    bandwidth = memory_bandwidth(device)
    print(f"weights {n_params / 1e6:.0f}M parameters, {weight_bytes / 1e9:.2f} GB read per decoding step; "
          f"memory bandwidth {bandwidth / 1e9:.1f} GB/s\n")

    n = args.prompts
    print(f"{'mode':<22}{'seconds':>9}{'responses/s':>14}{'tokens':>8}{'tokens/s':>11}"
          f"{'memory bound':>14}{'compute bound':>15}{'share of bound':>16}")
    embedding = sampler.model.get_input_embeddings().weight.numel()
    prompt_lengths = [len(sampler.tokenizer(sampler.prompt_text(c), add_special_tokens=False).input_ids)
                      for c in conversations]
    for name, seconds, tokens, batch, prompt_tokens in (
        ("batched (1 batch)", batched_s, batched_tokens, n, n * max(prompt_lengths)),
        ("one prompt at a time", single_s, single_tokens, 1, sum(prompt_lengths)),
    ):
        memory_bound = bandwidth / weight_bytes * batch
        flops = 2 * n_params * tokens + 2 * (n_params - embedding) * prompt_tokens
        compute_bound = tokens / (flops / matmul_throughput(sampler.model, batch, device, dtype))
        rate = tokens / seconds
        print(f"{name:<22}{seconds:>9.2f}{n / seconds:>14.2f}{tokens:>8}{rate:>11.1f}"
              f"{memory_bound:>14.0f}{compute_bound:>15.0f}{rate / min(memory_bound, compute_bound):>16.0%}")
    print(f"\nprompts {sum(prompt_lengths)} tokens ({n * max(prompt_lengths)} padded in the batch); "
          f"bounds in tokens/s; share of bound = tokens/s / the lower bound ({rate / memory_bound:.0%} of the "
          f"memory bound one at a time)")
    print(f"batching speed-up: {single_s / batched_s:.1f}x in responses/s, "
          f"{(batched_tokens / batched_s) / (single_tokens / single_s):.1f}x in tokens/s")


if __name__ == "__main__":
    main()
