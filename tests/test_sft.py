"""Supervised fine-tuning: the loss mask, packing, learning, reproducibility, LoRA."""

import json

import pytest
import torch
from safetensors.torch import load_file

from trainer.common import Cancelled, encode_prompt
from trainer.models import load_tokenizer
from trainer.sft import (
    IGNORE,
    SFTConfig,
    SFTExample,
    pack_rows,
    packed_batch,
    pad_batch,
    read_sft_checkpoint,
    response_nll_sum,
    tokenise_example,
    train_sft,
)

SKY = "The sky is blue."
ROSE = "Roses are red."


def colour_example(i: int) -> SFTExample:
    """Two kinds of question, each with its own answer: the model must read the prompt."""
    if i % 2:
        return SFTExample([{"role": "user", "content": f"Question {i}: what colour is the sky?"}], SKY)
    return SFTExample([{"role": "user", "content": f"Question {i}: what colour is a rose?"}], ROSE)


def greedy(model_dir, messages, max_new_tokens=10) -> str:
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = torch.tensor([encode_prompt(tokenizer, messages)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_loss_mask_covers_exactly_the_response_tokens(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "An apple."},  # an earlier turn is context, never learned
        {"role": "user", "content": "Another one?"},
    ]
    response = "A pear, ripe and **sweet**."
    tokenised, truncated = tokenise_example(tokenizer, SFTExample(messages, response), max_length=512)
    assert not truncated
    ids, labels = tokenised

    # The prompt is what the policy sees when it samples: chat template + generation prompt.
    prompt = encode_prompt(tokenizer, messages)
    assert ids[:len(prompt)] == prompt
    assert labels[:len(prompt)] == [IGNORE] * len(prompt)
    # Everything after it is learned: the response's own tokens and the EOS that ends the turn.
    learned = [t for t, label in zip(ids, labels) if label != IGNORE]
    assert labels[len(prompt):] == ids[len(prompt):] == learned
    assert learned == tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(learned) == response + tokenizer.eos_token
    # The text as a whole is the chat template of the conversation with the answer appended.
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)
    assert full.startswith(tokenizer.decode(ids))
    assert "An apple." in tokenizer.decode(ids[:len(prompt)])


def test_a_long_example_keeps_the_end_of_its_prompt_and_the_start_of_its_response(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    messages = [{"role": "user", "content": "word " * 200 + "What now?"}]
    response = "First part. " + "more " * 100
    (ids, labels), truncated = tokenise_example(tokenizer, SFTExample(messages, response), max_length=64)
    assert truncated and len(ids) == 64
    learned = [t for t, label in zip(ids, labels) if label != IGNORE]
    assert tokenizer.decode(learned).startswith("First part.")
    prompt_part = tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE])
    assert prompt_part.endswith("What now?<|im_end|>\n<|im_start|>assistant\n")


