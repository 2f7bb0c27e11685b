"""How much memory a training run needs per device, before it starts.

Pure arithmetic on a model's config.json (no torch, no weights loaded): the web
app calls it to show the estimate on the training forms and to refuse a run that
cannot fit the workers' devices, naming the settings that would make it fit.
`python -m trainer.memory` prints the README's "Scaling up" table.

What a run holds, per device:
- weights: every model the run keeps (SFT: the policy; reward: the model and its
  scalar head; PPO: policy, reference, reward model and value model; DPO: policy
  and reference). Trained weights are float32 (the optimizer's master copy);
  frozen models and the frozen base under LoRA take the run's weight dtype (bf16
  on CUDA, float32 on CPU; the LoRA base of a reward or value model stays
  float32). With LoRA and one base, PPO's and DPO's reference is
  the policy with its adapters off: no second copy.
- grads: one per trained weight, float32; with tied input and output embeddings
  their two gradients are summed, so one more embedding-sized gradient at a time.
- runtime: the framework's own memory: on CUDA the context, kernels and the
  allocator's cache (about 1 GiB), on the CPU about 64 MiB.
- optimizer: AdamW's two moments, float32 (8 bytes per trained weight), or 2
  bytes with 8-bit AdamW.
- activations: what one micro-batch's forward pass keeps for the backward pass
  (every decoder layer's intermediate tensors, or only each layer's input with
  gradient checkpointing, plus one layer recomputed), and the float32 logits,
  log-softmax and their gradients over the vocabulary for the tokens that carry
  a loss; PPO's rollouts hold a KV cache instead, whichever is larger counts.
- strategies: single and ddp hold everything on each device (ddp on several also
  a bucketed copy of the gradients to all-reduce), each process taking its share
  of every batch; zero2 shards grads and optimizer state over the devices; fsdp
  and zero3 shard weights too (the frozen models as well), gathering one layer's
  weights at a time besides the embeddings. Their gradients are sharded as the
  backward pass frees the activations, so it peaks at its start (the activations
  and the output head's full gradient) or at its end (every gradient shard, the
  embeddings' full gradient and its reduce-scatter copy), whichever is larger.
  NCCL and gloo alike reduce-scatter (gloo has reduce_scatter_tensor): the same
  on CUDA and on the CPU, where fsdp's runtime memory is smaller (malloc's fixed
  mmap threshold, trainer/distributed.py). At the end the main process gathers
  the saved model's full weights into host memory after dropping the optimizer's
  state: on the CPU that is the peak where the state was the smaller (many
  devices, 8-bit AdamW, LoRA).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

GiB = 1024**3
KINDS = ("sft", "reward", "ppo", "dpo")
STRATEGIES = ("single", "ddp", "fsdp", "zero2", "zero3")
SHARD_WEIGHTS = ("fsdp", "zero3")
SHARD_STATE = ("fsdp", "zero2", "zero3")
BYTES = {"fp32": 4, "bf16": 2}
RUNTIME = {"cpu": 64 * 1024**2, "cuda": GiB}
# FSDP on the CPU fixes malloc's mmap threshold (trainer/distributed.py), so the heap keeps less of what was
# freed: what a process holds besides its shards after fully_shard (36 to 40 MiB, SmolLM2-135M and a tiny Llama).
RUNTIME_FSDP_CPU = 40 * 1024**2
CHECKPOINTING_ABOVE = 1_000_000_000  # gradient checkpointing is on by default for models over 1B parameters


@dataclass(frozen=True)
class Architecture:
    """The sizes of a decoder-only transformer (Llama-like: gated MLP, grouped-query attention)."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool = True

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Architecture:
        """From a transformers config.json (Llama, Mistral, Qwen, Gemma and GPT-2 names)."""
        config = config.get("text_config") or config

        def pick(*names: str, default: Any = None) -> Any:
            for name in names:
                if config.get(name) is not None:
                    return config[name]
            if default is None:
                raise ValueError(f"config.json has none of {', '.join(names)}")
            return default

        hidden = int(pick("hidden_size", "n_embd", "d_model"))
        heads = int(pick("num_attention_heads", "n_head"))
        return cls(
            vocab=int(pick("vocab_size")),
            hidden=hidden,
            layers=int(pick("num_hidden_layers", "n_layer", "num_layers")),
            intermediate=int(pick("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
            heads=heads,
            kv_heads=int(pick("num_key_value_heads", default=heads)),
            head_dim=int(pick("head_dim", default=hidden // heads)),
            tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        )

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of one decoder layer's linear layers (those LoRA adapts)."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def parameters(self, head: str = "lm") -> int:
        """Weights of the causal LM (head="lm") or of the sequence classifier with its
        scalar head (head="score")."""
        per_layer = sum(a * b for a, b in self.linear_shapes()) + 2 * self.hidden  # two RMSNorms
        embeddings = self.vocab * self.hidden
        out = (0 if self.tied_embeddings else self.vocab * self.hidden) if head == "lm" else self.hidden
        return embeddings + self.layers * per_layer + self.hidden + out

    def lora_parameters(self, r: int) -> int:
        """Adapter weights of rank r on every linear layer of the decoder."""
        return self.layers * sum(r * (a + b) for a, b in self.linear_shapes())


def read_architecture(path: str | Path) -> Architecture:
    """The architecture in a checkpoint directory's config.json. Raises ValueError
    when it is missing or unreadable."""
    file = Path(path) / "config.json"
    try:
        return Architecture.from_config(json.loads(file.read_text()))
    except FileNotFoundError as error:
        raise ValueError(f"{file} does not exist: the model's size is unknown") from error
    except (ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"{file} is not a transformers config ({error}): the model's size is unknown") from error


@dataclass(frozen=True)
class Run:
    """What a run does, as far as memory goes."""

    kind: str  # sft | reward | ppo | dpo
    rows: int  # sequences per forward pass with gradients (a micro-batch)
    length: int  # tokens per sequence
    loss_tokens: int  # tokens per sequence with logits over the vocabulary (0: a scalar head only)
    dtype: str = "fp32"  # frozen weights and activations: fp32 (CPU) or bf16 (CUDA)
    lora_r: int = 0
    strategy: str = "single"
    devices: int = 1
    gradient_checkpointing: bool = False
    adam_8bit: bool = False
    separate_reference: bool = True  # PPO, DPO: a reference checkpoint other than the policy's
    rollout_rows: int = 0  # PPO: sequences sampled at once (the KV cache)
    device: str = "cpu"  # cpu | cuda: the runtime's own memory

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        if self.device not in RUNTIME:
            raise ValueError(f"device must be one of {', '.join(RUNTIME)}, not {self.device!r}")
        if self.dtype not in BYTES:
            raise ValueError(f"dtype must be one of {', '.join(BYTES)}, not {self.dtype!r}")
        if self.devices < 1 or (self.strategy == "single" and self.devices != 1):
            raise ValueError(f"devices must be 1 with strategy single and at least 1 otherwise, not {self.devices}")


@dataclass(frozen=True)
class Estimate:
    """Bytes per device."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.runtime

    def as_gib(self) -> dict[str, float]:
        return {name: round(value / GiB, 2) for name, value in asdict(self).items()} | {
            "total": round(self.total / GiB, 2)}


def _layer_activations(arch: Architecture, tokens: int, dtype_bytes: int, checkpointing: bool) -> int:
    """Bytes one forward pass over `tokens` keeps for the backward pass in the decoder layers."""
    h, q, kv, i = arch.hidden, arch.q_dim, arch.kv_dim, arch.intermediate
    # Per token and layer: the two norms' inputs and outputs (4h), the residual sums and o_proj's output (3h);
    # q projected, rotated and attended (3q); k and v projected, k rotated, the rotation's temporary (4kv); the
    # gated MLP's gate, up, silu(gate) and their product (4i).
    full_layer = (7 * h + 3 * q + 4 * kv + 4 * i) * tokens * dtype_bytes
    if checkpointing:
        return arch.layers * h * tokens * dtype_bytes + full_layer  # each layer's input, one layer recomputed
    return arch.layers * full_layer


def _head_activations(arch: Architecture, rows: int, loss_tokens: int, copies: int = 3) -> int:
    """Logits over the vocabulary for the loss tokens, float32: three copies at the start of the backward
    pass (the log-softmax, the loss's gradient and the log-softmax's gradient); PPO's scoring pass without
    gradients holds five (logits, scaled logits, log-softmax, and the entropy's probabilities and product)."""
    return copies * rows * loss_tokens * arch.vocab * 4


def estimate(arch: Architecture, run: Run) -> Estimate:
    """Peak bytes per device of a training run (see the module's docstring)."""
    low = BYTES[run.dtype]
    lm, scored = arch.parameters("lm"), arch.parameters("score")
    lora = arch.lora_parameters(run.lora_r) if run.lora_r else 0

    # (trained weights, frozen weights in the run's dtype, frozen float32 weights) of each model the run holds;
    # a scalar-head model under LoRA keeps its base float32 (its head is trained in it)
    policy = (lm, 0, 0) if not lora else (lora, lm, 0)
    scalar = (scored, 0, 0) if not lora else (lora + arch.hidden, 0, scored - arch.hidden)
    reference = (0, lm, 0) if (run.separate_reference or not lora) else (0, 0, 0)
    held = {"sft": [policy], "reward": [scalar], "dpo": [policy, reference],
            "ppo": [policy, reference, (0, scored, 0), scalar]}[run.kind]  # PPO's value model: from the RM
    trained, frozen, frozen_fp32 = (sum(parts) for parts in zip(*held))

    weight_shards = run.devices if run.strategy in SHARD_WEIGHTS else 1
    state_shards = run.devices if run.strategy in SHARD_STATE else 1
    weights = (trained * 4 + frozen * low + frozen_fp32 * 4) / weight_shards
    grads = trained * 4 / state_shards
    # The unit of weights outside the decoder layers: the embeddings (and an untied output head).
    outer = arch.vocab * arch.hidden * (1 if arch.tied_embeddings or run.kind == "reward" else 2)
    head_grad = arch.vocab * arch.hidden * 4 if run.kind in ("sft", "dpo", "ppo") and not lora else 0
    end_of_backward = None
    if weight_shards > 1:
        # Gathered in full for the forward and backward: one layer's weights at a time, and the outer unit
        # (FSDP's root, not resharded until the step ends).
        weights += (sum(a * b for a, b in arch.linear_shapes()) + outer) * low
        if not lora:
            # Each unit's gradient is sharded as the backward pass frees the activations it needed; the outer
            # unit's comes last: its full gradient (the output head's summed in since the start) and the
            # reduce-scatter's flat copy, beside every other unit's shard.
            end_of_backward = grads + 2 * outer * 4
    elif run.strategy == "ddp" and run.devices > 1:  # DDP's buckets: a copy of every gradient to all-reduce
        grads += trained * 4
    if arch.tied_embeddings and head_grad and end_of_backward is None:  # the summed embedding gradient
        grads += head_grad
    optimizer = trained * (2 if run.adam_8bit else 8) / state_shards

    tokens = run.rows * run.length
    checkpointing = run.gradient_checkpointing
    if run.kind == "reward":
        activations = _layer_activations(arch, tokens, low, checkpointing)
    elif run.kind in ("sft", "dpo"):  # DPO's reference log-probs come without gradients, one batch at a time
        activations = (_layer_activations(arch, tokens, low, checkpointing)
                       + _head_activations(arch, run.rows, run.loss_tokens))
    else:  # ppo: the policy's and the value model's passes, the scoring of a minibatch, or the rollouts' KV cache
        train = 2 * _layer_activations(arch, tokens, low, checkpointing) + _head_activations(arch, run.rows,
                                                                                             run.loss_tokens)
        scoring = _head_activations(arch, run.rows, run.loss_tokens, copies=5)
        rollout = run.rollout_rows * (2 * arch.layers * arch.kv_dim * run.length * low + 2 * arch.vocab * 4)
        activations = max(train, scoring, rollout)
    if end_of_backward is not None:
        # The backward pass peaks at its start (the activations and the output head's full gradient) or at its
        # end (the gradients above), not both at once.
        grads = max(head_grad, end_of_backward - activations)
    if weight_shards > 1 and run.device == "cpu":
        # At the end the main process gathers the saved model's weights in full (the first model held) into host
        # memory, once the optimizer's state, the gradients and the activations are gone (trainer/distributed.py's
        # unwrapped); on CUDA the GPUs do not hold them.
        saved_trained, saved_frozen, saved_frozen_fp32 = held[0]
        saved = saved_trained * 4 + saved_frozen * low + saved_frozen_fp32 * 4
        weights += max(0, saved - (optimizer + grads + activations))
    runtime = RUNTIME_FSDP_CPU if run.strategy == "fsdp" and run.devices > 1 and run.device == "cpu" else \
        RUNTIME[run.device]
    return Estimate(weights=math.ceil(weights), grads=math.ceil(grads), optimizer=math.ceil(optimizer),
                    activations=math.ceil(activations), runtime=runtime)


def run_of(kind: str, config: Any, *, responses: int = 2, dtype: str = "fp32", strategy: str = "single",
           devices: int = 1, parameters: int | None = None, separate_reference: bool = True) -> Run:
    """The Run of a trainer config (trainer.configs' SFTConfig, RewardConfig, PPOConfig, DPOConfig or a
    mapping of their fields) on `devices` processes, each taking its share of every batch.
    responses: how many responses each ranking holds (reward model, DPO). parameters: the model's size, for
    gradient checkpointing's "auto"."""
    get = config.get if isinstance(config, Mapping) else lambda name, default=None: getattr(config, name, default)
    checkpointing = get("gradient_checkpointing", "off" if kind == "dpo" else "auto")  # DPO does not checkpoint
    if checkpointing == "auto":
        checkpointing = parameters is not None and parameters > CHECKPOINTING_ABOVE
    common = dict(kind=kind, dtype=dtype, strategy=strategy, devices=devices, lora_r=int(get("lora_r", 0)),
                  gradient_checkpointing=bool(checkpointing) and checkpointing != "off",
                  adam_8bit=bool(get("adam_8bit", False)), separate_reference=separate_reference)

    def share(name: str) -> int:  # this process's rows of a batch (trainer/distributed.py's shard)
        return -(-int(get(name)) // devices)

    if kind == "sft":
        length = int(get("max_length"))
        return Run(rows=share("batch_size"), length=length, loss_tokens=length, **common)
    if kind == "reward":
        return Run(rows=share("batch_size") * responses, length=int(get("max_length")), loss_tokens=0, **common)
    if kind == "dpo":
        length = int(get("max_length"))
        return Run(rows=share("batch_size") * responses, length=length, loss_tokens=length, **common)
    if kind == "ppo":
        response = int(get("max_new_tokens"))
        return Run(rows=share("mini_batch_size"), length=int(get("max_prompt_length", 256)) + response,
                   loss_tokens=response + 1, rollout_rows=share("batch_size"), **common)
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")


def alternatives(arch: Architecture, run: Run, limit: int) -> list[tuple[str, Run, Estimate]]:
    """Changes of settings that bring the run under `limit` bytes per device, each on its own and then
    together, the cheapest first: gradient checkpointing, 8-bit AdamW, smaller batches, LoRA, ZeRO-3."""
    candidates: list[tuple[str, Run]] = []
    if not run.gradient_checkpointing:
        candidates.append(("gradient checkpointing on", replace(run, gradient_checkpointing=True)))
    if not run.adam_8bit and not run.lora_r:
        candidates.append(("8-bit AdamW", replace(run, adam_8bit=True)))
    batch = run.rows
    while batch > 1:
        batch //= 2
        candidates.append((f"a batch of {batch} sequences per pass", replace(run, rows=batch)))
    if not run.lora_r:
        candidates.append(("LoRA rank 16", replace(run, lora_r=16, separate_reference=False)))
    for devices in (2, 4, 8):
        if devices > run.devices or run.strategy not in SHARD_WEIGHTS:
            candidates.append((f"ZeRO-3 over {devices} GPUs", replace(run, strategy="zero3", devices=devices)))
    lean = replace(run, gradient_checkpointing=True, lora_r=run.lora_r or 16, separate_reference=False)
    for devices in (1, 2, 4, 8):
        together = lean if devices == 1 else replace(lean, strategy="zero3", devices=devices)
        where = "" if devices == 1 else f" and ZeRO-3 over {devices} GPUs"
        candidates.append((f"LoRA rank {together.lora_r} with gradient checkpointing{where}", together))
    fits = []
    for label, candidate in candidates:
        if (result := estimate(arch, candidate)).total <= limit:
            fits.append((label, candidate, result))
    return fits


def refusal(arch: Architecture, run: Run, limit: int, where: str) -> str | None:
    """None when the run fits `limit` bytes per device; else why not, with settings that would fit."""
    need = estimate(arch, run)
    if need.total <= limit:
        return None
    options = alternatives(arch, run, limit)
    message = (f"this run needs about {need.total / GiB:.1f} GiB per device and {where} has {limit / GiB:.1f} GiB"
               f" (weights {need.weights / GiB:.1f}, gradients {need.grads / GiB:.1f}, optimizer"
               f" {need.optimizer / GiB:.1f}, activations {need.activations / GiB:.1f} GiB).")
    if not options:
        return message + " No combination of LoRA, ZeRO-3 over up to 8 GPUs, smaller batches and gradient" \
                         " checkpointing fits: choose a smaller model."
    shown = "; ".join(f"{label} ({result.total / GiB:.1f} GiB)" for label, _, result in options[:4])
    return f"{message} Settings that would fit: {shown}."


# ---- the README's table ---------------------------------------------------------------

# Public configs of the three sizes (Llama 3.2 1B, Llama 3.1 8B and 70B).
REFERENCE_MODELS = {
    "1B": Architecture(vocab=128_256, hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8, head_dim=64),
    "8B": Architecture(vocab=128_256, hidden=4096, layers=32, intermediate=14_336, heads=32, kv_heads=8,
                       head_dim=128, tied_embeddings=False),
    "70B": Architecture(vocab=128_256, hidden=8192, layers=80, intermediate=28_672, heads=64, kv_heads=8,
                        head_dim=128, tied_embeddings=False),
}


def fewest_gpus(arch: Architecture, run: Run, gpu_bytes: int) -> tuple[str, Estimate] | None:
    """The fewest GPUs of gpu_bytes (up to 64) that hold the run, with the least sharding that does."""
    for devices in (1, 2, 4, 8, 16, 32, 64):
        for strategy in (("single",) if devices == 1 else ("ddp", "zero2", "zero3")):
            result = estimate(arch, replace(run, devices=devices, strategy=strategy))
            if result.total <= gpu_bytes:
                return f"{devices} × {strategy}", result
    return None


H100_GIB = 81_559 / 1024  # what an "80 GB" H100 reports (nvidia-smi: 81,559 MiB); an A100 80GB has 80 GiB


def scaling_table(gpu_gib: float = H100_GIB) -> str:
    """A markdown table: for each model size and job kind, the fewest GPUs of gpu_gib that hold it with full
    fine-tuning and with LoRA (rank 16; PPO's reference is the policy with its adapters off), with the
    memory per GPU. bf16 frozen weights and activations, gradient checkpointing on, the trainers' default
    batches; SFT and reward model at 1024 tokens, PPO with 512-token prompts and responses."""
    from trainer.configs import PPOConfig, RewardConfig, SFTConfig

    kinds = (("sft", SFTConfig(max_length=1024)), ("reward", RewardConfig(max_length=1024)),
             ("ppo", PPOConfig(max_new_tokens=512, max_prompt_length=512)))
    rows = ["| Model | Training | SFT | Reward model | PPO |", "|---|---|---|---|---|"]
    for name, arch in REFERENCE_MODELS.items():
        for lora in (0, 16):
            cells = []
            for kind, config in kinds:
                run = replace(run_of(kind, config, dtype="bf16", parameters=arch.parameters()), device="cuda",
                              gradient_checkpointing=True, lora_r=lora, separate_reference=not lora)
                found = fewest_gpus(arch, run, int(gpu_gib * GiB))
                cells.append(f"{found[0]} ({found[1].total / GiB:.0f} GiB)" if found else "over 64 GPUs")
            training = "LoRA r=16" if lora else "full"
            rows.append(f"| {name} ({arch.parameters() / 1e9:.1f} B) | {training} | {' | '.join(cells)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(scaling_table())
