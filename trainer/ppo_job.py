"""The `train_ppo` job: optimise a policy against a reward model with a KL penalty
toward a frozen reference, on the rl-split prompts of the chosen sets, and
register it with its metrics and the validation prompts' samples before and
after training (read side by side on the model's page).

Parameters (app/services/training.clean_ppo_params): policy_model_id,
reference_model_id, reward_model_id, prompt_set_ids, sft_set_ids (for the
ptx term), name (or None), config (trainer.ppo.PPOConfig's fields).
"""

import logging
from typing import Any

from app.db.enums import ModelKind, Split
from app.services import demonstrations, models, training
from trainer.jobs import JobContext, JobFailed
from trainer.ppo import PPOConfig, train_ppo
from trainer.runs import device_setting, fresh_output_dir, register, step_callbacks

log = logging.getLogger(__name__)


def train_ppo_job(ctx: JobContext) -> dict[str, Any]:
    params = ctx.params
    config = PPOConfig(**params["config"])
    config.device = device_setting(ctx, params["config"])
    from trainer.models import resolve_model_path

    # 1. the models and the data, read in one short transaction
    artifacts = ctx.settings.artifacts_path
    with ctx.new_session() as session:
        policy = models.get_model(session, int(params["policy_model_id"]))
        reference = models.get_model(session, int(params["reference_model_id"]))
        reward = models.get_model(session, int(params["reward_model_id"]))
        names = {"policy": policy.name, "reference": reference.name, "reward": reward.name}
        policy_id = policy.id
        paths = {key: resolve_model_path(m.path, artifacts) for key, m in
                 (("policy", policy), ("reference", reference), ("reward", reward))}
        prompts = training.prompts_of(session, params["prompt_set_ids"], Split.rl)
        # Held out: the validation split only, never the rl prompts PPO trains on.
        sample_rows = training.prompts_of(session, params["prompt_set_ids"], Split.validation,
                                          limit=config.validation_samples)
        sft_data = None
        if config.ptx_coef > 0:
            accepted = demonstrations.accepted_demonstrations(session, prompt_set_ids=params.get("sft_set_ids") or [])
            sft_data = [(d.messages, d.response) for d in accepted]
    if not prompts:
        raise JobFailed("The chosen sets have no prompt in the rl split any more.")
    if config.ptx_coef > 0 and not sft_data:
        raise JobFailed("The pretraining-loss term needs accepted demonstrations; the chosen sets have none.")
    log.info("PPO of %s against %s on %d prompts", names["policy"], names["reward"], len(prompts))

    # 2. train, with progress, curves and cancellation through the job
    output_dir = fresh_output_dir(ctx, "policy")
    on_step, should_stop = step_callbacks(ctx)
    try:
        result = train_ppo(config, [p.messages for p in prompts], policy_path=paths["policy"],
                           reference_path=paths["reference"], reward_path=paths["reward"], output_dir=output_dir,
                           on_step=lambda step, m: on_step(step, m | {"total_steps": config.steps}),
                           should_stop=should_stop, sft_data=sft_data,
                           validation_prompts=[p.messages for p in sample_rows])
    except AssertionError as error:
        if "tokenizer" in str(error):
            raise JobFailed(f"The reward model '{names['reward']}' and the policy '{names['policy']}' do not share"
                            " a tokenizer: choose a reward model trained from the policy's family.") from error
        raise
    except ValueError as error:
        raise JobFailed(f"PPO cannot run with these settings or data: {error}.") from error

    # 3. register: a policy whose parent is the starting policy, with its samples before and after
    registered = register(
        ctx, name=params.get("name") or f"{names['policy']} PPO (job {ctx.job_id})", kind=ModelKind.policy,
        output_dir=output_dir, source="train_ppo", parent_id=policy_id, metrics=result.metrics,
        config={"ppo": params["config"], "policy_model_id": policy_id,
                "reference_model_id": int(params["reference_model_id"]),
                "reward_model_id": int(params["reward_model_id"]), "prompt_set_ids": params["prompt_set_ids"],
                "sft_set_ids": params.get("sft_set_ids") or [], "rl_prompts": len(prompts)},
        samples=[("before", result.samples_before), ("after", result.samples_after)], sample_prompts=sample_rows,
    )
    metrics = result.metrics
    out = {"model_id": registered.model_id, "model_name": registered.name, "steps": metrics["steps"],
           "reward": round(metrics["reward"], 4), "kl": round(metrics["kl"], 4), "rl_prompts": len(prompts)}
    out["cut_fraction"] = round(metrics["cut_fraction"], 4)
    out["validation_prompts"] = len(sample_rows)
    if len(sample_rows) < config.validation_samples:
        out["validation_note"] = (f"the chosen sets have {len(sample_rows)} validation-split prompt(s) of the"
                                  f" {config.validation_samples} asked for")
    for key in ("validation_reward_before", "validation_reward_after", "validation_reward_change"):
        if key in metrics:
            out[key] = round(metrics[key], 4)
            out[f"{key}_ci"] = round(metrics[f"{key}_ci"], 4)
    return out
