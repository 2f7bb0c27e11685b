"""Train from files, in one process or data parallel under a launcher.

    python -m trainer.cli_train reward --model SFT_DIR --data rankings.jsonl [--validation val.jsonl] --output DIR
    python -m trainer.cli_train sft --model BASE_DIR --data demos.jsonl [--validation val.jsonl] --output DIR
    python -m trainer.cli_train ppo --policy SFT_DIR --reward RM_DIR --prompts prompts.jsonl --output DIR
    python -m trainer.cli_train dpo --policy SFT_DIR --data rankings.jsonl [--validation val.jsonl] --output DIR

Several processes (see trainer/distributed.py for what is sharded):

    accelerate launch --multi_gpu --num_processes 4 -m trainer.cli_train reward ...   # 4 GPUs
    torchrun --nproc_per_node 2 -m trainer.cli_train reward ...   # 2 processes; CPU without CUDA
                                                                   # or with ACCELERATE_USE_CPU=1
(`accelerate launch --cpu --num_processes N` starts one process unless given an MPI host file.)

Every field of the trainer's config is an option: --epochs 2 --batch-size 16
--learning-rate 1e-5 --no-mixed-precision ... (trainer.reward.RewardConfig,
trainer.sft.SFTConfig, trainer.ppo.PPOConfig, trainer.dpo.DPOConfig).

Input files are JSON lines:
- rankings (reward, dpo): the annotations export (app/services/export.py, format
  jsonl: {"prompt": [messages], "ratings": [{"rank", "text"}, ...], "is_gold",
  "all_bad"}; gold and "all bad" annotations are skipped, as in training from the
  dashboard; a partial ranking's unranked responses carry rank top_k + 1, tied
  last, so they lose to every ranked one and tie among themselves), or
  {"messages" | "prompt", "responses": [...], "ranks": [...]} (1 = best,
  equal ranks tie), or TRL's preference rows {"prompt", "chosen", "rejected"}
  (plain strings or conversational message lists, as the comparisons export).
- demonstrations (sft): {"messages": [..., {"role": "assistant", ...}]}
  (the last assistant turn is learned) or {"prompt", "completion"}.
- prompts (ppo): {"prompt": "..."} or {"messages": [...]}.
A prompt given as a string is one user turn. Without --validation, rows whose
"split" is "validation" (as the exports mark them) validate and the rest train.

The main process prints the final metrics as one JSON object on stdout; the
checkpoint and its workbench.json go to --output.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.common import Messages

log = logging.getLogger("trainer.cli_train")


class DataError(ValueError):
    """A line of an input file that cannot be read; says which file and line."""


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line."""
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object")
            yield number, row


def as_messages(value: Any, where: str) -> Messages:
    """A prompt as chat messages: a string is one user turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in value):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    raise DataError(f"{where}: the prompt must be a string or a list of {{role, content}} messages")


def _text(value: Any, where: str, name: str) -> str:
    """A response: a string, or TRL's conversational [{"role": "assistant", "content": ...}]."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and "content" in value[0]:
        return str(value[0]["content"])
    raise DataError(f"{where}: {name} must be a string or one assistant message")


def _prompt_of(row: dict, where: str) -> Messages:
    if "messages" in row:
        return as_messages(row["messages"], where)
    if "prompt" in row:
        return as_messages(row["prompt"], where)
    raise DataError(f"{where}: no prompt (expected a \"prompt\" or \"messages\" field)")


def ranking_of(row: dict, where: str):
    """A RankedGroup from any of the ranking formats; None for a gold or "all bad" annotation
    (it ranks nothing: no pairs)."""
    from trainer.reward import RankedGroup, pairwise

    if "ratings" in row:  # the annotations export
        if row.get("is_gold") or row.get("all_bad"):
            return None
        ratings = sorted(row["ratings"], key=lambda r: r.get("position") or 0)
        if any(r.get("rank") is None for r in ratings):
            raise DataError(f"{where}: a rating has no rank")
        return RankedGroup(as_messages(row["prompt"], where), [str(r["text"]) for r in ratings],
                           [int(r["rank"]) for r in ratings])
    if "responses" in row:
        responses, ranks = row["responses"], row.get("ranks")
        if not isinstance(responses, list) or not isinstance(ranks, list):
            raise DataError(f"{where}: \"responses\" and \"ranks\" must be lists")
        return RankedGroup(_prompt_of(row, where), [_text(r, where, "a response") for r in responses],
                           [int(r) for r in ranks])
    if "chosen" in row and "rejected" in row:
        return pairwise(_prompt_of(row, where), _text(row["chosen"], where, "chosen"),
                        _text(row["rejected"], where, "rejected"))
    raise DataError(f"{where}: not a ranking (expected \"ratings\", \"responses\"/\"ranks\" or \"chosen\"/\"rejected\")")


