"""The `ai_label` job: an AI labeler ranks a ranking set's tasks with its judge
(trainer/ai_judge.py) and its rankings are stored as its annotations
(app/services/ai_labelers.store_ranking), a batch of tasks per transaction.

Parameters (app/services/ai_labelers.start_ai_label_job): prompt_set_id, ai_user_id,
scope ("missing": the tasks it has not ranked; "all": every task, replacing its
earlier rankings).
"""

from datetime import UTC, datetime
from typing import Any

from app.db.models import User
from app.services import ai_labelers, models
from app.services.prompt_sets import get_prompt_set
from trainer.ai_judge import JudgeConfig, copeland_ranks, judge_pairs, reward_ranks
from trainer.jobs import JobContext, JobFailed

BATCH_TASKS = 16  # tasks stored per transaction (and per progress report)


def ai_label_job(ctx: JobContext) -> dict[str, Any]:
    params = ctx.params
    from trainer.models import load_causal_lm, load_tokenizer, resolve_model_path
    from trainer.common import prepare_tokenizer
    from trainer.reward import load_reward_model

    # 1. the AI labeler, its judge, the set's texts and the tasks, read in one short transaction
    with ctx.new_session() as session:
        user = session.get(User, int(params["ai_user_id"]))
        if user is None or not user.is_ai:
            raise JobFailed("The AI labeler of this job no longer exists.")
        judge = models.get_model(session, user.judge_model_id)
        kind, judge_name = ai_labelers.judge_kind(judge), judge.name
        path = resolve_model_path(judge.path, ctx.settings.artifacts_path)
        prompt_set = get_prompt_set(session, int(params["prompt_set_id"]))
        instructions, principles = prompt_set.instructions, prompt_set.principles
        tasks = ai_labelers.tasks_to_rank(session, prompt_set_id=prompt_set.id, ai_user_id=user.id,
                                          scope=params["scope"])
    ctx.progress(0, len(tasks))

    # 2. the judge
    if kind == "reward":
        model, tokenizer = load_reward_model(path, ctx.device, ctx.dtype)
    else:
        model = load_causal_lm(path, ctx.device, ctx.dtype).eval()
        tokenizer = prepare_tokenizer(load_tokenizer(path))
    config = JudgeConfig()

    # 3. rank each task and store the rankings a batch at a time
    ties = judged_pairs = consistent = 0
    for start in range(0, len(tasks), BATCH_TASKS):
        ctx.check_cancelled()
        batch = tasks[start:start + BATCH_TASKS]
        rankings = []
        for task in batch:
            if kind == "reward":
                ranks, _ = reward_ranks(model, tokenizer, task.messages, task.responses)
            else:
                verdicts = judge_pairs(model, tokenizer, task.messages, task.responses, instructions=instructions,
                                       principles=principles)
                preferences = {(v.i, v.j): v.preference(config.tie_margin) for v in verdicts}
                ranks = copeland_ranks(len(task.responses), preferences)
                judged_pairs += len(verdicts)
                # Both orders name the same response better: the judge is not swayed by position.
                consistent += sum(1 for v in verdicts if (v.p_ab > 0.5) != (v.p_ba > 0.5))
            ties += len(ranks) - len(set(ranks))
            rankings.append(ranks)
        with ctx.new_session() as session:
            ai_user = session.get(User, int(params["ai_user_id"]))
            now = datetime.now(UTC)
            for task, ranks in zip(batch, rankings, strict=True):
                ai_labelers.store_ranking(session, ai_user=ai_user, task_id=task.task_id, ranks=ranks, now=now)
            ctx.progress(start + len(batch), len(tasks), session=session)
            session.commit()

    out: dict[str, Any] = {"tasks": len(tasks), "judge": judge_name, "judge_kind": kind, "tied_responses": ties}
    if kind == "judge":
        out |= {"pairs_judged": judged_pairs, "prompts_asked": 2 * judged_pairs,
                "order_consistency": round(consistent / judged_pairs, 4) if judged_pairs else None}
    return out
