"""Active learning: hand out first the tasks a reward model separates least confidently.

A ranking set's `task_order` is `created` (oldest task first) or `uncertainty`.
With `uncertainty`, a reward model (the set's `order_model`, or the newest reward
model when none is chosen) scores every response of the set's open tasks, and
each task's informativeness is its margin:

    margin = mean over the task's K(K-1)/2 pairs of |r_i - r_j|

with r the normalised rewards (the SFT samples have mean 0, std 1). Under the
Bradley-Terry model the reward model is trained with, P(i beats j) =
sigmoid(r_i - r_j), so a small gap is a pair the model is unsure of, and the mean
over pairs matches the ranking loss, which averages over the same pairs. Tasks
of smallest margin go first (app/services/assignment.py); overlap-filling (tasks
that already have labels) still comes before them, and tasks not scored yet come
after every scored task, oldest first.

Scoring runs as a `score_tasks` job (trainer/score_tasks_job.py), queued when a
set switches to the uncertainty order or changes its reward model, when a new
reward model is registered (sets following the newest one), when a generate job
created tasks, and by hand. Only the tasks still open (not gold, fewer labels
than the overlap, of the current round) are scored: the order of the others no
longer matters. The scores are for admins and engineers; nothing a labeler reads
carries them.
"""

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, joinedload

from app.db.enums import JobKind, JobStatus, ModelKind, PromptSetKind, PromptSetStatus, TaskOrder
from app.db.models import Job, Model, Prompt, PromptSet, Task, TaskResponse, TaskScore
from app.services.errors import Conflict, Invalid
from app.services.validation import as_id

SCORES_SHOWN = 20  # lowest-margin tasks listed on the set's page


def margin(rewards: Sequence[float]) -> float:
    """Mean |r_i - r_j| over the pairs of responses: how confidently the rewards
    separate them (0 = not at all)."""
    assert len(rewards) >= 2, "a task has two responses or more"
    gaps = [abs(a - b) for a, b in itertools.combinations(rewards, 2)]
    return sum(gaps) / len(gaps)


def newest_reward_model(session: Session) -> Model | None:
    return session.scalar(select(Model).where(Model.kind == ModelKind.reward)
                          .order_by(Model.created_at.desc(), Model.id.desc()).limit(1))


def scoring_model(session: Session, prompt_set: PromptSet) -> Model | None:
    """The reward model whose scores order the set: its chosen one, else the newest."""
    if prompt_set.order_model_id is not None:
        return session.get(Model, prompt_set.order_model_id)
    return newest_reward_model(session)


def update_order(session: Session, *, prompt_set: PromptSet, order: Any, order_model_id: Any,
                 user_id: int | None) -> Job | None:
    """Set the task order and the reward model (blank: the newest reward model).
    Switching to the uncertainty order, or changing its model, queues scoring.
    Raises Invalid per field, Conflict for an archived or non-ranking set. Commits;
    returns the scoring job queued, if any."""
    _check_rankable(prompt_set)
    errors: dict[str, str] = {}
    try:
        order = TaskOrder(order.strip() if isinstance(order, str) else order)
    except ValueError:
        errors["task_order"] = "must be " + " or ".join(o.value for o in TaskOrder)
    model_id = None
    if not (order_model_id is None or (isinstance(order_model_id, str) and not order_model_id.strip())):
        model_id = as_id(order_model_id)
        model = session.get(Model, model_id) if model_id is not None else None
        if model is None or model.kind != ModelKind.reward:
            errors["order_model_id"] = "choose a reward model from the registry"
    if errors:
        raise Invalid("Please correct the highlighted fields: " + ", ".join(errors) + ".", errors=errors)
    changed = (order, model_id) != (prompt_set.task_order, prompt_set.order_model_id)
    prompt_set.task_order, prompt_set.order_model_id = order, model_id
    job = queue_scoring_if_needed(session, prompt_set=prompt_set, created_by_id=user_id) if changed else None
    session.commit()
    return job


def _check_rankable(prompt_set: PromptSet) -> None:
    if prompt_set.kind != PromptSetKind.ranking:
        raise Conflict(f"'{prompt_set.name}' is a {prompt_set.kind.value} set: only ranking sets have a task order.")
    if prompt_set.status == PromptSetStatus.archived:
        raise Conflict(f"'{prompt_set.name}' is archived: its tasks are no longer handed out.")


def _queued_scoring(session: Session, prompt_set_id: int) -> Job | None:
    return session.scalar(select(Job).where(Job.kind == JobKind.score_tasks, Job.prompt_set_id == prompt_set_id,
                                            Job.status == JobStatus.queued).order_by(Job.id).limit(1))


def queue_scoring(session: Session, *, prompt_set: PromptSet, created_by_id: int | None,
                  commit: bool = True) -> Job:
    """Queue a score_tasks job for the set with its scoring model (a job already
    queued for the set is returned instead: it will read the newest tasks).
    Raises Conflict for an archived or non-ranking set, or when no reward model is
    registered."""
    _check_rankable(prompt_set)
    model = scoring_model(session, prompt_set)
    if model is None:
        raise Conflict("Register or train a reward model first: none is registered to score the tasks.")
    # The set's row is locked: two triggers at once queue one job, not two.
    session.execute(select(PromptSet.id).where(PromptSet.id == prompt_set.id).with_for_update())
    job = _queued_scoring(session, prompt_set.id)
    if job is None or job.params.get("reward_model_id") != model.id:
        from app.services.jobs import enqueue_job  # jobs imports the queue; load it only when needed

        job = enqueue_job(session, kind=JobKind.score_tasks, created_by_id=created_by_id, commit=False,
                          params={"prompt_set_id": prompt_set.id, "reward_model_id": model.id},
                          prompt_set_id=prompt_set.id)
    if commit:
        session.commit()
    return job


