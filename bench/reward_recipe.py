"""Reward-model recipes on a small, noisy pilot: which settings generalise?

Usage (from the repository root):

    .venv/bin/python -m bench.reward_recipe                          # tiny random model, CPU, minutes
    .venv/bin/python -m bench.reward_recipe --model default --recipes old,new

The data imitates a pilot: --prompts prompts (default 120), K = 4 word-soup responses
each (tests/factories/synthetic.py: the more "good", the better), each prompt ranked by
--overlap labelers (default 3) who rank by the count of "good" plus Gaussian noise
(--noise sets its size; 1.0 gives labelers agreeing on ~80% of pairs). 10% of the
prompts validate. Each recipe prints its validation accuracy against the noisy
labels (with its Wilson 95% interval) and against the noiseless rule, its best epoch
and its time; with the learning curve on, the probes' points too.
"""

import argparse
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reward import tiny_model  # noqa: E402


def noisy_pilot(prompts: int, overlap: int, noise: float, seed: int):
    """(train, validation, noiseless validation, labeler agreement on train) as RankedGroups."""
    from tests.factories import synthetic
    from trainer.reward import RankedGroup

    rng = random.Random(seed)
    train, validation, clean = [], [], []
    agree = total = 0
    for index in range(prompts):
        counts = [rng.randint(0, 4) for _ in range(4)]
        responses = [synthetic.response(rng, c, 8) for c in counts]
        messages = synthetic.prompt(index)
        rankings = []
        for _ in range(overlap):
            noisy = [c + rng.gauss(0, noise) for c in counts]
            order = sorted(range(4), key=lambda i: -noisy[i])
            ranks = [order.index(i) + 1 for i in range(4)]
            rankings.append(ranks)
        for a in range(overlap):
            for b in range(a + 1, overlap):
                for i in range(4):
                    for j in range(i + 1, 4):
                        total += 1
                        agree += (rankings[a][i] < rankings[a][j]) == (rankings[b][i] < rankings[b][j])
        target = validation if index % 10 == 9 else train
        target += [RankedGroup(messages, responses, r) for r in rankings]
        if index % 10 == 9:
            order = sorted(set(counts), reverse=True)
            clean.append(RankedGroup(messages, responses, [order.index(c) + 1 for c in counts]))
    return train, validation, clean, agree / max(1, total)


RECIPES = {
    # what the dashboard ran in the pilot: one epoch, the trunk's rate for the head, the last weights
    "old": dict(epochs=1, head_lr_multiplier=1.0, probe_init=False, early_stopping_patience=0, learning_curve=False),
    "new": dict(),  # the defaults
    "new-no-probe": dict(probe_init=False),
    "new-smooth": dict(label_smoothing=0.1),
    "new-head-only-x100": dict(head_lr_multiplier=100.0),
    "old-4-epochs-last": dict(epochs=4, head_lr_multiplier=1.0, probe_init=False, early_stopping_patience=0,
                              learning_curve=False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | default | a model directory")
    parser.add_argument("--prompts", type=int, default=120)
    parser.add_argument("--overlap", type=int, default=3)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--recipes", default="old,new,new-no-probe,new-smooth")
    parser.add_argument("--lr", type=float, default=None, help="trunk learning rate (default: 1e-3 tiny, 3e-5 else)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from trainer.configs import RewardConfig
    from trainer.reward import evaluate_reward_model, load_reward_model, train_reward_model

    work = Path(tempfile.mkdtemp(prefix="rm-recipe-"))
    default_dir = ROOT / "var/artifacts/models/smollm2-135m-instruct"
    if args.model == "tiny":
        model_dir = tiny_model(work / "tiny", default_dir)
    elif args.model == "default":
        model_dir = default_dir
    else:
        model_dir = Path(args.model)
    lr = args.lr if args.lr is not None else (1e-3 if args.model == "tiny" else 3e-5)
    train, validation, clean, agreement = noisy_pilot(args.prompts, args.overlap, args.noise, args.seed)
    print(f"model {args.model}; {len(train)} training rankings, {len(validation)} validation rankings"
          f" ({len(clean)} prompts); labelers' pairwise agreement {agreement:.3f}; trunk lr {lr:g}", flush=True)
    for name in args.recipes.split(","):
        config = replace(RewardConfig(learning_rate=lr, batch_size=8, device=args.device, seed=args.seed),
                         **RECIPES[name])
        started = time.perf_counter()
        result = train_reward_model(config, train, validation, model_path=model_dir, output_dir=work / name)
        seconds = time.perf_counter() - started
        m = result.metrics
        model, tokenizer = load_reward_model(result.output_dir)
        truth = evaluate_reward_model(model, tokenizer, clean)
        low, high = m["val_accuracy_low"], m["val_accuracy_high"]
        curve = " ".join(f"{p['rankings']}:{p['val_accuracy']:.3f}" for p in m.get("learning_curve", []))
        print(f"{name:20s} val acc {m['val_accuracy']:.3f} [{low:.3f}, {high:.3f}] n={m['val_pairs']}"
              f"  vs rule {truth['accuracy']:.3f}  train acc {m['train_accuracy'] if m['train_accuracy'] is not None else float('nan'):.3f}"
              f"  best epoch {m['best_epoch']}/{m['epochs_run']}  {seconds:.0f} s"
              + (f"  curve {curve}" if curve else ""), flush=True)


if __name__ == "__main__":
    main()
