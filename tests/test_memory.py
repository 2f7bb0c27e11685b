"""The memory estimator (trainer/memory.py) against peaks measured on the CPU, and its refusals."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import default_model_dir
from trainer.configs import PPOConfig, RewardConfig, SFTConfig
from trainer.memory import GiB, REFERENCE_MODELS, Architecture, Run, estimate, read_architecture, refusal, run_of

ROOT = Path(__file__).resolve().parent.parent


def measured_and_estimated(model_dir: Path, kind: str, batch_size: int, max_length: int,
                           strategy: str = "single", processes: int = 1) -> tuple[int, int]:
    """(peak bytes measured over a real run of a few steps in its own process, the estimator's total); with
    several processes (launched on the CPU as tests/test_distributed.py does) the largest of their peaks."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    command = [sys.executable]
    if processes > 1:
        from tests.test_distributed import _free_port

        command += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(_free_port())]
        env |= {"ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([*command, str(ROOT / "tests" / "memory_probe.py"), kind, str(model_dir),
                           str(batch_size), str(max_length), "0", "cpu", strategy],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    probes = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(probes) == processes, done.stdout
    probe = max(probes, key=lambda p: p["delta"])
    if kind == "ppo":  # one minibatch a step, prompts and responses of max_length tokens
        config = PPOConfig(batch_size=batch_size, mini_batch_size=batch_size, max_new_tokens=max_length,
                           max_prompt_length=max_length)
    else:
        config = (SFTConfig if kind == "sft" else RewardConfig)(batch_size=batch_size, max_length=max_length)
    run = run_of(kind, config, strategy=strategy, devices=processes)
    if kind == "sft":  # the loss covers the response: every token after the prompt
        run = replace(run, loss_tokens=max_length - probe["prompt_tokens"])
    return probe["delta"], estimate(read_architecture(model_dir), run).total


@pytest.mark.parametrize("kind, batch_size, max_length", [("sft", 4, 128), ("reward", 8, 256), ("ppo", 8, 128)])
def test_the_estimate_is_within_20_percent_of_the_measured_peak_of_the_tiny_model(
        tiny_model_dir, kind, batch_size, max_length):
    measured, estimated = measured_and_estimated(tiny_model_dir, kind, batch_size, max_length)
    assert 0.8 <= estimated / measured <= 1.2, (kind, measured / 2**20, estimated / 2**20)


@pytest.mark.slow
@pytest.mark.parametrize("kind, batch_size, max_length", [("sft", 2, 128), ("reward", 2, 128), ("ppo", 2, 64)])
def test_the_estimate_is_within_20_percent_of_the_measured_peak_of_the_default_model(kind, batch_size, max_length):
    measured, estimated = measured_and_estimated(default_model_dir(), kind, batch_size, max_length)
    assert 0.8 <= estimated / measured <= 1.2, (kind, measured / 2**20, estimated / 2**20)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind, batch_size, max_length", [("sft", 4, 128), ("reward", 8, 256)])
def test_the_estimate_is_within_20_percent_of_each_process_peak_of_the_tiny_model_on_two_processes(
        tiny_model_dir, kind, batch_size, max_length, strategy):
    measured, estimated = measured_and_estimated(tiny_model_dir, kind, batch_size, max_length, strategy, 2)
    assert 0.8 <= estimated / measured <= 1.2, (kind, strategy, measured / 2**20, estimated / 2**20)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind, batch_size, max_length", [("sft", 2, 128), ("reward", 2, 128)])
def test_the_estimate_is_within_20_percent_of_each_process_peak_of_the_default_model_on_two_processes(
        kind, batch_size, max_length, strategy):
    measured, estimated = measured_and_estimated(default_model_dir(), kind, batch_size, max_length, strategy, 2)
    assert 0.8 <= estimated / measured <= 1.2, (kind, strategy, measured / 2**20, estimated / 2**20)


