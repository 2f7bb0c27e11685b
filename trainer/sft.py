"""Supervised fine-tuning on demonstrations (step 1 of the InstructGPT recipe).

Labelers write the response they would want for a prompt; the pretrained model
is fine-tuned on those (prompt, response) pairs with the ordinary next-token
loss, counted ONLY on the response: the prompt, the system prompt the chat
template adds and the template's role markers are context, not targets
(InstructGPT section 3.5; TRL's `completion_only_loss`).

An example is tokenised exactly as the policy later sees and produces it:
the prompt is the chat template applied to the messages with the assistant
generation prompt (trainer.common.encode_prompt), the response is what the
template puts after it for the assistant turn, up to and including the EOS
that closes the turn (SmolLM2: "<|im_end|>"). Template tokens after that EOS
(a newline) are dropped: the model stops at EOS, it never produces them.

Packing puts several whole examples in one row of up to max_length tokens.
Each example's position ids restart at 0 and no attention mask is passed, so
transformers builds a block-diagonal causal mask (masking_utils
find_packed_sequence_indices): an example never attends to its neighbours and
its loss is the same as unpacked. Packing only saves the padding.

The loss of an optimizer step is the sum of the response tokens' negative
log-likelihood divided by the number of response tokens in the whole step
(all micro-batches), so gradient accumulation and packing do not change what
a token weighs (transformers issue #34242 "gradient accumulation loss").
"""

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from trainer.common import (
    Messages,
    add_lora,
    apply_gradient_checkpointing,
    autocast,
    encode_prompt,
    lr_lambda,
    make_adamw,
    prepare_tokenizer,
    read_workbench_json,
    save_checkpoint,
    seed_everything,
    unwrap_lora,
)
from trainer.configs import SFTConfig
from trainer.distributed import Runtime, runtime
from trainer.models import load_tokenizer, pick_dtype

log = logging.getLogger(__name__)

IGNORE = -100  # the label of a token that is not learned (PyTorch's cross_entropy ignore_index)


class SFTExample(NamedTuple):
    """One demonstration: the conversation so far (ending with a user turn) and the response to learn."""

    messages: Messages
    response: str


@dataclass
class SFTResult:
    output_dir: Path
    metrics: dict[str, float]  # final figures: val_loss, initial_val_loss, train_loss, tokens_per_s, ...
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per optimizer step / evaluation


class Tokenised(NamedTuple):
    input_ids: list[int]
    labels: list[int]  # IGNORE for prompt and template tokens, the token id for response tokens


# ---- data -------------------------------------------------------------------------

def completion_ids(tokenizer, messages: Messages, response: str) -> list[int]:
    """The tokens the chat template puts after the generation prompt for this assistant
    response, up to and including the EOS that ends the turn."""
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": response}], tokenize=False
    )
    # A template that rewrites earlier turns once an answer follows (some drop the
    # reasoning of past turns) would make the prompt differ from what the policy sees.
    assert full_text.startswith(prompt_text), "the chat template changes the prompt when an answer follows it"
    ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    if eos in ids:
        return ids[: ids.index(eos) + 1]
    return ids + [eos]  # a template that ends the turn with another token: EOS still ends the response