def test_packing_gives_the_same_loss_as_one_example_per_row(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    examples = [tokenise_example(tokenizer, colour_example(i), 128)[0] for i in range(6)]
    rows = pack_rows(examples, max_length=128, order=list(range(6)))
    assert len(rows) < len(examples), "the examples should share rows"
    padded, packed = pad_batch(examples, tokenizer.pad_token_id), packed_batch(rows, tokenizer.pad_token_id)
    assert packed.tokens == padded.tokens
    with torch.no_grad():
        a = response_nll_sum(model, padded, torch.device("cpu"))
        b = response_nll_sum(model, packed, torch.device("cpu"))
    # Equal only if no packed example attends to its neighbours.
    assert torch.allclose(a, b, rtol=1e-4), (a, b)


def test_fine_tuning_lowers_validation_loss_and_teaches_the_answer(tiny_model_dir, tmp_path):
    train = [colour_example(i) for i in range(8)]
    validation = [colour_example(i) for i in range(100, 104)]  # unseen prompts of the same kinds
    steps = []
    config = SFTConfig(epochs=16, batch_size=4, learning_rate=5e-3, lr_schedule="constant", warmup_ratio=0.0,
                       max_length=128, seed=0)
    result = train_sft(config, train, validation, base_path=tiny_model_dir, output_dir=tmp_path / "sft",
                       on_step=lambda step, metrics: steps.append((step, metrics)))

    val_losses = [m["val_loss"] for _, m in steps if "val_loss" in m]
    assert len(val_losses) == 1 + config.epochs  # before training, then after each epoch
    assert result.metrics["val_loss"] == val_losses[-1] < 0.1 * val_losses[0]
    assert result.metrics["steps"] == 16 * 2
    assert [s for s, m in steps if "loss" in m] == list(range(1, 33))
    assert greedy(result.output_dir, colour_example(201).messages) == SKY
    assert greedy(result.output_dir, colour_example(202).messages) == ROSE

    # The checkpoint is a plain transformers directory with our settings beside it.
    assert (result.output_dir / "model.safetensors").exists()
    assert (result.output_dir / "tokenizer.json").exists()
    assert json.loads((result.output_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    saved = read_sft_checkpoint(result.output_dir)
    assert saved["kind"] == "sft" and saved["config"]["learning_rate"] == 5e-3
    assert saved["metrics"]["val_loss"] == result.metrics["val_loss"]


def test_same_seed_same_result(tiny_model_dir, tmp_path):
    train = [colour_example(i) for i in range(8)]
    validation = [colour_example(i) for i in range(100, 102)]
    config = SFTConfig(epochs=1, batch_size=2, learning_rate=1e-3, max_length=128, packing=True, seed=7)

    def run(name, seed):
        config.seed = seed
        return train_sft(config, train, validation, base_path=tiny_model_dir, output_dir=tmp_path / name)

    a, b, c = run("a", 7), run("b", 7), run("c", 8)
    assert [h for h in a.history] == [h for h in b.history]
    wa, wb, wc = (load_file(r.output_dir / "model.safetensors") for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa), "another seed should shuffle differently"


def test_lora_trains_adapters_and_saves_a_merged_model(tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    train = [colour_example(i) for i in range(4)]
    validation = [colour_example(i) for i in range(100, 102)]
    config = SFTConfig(epochs=2, batch_size=2, learning_rate=1e-2, max_length=128, lora_r=4, lora_alpha=8)
    result = train_sft(config, train, validation, base_path=tiny_model_dir, output_dir=tmp_path / "lora")
    assert result.metrics["val_loss"] < result.metrics["initial_val_loss"]
    base = load_file(tiny_model_dir / "model.safetensors")
    tuned = load_file(result.output_dir / "model.safetensors")
    assert set(tuned) == set(base), "the saved model has the base model's weights, adapters merged in"
    assert not torch.equal(base["model.layers.0.self_attn.q_proj.weight"], tuned["model.layers.0.self_attn.q_proj.weight"])
    # LoRA leaves the embeddings alone (on CUDA the frozen base, and so the saved model, is bf16: rounded).
    embeddings = tuned["model.embed_tokens.weight"]
    assert torch.equal(base["model.embed_tokens.weight"].to(embeddings.dtype), embeddings)


def test_should_stop_cancels_and_saves_nothing(tiny_model_dir, tmp_path):
    train = [colour_example(i) for i in range(4)]
    validation = [colour_example(100)]
    with pytest.raises(Cancelled):
        train_sft(SFTConfig(epochs=3, batch_size=2, max_length=128), train, validation, base_path=tiny_model_dir,
                  output_dir=tmp_path / "out", should_stop=lambda: True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("examples, message", [
    ([SFTExample([{"role": "user", "content": "Hi"}], "  ")], "train example 0: the response is empty"),
    ([SFTExample([], "Hello")], "train example 0: the prompt has no messages"),
    ([SFTExample([{"role": "assistant", "content": "Hi"}], "Hello")], "must end with a user turn"),
    ([], "there are no training demonstrations"),
])
def test_bad_data_is_refused_before_training(tiny_model_dir, tmp_path, examples, message):
    with pytest.raises(ValueError, match=message):
        train_sft(SFTConfig(), examples, [colour_example(1)], base_path=tiny_model_dir, output_dir=tmp_path / "x")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="epochs=0.*lr_schedule='sometimes'"):
        SFTConfig(epochs=0, lr_schedule="sometimes")


@pytest.mark.slow
def test_fine_tuning_the_default_model_for_a_few_steps(tmp_path):
    from tests.conftest import default_model_dir

    train = [colour_example(i) for i in range(8)]
    validation = [colour_example(i) for i in range(100, 102)]
    config = SFTConfig(epochs=1, batch_size=4, learning_rate=1e-4, warmup_ratio=0.0, max_length=96, seed=0)
    result = train_sft(config, train, validation, base_path=default_model_dir(), output_dir=tmp_path / "sft")
    assert result.metrics["steps"] == 2
    assert result.metrics["val_loss"] < result.metrics["initial_val_loss"]
    assert result.metrics["tokens_per_s"] > 0
    assert greedy(result.output_dir, [{"role": "user", "content": "What colour is the sky?"}], max_new_tokens=4)


def test_the_response_loss_is_the_library_loss_with_masked_labels(tiny_model_dir):
    """Cross-check of the shift and the mask: transformers' own loss over labels -100 elsewhere."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    batch = pad_batch([tokenise_example(tokenizer, colour_example(i), 128)[0] for i in range(3)],
                      tokenizer.pad_token_id)
    with torch.no_grad():
        ours = response_nll_sum(model, batch, torch.device("cpu")) / batch.tokens
        theirs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)