def demonstration_of(row: dict, where: str):
    """An SFTExample from {"messages": [..., assistant]} or {"prompt", "completion"}."""
    from trainer.sft import SFTExample

    if "completion" in row:
        return SFTExample(_prompt_of(row, where), _text(row["completion"], where, "completion"))
    if "messages" in row:
        messages = as_messages(row["messages"], where)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's response")
        return SFTExample(messages[:-1], messages[-1]["content"])
    raise DataError(f"{where}: not a demonstration (expected \"messages\" or \"prompt\"/\"completion\")")


def load(path: Path, parse) -> tuple[list, list]:
    """(rows, their splits) of a file, skipping rows parse() returns None for."""
    rows, splits = [], []
    for number, raw in read_jsonl(path):
        item = parse(raw, f"{path}:{number}")
        if item is not None:
            rows.append(item)
            splits.append(raw.get("split"))
    return rows, splits


def train_and_validation(data: Path, validation: Path | None, parse) -> tuple[list, list]:
    rows, splits = load(data, parse)
    if validation is not None:
        return rows, load(validation, parse)[0]
    train = [r for r, s in zip(rows, splits) if s != "validation"]
    val = [r for r, s in zip(rows, splits) if s == "validation"]
    if not val:
        raise DataError(f"{data} has no row whose \"split\" is \"validation\"; give --validation FILE")
    return train, val


# ---- options from the config dataclasses ----------------------------------------

def _add_config_options(parser: argparse.ArgumentParser, config_class) -> None:
    group = parser.add_argument_group(f"settings ({config_class.__name__})")
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"default {f.default}")
            continue
        optional = isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)
        base = next(t for t in typing.get_args(kind) if t is not type(None)) if optional else kind

        def convert(text: str, base=base, optional=optional):
            if optional and text.lower() == "none":
                return None
            return base(text)

        group.add_argument(flag, dest=f.name, type=convert, default=None, metavar=base.__name__.upper(),
                           help=f"default {f.default}")


def _config(config_class, args: argparse.Namespace):
    chosen = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
              if getattr(args, f.name, None) is not None}
    return config_class(**chosen)


