"""Data-parallel training: the trainers launched as 2 CPU processes (accelerate launch, torchrun)
train the same number of steps to the same figures as one process, save once, and say how many
processes took part; the file formats of `python -m trainer.cli_train`."""

import importlib.util
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factories import synthetic
from trainer import cli_train
from trainer.common import CONFIG_FILE

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """`python -m trainer.cli_train ARGS` as 2 processes on CPU, the way a user would start it."""
    if launcher == "accelerate":
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(_free_port())]
    else:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                  "--master_port", str(_free_port())]
    # CPU even where a GPU is present: ACCELERATE_USE_CPU is what `accelerate launch --cpu` sets.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([*prefix, "-m", "trainer.cli_train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def printed_metrics(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ranking_rows(groups) -> list[dict]:
    return [{"messages": g.messages, "responses": g.responses, "ranks": g.ranks} for g in groups]


# ---- two processes against one ------------------------------------------------------

@pytest.mark.parametrize("launcher,strategy", [("accelerate", "ddp"), ("torchrun", "fsdp")])
def test_reward_model_on_two_processes_matches_one_process(launcher, strategy, tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "rankings.jsonl", ranking_rows(synthetic.ranked_groups(range(0, 200), k=4, seed=1)))
    validation = write_jsonl(tmp_path / "val.jsonl",
                             ranking_rows(synthetic.ranked_groups(range(1000, 1040), k=4, seed=2)))
    settings = ["--learning-rate", "1e-3", "--eval-batch-size", "32", "--batch-size", "8", "--epochs", "1"]
    common = ["reward", "--model", str(tiny_model_dir), "--data", str(data), "--validation", str(validation), *settings]

    runs = tmp_path / "runs"
    result = launch(launcher, [*common, "--strategy", strategy, "--output", str(runs / "rm2")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert cli_train.main([*common, "--output", str(runs / "rm1")]) == 0  # one process, in this one
    one = printed_metrics(capsys.readouterr().out)[0]

    printed = printed_metrics(result.stdout)
    assert len(printed) == 1, "only the main process prints the result"
    two = json.loads((runs / "rm2" / CONFIG_FILE).read_text())["metrics"]
    assert two == printed[0]
    assert two["processes"] == 2 and one["processes"] == 1
    # Saved once, by one process: the checkpoint and nothing half-written beside it.
    assert sorted(p.name for p in runs.iterdir()) == ["rm1", "rm2"]
    assert (runs / "rm2" / "model.safetensors").exists()
    # Each process took half of every batch and the gradients were summed: the same run.
    assert two["steps"] == one["steps"] == 25
    assert two["train_groups"] == one["train_groups"] and two["val_pairs"] == one["val_pairs"]
    assert two["val_accuracy"] > 0.9
    assert two["val_accuracy"] == pytest.approx(one["val_accuracy"], abs=0.02)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-3, abs=1e-4)
    assert two["reward_mean"] == pytest.approx(one["reward_mean"], rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("launcher,strategy", [("torchrun", "ddp"), ("accelerate", "fsdp")])
def test_sft_on_two_processes_matches_one_process(launcher, strategy, tiny_model_dir, tmp_path, capsys):
    # The split column decides validation (as the exports mark it); 5 rows per batch do not halve evenly.
    rows = [{"messages": [*m, {"role": "assistant", "content": t}], "split": "validation" if i % 8 == 0 else "train"}
            for i, (m, t) in enumerate(synthetic.sft_examples(48))]
    data = write_jsonl(tmp_path / "demos.jsonl", rows)
    common = ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--learning-rate", "1e-3",
              "--batch-size", "5", "--gradient-accumulation-steps", "2", "--epochs", "2", "--max-length", "128"]

    result = launch(launcher, [*common, "--strategy", strategy, "--output", str(tmp_path / "sft2")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert cli_train.main([*common, "--output", str(tmp_path / "sft1")]) == 0
    one = printed_metrics(capsys.readouterr().out)[0]

    two = json.loads((tmp_path / "sft2" / CONFIG_FILE).read_text())["metrics"]
    assert printed_metrics(result.stdout) == [two]
    assert two["processes"] == 2
    assert two["steps"] == one["steps"] == 10  # 42 training rows: 9 micro-batches, 5 steps per epoch
    assert two["val_examples"] == one["val_examples"] == 6
    assert two["initial_val_loss"] == pytest.approx(one["initial_val_loss"], rel=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    assert two["val_loss"] < two["initial_val_loss"]
    # The saved weights are the trained ones, whole (FSDP gathers its shards to save).
    from safetensors.torch import load_file

    saved_one, saved_two = (load_file(tmp_path / name / "model.safetensors") for name in ("sft1", "sft2"))
    assert saved_one.keys() == saved_two.keys()
    for name, weight in saved_one.items():
        assert saved_two[name].shape == weight.shape, name
        assert (saved_two[name] - weight).abs().max() < 1e-4, name


def logged(text: str, name: str) -> dict[int, float]:
    """A per-step figure from the main process's "step N: epoch E, loss X, ..., NAME X" log lines."""
    found = re.findall(rf"step (\d+): epoch \d+, .*\b{name} ([-\d.e+]+)", text)
    return {int(step): float(value) for step, value in found}


@pytest.mark.parametrize("launcher,strategy", [("torchrun", "ddp"), ("accelerate", "fsdp")])
def test_dpo_on_two_processes_matches_one_process(launcher, strategy, tiny_model_dir, tmp_path, capsys, caplog):
    # about 30 rankings, 8 per step: the last step's do not halve evenly; 3 held-out prompts sampled by both
    data = write_jsonl(tmp_path / "rankings.jsonl", ranking_rows(synthetic.ranked_groups(range(0, 30), k=3, seed=1)))
    validation = write_jsonl(tmp_path / "val.jsonl", ranking_rows(synthetic.ranked_groups(range(1000, 1010), k=3)))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say {i}"} for i in range(3)])
    common = ["dpo", "--policy", str(tiny_model_dir), "--data", str(data), "--validation", str(validation),
              "--validation-prompts", str(prompts), "--max-new-tokens", "4", "--learning-rate", "1e-3",
              "--batch-size", "8", "--eval-batch-size", "4", "--epochs", "1", "--warmup-ratio", "0"]

    result = launch(launcher, [*common, "--strategy", strategy, "--output", str(tmp_path / "dpo2")])
    assert result.returncode == 0, result.stderr[-3000:]
    with caplog.at_level(logging.INFO, logger="trainer.cli_train"):
        assert cli_train.main([*common, "--output", str(tmp_path / "dpo1")]) == 0
    one = printed_metrics(capsys.readouterr().out)[0]

    two = json.loads((tmp_path / "dpo2" / CONFIG_FILE).read_text())["metrics"]
    assert printed_metrics(result.stdout) == [two]
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["steps"] == one["steps"] == 4
    assert two["train_rankings"] == one["train_rankings"]
    # every response once per epoch, over both processes
    assert two["policy_sequences"] == one["policy_sequences"] == 3 * one["train_rankings"]
    # Every step's loss (each process its shard, the gradients summed) is the one-process step's.
    # So is its gradient's norm before clipping (each process's loss is scaled by the number of processes,
    # so the sum of their gradients is the whole batch's, not its mean over processes).
    for name in ("loss", "grad_norm"):
        one_process, two_processes = logged(caplog.text, name), logged(result.stderr, name)
        assert sorted(one_process) == sorted(two_processes) == [1, 2, 3, 4], name
        for step, value in one_process.items():
            assert two_processes[step] == pytest.approx(value, rel=2e-3, abs=1e-5), (name, step)
    assert two["val_pairs"] == one["val_pairs"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    assert two["val_accuracy"] == pytest.approx(one["val_accuracy"], abs=1e-6)
    assert "kl" in two  # the held-out prompts, sampled by both processes
    from safetensors.torch import load_file

    saved_one, saved_two = (load_file(tmp_path / name / "model.safetensors") for name in ("dpo1", "dpo2"))
    assert saved_one.keys() == saved_two.keys()
    start = load_file(tiny_model_dir / "model.safetensors")
    moved = max((weight - start[name]).abs().max() for name, weight in saved_one.items() if name in start)
    assert moved > 1e-4  # the policy trained
    for name, weight in saved_one.items():
        assert (saved_two[name] - weight).abs().max() < 1e-4, name


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    from trainer.reward import RewardConfig, train_reward_model

    out = tmp_path_factory.mktemp("dist-rm") / "rm"
    train_reward_model(RewardConfig(batch_size=8, learning_rate=1e-3), synthetic.ranked_groups(range(0, 48), seed=1),
                       synthetic.ranked_groups(range(1000, 1008), seed=2), model_path=tiny_model_dir, output_dir=out)
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ppo_on_two_processes_matches_one_process(strategy, tiny_model_dir, reward_model_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": synthetic.prompt(i)[0]["content"]} for i in range(16)])
    held_out = write_jsonl(tmp_path / "held.jsonl", [{"messages": synthetic.prompt(i)} for i in range(100, 105)])
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": m, "completion": t} for m, t in synthetic.sft_examples(8)])
    common = ["ppo", "--policy", str(tiny_model_dir), "--reward", str(reward_model_dir), "--prompts", str(prompts),
              "--steps", "2", "--ppo-epochs", "1", "--max-new-tokens", "6", "--learning-rate", "1e-4"]
    full = [*common, "--batch-size", "4", "--mini-batch-size", "2", "--ptx-coef", "0.5", "--sft-data", str(demos),
            "--validation-prompts", str(held_out), "--adaptive-kl"]

    result = launch("accelerate", [*full, "--strategy", strategy, "--output", str(tmp_path / "ppo2")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert cli_train.main([*full, "--output", str(tmp_path / "ppo1")]) == 0  # one process, in this one
    one = printed_metrics(capsys.readouterr().out)[0]
    two = json.loads((tmp_path / "ppo2" / CONFIG_FILE).read_text())
    assert printed_metrics(result.stdout) == [two["metrics"]]
    assert two["config"]["strategy"] == strategy
    two = two["metrics"]
    assert two["processes"] == 2 and one["processes"] == 1 and two["steps"] == 2
    assert two["ptx_loss"] > 0 and two["response_length"] > 0
    assert "validation_reward_after" in two  # the 5 held-out prompts, sampled by both processes
    # Every rollout is drawn from its own seed, whichever process samples it, and every figure over the batch
    # is taken over all processes' rollouts: two processes sample the same responses as one and train alike.
    for name in ("response_length", "eos_fraction"):
        assert two[name] == one[name], name
    for name in ("reward", "reward_unnormalised", "kl", "kl_coef", "total_reward", "policy_loss", "value_loss",
                 "ptx_loss", "entropy", "approx_kl", "clip_frac", "normalisation_mean", "normalisation_std",
                 "validation_reward_before", "validation_reward_after"):
        assert two[name] == pytest.approx(one[name], rel=1e-3, abs=1e-4), name
    from safetensors.torch import load_file

    saved_one, saved_two = (load_file(tmp_path / name / "model.safetensors") for name in ("ppo1", "ppo2"))
    assert saved_one.keys() == saved_two.keys()
    for name, weight in saved_one.items():
        assert (saved_two[name] - weight).abs().max() < 1e-5, name


def test_ppo_refuses_minibatches_that_do_not_split_over_the_processes(tiny_model_dir, reward_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": synthetic.prompt(i)[0]["content"]} for i in range(4)])
    common = ["ppo", "--policy", str(tiny_model_dir), "--reward", str(reward_model_dir), "--prompts", str(prompts),
              "--steps", "1", "--max-new-tokens", "6"]
    # Each process takes an equal share of every minibatch: a minibatch of one rollout cannot be shared.
    refused = launch("torchrun", [*common, "--batch-size", "4", "--mini-batch-size", "1",
                                  "--output", str(tmp_path / "refused")])
    assert refused.returncode != 0
    assert "must be multiples of 2" in refused.stderr
    assert not (tmp_path / "refused").exists()


def test_strategies_that_cannot_run_are_refused_clearly(monkeypatch):
    from trainer.distributed import runtime

    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(ValueError, match="strategy zero3 .DeepSpeed ZeRO. needs the deepspeed package"):
            runtime("cpu", "zero3")
    with pytest.raises(ValueError, match="strategy must be one of single, ddp, fsdp, zero2, zero3, not 'tp'"):
        runtime("cpu", "tp")
    assert runtime("cpu", "fsdp").world == 1  # one process: trains as single does
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="strategy single trains in one process, but the launcher started 2"):
        runtime("cpu", "single")


# ---- the file formats -----------------------------------------------------------------

def test_every_ranking_format_reads_as_the_same_ranking(tmp_path):
    messages = [{"role": "user", "content": "Name a colour."}]
    annotation = {  # a line of the annotations export (app/services/export.py, format jsonl)
        "annotation_id": 7, "split": "train", "is_gold": False, "prompt": messages,
        "ratings": [{"response_id": 2, "position": 1, "likert": 3, "rank": 2, "flags": [], "text": "Blue."},
                    {"response_id": 1, "position": 0, "likert": 6, "rank": 1, "flags": [], "text": "Red."}],
    }
    gold = {**annotation, "annotation_id": 8, "is_gold": True}
    simple = {"prompt": "Name a colour.", "responses": ["Red.", "Blue."], "ranks": [1, 2]}
    trl_plain = {"prompt": "Name a colour.", "chosen": "Red.", "rejected": "Blue.", "split": "validation"}
    trl_conversational = {"prompt": messages, "chosen": [{"role": "assistant", "content": "Red."}],
                          "rejected": [{"role": "assistant", "content": "Blue."}]}
    path = write_jsonl(tmp_path / "r.jsonl", [annotation, gold, simple, trl_plain, trl_conversational])

    groups, splits = cli_train.load(path, cli_train.ranking_of)
    assert len(groups) == 4, "the gold annotation is a labeler test, not training data"
    assert all(g.messages == messages and g.responses == ["Red.", "Blue."] and g.ranks == [1, 2] for g in groups)
    train, validation = cli_train.train_and_validation(path, None, cli_train.ranking_of)
    assert (len(train), len(validation)) == (3, 1)


def test_demonstration_formats_and_errors_name_the_line(tmp_path):
    prompt = [{"role": "user", "content": "Hi"}]
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [*prompt, {"role": "assistant", "content": "Hello."}]},
        {"prompt": "Hi", "completion": "Hello."},
        {"prompt": prompt, "completion": [{"role": "assistant", "content": "Hello."}]},
    ])
    examples, _ = cli_train.load(path, cli_train.demonstration_of)
    assert [tuple(e) for e in examples] == [(prompt, "Hello.")] * 3

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": prompt}) + "\n\nnot json\n")
    with pytest.raises(cli_train.DataError, match=r"bad.jsonl:1: the last message must be the assistant's"):
        cli_train.load(bad, cli_train.demonstration_of)
    with pytest.raises(cli_train.DataError, match=r"bad.jsonl:3: not JSON"):
        list(cli_train.read_jsonl(bad))
    with pytest.raises(cli_train.DataError, match="no row whose \"split\" is \"validation\""):
        cli_train.train_and_validation(path, None, cli_train.demonstration_of)
