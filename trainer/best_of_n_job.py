"""The `best_of_n` job: N samples per prompt of a split of the chosen sets from a
policy, scored by a reward model; the best are kept, and per prompt the best
reward is reported beside the mean of the N, with the analytical KL of
best-of-N from the policy (trainer/best_of_n.py).

With use "demonstrations" the kept responses become demonstrations of the
job's owner (source best_of_n), submitted for review like a labeler's: once
accepted they are SFT data (rejection-sampling fine-tuning, expert iteration).

Parameters (app/services/training.clean_best_of_n_params): policy_model_id,
reward_model_id, prompt_set_ids, split, use, config (BestOfNConfig's fields).
"""

import logging
from datetime import UTC, datetime
from typing import Any

from app.db.models import Job
from app.services import demonstrations, models, training
from trainer.best_of_n import BestOfNConfig, TokenizerMismatch, best_of_n, kl_bound
from trainer.jobs import JobContext, JobFailed
from trainer.runs import device_setting

log = logging.getLogger(__name__)

PER_PROMPT_ROWS = 200  # per-prompt figures kept in the job's result (all of them are in its curves)


def best_of_n_job(ctx: JobContext) -> dict[str, Any]:
    params = ctx.params
    config = BestOfNConfig(**params["config"])
    config.device = device_setting(ctx, params["config"])
    from trainer.models import resolve_model_path

    # 1. the models, the prompts and the owner, read in one short transaction
    artifacts = ctx.settings.artifacts_path
    with ctx.new_session() as session:
        policy = models.get_model(session, int(params["policy_model_id"]))
        reward = models.get_model(session, int(params["reward_model_id"]))
        names = {"policy": policy.name, "reward": reward.name}
        paths = {"policy": resolve_model_path(policy.path, artifacts),
                 "reward": resolve_model_path(reward.path, artifacts)}
        rows = training.prompts_of(session, params["prompt_set_ids"], params["split"], limit=config.max_prompts)
        owner_id = session.get(Job, ctx.job_id).created_by_id
    if not rows:
        raise JobFailed(f"The chosen sets have no prompt in the {params['split']} split any more.")
    if params["use"] == "demonstrations" and owner_id is None:
        raise JobFailed("Demonstrations belong to a user: start the run as a signed-in engineer.")

    # 2. sample and score, with progress and cancellation through the job
    def on_prompts(done: int) -> None:
        ctx.check_cancelled()
        ctx.progress(done, len(rows))

    try:
        outcomes = best_of_n(config, [r.messages for r in rows], policy_path=paths["policy"],
                             reward_path=paths["reward"], on_prompts=on_prompts)
    except TokenizerMismatch as error:
        raise JobFailed(f"The reward model '{names['reward']}' and the policy '{names['policy']}' do not share"
                        " a tokenizer: choose a reward model trained from the policy's family.") from error
    for index, outcome in enumerate(outcomes):
        ctx.metrics(index + 1, {"best_reward": outcome.best_reward, "mean_reward": outcome.mean_reward})

    # 3. keep: the best response of each prompt becomes a demonstration to review
    stored = left = 0
    if params["use"] == "demonstrations":
        with ctx.new_session() as session:
            stored, left = demonstrations.store_best_of_n(
                session, user_id=owner_id, now=datetime.now(UTC),
                kept=[(row.prompt_id, o.responses[o.best]) for row, o in zip(rows, outcomes, strict=True)])

    best = [o.best_reward for o in outcomes]
    mean = [o.mean_reward for o in outcomes]
    out = {"n": config.n, "prompts": len(outcomes), "best_reward": round(sum(best) / len(best), 4),
           "mean_reward": round(sum(mean) / len(mean), 4), "kl_bound": round(kl_bound(config.n), 4),
           "policy": names["policy"], "reward_model": names["reward"],
           "per_prompt": [{"prompt_id": r.prompt_id, "best_reward": round(o.best_reward, 4),
                           "mean_reward": round(o.mean_reward, 4)} for r, o in zip(rows, outcomes)][:PER_PROMPT_ROWS]}
    out["gain"] = round(out["best_reward"] - out["mean_reward"], 4)
    if params["use"] == "demonstrations":
        out["demonstrations"] = stored
        if left:
            out["demonstrations_note"] = (f"{left} prompt(s) already hold a demonstration you wrote yourself;"
                                          " left alone")
    return out
