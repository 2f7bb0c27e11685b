"""Reward-model training speed: our K-wise training against TRL's RewardTrainer.

Usage (from the repository root):

    .venv/bin/python -m bench.reward                      # tiny random model, CPU, a couple of minutes
    .venv/bin/python -m bench.reward --model default      # SmolLM2-135M-Instruct
    .venv/bin/python -m bench.reward --model default --groups 64 --device cuda

Both train one epoch on the same rankings of K = 4 responses (synthetic word
soup, tests/factories/synthetic.py), tokenised identically (chat-templated prompt +
response + EOS), with the same model, learning rate, optimizer step size in
comparisons and max length. Ours sends the K responses of a ranking through
the model once and averages its K(K-1)/2 pairwise losses (InstructGPT); TRL
expands the rankings into pairs and runs each pair's two sequences, so a
response goes through the model K-1 times per epoch.

Comparisons/s is counted between the end of the first optimizer step and the
end of the last (loading, tokenising and the first step's warm-up are not
timed). Peak memory: the process's peak resident memory on CPU (each trainer
runs in its own subprocess), peak allocated CUDA memory on a GPU. `trl` is an
optional dependency (pip install 'rlhf-workbench[bench]'); without it only our
figures are printed, with the reason.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_model(directory: Path, tokenizer_dir: Path) -> Path:
    """A random 2-layer Llama with the default model's tokenizer (as tests/conftest.py makes it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.models import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def data(groups: int):
    from tests.factories import synthetic

    return synthetic.ranked_groups(range(groups), k=4, seed=0)


def peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_ours(args) -> dict:
    import torch

    from trainer.models import pick_device
    from trainer.reward import RewardConfig, train_reward_model

    device = pick_device(args.device)
    train = data(args.groups)
    config = RewardConfig(epochs=1, batch_size=args.batch_groups, learning_rate=args.lr, lr_schedule="constant",
                          warmup_ratio=0.0, max_length=args.max_length, device=args.device, seed=0)
    ends: list[float] = []
    order_pairs = [sum(1 for a in g.ranks for b in g.ranks if a < b) for g in train]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def on_step(step, metrics):
        if "loss" in metrics:
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        result = train_reward_model(config, train, train[:2], model_path=args.model_path,
                                    output_dir=Path(tmp) / "rm", on_step=on_step)
    # Steps hold batch_groups rankings each (shuffled); count comparisons from the total.
    total_pairs = sum(order_pairs)
    steps = len(ends)
    pairs_after_first = total_pairs * (steps - 1) / steps
    return {"comparisons": total_pairs, "steps": steps, "comparisons_per_s": pairs_after_first / (ends[-1] - ends[0]),
            "peak_mib": peak_memory_mib(device), "final_loss": result.history[-2]["loss"]}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from trainer.common import encode_prompt, encode_response, prepare_tokenizer
    from trainer.models import load_tokenizer, pick_device

    device = pick_device(args.device)
    tokenizer = prepare_tokenizer(load_tokenizer(str(args.model_path)))
    tokenizer.padding_side = "right"
    rows = []
    for messages, responses, ranks in data(args.groups):
        prompt = encode_prompt(tokenizer, messages)
        for i in range(len(responses)):
            for j in range(len(responses)):
                if ranks[i] < ranks[j]:  # the same pairs our loss averages; ties give none
                    rows.append({"chosen_ids": (prompt + encode_response(tokenizer, responses[i]))[-args.max_length:],
                                 "rejected_ids": (prompt + encode_response(tokenizer, responses[j]))[-args.max_length:]})
    pairs_per_step = round(len(rows) / args.groups * args.batch_groups)  # same comparisons per optimizer step
    ends: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        config = RewardConfig(
            output_dir=tmp, per_device_train_batch_size=pairs_per_step, num_train_epochs=1,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, max_length=args.max_length,
            report_to=[], save_strategy="no", logging_strategy="no", seed=0, data_seed=0,
            use_cpu=device.type == "cpu", bf16=device.type == "cuda", dataloader_num_workers=0,
        )
        trainer = RewardTrainer(model=str(args.model_path), args=config, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer, callbacks=[Timer()])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train()
    steps = len(ends)
    return {"comparisons": len(rows), "steps": steps,
            "comparisons_per_s": len(rows) * (steps - 1) / steps / (ends[-1] - ends[0]),
            "peak_mib": peak_memory_mib(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (random 2-layer Llama), default (SmolLM2-135M) or a path")
    parser.add_argument("--groups", type=int, default=None, help="rankings of K=4 (default: 256 tiny, 32 default)")
    parser.add_argument("--batch-groups", type=int, default=4, help="rankings per optimizer step (TRL: their pairs)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", choices=["ours", "trl"], help=argparse.SUPPRESS)  # one trainer, in a subprocess
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.only:
        result = run_ours(args) if args.only == "ours" else run_trl(args)
        print("RESULT " + json.dumps(result))
        return

    from app.config import Settings
    from trainer.models import DEFAULT_MODEL_DIR

    default_dir = Settings().artifacts_path / DEFAULT_MODEL_DIR
    default_dir = default_dir if default_dir.is_absolute() else ROOT / default_dir
    groups = args.groups or (256 if args.model == "tiny" else 32)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            model_path = tiny_model(Path(tmp) / "tiny", default_dir)
        else:
            model_path = default_dir if args.model == "default" else Path(args.model)
        print(f"model {args.model} ({model_path.name}), {groups} rankings of K=4, {args.batch_groups} rankings "
              f"per step, max length {args.max_length}, device {args.device}")
        results = {}
        for which in ("ours", "trl"):
            command = [sys.executable, "-m", "bench.reward", "--only", which, "--model-path", str(model_path),
                       "--groups", str(groups), "--batch-groups", str(args.batch_groups),
                       "--max-length", str(args.max_length), "--lr", str(args.lr), "--device", args.device]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
                results[which] = {"error": reason}
            else:
                results[which] = json.loads(line[len("RESULT "):])

    print(f"{'':24}{'ours (K-wise)':>16}{'TRL RewardTrainer':>20}")
    for key, label in (("comparisons", "comparisons"), ("steps", "optimizer steps"),
                       ("comparisons_per_s", "comparisons/s"), ("peak_mib", "peak memory (MiB)")):
        cells = [f"{r[key]:.1f}" if isinstance(r.get(key), float) else str(r.get(key, "-")) for r in results.values()]
        print(f"{label:24}{cells[0]:>16}{cells[1]:>20}")
    for which, result in results.items():
        if "error" in result:
            print(f"{which} did not run: {result['error']}")
    if all("comparisons_per_s" in r for r in results.values()):
        print(f"speed-up: {results['ours']['comparisons_per_s'] / results['trl']['comparisons_per_s']:.2f}x")


if __name__ == "__main__":
    main()
