"""PPO speed: samples/s and where the time goes (generation / scoring / update).

Usage (from the repository root):

    .venv/bin/python -m bench.ppo                      # tiny random policy, CPU, about a minute
    .venv/bin/python -m bench.ppo --model default      # SmolLM2-135M-Instruct as policy, reference and RM base
    .venv/bin/python -m bench.ppo --model default --batch-size 16 --max-new-tokens 64 --device cuda
    .venv/bin/python -m bench.ppo --model default --device cuda --rollout-engine vllm   # rollouts on vLLM

The reward model is trained first (one short epoch on synthetic rankings,
tests/factories/synthetic.py) from the same model, then PPO runs --steps steps. The
first step is a warm-up (weights paged in, allocator) and is left out of the
figures. Per step: generation = sampling from the policy; scoring = the
forward passes of policy (old log-probs), reference, value and reward models;
update = the PPO epochs. TRL's PPO trainer is tried for the same settings; TRL
1.x removed it (its current trainers are GRPO/RLOO-style), in which case the
reason is printed beside our figures.
"""

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def trl_ppo_status() -> str:
    """Whether TRL's PPO trainer can be imported here; its module path or why not."""
    for module in ("trl", "trl.experimental.ppo"):
        try:
            found = importlib.import_module(module)
        except ImportError as error:
            return f"not available ({error})"
        if hasattr(found, "PPOTrainer"):
            return f"{module}.PPOTrainer"
    return "not available (this trl has no PPOTrainer)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (random 2-layer Llama), default (SmolLM2-135M) or a path")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mini-batch-size", type=int, default=4)
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rollout-engine", default="transformers", choices=("auto", "transformers", "vllm"))
    args = parser.parse_args()

    from app.config import Settings
    from bench.reward import tiny_model
    from tests.factories import synthetic
    from trainer.models import DEFAULT_MODEL_DIR
    from trainer.ppo import PPOConfig, train_ppo
    from trainer.reward import RewardConfig, train_reward_model

    default_dir = Settings().artifacts_path / DEFAULT_MODEL_DIR
    default_dir = default_dir if default_dir.is_absolute() else ROOT / default_dir
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model == "tiny":
            model = tiny_model(tmp / "tiny", default_dir)
        else:
            model = default_dir if args.model == "default" else Path(args.model)
        tiny = args.model == "tiny"
        reward = train_reward_model(
            RewardConfig(epochs=1, batch_size=4, learning_rate=1e-3 if tiny else 1e-5, max_length=128,
                         device=args.device),
            synthetic.ranked_groups(range(64 if tiny else 8), seed=1), synthetic.ranked_groups(range(1000, 1004), seed=2),
            model_path=model, output_dir=tmp / "rm")
        config = PPOConfig(steps=args.steps, batch_size=args.batch_size, mini_batch_size=args.mini_batch_size,
                           ppo_epochs=args.ppo_epochs, max_new_tokens=args.max_new_tokens,
                           learning_rate=1e-4 if tiny else 1e-6, device=args.device, rollout_engine=args.rollout_engine)
        started = time.perf_counter()
        result = train_ppo(config, [synthetic.prompt(i) for i in range(64)], policy_path=model,
                           reference_path=model, reward_path=reward.output_dir, output_dir=tmp / "policy")
        total = time.perf_counter() - started

    timed = result.history[1:] or result.history  # the first step is warm-up
    split = {k: statistics.mean(h[k] for h in timed) for k in ("generation_s", "scoring_s", "update_s")}
    step_s = sum(split.values())
    print(f"model {args.model}, {args.steps} steps x {args.batch_size} samples, {args.max_new_tokens} new tokens max, "
          f"{args.ppo_epochs} PPO epochs, minibatch {args.mini_batch_size}, device {args.device},"
          f" rollouts on {args.rollout_engine}")
    print(f"{'':28}{'ours':>12}{'TRL PPO':>12}")
    print(f"{'samples/s':28}{args.batch_size / step_s:>12.2f}{'-':>12}")
    print(f"{'mean response tokens':28}{statistics.mean(h['response_length'] for h in timed):>12.1f}{'-':>12}")
    for key, label in (("generation_s", "generation s/step"), ("scoring_s", "scoring s/step"),
                       ("update_s", "update s/step")):
        print(f"{label:28}{split[key]:>8.2f} ({split[key] / step_s:>3.0%}){'-':>12}")
    print(f"{'whole run incl. loading (s)':28}{total:>12.1f}{'-':>12}")
    print(f"TRL PPO: {trl_ppo_status()}")


if __name__ == "__main__":
    main()