def build_parser() -> argparse.ArgumentParser:
    from trainer.dpo import DPOConfig
    from trainer.ppo import PPOConfig
    from trainer.reward import RewardConfig
    from trainer.sft import SFTConfig

    parser = argparse.ArgumentParser(prog="python -m trainer.cli_train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    reward = commands.add_parser("reward", help="train a reward model on rankings")
    reward.add_argument("--model", required=True, type=Path, help="the SFT model the reward model starts from")
    reward.add_argument("--data", required=True, type=Path, help="rankings, JSONL")
    reward.add_argument("--validation", type=Path, help="validation rankings, JSONL (default: rows of split validation)")
    reward.add_argument("--sft-samples", type=Path,
                        help="SFT model samples for the reward normalisation, in a demonstration format"
                             " (default: the training responses)")
    reward.add_argument("--output", required=True, type=Path, help="checkpoint directory (must not exist or be empty)")
    _add_config_options(reward, RewardConfig)

    sft = commands.add_parser("sft", help="supervised fine-tuning on demonstrations")
    sft.add_argument("--model", required=True, type=Path, help="the model to fine-tune")
    sft.add_argument("--data", required=True, type=Path, help="demonstrations, JSONL")
    sft.add_argument("--validation", type=Path, help="validation demonstrations (default: rows of split validation)")
    sft.add_argument("--output", required=True, type=Path, help="checkpoint directory (must not exist or be empty)")
    _add_config_options(sft, SFTConfig)

    ppo = commands.add_parser("ppo", help="PPO of a policy against a reward model")
    ppo.add_argument("--policy", required=True, type=Path, help="the SFT model to optimise")
    ppo.add_argument("--reference", type=Path, help="the KL reference (default: --policy)")
    ppo.add_argument("--reward", required=True, type=Path, help="the reward model")
    ppo.add_argument("--prompts", required=True, type=Path, help="prompts, JSONL")
    ppo.add_argument("--validation-prompts", type=Path, help="prompts sampled before and after training, JSONL")
    ppo.add_argument("--sft-data", type=Path, help="demonstrations for the ptx term (--ptx-coef), JSONL")
    ppo.add_argument("--output", required=True, type=Path, help="checkpoint directory (must not exist or be empty)")
    _add_config_options(ppo, PPOConfig)

    dpo = commands.add_parser("dpo", help="DPO of a policy on rankings")
    dpo.add_argument("--policy", required=True, type=Path, help="the SFT model to optimise")
    dpo.add_argument("--reference", type=Path, help="the reference (default: --policy)")
    dpo.add_argument("--data", required=True, type=Path, help="rankings, JSONL")
    dpo.add_argument("--validation", type=Path, help="validation rankings, JSONL (default: rows of split validation)")
    dpo.add_argument("--validation-prompts", type=Path, help="prompts sampled before and after training, JSONL")
    dpo.add_argument("--output", required=True, type=Path, help="checkpoint directory (must not exist or be empty)")
    _add_config_options(dpo, DPOConfig)
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train as the arguments say; returns the final metrics."""
    if args.command == "reward":
        from trainer.reward import RewardConfig, train_reward_model

        config = _config(RewardConfig, args)
        train, validation = train_and_validation(args.data, args.validation, ranking_of)
        samples = None
        if args.sft_samples is not None:
            samples = [(e.messages, e.response) for e in load(args.sft_samples, demonstration_of)[0]]
        result = train_reward_model(config, train, validation, model_path=args.model, output_dir=args.output,
                                    sft_samples=samples, on_step=_log_step)
    elif args.command == "sft":
        from trainer.sft import SFTConfig, train_sft

        config = _config(SFTConfig, args)
        train, validation = train_and_validation(args.data, args.validation, demonstration_of)
        result = train_sft(config, train, validation, base_path=args.model, output_dir=args.output, on_step=_log_step)
    elif args.command == "dpo":
        from trainer.dpo import DPOConfig, train_dpo

        config = _config(DPOConfig, args)
        train, validation = train_and_validation(args.data, args.validation, ranking_of)
        prompts = (load(args.validation_prompts, lambda row, where: _prompt_of(row, where))[0]
                   if args.validation_prompts else None)
        result = train_dpo(config, train, validation, policy_path=args.policy,
                           reference_path=args.reference or args.policy, output_dir=args.output,
                           validation_prompts=prompts, on_step=_log_step)
    else:
        from trainer.ppo import PPOConfig, train_ppo

        config = _config(PPOConfig, args)
        prompts = load(args.prompts, lambda row, where: _prompt_of(row, where))[0]
        validation = (load(args.validation_prompts, lambda row, where: _prompt_of(row, where))[0]
                      if args.validation_prompts else None)
        sft_data = ([(e.messages, e.response) for e in load(args.sft_data, demonstration_of)[0]]
                    if args.sft_data else None)
        result = train_ppo(config, prompts, policy_path=args.policy, reference_path=args.reference or args.policy,
                           reward_path=args.reward, output_dir=args.output, on_step=_log_step,
                           sft_data=sft_data, validation_prompts=validation)
    return result.metrics


def _log_step(step: int, metrics: dict[str, float]) -> None:
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
    log.info("step %d: %s", step, shown)


def main(argv: list[str] | None = None) -> int:
    from trainer.distributed import launched_world_size, shutdown

    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0") or 0)  # set by the launcher; rank 0 talks, the others only warn
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}/{launched_world_size()}] %(name)s: %(message)s")
    try:
        metrics = run(args)
    except ValueError as error:  # unreadable data or settings: the message says which
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if rank == 0:
        print(json.dumps(metrics, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
