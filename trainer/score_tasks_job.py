"""The `score_tasks` job: a reward model scores the responses of a ranking set's open
tasks, and each task's margin (app/services/active_learning.margin) orders the set
when it hands tasks out by uncertainty.

Parameters (app/services/active_learning.queue_scoring): prompt_set_id, reward_model_id.
"""

import logging
from typing import Any

import torch

from app.services import active_learning, models
from trainer.jobs import JobContext, JobFailed
from trainer.models import resolve_model_path
from trainer.reward import load_reward_model, score_many

log = logging.getLogger(__name__)

BATCH_TASKS = 64  # tasks scored between two writes (and progress reports)


def score_tasks_job(ctx: JobContext) -> dict[str, Any]:
    prompt_set_id, model_id = ctx.params.get("prompt_set_id"), ctx.params.get("reward_model_id")
    if not isinstance(prompt_set_id, int) or not isinstance(model_id, int):
        raise JobFailed("The job's parameters lack prompt_set_id and reward_model_id (integers).")

    # 1. the reward model and the open tasks, read in one short transaction
    with ctx.new_session() as session:
        model = models.get_model(session, model_id)
        name, path = model.name, resolve_model_path(model.path, ctx.settings.artifacts_path)
        tasks = active_learning.tasks_to_score(session, prompt_set_id)
    ctx.progress(0, len(tasks))
    if not tasks:
        return {"tasks": 0, "reward_model": name}
    reward_model, tokenizer = load_reward_model(path, ctx.device)

    # 2. score in batches; each batch's scores and progress commit together
    margins: list[float] = []
    for start in range(0, len(tasks), BATCH_TASKS):
        ctx.check_cancelled()
        batch = tasks[start:start + BATCH_TASKS]
        scored = []
        for task, rewards in zip(batch, score_many(reward_model, tokenizer, [(t.messages, t.texts) for t in batch]),
                                 strict=True):  # (K,) each
            assert torch.isfinite(rewards).all(), f"task {task.task_id}: the reward model gave a non-finite score"
            scored.append((task.task_id, dict(zip(task.response_ids, rewards.tolist(), strict=True))))
        margins += [active_learning.margin(list(r.values())) for _, r in scored]
        with ctx.new_session() as session:
            active_learning.store_scores(session, model_id=model_id, job_id=ctx.job_id, scored=scored)
            ctx.progress(start + len(batch), len(tasks), session=session)
            session.commit()
    log.info("scored %d tasks of set %s with %s", len(tasks), prompt_set_id, name)
    ordered = sorted(margins)
    return {"tasks": len(tasks), "reward_model": name, "margin_min": round(ordered[0], 4),
            "margin_median": round(ordered[len(ordered) // 2], 4), "margin_max": round(ordered[-1], 4)}
