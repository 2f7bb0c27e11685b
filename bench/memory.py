"""Peak memory of training runs: the estimator (trainer/memory.py) beside the measured peak.

Usage (from the repository root):

    .venv/bin/python -m bench.memory                                # tiny random model, CPU
    .venv/bin/python -m bench.memory --model default                # SmolLM2-135M-Instruct, CPU (minutes)
    .venv/bin/python -m bench.memory --model PATH --device cuda     # on a GPU (scripts/gpu-check.sh)

Each run trains a few steps in a process of its own (tests/memory_probe.py). On the
CPU the measured figure is the process's peak resident memory over its start; on CUDA
it is the peak of torch's allocations, so the estimate is shown without its runtime
term (the CUDA context and the allocator's cache) beside it.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (random 2-layer Llama), default (SmolLM2-135M) or a path")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--runs", default="sft:4:128,reward:8:256,ppo:8:128",
                        help="KIND:BATCH_SIZE:MAX_LENGTH[:LORA_R], comma-separated; KIND sft, reward or ppo")
    args = parser.parse_args()

    from trainer.configs import PPOConfig, RewardConfig, SFTConfig
    from trainer.memory import estimate, read_architecture, run_of

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model)
        if args.model in ("tiny", "default"):  # the web app's settings say where the default model is
            from app.config import Settings
            from bench.reward import tiny_model
            from trainer.models import DEFAULT_MODEL_DIR

            default_dir = Settings().artifacts_path / DEFAULT_MODEL_DIR
            default_dir = default_dir if default_dir.is_absolute() else ROOT / default_dir
            model = tiny_model(Path(tmp) / "tiny", default_dir) if args.model == "tiny" else default_dir
        arch = read_architecture(model)
        print(f"model {args.model} ({arch.parameters() / 1e6:.1f} M weights), device {args.device}")
        print(f"{'run':28}{'estimate MiB':>14}{'w/o runtime':>13}{'measured MiB':>14}{'estimate/measured':>19}")
        for spec in args.runs.split(","):
            kind, batch, length, *lora = spec.split(":")
            lora_r = int(lora[0]) if lora else 0
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            done = subprocess.run([sys.executable, str(ROOT / "tests" / "memory_probe.py"), kind, str(model), batch,
                                   length, str(lora_r), args.device], capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(f"{spec:28} failed: {done.stderr.strip().splitlines()[-1]}")
                continue
            probe = json.loads(done.stdout.strip().splitlines()[-1])
            if kind == "ppo":  # one minibatch a step, prompts and responses of LENGTH tokens (tests/memory_probe.py)
                config = PPOConfig(batch_size=int(batch), mini_batch_size=int(batch), max_new_tokens=int(length),
                                   max_prompt_length=int(length), lora_r=lora_r)
            else:
                config = (SFTConfig if kind == "sft" else RewardConfig)(batch_size=int(batch),
                                                                        max_length=int(length), lora_r=lora_r)
            run = run_of(kind, config, dtype="bf16" if args.device == "cuda" else "fp32", parameters=arch.parameters())
            run = replace(run, device=args.device)
            if kind == "sft":  # the loss covers the response: every token after the prompt
                run = replace(run, loss_tokens=int(length) - probe["prompt_tokens"])
            found = estimate(arch, run)
            compared = found.total if args.device == "cpu" else found.total - found.runtime
            print(f"{spec:28}{found.total / MiB:>14.0f}{(found.total - found.runtime) / MiB:>13.0f}"
                  f"{probe['delta'] / MiB:>14.0f}{compared / probe['delta']:>19.2f}")


if __name__ == "__main__":
    main()
