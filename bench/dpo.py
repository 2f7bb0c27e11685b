"""DPO training speed: our DPO (pairwise sigmoid and listwise) against TRL's DPOTrainer.

Usage (from the repository root):

    .venv/bin/python -m bench.dpo                         # tiny random model, CPU
    .venv/bin/python -m bench.dpo --model default         # SmolLM2-135M-Instruct (32 rankings, a few minutes)
    .venv/bin/python -m bench.dpo --model default --quick # the same, 12 rankings (a quick look, noisier)
    .venv/bin/python -m bench.dpo --model default --device cuda

All three train one epoch on the same rankings of K = 4 responses (synthetic
word soup, tests/factories/synthetic.py; ties allowed), with the same model
(float32 weights), beta, learning rate, max length, optimizer step size in
comparisons (a step of B rankings for ours is a step of those rankings' pairs
for TRL), no gradient checkpointing (TRL's default turns it on) and torch's
default threads. Ours sends each ranking's prompt through the policy once and
its K responses after it, whatever the loss (sigmoid: the mean of the
ranking's pairwise DPO losses; listwise: Plackett-Luce over the ranking); TRL
takes the rankings expanded into their pairs (tied responses form none) and
runs each pair's two sequences, prompt included. The reference's
log-probabilities are computed before training in all three (ours always; TRL
with precompute_ref_log_probs=True).

Comparisons/s is counted between the end of the first optimizer step and the
end of the last (loading, tokenising, evaluation and the first step's warm-up
are not timed); "with it" adds the reference pass (timed in both trainers) to
an epoch at that rate. Peak memory: the process's peak resident memory on CPU
(each trainer runs in its own subprocess), peak allocated CUDA memory on a GPU.
`trl` is an optional dependency (pip install 'rlhf-workbench[bench]'); without
it only our figures are printed, with the reason. The load average is printed
with the figures: on a shared machine they move with it.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reward import data, peak_memory_mib, tiny_model  # noqa: E402  (one definition of each)

RUNS = ("listwise", "sigmoid", "trl")


def _pairs(ranks) -> int:
    return sum(1 for a in ranks for b in ranks if a < b)


def _timed(function, seconds: list[float]):
    """function, adding the seconds each call takes to `seconds` (the reference pass, in both trainers)."""
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    return timed


def _figures(comparisons: int, sequences: int, ends: list[float], reference_s: float, device) -> dict:
    """Rates from the end times of the optimizer steps: the steps after the first (warm-up) give the
    training rate; with the reference pass, the whole epoch at that rate plus the reference pass."""
    import torch

    steps = len(ends)
    per_s = comparisons * (steps - 1) / steps / (ends[-1] - ends[0])
    return {"comparisons": comparisons, "steps": steps, "sequences": sequences, "comparisons_per_s": per_s,
            "reference_s": reference_s, "with_reference_per_s": comparisons / (comparisons / per_s + reference_s),
            "peak_mib": peak_memory_mib(device), "threads": torch.get_num_threads()}


def run_ours(args, loss: str) -> dict:
    import torch

    from trainer import dpo
    from trainer.dpo import DPOConfig, train_dpo
    from trainer.models import pick_device

    device = pick_device(args.device)
    train = [g for g in data(args.groups) if len(set(g.ranks)) > 1]
    config = DPOConfig(loss=loss, beta=args.beta, epochs=1, batch_size=args.batch_groups, learning_rate=args.lr,
                       lr_schedule="constant", warmup_ratio=0.0, max_length=args.max_length, device=args.device,
                       validation_samples=0, mixed_precision=device.type == "cuda", seed=0)
    ends: list[float] = []
    reference_seconds: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def on_step(step, metrics):
        if "loss" in metrics:
            ends.append(time.perf_counter())

    dpo._cached_logprobs = _timed(dpo._cached_logprobs, reference_seconds)
    with tempfile.TemporaryDirectory() as tmp:
        result = train_dpo(config, train, train[:2], policy_path=args.model_path, reference_path=args.model_path,
                           output_dir=Path(tmp) / "policy", on_step=on_step)
    return _figures(sum(_pairs(g.ranks) for g in train), result.metrics["policy_sequences"], ends,
                    sum(reference_seconds), device)


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from trainer.common import prepare_tokenizer
    from trainer.models import load_tokenizer, pick_device

    device = pick_device(args.device)
    tokenizer = prepare_tokenizer(load_tokenizer(str(args.model_path)))
    tokenizer.padding_side = "right"
    train = [g for g in data(args.groups) if len(set(g.ranks)) > 1]
    rows = []
    for messages, responses, ranks in train:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        for i in range(len(responses)):
            for j in range(len(responses)):
                if ranks[i] < ranks[j]:  # the same pairs our losses compare; ties give none
                    rows.append({"prompt": prompt, "chosen": responses[i], "rejected": responses[j]})
    pairs_per_step = round(len(rows) / len(train) * args.batch_groups)  # same comparisons per optimizer step
    ends: list[float] = []
    reference_seconds: list[float] = []
    DPOTrainer._precompute_ref_logps = _timed(DPOTrainer._precompute_ref_logps, reference_seconds)

    class Timer(TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(
            output_dir=tmp, per_device_train_batch_size=pairs_per_step, num_train_epochs=1, beta=args.beta,
            loss_type=["sigmoid"], learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
            max_length=args.max_length, precompute_ref_log_probs=True, report_to=[], save_strategy="no",
            gradient_checkpointing=False,  # TRL's default is True; ours keeps the activations, so TRL does too
            logging_strategy="no", seed=0, data_seed=0, use_cpu=device.type == "cpu", bf16=device.type == "cuda",
            dataloader_num_workers=0,
            # float32 weights as ours (autocast does bf16 on CUDA): since transformers 5 a model loaded by name
            # takes its checkpoint's dtype, bf16 for SmolLM2, which is another computation on a CPU
            model_init_kwargs={"dtype": torch.float32},
        )
        trainer = DPOTrainer(model=str(args.model_path), args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[Timer()])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train()
    return _figures(len(rows), 2 * len(rows), ends, sum(reference_seconds), device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (random 2-layer Llama), default (SmolLM2-135M) or a path")
    parser.add_argument("--groups", type=int, default=None, help="rankings of K=4 (default: 256 tiny, 32 default)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer rankings: 64 instead of 256 (tiny), 12 instead of 32")
    parser.add_argument("--batch-groups", type=int, default=4, help="rankings per optimizer step (TRL: their pairs)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", choices=RUNS, help=argparse.SUPPRESS)  # one trainer, in a subprocess
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.only:
        result = run_trl(args) if args.only == "trl" else run_ours(args, args.only)
        print("RESULT " + json.dumps(result))
        return

    from app.config import Settings
    from trainer.models import DEFAULT_MODEL_DIR

    default_dir = Settings().artifacts_path / DEFAULT_MODEL_DIR
    default_dir = default_dir if default_dir.is_absolute() else ROOT / default_dir
    groups = args.groups or ((64, 12) if args.quick else (256, 32))[args.model != "tiny"]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            model_path = tiny_model(Path(tmp) / "tiny", default_dir)
        else:
            model_path = default_dir if args.model == "default" else Path(args.model)
        print(f"model {args.model} ({model_path.name}), {groups} rankings of K=4, {args.batch_groups} rankings "
              f"per step, max length {args.max_length}, device {args.device}; {os.cpu_count()} cores, "
              f"load average {load_before:.1f} before")
        results = {}
        for which in RUNS:
            command = [sys.executable, "-m", "bench.dpo", "--only", which, "--model-path", str(model_path),
                       "--groups", str(groups), "--batch-groups", str(args.batch_groups),
                       "--max-length", str(args.max_length), "--beta", str(args.beta), "--lr", str(args.lr),
                       "--device", args.device]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
                results[which] = {"error": reason}
            else:
                results[which] = json.loads(line[len("RESULT "):])

    headers = {"listwise": "ours listwise", "sigmoid": "ours sigmoid", "trl": "TRL DPOTrainer"}
    print(f"{'':26}" + "".join(f"{headers[w]:>18}" for w in RUNS))
    for key, label in (("comparisons", "comparisons"), ("steps", "optimizer steps"),
                       ("sequences", "policy sequences"), ("comparisons_per_s", "comparisons/s"),
                       ("reference_s", "reference pass (s)"), ("with_reference_per_s", "  with it, comparisons/s"),
                       ("peak_mib", "peak memory (MiB)"), ("threads", "torch threads")):
        cells = [(f"{r[key]:.0f}" if r[key] >= 100 else f"{r[key]:.3g}") if isinstance(r.get(key), float)
                 else str(r.get(key, "-")) for r in results.values()]
        print(f"{label:26}" + "".join(f"{c:>18}" for c in cells))
    for which, result in results.items():
        if "error" in result:
            print(f"{which} did not run: {result['error']}")
    if "comparisons_per_s" in results["trl"]:
        for which in ("listwise", "sigmoid"):
            if "comparisons_per_s" in results[which]:
                ratio, with_reference = (results[which][key] / results["trl"][key]
                                         for key in ("comparisons_per_s", "with_reference_per_s"))
                print(f"{headers[which]} / TRL: {ratio:.2f}x comparisons/s ({with_reference:.2f}x with the "
                      f"reference pass)")
    print(f"load average {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
