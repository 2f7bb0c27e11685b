"""Pieces shared by reward-model training and PPO: tokenising chat prompts,
padding, masks, per-token log-probs, whitening, lr schedules, checkpoints.

Conventions used everywhere in the trainer:
- A prompt is a list of chat messages ({"role", "content"}); it is encoded with
  the tokenizer's chat template and the generation prompt, exactly as the
  policy sees it when sampling. A response is its text followed by EOS.
- Prompts are LEFT-padded (so every response starts at the same column,
  `context_length`), responses are RIGHT-padded after their first EOS.
  Masks are always explicit tensors: SmolLM2's pad token is its EOS, so
  "input_ids != pad_token_id" would mask the very EOS the reward head reads.
- Position ids come from the attention mask (cumsum - 1), so a left-padded
  row sees the same positions as the unpadded sequence.
"""

import contextlib
import json
import math
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

Messages = list[dict[str, str]]

CONFIG_FILE = "workbench.json"  # our training config, normalisation and metrics, beside config.json


class Cancelled(Exception):
    """Raised by a training function when its should_stop() callback said so."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA


def prepare_tokenizer(tokenizer):
    """Give the tokenizer a pad token distinct from EOS where the vocabulary has one.

    SmolLM2 ships pad == eos (<|im_end|>). Our masks never rely on the pad id,
    but other code does (HF sequence-classification pooling, generate's
    stopping bookkeeping), so we take another existing special token
    (<|endoftext|> for SmolLM2) rather than add a new embedding row.
    """
    eos = tokenizer.eos_token
    assert eos is not None, "the tokenizer has no EOS token; responses could never end"
    if tokenizer.pad_token is None or tokenizer.pad_token == eos:
        candidates = [tokenizer.unk_token, *tokenizer.all_special_tokens]
        distinct = [t for t in candidates if t is not None and t not in (eos, tokenizer.bos_token)]
        tokenizer.pad_token = distinct[0] if distinct else eos
    tokenizer.padding_side = "left"  # for prompts; responses are padded by hand
    return tokenizer


def encode_prompt(tokenizer, messages: Messages, max_prompt_length: int | None = None) -> list[int]:
    """Chat-template the messages with the assistant generation prompt; keep the last tokens if too long."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        ids = ids[-max_prompt_length:]  # the end of a prompt (the question, the generation prompt) matters most
    return ids


