"""Evaluation sets made as the service and the generate job make them, without a
model: each model's response to a prompt is a given text, and each prompt's task
compares the pair the schedule gives it (app/services/evaluation.pair_for)."""

from collections.abc import Sequence

from sqlalchemy.orm import Session

from app.db.enums import PromptSetKind, PromptSetStatus, Split
from app.db.models import Model, Prompt, PromptSet, Response, Task, TaskResponse
from app.services import evaluation
from app.services.prompt_sets import prompt_hash
from tests.factories.prompt_sets import make_prompt_set


def make_evaluation(session: Session, models: Sequence[Model], *, prompts: int = 6, overlap: int = 1,
                    seed: int = 0, status: PromptSetStatus = PromptSetStatus.active, **values) -> PromptSet:
    """An evaluation set of `models` with `prompts` prompts, one response per (prompt,
    model) ("<model name> answers question i" padded by its position) and the tasks."""
    prompt_set = make_prompt_set(session, kind=PromptSetKind.evaluation, k=2, pairwise=True, overlap=overlap,
                                 seed=seed, status=status, train_ratio=0.0, validation_ratio=1.0, rl_ratio=0.0,
                                 **values)
    evaluation.add_models(session, prompt_set, [m.id for m in models])
    session.flush()
    for rank in range(prompts):
        messages = [{"role": "user", "content": f"question {prompt_set.id}.{rank}"}]
        prompt = Prompt(prompt_set_id=prompt_set.id, messages=messages, text=messages[0]["content"],
                        text_hash=prompt_hash(messages), split=Split.validation)
        session.add(prompt)
        session.flush()
        responses = [Response(prompt_id=prompt.id, model_id=m.id, round=prompt_set.round, sample_index=pos,
                              text=f"answer {rank}" + " more" * pos, num_tokens=2 + pos, seed=rank,
                              sampling={"model": m.name})  # as the generate job stores it
                     for pos, m in enumerate(models)]
        session.add_all(responses)
        session.flush()
        a, b = evaluation.pair_for(rank, len(models), seed)
        task = Task(prompt_set_id=prompt_set.id, prompt_id=prompt.id, round=prompt_set.round, k=2)
        session.add(task)
        session.flush()
        session.add_all([TaskResponse(task_id=task.id, response_id=responses[a].id, position=0),
                         TaskResponse(task_id=task.id, response_id=responses[b].id, position=1)])
        session.flush()
    return prompt_set
