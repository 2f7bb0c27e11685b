"""The `train_sft` job: fine-tune a registered model on accepted demonstrations and
register the result as an SFT model whose parent is the base model.

Parameters (app/services/sft.clean_sft_params): base_model_id, prompt_set_ids,
name (or None), config (trainer.sft.SFTConfig's fields).

Data: accepted demonstrations only (app/services/demonstrations). Prompts of
the validation split validate, all others train; the split is the prompt's,
fixed by its text hash, so the same prompt never lands on both sides. A set
too small to have validation prompts lends its last ~10% of prompts (at least
one) in a stable order.
"""

import logging
import shutil
from typing import Any

from app.db.enums import ModelKind, Split
from app.services import demonstrations, models
from app.services.errors import Conflict
from trainer.jobs import JobContext, JobFailed
from trainer.sft import SFTConfig, SFTExample, train_sft

log = logging.getLogger(__name__)

VALIDATION_SHARE = 0.1  # of the prompts, when no prompt is in the validation split


def split_examples(items: list[demonstrations.AcceptedDemonstration]) -> tuple[list[SFTExample], list[SFTExample]]:
    """(train, validation) by the prompts' split; validation borrowed from train when empty."""
    validation_prompts = {d.prompt_id for d in items if d.split == Split.validation}
    if not validation_prompts:
        prompts = sorted({d.prompt_id for d in items})
        take = max(1, round(VALIDATION_SHARE * len(prompts)))
        validation_prompts = set(prompts[len(prompts) - take:]) if len(prompts) > 1 else set()
    train = [SFTExample(d.messages, d.response) for d in items if d.prompt_id not in validation_prompts]
    val = [SFTExample(d.messages, d.response) for d in items if d.prompt_id in validation_prompts]
    return train, val


def train_sft_job(ctx: JobContext) -> dict[str, Any]:
    params = ctx.params
    config = SFTConfig(**params["config"])
    artifacts = ctx.settings.artifacts_path
    from trainer.models import resolve_model_path

    # 1. the base model and the data, read in one short transaction
    with ctx.new_session() as session:
        base = models.get_model(session, int(params["base_model_id"]))
        base_name, base_id = base.name, base.id
        base_path = resolve_model_path(base.path, artifacts)
        items = demonstrations.accepted_demonstrations(session, prompt_set_ids=params["prompt_set_ids"])
    train, val = split_examples(items)
    if not train or not val:
        raise JobFailed(f"The chosen sets hold {len(items)} accepted demonstration(s) on"
                        f" {len({d.prompt_id for d in items})} prompt(s); training needs at least two prompts"
                        " (one to train on, one to validate on).")
    log.info("SFT of %s on %d demonstrations, validating on %d", base_name, len(train), len(val))

    # 2. train, with progress, curves and cancellation through the job
    output_dir = artifacts / "models" / f"sft-job-{ctx.job_id}"
    if output_dir.exists():
        # Left by an earlier run of this same job that stopped before registering it.
        shutil.rmtree(output_dir)
    total_steps = 0

    def on_step(step: int, metrics: dict[str, float]) -> None:
        nonlocal total_steps
        total_steps = int(metrics.pop("total_steps", total_steps))
        ctx.metrics(step, metrics)
        ctx.progress(step, total_steps)

    def should_stop() -> bool:
        ctx.check_cancelled()  # raises JobCancelled: the worker marks the job
        return False

    config.device = ctx.settings.device if config.device == "auto" else config.device
    result = train_sft(config, train, val, base_path=base_path, output_dir=output_dir,
                       on_step=on_step, should_stop=should_stop)

    # 3. register the checkpoint: an SFT model whose parent is the base model
    name = params.get("name") or f"{base_name} SFT (job {ctx.job_id})"
    with ctx.new_session() as session:
        registered = dict(
            kind=ModelKind.sft, path=models.stored_path(output_dir, artifacts), source="train_sft",
            parent_id=base_id, job_id=ctx.job_id, metrics=result.metrics, sha256=models.checkpoint_sha256(output_dir),
            config={"sft": params["config"], "prompt_set_ids": params["prompt_set_ids"],
                    "architectures": _architectures(output_dir)},
        )
        try:
            model = models.register_model(session, name=name, **registered)
        except Conflict:  # the name was taken while the job ran
            session.rollback()
            model = models.register_model(session, name=f"{name} #{ctx.job_id}", **registered)
        ctx.set_model(model.id)
        model_id, model_name = model.id, model.name
    return {
        "model_id": model_id, "model_name": model_name,
        "val_loss": round(result.metrics["val_loss"], 4),
        "initial_val_loss": round(result.metrics["initial_val_loss"], 4),
        "train_examples": len(train), "val_examples": len(val), "steps": result.metrics["steps"],
    }


def _architectures(directory) -> list[str]:
    import json

    return json.loads((directory / "config.json").read_text()).get("architectures") or []
