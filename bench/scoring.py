"""Scoring stored responses with a reward model (the score_tasks and eval_figures jobs):
many prompts batched together (trainer.reward.score_many) against one prompt at a time.

Usage (from the repository root):

    .venv/bin/python -m bench.scoring                    # SmolLM2-135M-Instruct with a random head, CPU
    .venv/bin/python -m bench.scoring --prompts 256 --device cuda

Both score the same prompts of K = 4 responses (synthetic word soup,
tests/factories/synthetic.py) with the same model, and their scores agree (checked
here). One at a time runs a forward pass per prompt, its K responses padded to the
longest; batched runs --batch-rows sequences at a time, those of similar length
together. A warm-up pass of one prompt runs first; loading is not timed.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a causal LM checkpoint (default: the provisioned model)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-rows", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForSequenceClassification

    from app.config import Settings
    from tests.factories import synthetic
    from trainer.common import prepare_tokenizer
    from trainer.models import DEFAULT_MODEL_DIR, load_tokenizer, pick_device
    from trainer.reward import load_reward_model, score, score_many

    source = Path(args.model or Settings().artifacts_path / DEFAULT_MODEL_DIR)
    source = source if source.is_absolute() else ROOT / source
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)  # a reward model of the checkpoint's family with a random head
        head = AutoModelForSequenceClassification.from_pretrained(str(source), num_labels=1, dtype=torch.float32)
        tokenizer = prepare_tokenizer(load_tokenizer(str(source)))
        head.config.pad_token_id = tokenizer.pad_token_id
        head.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        del head
        model, tokenizer = load_reward_model(directory, device)

    groups = [(g.messages, list(g.responses)) for g in synthetic.ranked_groups(range(args.prompts), k=4, seed=0)]
    score(model, tokenizer, *groups[0])  # warm-up
    started = time.perf_counter()
    alone = [score(model, tokenizer, messages, responses) for messages, responses in groups]
    alone_s = time.perf_counter() - started
    started = time.perf_counter()
    together = score_many(model, tokenizer, groups, batch_rows=args.batch_rows)
    together_s = time.perf_counter() - started
    worst = max(float((a - b).abs().max()) for a, b in zip(alone, together, strict=True))

    print(f"model {source.name}, device {device}, torch threads {torch.get_num_threads()}")
    print(f"{args.prompts} prompts of K = 4 responses; largest difference between the two: {worst:.1e}\n")
    print(f"{'mode':<34}{'seconds':>9}{'prompts/s':>11}")
    print(f"{'one prompt at a time':<34}{alone_s:>9.2f}{args.prompts / alone_s:>11.1f}")
    print(f"{f'batched ({args.batch_rows} sequences a pass)':<34}{together_s:>9.2f}{args.prompts / together_s:>11.1f}")
    print(f"\nspeed-up: {alone_s / together_s:.1f}x")


if __name__ == "__main__":
    main()