def test_parameters_counted_from_the_config_are_the_models(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    arch = read_architecture(tiny_model_dir)
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    assert arch.parameters("lm") == sum(p.numel() for p in lm.parameters())
    scored = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    assert arch.parameters("score") == sum(p.numel() for p in scored.parameters())
    default = read_architecture(default_model_dir())
    assert 134e6 < default.parameters() < 135e6  # SmolLM2-135M


def test_strategies_shard_what_they_should():
    arch = REFERENCE_MODELS["8B"]
    single = estimate(arch, Run(kind="sft", rows=1, length=512, loss_tokens=512, dtype="bf16", device="cuda"))
    ddp = estimate(arch, Run(kind="sft", rows=1, length=512, loss_tokens=512, dtype="bf16", device="cuda",
                             strategy="ddp", devices=4))
    zero2 = estimate(arch, Run(kind="sft", rows=1, length=512, loss_tokens=512, dtype="bf16", device="cuda",
                               strategy="zero2", devices=4))
    zero3 = estimate(arch, Run(kind="sft", rows=1, length=512, loss_tokens=512, dtype="bf16", device="cuda",
                               strategy="zero3", devices=4))
    assert replace(ddp, grads=single.grads) == single  # replicated, with DDP's buckets: a copy of the gradients
    assert ddp.grads == pytest.approx(2 * single.grads, abs=4)
    assert zero2.weights == single.weights and zero2.optimizer * 4 == pytest.approx(single.optimizer, abs=4)
    assert zero3.weights < single.weights / 3 and zero2.grads < zero3.grads < single.grads / 1.5
    eight_bit = estimate(arch, Run(kind="sft", rows=1, length=512, loss_tokens=512, adam_8bit=True))
    assert eight_bit.optimizer * 4 == pytest.approx(single.optimizer, abs=4)
    lora = estimate(arch, Run(kind="ppo", rows=1, length=512, loss_tokens=256, lora_r=16, separate_reference=False))
    full = estimate(arch, Run(kind="ppo", rows=1, length=512, loss_tokens=256))
    assert lora.optimizer < full.optimizer / 100 and lora.weights < full.weights * 0.8  # no second policy


def test_sharded_weights_peak_at_the_start_or_the_end_of_the_backward_pass_and_at_the_save_on_the_cpu():
    arch = REFERENCE_MODELS["1B"]
    fsdp = Run(kind="reward", rows=1, length=16, loss_tokens=0, strategy="fsdp", devices=2)
    short, longer = estimate(arch, fsdp), estimate(arch, replace(fsdp, length=32))
    # Short sequences: the end's gradients outweigh the activations, which do not add to them.
    assert short.activations < longer.activations and short.total == longer.total
    long, longest = estimate(arch, replace(fsdp, length=4096)), estimate(arch, replace(fsdp, length=8192))
    assert long.total - long.activations == longest.total - longest.activations  # the activations outweigh them
    # Over many processes with 8-bit AdamW the main process's gathered float32 weights, at the save, are the
    # CPU's peak; on CUDA they go to host memory.
    many = replace(fsdp, devices=16, adam_8bit=True)
    assert estimate(arch, many).total > arch.parameters("score") * 4
    assert estimate(arch, replace(many, device="cuda")).weights < arch.parameters("score") * 4 / 2


def test_checkpointing_keeps_only_each_layers_input():
    arch = REFERENCE_MODELS["1B"]
    run = Run(kind="reward", rows=8, length=1024, loss_tokens=0, dtype="bf16")
    assert estimate(arch, replace(run, gradient_checkpointing=True)).activations < \
        estimate(arch, run).activations / 4


def test_an_impossible_run_is_refused_with_settings_that_would_fit():
    arch = REFERENCE_MODELS["70B"]
    run = run_of("sft", SFTConfig(batch_size=8, max_length=1024), dtype="bf16", parameters=arch.parameters())
    run = replace(run, device="cuda")
    message = refusal(arch, run, 80 * GiB, "each GPU of the workers")
    assert message is not None and "needs about" in message and "has 80.0 GiB" in message
    assert "ZeRO-3 over 8 GPUs" in message or "LoRA rank 16 with gradient checkpointing and ZeRO-3" in message
    # On a small machine nothing fits a 70B model: the message says so.
    assert "choose a smaller model" in refusal(arch, run, 4 * GiB, "this machine")
    # A run that fits is not refused.
    small = Architecture(vocab=1000, hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, head_dim=16)
    assert refusal(small, run, 80 * GiB, "each GPU") is None


def test_a_config_without_sizes_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="config.json has none of hidden_size"):
        read_architecture(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        read_architecture(tmp_path / "missing")


def test_gradient_checkpointing_keeps_less_for_the_backward_pass_of_a_model_in_eval_mode_same_gradients(
        tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.common import apply_gradient_checkpointing

    ids = torch.arange(5, 69).unsqueeze(0)  # (1, 64)
    grads, kept = [], []
    for setting in ("off", "on"):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
        assert apply_gradient_checkpointing(model, setting) == (setting == "on")
        saved = [0]

        def pack(tensor):
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model.model(input_ids=ids).last_hidden_state.pow(2).mean()  # the decoder layers only
        loss.backward()
        kept.append(saved[0])
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad)
        assert not model.model.layers[0].mlp.training  # dropout and the like stay off
    assert kept[1] < kept[0] / 2, kept  # each layer's input only, the rest recomputed
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert apply_gradient_checkpointing(model, "auto") is False  # "auto": only models over 1B weights


def test_8bit_adamw_without_bitsandbytes_is_a_clear_error(tiny_model_dir, tmp_path):
    import importlib.util

    from trainer.sft import SFTExample, train_sft

    if importlib.util.find_spec("bitsandbytes"):
        pytest.skip("bitsandbytes is installed here")
    examples = [SFTExample([{"role": "user", "content": f"Question {i}"}], "An answer.") for i in range(2)]
    with pytest.raises(RuntimeError, match="needs the optional package bitsandbytes"):
        train_sft(SFTConfig(adam_8bit=True, device="cpu"), examples, examples[:1], base_path=tiny_model_dir,
                  output_dir=tmp_path / "x")


def test_the_readmes_scaling_up_table_is_what_the_estimator_prints():
    from trainer.memory import scaling_table

    readme = (ROOT / "README.md").read_text()
    assert scaling_table().strip() in readme, "update README.md's Scaling up table: python -m trainer.memory"
