"""Gold tasks: tasks with a known answer, mixed into labelers' queues to measure them.

The expected answer is stored as tasks.gold_ranking = {response_id (str): rank},
rank 1 = best, equal ranks = no preference. An "expected best response" is the
ranking {best: 1, every other: 2}: only the pairs with the best one are scored.
A labeler's gold accuracy (app/services/agreement) is the share of scored pairs
where their strict preference matches the expected one.

Mixing gold tasks into queues at prompt_sets.gold_rate is the assignment
service's job; this module only marks tasks and sets the rate.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from app.db.models import Annotation, PromptSet, Task, TaskResponse
from app.services.errors import Invalid, NotFound

LETTERS = "ABCDEFGHI"  # display letters of positions 0..8, as labelers see them
from app.services.prompt_sets import get_prompt_set
from app.services.validation import small_int


def get_task(session: Session, *, prompt_set_id: int, task_id: int) -> Task:
    """The set's task with its responses in display order; raises NotFound."""
    task = session.scalar(
        select(Task)
        .where(Task.id == task_id, Task.prompt_set_id == prompt_set_id)
        .options(selectinload(Task.items).selectinload(TaskResponse.response), selectinload(Task.prompt))
    )
    if task is None:
        raise NotFound(f"Prompt set {prompt_set_id} has no task {task_id}.")
    return task


def expected_ranking(task: Task, *, ranking: Mapping[Any, Any] | None = None,
                     best_response_id: Any = None) -> dict[str, int]:
    """Check an expected ranking (or best response) against the task's responses and
    return it as stored: {response_id (str): rank}. Raises Invalid naming each
    response that is wrong."""
    response_ids = [item.response_id for item in task.items]
    k = len(response_ids)
    if (ranking is None) == (best_response_id is None or best_response_id == ""):
        raise Invalid("Give either an expected ranking or an expected best response.",
                      errors={"ranking": "give a ranking or a best response"})
    if ranking is None:
        best = small_int(best_response_id)
        if best not in response_ids:
            raise Invalid(f"Response {best_response_id!r} is not one of task {task.id}'s responses.",
                          errors={"best_response_id": f"choose one of {', '.join(map(str, response_ids))}"})
        return {str(rid): 1 if rid == best else 2 for rid in response_ids}
    errors: dict[str, str] = {}
    clean: dict[str, int] = {}
    given = {str(key).strip(): value for key, value in ranking.items()}
    for key in given:
        if small_int(key) not in response_ids:
            errors[f"rank_{key}"] = f"response {key} is not part of task {task.id}"
    for rid in response_ids:
        raw = given.get(str(rid))
        rank = small_int(raw)
        if raw is None or raw == "":
            errors[f"rank_{rid}"] = "rank required"
        elif rank is None or not 1 <= rank <= k:
            errors[f"rank_{rid}"] = f"rank must be a whole number 1..{k}"
        else:
            clean[str(rid)] = rank
    if not errors and len(set(clean.values())) < 2:
        errors["ranking"] = "all responses share one rank: nothing to score; rank at least one higher"
    if errors:
        detail = "; ".join(f"{name}: {msg}" for name, msg in errors.items())
        raise Invalid(f"The expected ranking of task {task.id} is not valid ({detail}).", errors=errors)
    return clean


def mark_gold(session: Session, *, prompt_set_id: int, task_id: int,
              ranking: Mapping[Any, Any] | None = None, best_response_id: Any = None) -> Task:
    """Make a task gold with an expected ranking ({response_id: rank 1..K} for every
    response; ties allowed) or an expected best response. Marking again replaces
    the answer. Raises NotFound, Invalid."""
    task = get_task(session, prompt_set_id=prompt_set_id, task_id=task_id)
    task.gold_ranking = expected_ranking(task, ranking=ranking, best_response_id=best_response_id)
    task.is_gold = True
    session.commit()
    return task


def unmark_gold(session: Session, *, prompt_set_id: int, task_id: int) -> Task:
    """Make a gold task an ordinary one again (its expected answer is dropped)."""
    task = get_task(session, prompt_set_id=prompt_set_id, task_id=task_id)
    task.is_gold = False
    task.gold_ranking = None
    session.commit()
    return task


def set_gold_rate(session: Session, *, prompt_set_id: int, rate: Any) -> PromptSet:
    """Set the share (0..1) of gold tasks mixed into labelers' queues. Raises Invalid."""
    prompt_set = get_prompt_set(session, prompt_set_id)
    try:
        value = float(rate.strip() if isinstance(rate, str) else rate)
    except (TypeError, ValueError):
        raise Invalid(f"Gold rate {rate!r} is not a number; give a share between 0 and 1 (e.g. 0.05).",
                      errors={"gold_rate": "must be a number between 0 and 1"})
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise Invalid(f"Gold rate {value:g} is out of range; give a share between 0 and 1 (e.g. 0.05).",
                      errors={"gold_rate": "must be between 0 and 1"})
    prompt_set.gold_rate = value
    session.commit()
    return prompt_set


def expected_text(task: Task) -> str:
    """The expected answer by display letters, best first: "B > A = C"."""
    ranking = task.gold_ranking or {}
    letters = {item.response_id: LETTERS[item.position] for item in task.items}
    by_rank: dict[int, list[str]] = {}
    for rid, rank in ranking.items():
        by_rank.setdefault(int(rank), []).append(letters.get(int(rid), "?"))
    return " > ".join(" = ".join(sorted(group)) for _, group in sorted(by_rank.items()))


@dataclass
class GoldTask:
    task: Task
    annotations: int  # labelers who answered it

    @property
    def expected(self) -> str:
        return expected_text(self.task)


def list_gold_tasks(session: Session, *, prompt_set_id: int) -> list[GoldTask]:
    """The set's gold tasks with their responses and how often they were answered."""
    answered = (
        select(func.count(Annotation.id)).where(Annotation.task_id == Task.id).correlate(Task).scalar_subquery()
    )
    rows = session.execute(
        select(Task, answered)
        .where(Task.prompt_set_id == prompt_set_id, Task.is_gold)
        .options(selectinload(Task.items).selectinload(TaskResponse.response), selectinload(Task.prompt))
        .order_by(Task.id)
    ).all()
    return [GoldTask(task=task, annotations=n) for task, n in rows]


def candidate_tasks(session: Session, *, prompt_set_id: int, limit: int = 10) -> list[Task]:
    """Ordinary tasks of the set's current round that could be made gold, most labeled first."""
    return list(session.scalars(
        select(Task)
        .join(PromptSet, PromptSet.id == Task.prompt_set_id)
        .where(Task.prompt_set_id == prompt_set_id, Task.is_gold.is_(False), Task.round == PromptSet.round)
        .options(selectinload(Task.prompt))
        .order_by(Task.num_labels.desc(), Task.id)
        .limit(limit)
    ))