def tokenise_example(tokenizer, example: SFTExample, max_length: int) -> tuple[Tokenised, bool]:
    """prompt + response tokens with the loss mask (labels). Too long: the prompt keeps its
    last tokens (at least half the length when the response is long), then the response
    is cut at the end. Returns (tokenised, truncated)."""
    prompt = encode_prompt(tokenizer, example.messages)
    completion = completion_ids(tokenizer, example.messages, example.response)
    truncated = len(prompt) + len(completion) > max_length
    if truncated:
        keep_prompt = min(len(prompt), max(max_length // 2, max_length - len(completion)))
        prompt = prompt[len(prompt) - keep_prompt:]
        completion = completion[: max_length - keep_prompt]
    ids = prompt + completion
    labels = [IGNORE] * len(prompt) + completion
    assert len(ids) == len(labels) <= max_length
    return Tokenised(ids, labels), truncated


def _tokenise_all(tokenizer, examples: list[SFTExample], max_length: int, name: str) -> tuple[list[Tokenised], int]:
    out, truncated = [], 0
    for index, example in enumerate(examples):
        messages, response = example
        where = f"{name} example {index}"
        if not messages:
            raise ValueError(f"{where}: the prompt has no messages")
        if messages[-1].get("role") != "user":
            raise ValueError(f"{where}: the prompt must end with a user turn, not {messages[-1].get('role')!r}")
        if not isinstance(response, str) or not response.strip():
            raise ValueError(f"{where}: the response is empty")
        tokenised, cut = tokenise_example(tokenizer, SFTExample(messages, response), max_length)
        out.append(tokenised)
        truncated += cut
    return out, truncated


class Batch(NamedTuple):
    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T); None for packed rows (the positions mark the examples)
    tokens: int  # response tokens (the loss's denominator)
    real_tokens: int  # tokens that are not padding


def pad_batch(rows: list[Tokenised], pad_id: int) -> Batch:
    """One example per row, right-padded, with an attention mask."""
    T = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        ids[b, :n] = torch.tensor(r.input_ids)
        labels[b, :n] = torch.tensor(r.labels)
        mask[b, :n] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return Batch(ids, labels, positions, mask, int((labels[:, 1:] != IGNORE).sum()), int(mask.sum()))


def pack_rows(examples: list[Tokenised], max_length: int, order: list[int]) -> list[list[Tokenised]]:
    """Whole examples packed into rows of at most max_length tokens: first fit, longest
    first (ties in `order`), so rows fill well and nothing is cut."""
    ranked = sorted(order, key=lambda i: -len(examples[i].input_ids))  # stable: ties keep the shuffled order
    rows: list[list[Tokenised]] = []
    room: list[int] = []
    for i in ranked:
        n = len(examples[i].input_ids)
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([])
            room.append(max_length)
            slot = len(rows) - 1
        rows[slot].append(examples[i])
        room[slot] -= n
    return rows


def packed_batch(rows: list[list[Tokenised]], pad_id: int) -> Batch:
    """Rows of several examples; each example's positions restart at 0 (a block-diagonal mask)."""
    flat = [
        (sum((e.input_ids for e in row), []), sum((e.labels for e in row), []),
         sum((list(range(len(e.input_ids))) for e in row), []))
        for row in rows
    ]
    T = max(len(ids) for ids, _, _ in flat)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)  # (B, T)
    # Padding is one more "example" whose positions start at 0: it attends only to itself.
    positions = torch.arange(T).repeat(len(rows), 1)  # (B, T)
    for b, (row_ids, row_labels, row_positions) in enumerate(flat):
        n = len(row_ids)
        ids[b, :n] = torch.tensor(row_ids)
        labels[b, :n] = torch.tensor(row_labels)
        positions[b, :n] = torch.tensor(row_positions)
        positions[b, n:] = torch.arange(T - n)
    return Batch(ids, labels, positions, None, int((labels[:, 1:] != IGNORE).sum()), sum(len(f[0]) for f in flat))


Row = Tokenised | list[Tokenised]  # one example, or a packed row of examples


def row_tokens(row: Row) -> tuple[int, int]:
    """(response tokens the loss counts, real tokens) of a row: what pad_batch / packed_batch
    count as Batch.tokens and Batch.real_tokens, without building the tensors."""
    labels = row.labels if isinstance(row, Tokenised) else [label for e in row for label in e.labels]
    return sum(1 for label in labels[1:] if label != IGNORE), len(labels)


# ---- the loss ---------------------------------------------------------------------

def _core(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # through a LoRA wrapper


def response_nll_sum(model, batch: Batch, device: torch.device, mixed_precision: bool = False) -> torch.Tensor:
    """Sum of -log p(token) over the batch's response tokens.

    The LM head runs on the response positions only: a (B, T, V) logits tensor
    (V = 49k for SmolLM2) is most of the memory and time of a small model, and
    the prompt's logits are never used.
    """
    core = _core(model)
    # Models that transform their logits after the head cannot take this short cut.
    assert not getattr(core.config, "final_logit_softcapping", None), "logit soft-capping is not supported"
    ids = batch.input_ids.to(device)
    with autocast(device, mixed_precision):
        hidden = core.get_decoder()(
            input_ids=ids,
            attention_mask=batch.attention_mask.to(device) if batch.attention_mask is not None else None,
            position_ids=batch.position_ids.to(device),
            use_cache=False,
        ).last_hidden_state  # (B, T, D)
        targets = batch.labels[:, 1:].to(device)  # (B, T-1): column t is predicted at t-1
        keep = targets != IGNORE  # (B, T-1)
        logits = core.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V), N response tokens
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