def queue_scoring_if_needed(session: Session, *, prompt_set: PromptSet, created_by_id: int | None) -> Job | None:
    """Queue scoring when the set orders by uncertainty, is open and a reward model
    is there to score with. Does not commit."""
    if (prompt_set.task_order != TaskOrder.uncertainty or prompt_set.kind != PromptSetKind.ranking
            or prompt_set.status == PromptSetStatus.archived or scoring_model(session, prompt_set) is None):
        return None
    return queue_scoring(session, prompt_set=prompt_set, created_by_id=created_by_id, commit=False)


def queue_scoring_for_new_model(session: Session, *, model: Model) -> list[Job]:
    """A reward model was registered: the sets ordered by uncertainty that follow the
    newest reward model are scored again with it. Does not commit."""
    if model.kind != ModelKind.reward:
        return []
    following = session.scalars(select(PromptSet).where(
        PromptSet.task_order == TaskOrder.uncertainty, PromptSet.order_model_id.is_(None),
        PromptSet.kind == PromptSetKind.ranking, PromptSet.status != PromptSetStatus.archived,
    ).order_by(PromptSet.id)).all()
    jobs = [queue_scoring_if_needed(session, prompt_set=s, created_by_id=None) for s in following]
    return [j for j in jobs if j is not None]


# ---- the job's reads and writes ----------------------------------------------------

@dataclass
class TaskToScore:
    task_id: int
    messages: list[dict[str, str]]
    response_ids: list[int]
    texts: list[str]


def tasks_to_score(session: Session, prompt_set_id: int) -> list[TaskToScore]:
    """The set's open tasks (current round, not gold, fewer labels than the overlap), oldest first."""
    tasks = session.scalars(
        select(Task).join(PromptSet, PromptSet.id == Task.prompt_set_id)
        .where(Task.prompt_set_id == prompt_set_id, Task.round == PromptSet.round, ~Task.is_gold,
               Task.num_labels < PromptSet.overlap)
        .options(joinedload(Task.items).joinedload(TaskResponse.response), joinedload(Task.prompt))
        .order_by(Task.created_at, Task.id)
    ).unique().all()
    return [TaskToScore(t.id, t.prompt.messages, [i.response_id for i in t.items], [i.response.text for i in t.items])
            for t in tasks]


def store_scores(session: Session, *, model_id: int, job_id: int | None,
                 scored: Sequence[tuple[int, Mapping[int, float]]]) -> None:
    """Write (task id, {response id: reward}) pairs with their margins, replacing
    earlier scores of those tasks. Does not commit."""
    if not scored:
        return
    rows = [{"task_id": task_id, "model_id": model_id, "job_id": job_id, "margin": margin(list(rewards.values())),
             "rewards": {str(r): round(float(v), 6) for r, v in rewards.items()}} for task_id, rewards in scored]
    statement = insert(TaskScore).values(rows)
    session.execute(statement.on_conflict_do_update(
        index_elements=[TaskScore.task_id],
        set_={c: statement.excluded[c] for c in ("model_id", "job_id", "margin", "rewards")} | {
            "scored_at": func.now()},
    ))


# ---- what admins and engineers read ------------------------------------------------

@dataclass
class ScoredTask:
    task_id: int
    prompt: str
    margin: float
    num_labels: int
    model_name: str


@dataclass
class OrderSummary:
    """The set's order, its scoring model and the lowest-margin open tasks."""

    task_order: TaskOrder
    chosen_model: Model | None  # None: the newest reward model
    scoring_model: Model | None
    open_tasks: int
    scored_tasks: int
    lowest: list[ScoredTask]
    job: Job | None  # the latest scoring job


def order_summary(session: Session, prompt_set: PromptSet, *, limit: int = SCORES_SHOWN) -> OrderSummary:
    open_task = (Task.prompt_set_id == prompt_set.id, Task.round == prompt_set.round, ~Task.is_gold,
                 Task.num_labels < prompt_set.overlap)
    open_tasks, scored = session.execute(
        select(func.count(Task.id), func.count(TaskScore.task_id))
        .outerjoin(TaskScore, TaskScore.task_id == Task.id).where(*open_task)
    ).one()
    lowest = [
        ScoredTask(task_id, text, score_margin, num_labels, model_name)
        for task_id, text, score_margin, num_labels, model_name in session.execute(
            select(Task.id, Prompt.text, TaskScore.margin, Task.num_labels, Model.name)
            .join(TaskScore, TaskScore.task_id == Task.id).join(Prompt, Prompt.id == Task.prompt_id)
            .join(Model, Model.id == TaskScore.model_id)
            .where(*open_task).order_by(TaskScore.margin, Task.created_at, Task.id).limit(limit)
        )
    ]
    job = session.scalar(select(Job).where(Job.kind == JobKind.score_tasks, Job.prompt_set_id == prompt_set.id)
                         .order_by(Job.id.desc()).limit(1))
    return OrderSummary(prompt_set.task_order, prompt_set.order_model, scoring_model(session, prompt_set),
                        open_tasks, scored, lowest, job)
