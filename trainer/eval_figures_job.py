"""The `eval_figures` job: the automatic figures of an evaluation set beside the
human votes (trainer/eval_figures.py): every response's reward from the chosen
reward model, and for each of the set's policies that has a reference, the
per-response log-ratio whose mean estimates its KL from the reference.

Parameters (app/services/evaluation.start_figures_job): prompt_set_id,
reward_model_id, config (EvalFiguresConfig's fields). The result holds the
rewards per response id; the results page and API combine them with the votes
as they stand when read (app/services/evaluation.automatic_figures).
"""

import math
from typing import Any

from app.services import evaluation, models
from trainer.configs import EvalFiguresConfig
from trainer.eval_figures import StoredResponse, log_ratios, reward_scores
from trainer.jobs import JobContext, JobFailed
from trainer.runs import device_setting


def eval_figures_job(ctx: JobContext) -> dict[str, Any]:
    params = ctx.params
    config = EvalFiguresConfig(**params["config"])
    config.device = device_setting(ctx, params["config"])
    from trainer.models import resolve_model_path

    # 1. the set's responses, the reward model and each policy's reference, in one short transaction
    artifacts = ctx.settings.artifacts_path
    with ctx.new_session() as session:
        prompt_set = evaluation.get_evaluation(session, int(params["prompt_set_id"]))
        temperature = prompt_set.temperature
        reward = models.get_model(session, int(params["reward_model_id"]))
        reward_name, reward_path = reward.name, resolve_model_path(reward.path, artifacts)
        rows = evaluation.set_responses(session, prompt_set)
        policies = [(m.id, m.name, resolve_model_path(m.path, artifacts), ref.id, ref.name,
                     resolve_model_path(ref.path, artifacts))
                    for m in evaluation.set_models(session, prompt_set.id)
                    if (ref := evaluation.reference_of(session, m)) is not None]
    if not rows:
        raise JobFailed("The evaluation has no responses yet: run its generation first.")
    responses = [StoredResponse(r.response_id, list(r.messages), r.text, r.finish_reason == "eos") for r in rows]
    own = {m[0]: [s for s, r in zip(responses, rows, strict=True) if r.model_id == m[0]] for m in policies}
    total = len(responses) + sum(len(v) for v in own.values())

    def on_done(offset: int):
        def report(done: int) -> None:
            ctx.check_cancelled()
            ctx.progress(offset + done, total)
        return report

    # 2. every response's reward
    rewards = reward_scores(config, responses, reward_path=reward_path, on_done=on_done(0))

    # 3. each policy's KL from its reference, on its own responses
    kl, done = [], len(responses)
    for model_id, name, path, ref_id, ref_name, ref_path in policies:
        if not own[model_id]:
            continue
        try:
            ratios = log_ratios(config, own[model_id], policy_path=path, reference_path=ref_path,
                                temperature=temperature, on_done=on_done(done))
        except AssertionError as error:
            if "tokenizer" in str(error):
                raise JobFailed(f"The policy '{name}' and its reference '{ref_name}' do not share a tokenizer.") \
                    from error
            raise
        done += len(own[model_id])
        values = list(ratios.values())
        mean = sum(values) / len(values)
        spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        kl.append({"model_id": model_id, "model": name, "reference_id": ref_id, "reference": ref_name,
                   "kl": round(mean, 4), "kl_stderr": round(spread / math.sqrt(len(values)), 4),
                   "responses": len(values)})
    return {"reward_model_id": int(params["reward_model_id"]), "reward_model": reward_name,
            "responses_scored": len(rewards), "temperature": temperature,
            "rewards": {str(k): v for k, v in rewards.items()}, "kl": kl}
