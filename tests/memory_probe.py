"""Measure a training run's peak memory on the CPU, in a process of its own:

    python tests/memory_probe.py KIND MODEL_DIR BATCH_SIZE MAX_LENGTH [LORA_R [DEVICE [STRATEGY]]]

KIND is sft, reward or ppo (prompts and responses of MAX_LENGTH tokens), DEVICE cpu (the default) or cuda,
STRATEGY the run's strategy (under a launcher of several processes each prints its own line). Prints one JSON
line: on the
CPU the resident memory before the model is loaded (the tokenizer library loaded once
already), the peak resident memory of the process (VmHWM: not ru_maxrss, which keeps the
parent's resident memory at the fork across exec) and their difference; on
CUDA the peak of torch's allocations as the difference; in bytes, and the prompt's
tokens. Every sequence is longer than MAX_LENGTH, so every batch is full.

With MEMORY_PROBE_TRACE=1 each process also writes to stderr its resident and peak memory (MiB above the
baseline) at the phases of the run: the models loaded (prepare called), the models spread by the strategy,
the optimizer made, the first two forward and backward passes, optimizer steps and unwrappings, and the
end of the run."""

import gc
import json
import os
import resource
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from trainer.common import encode_prompt
from trainer.configs import PPOConfig, RewardConfig, SFTConfig
from trainer.models import load_tokenizer
from trainer.reward import RankedGroup, train_reward_model
from trainer.sft import SFTExample, train_sft


def resident() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def peak_resident() -> int:
    """This process's peak resident memory in bytes since it started its program. ru_maxrss
    would do but for one thing: Linux carries the parent's resident memory at the fork over
    exec into it, so a probe started by a large pytest process would report the parent's."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # elsewhere than Linux


def trace(baseline: int) -> Callable[[str], None]:
    """Wrap the engine's phases (trainer/distributed.py's Runtime) to print the memory after each;
    returns the function that prints it, for the phases outside the engine."""
    from trainer import distributed

    seen: dict[str, int] = {}

    def mark(phase: str) -> None:
        seen[phase] = seen.get(phase, 0) + 1
        if seen[phase] <= 2:
            print(f"trace rank={os.environ.get('RANK', '0')} {phase}#{seen[phase]}: resident"
                  f" {(resident() - baseline) / 2**20:.0f} peak {(peak_resident() - baseline) / 2**20:.0f} MiB",
                  file=sys.stderr, flush=True)

    def after(name: str, phase: str):
        original = getattr(distributed.Runtime, name)

        def wrapped(self, *args, **kwargs):
            if name == "prepare":
                mark("loaded")
            out = original(self, *args, **kwargs)
            mark(phase)
            return out
        setattr(distributed.Runtime, name, wrapped)

    shard = distributed._fully_shard
    distributed._fully_shard = lambda bundle: (shard(bundle), mark("sharded"))[0]
    for name, phase in (("prepare", "optimizer made"), ("run", "forward"), ("backward", "backward"),
                        ("unwrapped", "unwrapped")):
        after(name, phase)
    register_optimizer_step_post_hook(lambda *_: mark("step"))
    return mark


def main(kind: str, model_dir: str, batch_size: int, max_length: int, lora_r: int = 0, device: str = "cpu",
         strategy: str = "single") -> None:
    torch.set_num_threads(1)
    words = " ".join(f"word{i}" for i in range(max_length))  # more tokens than max_length
    out = Path(tempfile.mkdtemp()) / "run"
    load_tokenizer(model_dir)  # the tokenizer library's first load (about 130 MB of its own) is not the run's
    baseline = resident()
    mark = trace(baseline) if os.environ.get("MEMORY_PROBE_TRACE") == "1" else lambda phase: None
    if kind == "sft":
        train = [SFTExample([{"role": "user", "content": f"Question {i}"}], words) for i in range(2 * batch_size)]
        config = SFTConfig(batch_size=batch_size, max_length=max_length, lora_r=lora_r, eval_batch_size=1,
                           device=device, strategy=strategy)
        train_sft(config, train, train[:1], base_path=model_dir, output_dir=out)
    elif kind == "ppo":  # one minibatch per step; prompts and responses max_length tokens each
        from transformers import AutoModelForSequenceClassification

        from trainer.ppo import train_ppo

        reward = out.parent / "reward"  # an untrained reward head on the same model
        AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).save_pretrained(reward)
        load_tokenizer(model_dir).save_pretrained(reward)
        gc.collect()
        baseline = resident()
        config = PPOConfig(steps=2, batch_size=batch_size, mini_batch_size=batch_size, ppo_epochs=1,
                           max_new_tokens=max_length, max_prompt_length=max_length, normalisation_prompts=0,
                           validation_samples=0, lora_r=lora_r, device=device, strategy=strategy)
        train_ppo(config, [[{"role": "user", "content": words}]] * batch_size, policy_path=model_dir,
                  reference_path=model_dir, reward_path=reward, output_dir=out)
    else:
        groups = [RankedGroup([{"role": "user", "content": f"Question {i}"}], [words, "a " + words], [1, 2])
                  for i in range(2 * batch_size)]
        config = RewardConfig(epochs=1, batch_size=batch_size, max_length=max_length, lora_r=lora_r,
                              eval_batch_size=1, learning_curve=False, probe_init=False, device=device,
                              strategy=strategy)
        train_reward_model(config, groups, groups[:1], model_path=model_dir, output_dir=out)
    mark("trained")
    peak = peak_resident()
    if device == "cuda":
        baseline, peak = 0, torch.cuda.max_memory_allocated()
    prompt = len(encode_prompt(load_tokenizer(model_dir), [{"role": "user", "content": "Question 0"}]))
    print(json.dumps({"baseline": baseline, "peak": peak, "delta": peak - baseline, "prompt_tokens": prompt}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), *sys.argv[6:8])
