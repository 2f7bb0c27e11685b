"""The `train_sft` job: fine-tune a registered model on accepted demonstrations and
register the result as an SFT model whose parent is the base model.

Parameters (app/services/training.clean_sft_params): base_model_id, prompt_set_ids,
name (or None), config (trainer.sft.SFTConfig's fields).

Data: accepted demonstrations only (app/services/demonstrations). Prompts of
the validation split validate, all others train; the split is the prompt's,
fixed by its text hash, so the same prompt never lands on both sides. A set
too small to have validation prompts lends its last ~10% of prompts (at least
one) in a stable order.
"""

import logging
from typing import Any

from app.db.enums import ModelKind, Split
from app.services import demonstrations, models, training
from trainer.jobs import JobContext, JobFailed
from trainer.runs import device_setting, fresh_output_dir, register, step_callbacks
from trainer.sft import SFTConfig, SFTExample, train_sft

log = logging.getLogger(__name__)


def _sample_settings():
    from trainer.sampling import SamplingSettings

    return SamplingSettings(temperature=0.7, top_p=0.95, max_new_tokens=64)


def split_examples(items: list[demonstrations.AcceptedDemonstration]) -> tuple[list[SFTExample], list[SFTExample]]:
    """(train, validation) by the prompts' split; validation borrowed from train when empty."""
    validation_prompts = training.split_by_prompt([d.prompt_id for d in items],
                                                  {d.prompt_id for d in items if d.split == Split.validation})
    train = [SFTExample(d.messages, d.response) for d in items if d.prompt_id not in validation_prompts]
    val = [SFTExample(d.messages, d.response) for d in items if d.prompt_id in validation_prompts]
    return train, val


def train_sft_job(ctx: JobContext) -> dict[str, Any]:
    params = ctx.params
    config = SFTConfig(**params["config"])
    from trainer.models import resolve_model_path

    # 1. the base model and the data, read in one short transaction
    with ctx.new_session() as session:
        base = models.get_model(session, int(params["base_model_id"]))
        base_name, base_id = base.name, base.id
        base_path = resolve_model_path(base.path, ctx.settings.artifacts_path)
        items = demonstrations.accepted_demonstrations(session, prompt_set_ids=params["prompt_set_ids"])
        sample_rows = training.sample_prompts(session, params["prompt_set_ids"])
    train, val = split_examples(items)
    if not train or not val:
        raise JobFailed(f"The chosen sets hold {len(items)} accepted demonstration(s) on"
                        f" {len({d.prompt_id for d in items})} prompt(s); training needs at least two prompts"
                        " (one to train on, one to validate on).")
    log.info("SFT of %s on %d demonstrations, validating on %d", base_name, len(train), len(val))

    # 2. train, with progress, curves and cancellation through the job
    output_dir = fresh_output_dir(ctx, "sft")
    on_step, should_stop = step_callbacks(ctx)
    config.device = device_setting(ctx, params["config"])
    result = train_sft(config, train, val, base_path=base_path, output_dir=output_dir,
                       on_step=on_step, should_stop=should_stop)

    # 3. the parent and the new model answer the same validation prompts, for reading side by side
    ctx.check_cancelled(force=True)
    before = sample_answers(ctx, base_path, sample_rows)
    after = sample_answers(ctx, str(output_dir), sample_rows)

    # 4. register the checkpoint: an SFT model whose parent is the base model
    registered = register(
        ctx, name=params.get("name") or f"{base_name} SFT (job {ctx.job_id})", kind=ModelKind.sft,
        output_dir=output_dir, source="train_sft", parent_id=base_id, metrics=result.metrics,
        config={"sft": params["config"], "base_model_id": base_id, "prompt_set_ids": params["prompt_set_ids"]},
        samples=[("before", before), ("after", after)], sample_prompts=sample_rows,
    )
    return {
        "model_id": registered.model_id, "model_name": registered.name,
        "val_loss": round(result.metrics["val_loss"], 4),
        "initial_val_loss": round(result.metrics["initial_val_loss"], 4),
        "train_examples": len(train), "val_examples": len(val), "steps": result.metrics["steps"],
    }


def sample_answers(ctx: JobContext, model_path: str, prompts: list[models.PromptRow]) -> list[dict[str, Any]]:
    """One seeded sample per prompt (the same seeds for every model), without rewards
    (none off the main process of a multi-process run: they are only registered from there)."""
    if not prompts or not ctx.main:
        return []
    from trainer.sampling import TransformersSampler, derive_seed

    sampler = TransformersSampler(model_path, ctx.device, ctx.dtype)
    seeds = [derive_seed("side-by-side", p.prompt_id) for p in prompts]
    samples = sampler.sample([p.messages for p in prompts], seeds, _sample_settings())
    return [{"response": s.text, "reward": None, "ended": s.finish_reason == "eos"} for s in samples]