@torch.no_grad()
def evaluate_loss(model, examples: list[Tokenised], pad_id: int, device: torch.device,
                  batch_size: int, mixed_precision: bool = False, rt: Runtime | None = None) -> float:
    """Mean negative log-likelihood per response token over all examples (token-weighted).
    With several processes (rt), each scores its shard through the engine and the sums are reduced."""
    was_training = model.training
    model.eval()
    rt = rt if rt is not None else Runtime(1, 0, device)
    total, tokens = 0.0, 0
    for rows, real in rt.batches(examples, batch_size):
        batch = pad_batch(rows, pad_id)
        nll = rt.run(response_nll_sum, model, batch, device, mixed_precision).item()
        if real:
            total += nll
            tokens += batch.tokens
    model.train(was_training)
    total, tokens = rt.sum([total, tokens])
    return total / max(1, tokens)


# ---- training ---------------------------------------------------------------------

def train_sft(
    config: SFTConfig,
    train_examples: list[SFTExample],
    validation_examples: list[SFTExample],
    *,
    base_path: str | Path,
    output_dir: Path,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SFTResult:
    """Fine-tune the causal LM at base_path on the demonstrations, report the validation
    loss before training and after each epoch, save weights (safetensors), config,
    tokenizer and our settings to output_dir.

    validation_examples should hold prompts never seen in training. Raises
    ValueError for malformed data, Cancelled when should_stop() says so
    (nothing is saved then). Under a launcher with several processes each
    trains on its shard of every batch (trainer/distributed.py); rank 0 alone
    calls on_step and should_stop and saves.
    """
    started = time.perf_counter()
    history: list[dict[str, float]] = []

    # 0. seed and device; under a multi-process launch, this process's rank and device
    rt = runtime(config.device, config.strategy)
    device = rt.device
    seed_everything(config.seed)  # the same seed everywhere: the same shuffle in every process

    def report(step: int, metrics: dict[str, float]) -> None:
        history.append({"step": step, **metrics})
        if on_step is not None and rt.main:
            on_step(step, metrics)

    # 1. data: every example tokenised once, the loss mask beside it
    tokenizer = prepare_tokenizer(load_tokenizer(str(base_path)))
    pad_id = tokenizer.pad_token_id
    if not train_examples:
        raise ValueError("there are no training demonstrations")
    if not validation_examples:
        raise ValueError("there are no validation demonstrations")
    train, truncated = _tokenise_all(tokenizer, train_examples, config.max_length, "train")
    val, val_truncated = _tokenise_all(tokenizer, validation_examples, config.max_length, "validation")
    shuffle = random.Random(config.seed)

    def epoch_micro_batches() -> list[list[Row]]:
        """The epoch's micro-batches of rows (examples, or packed rows), in a seeded order."""
        order = list(range(len(train)))
        shuffle.shuffle(order)
        if config.packing:
            rows: list[Row] = pack_rows(train, config.max_length, order)
            shuffle.shuffle(rows)
        else:
            rows = [train[j] for j in order]
        return [rows[i:i + config.batch_size] for i in range(0, len(rows), config.batch_size)]

    def collate(rows: list[Row]) -> tuple[Batch, float]:
        """This process's shard of a micro-batch as tensors, with its loss weight: when the shard is
        empty, a stand-in row weighed 0 (every process makes the same forward and backward passes)."""
        local = rt.shard(rows)
        weight = 1.0 if local else 0.0
        local = local or rows[:1]
        return (packed_batch(local, pad_id) if config.packing else pad_batch(local, pad_id)), weight

    # First fit decreasing gives the same number of rows whatever the order of the examples.
    rows = len(pack_rows(train, config.max_length, list(range(len(train))))) if config.packing else len(train)
    micro_batches = -(-rows // config.batch_size)

    # 2. model: float32 trained weights (autocast does bf16 on CUDA); under LoRA the frozen base is bf16 on
    # CUDA (peft keeps the adapters float32)
    from transformers import AutoModelForCausalLM

    dtype = pick_dtype(device) if config.lora_r > 0 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=dtype).to(device)
    if config.lora_r > 0:
        model = add_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                         task_type="CAUSAL_LM")
    model.train()
    apply_gradient_checkpointing(model, config.gradient_checkpointing)

    # 3. optimizer and schedule; the model spread over the processes by the strategy
    steps_per_epoch = -(-micro_batches // config.gradient_accumulation_steps)
    total_steps = steps_per_epoch * config.epochs

    def make_optimizer() -> torch.optim.Optimizer:
        # The fused kernel: one pass over the weights instead of several (7x faster on CPU for 135M weights).
        return make_adamw([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                          weight_decay=config.weight_decay, adam_8bit=config.adam_8bit, device=device,
                          fused=device.type in ("cpu", "cuda"))

    optimizer = rt.prepare({"model": model}, make_optimizer, max_grad_norm=config.max_grad_norm,
                           accumulation=config.gradient_accumulation_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    warmup = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.lr_schedule, warmup, total_steps))

    initial_val_loss = evaluate_loss(model, val, pad_id, device, config.eval_batch_size, config.mixed_precision, rt)
    report(0, {"epoch": 0, "val_loss": initial_val_loss, "total_steps": total_steps})
    log.info("validation loss before training: %.4f", initial_val_loss)

    # 4. the loop: forward, summed response NLL / tokens of the step, backward, clip, step, log; evaluate each epoch.
    # Several processes: each takes its shard of every micro-batch; the denominator is the response tokens of the
    # whole step, so the summed gradients (Runtime.backward) are those of the whole step.
    step, tokens_seen, train_seconds = 0, 0, 0.0
    val_loss = initial_val_loss
    epoch_loss = 0.0
    for epoch in range(1, config.epochs + 1):
        micro = epoch_micro_batches()
        assert len(micro) == micro_batches
        batches = [collate(rows) for rows in micro]
        epoch_nll, epoch_tokens = 0.0, 0
        for first in range(0, len(batches), config.gradient_accumulation_steps):
            counts = [row_tokens(r) for rows in micro[first:first + config.gradient_accumulation_steps] for r in rows]
            window_tokens = sum(n for n, _ in counts)  # response tokens of the whole step, every process's
            window = batches[first:first + config.gradient_accumulation_steps]
            t0 = time.perf_counter()
            window_nll = 0.0
            for i, (batch, weight) in enumerate(window):
                if batch.tokens == 0 and not rt.distributed:
                    continue  # every response cut away by max_length: nothing to learn
                with rt.no_sync(i < len(window) - 1):  # the gradients are reduced once per step
                    nll = rt.run(response_nll_sum, model, batch, device, config.mixed_precision)
                    rt.backward(nll / max(1, window_tokens) if weight else nll * 0.0)
                window_nll += nll.item() * weight
            (window_nll,) = rt.sum([window_nll])
            grad_norm = rt.clip_grad_norm_(params, config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            train_seconds += time.perf_counter() - t0
            step += 1
            tokens_seen += sum(n for _, n in counts)
            epoch_nll += window_nll
            epoch_tokens += window_tokens
            report(step, {"epoch": epoch, "loss": window_nll / max(1, window_tokens), "grad_norm": float(grad_norm),
                          "lr": lr, "response_tokens": window_tokens})
            rt.agree_to_stop(should_stop, f"SFT stopped at step {step}")
        epoch_loss = epoch_nll / max(1, epoch_tokens)
        val_loss = evaluate_loss(model, val, pad_id, device, config.eval_batch_size, config.mixed_precision, rt)
        report(step, {"epoch": epoch, "train_loss": epoch_loss, "val_loss": val_loss})
        log.info("epoch %d: train loss %.4f, validation loss %.4f", epoch, epoch_loss, val_loss)

    # 5. save: LoRA merged in, weights, config, tokenizer, our settings and metrics
    model = unwrap_lora(rt.unwrapped("model"))
    model.eval()
    model.generation_config.pad_token_id = pad_id
    metrics = {
        "val_loss": val_loss, "initial_val_loss": initial_val_loss, "train_loss": epoch_loss,
        "steps": step, "epochs": config.epochs, "train_examples": len(train), "val_examples": len(val),
        "truncated_examples": truncated + val_truncated,
        # Prompt and response tokens (not padding) trained on per second of training steps.
        "tokens_per_s": tokens_seen / train_seconds if train_seconds > 0 else 0.0,
        "processes": rt.world, "seconds": time.perf_counter() - started,
    }
    if rt.main:
        save_checkpoint(model, tokenizer, output_dir, {
            "kind": "sft", "base_model": str(base_path), "config": asdict(config), "metrics": metrics,
        })
    rt.barrier()  # the checkpoint is in place when any process returns
    return SFTResult(output_dir=Path(output_dir), metrics=metrics, history=history)


def read_sft_checkpoint(path: str | Path) -> dict:
    """Our JSON beside an SFT checkpoint: its settings and metrics."""
    return read_workbench_json(Path(path))
