"""The `train_reward` job: fit a reward model on the included rankings of the chosen
sets and register it, with its metrics, settings and data snapshot (which
annotations, hence which comparisons, trained and validated it).

Parameters (app/services/training.clean_reward_params): base_model_id,
prompt_set_ids, labeler_ids (None: all), name (or None), config
(trainer.reward.RewardConfig's fields).

Validation holds the prompts of the validation split, never trained on; a set
without validation prompts lends its last ~10% of prompts (training.split_by_prompt).
"""

import logging
from typing import Any

from app.db.enums import ModelKind
from app.services import models, training
from trainer.jobs import JobContext, JobFailed
from trainer.reward import RankedGroup, RewardConfig, train_reward_model
from trainer.runs import device_setting, fresh_output_dir, register, step_callbacks

log = logging.getLogger(__name__)


def _pairs(ranks: list[int]) -> int:
    return sum(1 for a in ranks for b in ranks if a < b)


def total_steps(groups: list[RankedGroup], config: RewardConfig) -> int:
    """Optimizer steps the trainer will take (rankings that are all ties are dropped)."""
    usable = sum(1 for g in groups if len(set(g.ranks)) > 1)
    micro_batches = -(-usable // config.batch_size)
    return -(-micro_batches // config.gradient_accumulation_steps) * config.epochs


def train_reward_job(ctx: JobContext) -> dict[str, Any]:
    params = ctx.params
    config = RewardConfig(**params["config"])
    config.device = device_setting(ctx, params["config"])
    from trainer.models import resolve_model_path

    # 1. the base model and the data, read in one short transaction
    with ctx.new_session() as session:
        base = models.get_model(session, int(params["base_model_id"]))
        base_name, base_id = base.name, base.id
        base_path = resolve_model_path(base.path, ctx.settings.artifacts_path)
        train_items, val_items = training.reward_data(session, params["prompt_set_ids"], params.get("labeler_ids"))
    train = [RankedGroup(a.messages, a.responses, a.ranks) for a in train_items if len(set(a.ranks)) > 1]
    validation = [RankedGroup(a.messages, a.responses, a.ranks) for a in val_items if len(set(a.ranks)) > 1]
    if not train or not validation:
        prompts = len({a.prompt_id for a in train_items + val_items})
        raise JobFailed(f"The chosen data holds {len(train) + len(validation)} ranking(s) with a preference on"
                        f" {prompts} prompt(s); training needs rankings on at least two prompts (one to train"
                        " on, one to validate on). Were annotations excluded after the run was queued?")
    log.info("reward model from %s on %d rankings, validating on %d", base_name, len(train), len(validation))

    # 2. train, with progress, curves and cancellation through the job
    output_dir = fresh_output_dir(ctx, "reward")
    steps = total_steps(train, config)
    on_step, should_stop = step_callbacks(ctx)
    try:
        result = train_reward_model(config, train, validation, model_path=base_path, output_dir=output_dir,
                                    on_step=lambda step, m: on_step(step, m | {"total_steps": steps}),
                                    should_stop=should_stop)
    except ValueError as error:
        raise JobFailed(f"The reward model cannot be trained on this data: {error}.") from error

    # 3. register: a reward model whose parent is the base model, with the data it saw
    snapshot = {
        "annotation_ids": [a.annotation_id for a in train_items],
        "validation_annotation_ids": [a.annotation_id for a in val_items],
        "comparisons": sum(_pairs(a.ranks) for a in train_items),
        "validation_comparisons": sum(_pairs(a.ranks) for a in val_items),
    }
    registered = register(
        ctx, name=params.get("name") or f"{base_name} RM (job {ctx.job_id})", kind=ModelKind.reward,
        output_dir=output_dir, source="train_reward", parent_id=base_id, metrics=result.metrics,
        config={"reward": params["config"], "base_model_id": base_id, "prompt_set_ids": params["prompt_set_ids"],
                "labeler_ids": params.get("labeler_ids"), "data": snapshot},
    )
    metrics = result.metrics
    return {
        "model_id": registered.model_id, "model_name": registered.name,
        "val_accuracy": round(metrics["val_accuracy"], 4), "val_loss": round(metrics["val_loss"], 4),
        "train_rankings": len(train), "val_rankings": len(validation),
        "comparisons": snapshot["comparisons"], "steps": metrics["steps"],
    }
