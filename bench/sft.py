"""Training throughput of supervised fine-tuning on the default model, ours beside
TRL's SFTTrainer on the same data and settings, in one run.

    .venv/bin/python bench/sft.py [--examples 32] [--batch-size 8] [--max-length 256] [--packing] [--rounds 2]

Data: synthetic single-turn demonstrations of varied length (seeded). Settings
shared by both: SmolLM2-135M-Instruct (the provisioned default model), float32
weights (no autocast), CUDA when present else CPU, fused AdamW, no activation
checkpointing, lr 2e-5 with cosine decay, one epoch, the chat template
applied, loss on the completion only, no packing unless asked, the same seed.

Printed for each: training tokens per second (prompt + completion tokens, not
padding, divided by the time of the training loop: TRL's train_runtime, our
optimizer-step time; model loading and tokenisation are left out of both),
the seconds and the mean training loss of the epoch. Each is run --rounds
times, alternating, and its best run is shown.
"""

import argparse
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from app.config import Settings  # noqa: E402
from trainer.models import DEFAULT_MODEL_DIR, load_tokenizer  # noqa: E402
from trainer.sft import SFTConfig, SFTExample, tokenise_example, train_sft  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # float32 on both, no autocast
WORDS = ("light sky river stone cloud garden window music paper winter bread engine language "
         "mountain letter number market bridge forest candle").split()


def synthetic(n: int, seed: int) -> list[SFTExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = " ".join(rng.sample(WORDS, 2))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 90))).capitalize() + "."
        out.append(SFTExample([{"role": "user", "content": f"Question {i}: tell me about {topic}."}], answer))
    return out


def ours(model_dir: Path, train, val, args) -> dict:
    config = SFTConfig(epochs=1, batch_size=args.batch_size, learning_rate=2e-5, lr_schedule="cosine",
                       warmup_ratio=0.0, max_length=args.max_length, packing=args.packing, seed=0, device=DEVICE,
                       mixed_precision=False)
    with tempfile.TemporaryDirectory() as tmp:
        result = train_sft(config, train, val, base_path=model_dir, output_dir=Path(tmp) / "out")
    return {"tokens_per_s": result.metrics["tokens_per_s"], "loss": result.metrics["train_loss"],
            "seconds": None}


def trl(model_dir: Path, train, args, tokens: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    data = Dataset.from_list([{"prompt": e.messages, "completion": [{"role": "assistant", "content": e.response}]}
                              for e in train])
    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        config = TRLConfig(
            output_dir=tmp, num_train_epochs=1, per_device_train_batch_size=args.batch_size,
            learning_rate=2e-5, lr_scheduler_type="cosine", warmup_steps=0, max_length=args.max_length,
            packing=args.packing, completion_only_loss=True, seed=0, use_cpu=DEVICE == "cpu", bf16=False,
            report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
            # As ours: the fused AdamW (TRL's default too) and no activation checkpointing (TRL turns it
            # on by default to save memory, which costs a second forward pass).
            optim="adamw_torch_fused", activation_checkpointing=False,
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
        out = trainer.train()
    seconds = out.metrics["train_runtime"]
    return {"tokens_per_s": tokens / seconds, "loss": out.metrics["train_loss"], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each; the best one is shown")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model_dir = Settings().artifacts_path / DEFAULT_MODEL_DIR
    model_dir = model_dir if model_dir.is_absolute() else ROOT / model_dir
    if not model_dir.exists():
        sys.exit(f"{model_dir} is missing: run scripts/setup.sh (it provisions the default model)")
    train, val = synthetic(args.examples, seed=0), synthetic(4, seed=1)
    tokenizer = load_tokenizer(str(model_dir))
    tokens = sum(len(tokenise_example(tokenizer, e, args.max_length)[0].input_ids) for e in train)
    print(f"{len(train)} demonstrations, {tokens} tokens, batch {args.batch_size}, max length {args.max_length},"
          f" packing {'on' if args.packing else 'off'}, on {DEVICE} ({torch.get_num_threads()} CPU threads)")

    # Alternating rounds, best of each: other processes on a shared machine slow one run, not all.
    best: dict[str, dict] = {}
    for round_ in range(1, args.rounds + 1):
        started = time.perf_counter()
        mine = ours(model_dir, train, val, args)
        mine["seconds"] = tokens / mine["tokens_per_s"]
        print(f"round {round_}: ours {mine['tokens_per_s']:.0f} tokens/s"
              f" (whole run with load/eval/save {time.perf_counter() - started:.0f} s)", flush=True)
        theirs = trl(model_dir, train, args, tokens)
        print(f"round {round_}: TRL  {theirs['tokens_per_s']:.0f} tokens/s", flush=True)
        for name, run in (("ours", mine), ("trl", theirs)):
            if name not in best or run["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = run
    print()
    for name, label in (("ours", "ours (trainer/sft.py)"), ("trl", "TRL SFTTrainer")):
        run = best[name]
        print(f"{label:24s}{run['tokens_per_s']:8.0f} tokens/s  {run['seconds']:7.1f} s  loss {run['loss']:.4f}")
    print(f"ratio ours / TRL: {best['ours']['tokens_per_s'] / best['trl']['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
