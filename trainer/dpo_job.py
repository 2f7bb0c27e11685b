"""The `train_dpo` job: DPO of a policy on the included rankings of the chosen sets,
against a frozen reference, and its registration with its lineage (parent: the
starting policy; the reference and the data snapshot in its config) and the
validation prompts' samples before and after training, as a PPO policy's.

Parameters (app/services/training.clean_dpo_params): policy_model_id,
reference_model_id, prompt_set_ids, labeler_ids (None: all), include_imported
(whether the sets' imported preference data trains too), include_ai (whether AI
labelers' rankings do), name (or None),
processes (training processes; with several, the main process alone writes to
the database: progress, registration), config (trainer.configs.DPOConfig's fields).

The data is the reward model's (training.reward_data): the training split's
rankings train, the validation split's (held-out prompts) validate.
"""

import logging
from typing import Any

from app.db.enums import ModelKind, Split
from app.services import models, training
from trainer.dpo import DPOConfig, RankedGroup, train_dpo
from trainer.jobs import JobContext, JobFailed
from trainer.runs import device_setting, fresh_output_dir, register, step_callbacks

log = logging.getLogger(__name__)


def train_dpo_job(ctx: JobContext) -> dict[str, Any]:
    params = ctx.params
    config = DPOConfig(**params["config"])
    config.device = device_setting(ctx, params["config"])
    from trainer.models import resolve_model_path

    # 1. the models and the data, read in one short transaction
    artifacts = ctx.settings.artifacts_path
    with ctx.new_session() as session:
        policy = models.get_model(session, int(params["policy_model_id"]))
        reference = models.get_model(session, int(params["reference_model_id"]))
        policy_name, policy_id = policy.name, policy.id
        paths = {"policy": resolve_model_path(policy.path, artifacts),
                 "reference": resolve_model_path(reference.path, artifacts)}
        train_items, val_items = training.reward_data(session, params["prompt_set_ids"], params.get("labeler_ids"),
                                                     params.get("include_imported", True),
                                                     params.get("include_ai", False))
        sample_rows = training.prompts_of(session, params["prompt_set_ids"], Split.validation,
                                          limit=config.validation_samples)
    train = [RankedGroup(a.messages, a.responses, a.ranks) for a in train_items if len(set(a.ranks)) > 1]
    validation = [RankedGroup(a.messages, a.responses, a.ranks) for a in val_items if len(set(a.ranks)) > 1]
    if not train or not validation:
        prompts = len({a.prompt_id for a in train_items + val_items})
        raise JobFailed(f"The chosen data holds {len(train) + len(validation)} ranking(s) with a preference on"
                        f" {prompts} prompt(s); DPO needs rankings on at least two prompts (one to train on, one"
                        " to validate on). Were annotations excluded after the run was queued?")
    log.info("DPO (%s) of %s on %d rankings, validating on %d", config.loss, policy_name, len(train), len(validation))

    # 2. train, with progress, curves and cancellation through the job
    output_dir = fresh_output_dir(ctx, "policy")
    steps = -(-len(train) // config.batch_size) * config.epochs
    on_step, should_stop = step_callbacks(ctx)
    try:
        result = train_dpo(config, train, validation, policy_path=paths["policy"], reference_path=paths["reference"],
                           output_dir=output_dir, validation_prompts=[p.messages for p in sample_rows],
                           on_step=lambda step, m: on_step(step, m | {"total_steps": steps}), should_stop=should_stop)
    except ValueError as error:
        raise JobFailed(f"DPO cannot run on this data: {error}.") from error

    # 3. register: a policy whose parent is the starting policy, with its reference, data and samples
    snapshot = training.ranking_snapshot(train_items, val_items)
    registered = register(
        ctx, name=params.get("name") or f"{policy_name} DPO (job {ctx.job_id})", kind=ModelKind.policy,
        output_dir=output_dir, source="train_dpo", parent_id=policy_id, metrics=result.metrics,
        config={"dpo": params["config"], "policy_model_id": policy_id,
                "reference_model_id": int(params["reference_model_id"]), "prompt_set_ids": params["prompt_set_ids"],
                "labeler_ids": params.get("labeler_ids"), "include_imported": params.get("include_imported", True),
                "include_ai": params.get("include_ai", False), "data": snapshot},
        samples=[("before", result.samples_before), ("after", result.samples_after)], sample_prompts=sample_rows,
    )
    metrics = result.metrics
    return {"model_id": registered.model_id, "model_name": registered.name, "loss": config.loss,
            "val_accuracy": round(metrics["val_accuracy"], 4), "val_margin": round(metrics["val_margin"], 4),
            "val_pairs": metrics["val_pairs"], "kl": round(metrics["kl"], 4), "steps": metrics["steps"],
            "train_rankings": len(train), "val_rankings": len(validation), "comparisons": snapshot["comparisons"],
            "validation_prompts": len(sample_rows)}