def encode_response(tokenizer, text: str) -> list[int]:
    """A response as the policy would have produced it: its tokens then EOS."""
    return tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s):] = torch.tensor(s)
            mask[row, width - len(s):] = 1
    return ids, mask


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return ids, mask


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of the rightmost real token of each row, whatever the padding side."""
    T = attention_mask.shape[-1]
    columns = torch.arange(T, device=attention_mask.device)
    assert bool((attention_mask.sum(-1) > 0).all()), "a row has no real token"
    return (attention_mask.long() * columns).argmax(-1)  # (B,)


def truncate_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each response up to and including its first EOS; pad the rest.

    Returns (responses, mask, ended): ended[b] is False for a response that
    never produced EOS (it ran out of max_new_tokens).
    """
    B, R = responses.shape
    is_eos = responses == eos_id  # (B, R)
    ended = is_eos.any(-1)  # (B,)
    first_eos = torch.where(ended, is_eos.float().argmax(-1), torch.full_like(ended, R - 1, dtype=torch.long))  # (B,)
    columns = torch.arange(R, device=responses.device).expand(B, R)
    mask = columns <= first_eos.unsqueeze(-1)  # (B, R)
    return responses.masked_fill(~mask, pad_id), mask.long(), ended


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Zero mean, unit variance over the real tokens only (padding would drag both)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if n > 1:
        var = var * n / (n - 1)  # unbiased, as TRL and OpenAI's lm-human-preferences do
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def response_logprobs(model, query_response: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
                      temperature: float, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the response tokens (columns context_length:) under the model.

    The logits are divided by the sampling temperature first: the samples came
    from softmax(logits / T), so that is the distribution whose ratios PPO
    takes (N implementation details of RLHF, "temperature").
    """
    R = query_response.shape[1] - context_length
    responses = query_response[:, context_length:]  # (B, R)
    output = model(
        input_ids=query_response,
        attention_mask=attention_mask,
        position_ids=position_ids_from(attention_mask),
        logits_to_keep=R + 1,  # only the logits that predict response tokens (and one spare)
        use_cache=False,
    )
    logits = output.logits[:, :-1].float() / temperature  # (B, R, V): column t predicts response token t
    logprobs_all = torch.log_softmax(logits, dim=-1)  # (B, R, V)
    logprobs = logprobs_all.gather(-1, responses.unsqueeze(-1)).squeeze(-1)  # (B, R)
    entropy = None
    if with_entropy:
        entropy = -(logprobs_all.exp() * logprobs_all).sum(-1)  # (B, R)
    return logprobs, entropy


def generate_exactly(model, generation_config, **inputs) -> torch.Tensor:
    """model.generate(**inputs) sampling with generation_config and nothing else.

    In transformers 5, generate() fills every field the config leaves unset
    (None) from the checkpoint's generation_config.json: a checkpoint that sets
    min_p, top_h, epsilon_cutoff, repetition_penalty or no_repeat_ngram_size
    would change the distribution sampled, while PPO's log-probs (and the
    settings we record) assume only ours. The model's own config is blanked
    for the call, so only the library's neutral defaults fill the gaps.
    """
    from transformers import GenerationConfig

    core = model.get_base_model() if hasattr(model, "get_base_model") else model  # a LoRA wrapper reads it here
    saved = core.generation_config
    core.generation_config = GenerationConfig()
    try:
        return model.generate(**inputs, generation_config=generation_config)
    finally:
        core.generation_config = saved


def sequence_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the tokens where loss_mask is 1 (the SFT / ptx loss).

    Only the columns from the first loss token on get logits (a (B, T, V)
    tensor is most of the memory for a small model with a big vocabulary):
    left-pad the sequences so the responses line up at the end.
    """
    T = input_ids.shape[1]
    used = loss_mask.bool().any(0)  # (T,)
    assert bool(used.any()), "no token to compute a loss on"
    first = int(used.float().argmax())  # first column holding a loss token
    first = max(first, 1)  # column 0 has nothing before it to predict it
    output = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from(attention_mask), logits_to_keep=T - first + 1, use_cache=False)
    logits = output.logits[:, :-1].float()  # (B, T - first, V): column t predicts token first + t
    targets = input_ids[:, first:]  # (B, T - first)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T - first)
    return masked_mean(nll, loss_mask[:, first:])


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at an optimizer step: warmup, then linear/cosine decay to 0."""
    assert schedule in ("linear", "cosine", "constant"), schedule

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA (weights and optimizer stay float32); nothing elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def add_lora(model, *, r: int, alpha: int, dropout: float, task_type: str):
    """Wrap the model with LoRA adapters; needs the optional `peft` package."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise RuntimeError("LoRA needs the optional package peft: pip install 'rlhf-workbench[lora]'") from error
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type=task_type, target_modules="all-linear")
    return get_peft_model(model, config)


def unwrap_lora(model):
    """A plain transformers model: LoRA adapters merged in, if there are any."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def save_checkpoint(model, tokenizer, output_dir: Path, extra: dict) -> Path:
    """Write weights (safetensors), config, tokenizer and our JSON all at once, or nothing.

    The files are written to a temporary sibling directory that is renamed
    into place, so a crash never leaves a half-written checkpoint behind.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} exists and is not empty")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
        if output_dir.exists():
            output_dir.rmdir()
        tmp.rename(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def read_workbench_json(path: Path) -> dict:
    file = Path(path) / CONFIG_FILE
    return json.loads(file.read_text()) if file.exists() else {}



def apply_gradient_checkpointing(model, setting: str) -> bool:
    """Recompute each decoder layer's activations in the backward pass (setting "on", or "auto" for models
    over 1B parameters: trainer.memory's rule). Our trainers keep their models in eval mode (no dropout),
    where transformers skips checkpointing; only the decoder layers themselves are marked as training, so
    dropout stays off. Call after the trainer's last eval(). Returns whether it is on."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from trainer.memory import CHECKPOINTING_ABOVE

    on = setting == "on" or (setting == "auto" and sum(p.numel() for p in model.parameters()) > CHECKPOINTING_ABOVE)
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for module in model.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module.training = True  # this module only: its dropout children keep their mode
    return on


def make_adamw(params, *, lr: float, weight_decay: float, adam_8bit: bool, device: torch.device, **options):
    """torch's AdamW (options such as eps, fused), or bitsandbytes' 8-bit AdamW (2 bytes of state per
    weight instead of 8) when adam_8bit; a clear error when that cannot run here."""
    if not adam_8bit:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **options)
    try:
        import bitsandbytes
    except ImportError as error:
        raise RuntimeError("8-bit AdamW (adam_8bit) needs the optional package bitsandbytes:"
                           " pip install bitsandbytes") from error
    if device.type != "cuda":
        raise RuntimeError(f"8-bit AdamW (adam_8bit) runs on CUDA only; this run is on {device.type}")
    options.pop("fused", None)
    return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, **options)
