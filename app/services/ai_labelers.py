"""AI labelers: accounts of kind `ai` whose annotations come from an `ai_label` job.

An admin creates one naming its judge, a model of the registry:
- a reward model ranks a task's responses by score (equal scores tie);
- an SFT or policy model (instruction-following) compares every pair of responses
  under the set's instructions and principles, its preference read from the
  log-probabilities of the answer tokens, in both orders (trainer/ai_judge.py).

Its annotations are stored like a labeler's (app/services/annotations.submit_unleased:
the same checks and rows) and shown with an AI badge; they never count towards a
task's human overlap (tasks.num_labels), the set's progress or the humans' agreement
figures, while the quality page gives the AI labeler's own agreement with the human
consensus like any labeler's. Training uses them only when asked (include_ai).

An AI account cannot sign in: its password is random and unknown, sign-in and API
tokens refuse it (app/services/auth), and it cannot be given a password.

Pre-annotation (a per-set choice of AI labeler): the labeling page pre-fills that AI's
ranking on a fixed half of the set's tasks (annotations.prefill_arm); each labeler's
annotation records whether it was shown and changed, so the quality page compares
time spent and agreement with the AI with and without it (prefill_study).
"""

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app import queue
from app.db.enums import JobKind, ModelKind, PromptSetKind, Role, UserKind
from app.db.models import Annotation, Job, Model, PromptSet, Task, User
from app.services import annotations, models
from app.services.agreement import HUMAN_AUTHOR
from app.services.assignment import load_task
from app.services.errors import Conflict, Invalid, NotFound, raise_for_fields
from app.services.jobs import enqueue_job
from app.services.prompt_sets import get_prompt_set
from app.services.users import USERNAME_RE, get_user_by_name, hash_password
from app.services.validation import as_id, text_problem

JUDGE_KINDS = (ModelKind.reward, ModelKind.sft, ModelKind.policy)
SCOPES = {"missing": "tasks it has not ranked yet", "all": "every task (its earlier rankings are replaced)"}
MAX_PRINCIPLES = 10_000



def ai_author():
    """ORM clause: the annotation is an AI labeler's."""
    return Annotation.user_id.in_(select(User.id).where(User.kind == UserKind.ai))


def judge_kind(model: Model) -> str:
    """'reward' (ranks by score) or 'judge' (compares pairs under principles)."""
    return "reward" if model.kind == ModelKind.reward else "judge"


def create_ai_labeler(session: Session, *, username: Any, judge_model_id: Any) -> User:
    """An AI labeler account judging with a model of the registry. Raises Invalid
    (username, judge_model_id) or Conflict (name taken)."""
    errors: dict[str, str] = {}
    name = username.strip() if isinstance(username, str) else ""
    if not USERNAME_RE.match(name):
        errors["username"] = "2-64 letters, digits or . _ @ -"
    judge = models.choose_model(errors, session, "judge_model_id", judge_model_id, JUDGE_KINDS, None,
                                "a reward, SFT or policy model")
    raise_for_fields(errors)
    if get_user_by_name(session, name) is not None:
        raise Conflict(f"A user named '{name}' already exists.", errors={"username": "already taken"})
    assert judge is not None
    # No one knows this password, and sign-in refuses AI accounts anyway.
    user = User(username=name, role=Role.labeler, kind=UserKind.ai, judge_model_id=judge.id,
                password_hash=hash_password(secrets.token_urlsafe(32)))
    session.add(user)
    session.commit()
    return user


def list_ai_labelers(session: Session, *, active_only: bool = False) -> list[User]:
    query = select(User).where(User.kind == UserKind.ai).order_by(User.username)
    if active_only:
        query = query.where(User.is_active)
    return list(session.scalars(query))


def get_ai_labeler(session: Session, user_id: Any, *, field: str = "ai_user_id") -> User:
    """The active AI labeler of this id; raises Invalid naming the field otherwise."""
    user_id = as_id(user_id)
    user = session.get(User, user_id) if user_id is not None else None
    if user is None or not user.is_ai or not user.is_active:
        raise Invalid("Choose an active AI labeler.", errors={field: "choose an active AI labeler from the list"})
    return user


def _ranking_set(session: Session, prompt_set_id: int) -> PromptSet:
    prompt_set = get_prompt_set(session, prompt_set_id)
    if prompt_set.kind != PromptSetKind.ranking:
        raise Conflict(f"'{prompt_set.name}' is not a ranking set: AI labelers rank ranking sets' responses.")
    return prompt_set


def update_ai_settings(session: Session, *, prompt_set_id: int, principles: Any = None,
                       pre_annotator_id: Any = None) -> PromptSet:
    """Replace a ranking set's principles (text; None: none) and pre-annotator (an AI labeler's
    id; None or empty: off), both at once. Raises NotFound, Conflict (not a ranking set),
    Invalid (principles, pre_annotator_id)."""
    prompt_set = _ranking_set(session, prompt_set_id)
    errors: dict[str, str] = {}
    text_value = principles if isinstance(principles, str) else ""
    if principles is not None and not isinstance(principles, str):
        errors["principles"] = "must be text"
    elif len(text_value) > MAX_PRINCIPLES:
        errors["principles"] = f"at most {MAX_PRINCIPLES:,} characters ({len(text_value):,} given)"
    elif text_problem(text_value):
        errors["principles"] = text_problem(text_value)
    annotator = None
    if pre_annotator_id not in (None, ""):
        try:
            annotator = get_ai_labeler(session, pre_annotator_id, field="pre_annotator_id")
        except Invalid as exc:
            errors |= exc.errors
    raise_for_fields(errors)
    prompt_set.principles = text_value.replace("\r\n", "\n").strip()
    prompt_set.pre_annotator_id = annotator.id if annotator else None
    session.commit()
    return prompt_set


def start_ai_label_job(session: Session, *, prompt_set_id: int, ai_user_id: Any, scope: Any = "missing",
                       created_by_id: int | None, queue_name: str = queue.GPU_QUEUE) -> Job:
    """Queue an ai_label job: the AI labeler ranks the set's current-round tasks (all, or
    those it has not ranked). Raises NotFound, Conflict (not a ranking set), Invalid."""
    prompt_set = _ranking_set(session, prompt_set_id)
    errors: dict[str, str] = {}
    try:
        user = get_ai_labeler(session, ai_user_id)
    except Invalid as exc:
        errors |= exc.errors
    if scope not in SCOPES:
        errors["scope"] = "choose " + " or ".join(SCOPES)
    raise_for_fields(errors)
    params = {"prompt_set_id": prompt_set.id, "ai_user_id": user.id, "scope": scope}
    return enqueue_job(session, kind=JobKind.ai_label, params=params, created_by_id=created_by_id,
                       prompt_set_id=prompt_set.id, queue=queue_name)


# ---- what the job reads and writes (in the worker) ------------------------------------

@dataclass(frozen=True)
class TaskToRank:
    task_id: int
    messages: list[dict[str, str]]
    response_ids: list[int]  # in display order
    responses: list[str]


def tasks_to_rank(session: Session, *, prompt_set_id: int, ai_user_id: int, scope: str) -> list[TaskToRank]:
    """The set's current-round, non-gold tasks the AI labeler is to rank, in id order."""
    prompt_set = get_prompt_set(session, prompt_set_id)
    query = select(Task.id).where(Task.prompt_set_id == prompt_set_id, Task.round == prompt_set.round,
                                  Task.is_gold.is_(False)).order_by(Task.id)
    if scope == "missing":
        query = query.where(~select(Annotation.id).where(Annotation.task_id == Task.id,
                                                         Annotation.user_id == ai_user_id).exists())
    out = []
    for task_id in session.scalars(query).all():
        task = load_task(session, task_id)
        items = sorted(task.items, key=lambda item: item.position)
        out.append(TaskToRank(task.id, list(task.prompt.messages), [i.response_id for i in items],
                              [i.response.text for i in items]))
    return out


def store_ranking(session: Session, *, ai_user: User, task_id: int, ranks: list[int], now: datetime) -> Annotation:
    """The AI labeler's ranking of a task (ranks in display order) stored as its annotation
    (app/services/annotations.submit_unleased). Does not commit."""
    task = load_task(session, task_id)
    ids = [item.response_id for item in sorted(task.items, key=lambda item: item.position)]
    if len(ranks) != len(ids):
        raise Invalid(f"Task {task_id} has {len(ids)} responses; {len(ranks)} ranks were given.")
    return annotations.submit_unleased(session, user=ai_user, task=task, ranks=dict(zip(ids, ranks)), now=now)


# ---- the pre-annotation study ---------------------------------------------------------

@dataclass
class PrefillArm:
    annotations: int = 0
    mean_time_s: float | None = None
    changed_rate: float | None = None  # shown arm only: share of pre-fills the labeler changed
    ai_agreement: float | None = None  # share of strict pairs where the labeler agrees with the AI
    ai_pairs: int = 0


@dataclass
class PrefillStudy:
    pre_annotator: str | None
    shown: PrefillArm
    hidden: PrefillArm


def prefill_study(session: Session, *, prompt_set_id: int) -> PrefillStudy:
    """Labelers' annotations of the set's pre-annotation study, with and without the AI's
    ranking shown: mean time, how often a shown ranking was changed, and agreement with the
    pre-annotator's ranking (strict pairs of both). Only annotations made under the set's current
    pre-annotator count (choosing another starts a fresh study); excluded ones are left out."""
    prompt_set = get_prompt_set(session, prompt_set_id)
    arms = {True: PrefillArm(), False: PrefillArm()}
    params = {"set_id": prompt_set_id, "ai_id": prompt_set.pre_annotator_id}
    studied = f"""
        SELECT a.id, a.task_id, a.prefill_shown, a.prefill_changed, a.time_spent_s
        FROM annotations a JOIN tasks t ON t.id = a.task_id
        WHERE t.prompt_set_id = :set_id AND a.prefill_user_id = :ai_id AND NOT a.excluded AND {HUMAN_AUTHOR}
    """
    for row in session.execute(text(f"""
        SELECT s.prefill_shown AS shown, count(*) AS n, avg(s.time_spent_s) AS time_s,
               avg(s.prefill_changed::int) AS changed
        FROM ({studied}) s GROUP BY s.prefill_shown
    """), params):
        arm = arms[row.shown]
        arm.annotations, arm.mean_time_s = row.n, float(row.time_s)
        arm.changed_rate = float(row.changed) if row.changed is not None else None
    for row in session.execute(text(f"""
        SELECT s.prefill_shown AS shown,
               count(*) FILTER (WHERE sign(y.rank - x.rank) = sign(ay.rank - ax.rank)) AS agree, count(*) AS pairs
        FROM ({studied}) s
        JOIN ratings x ON x.annotation_id = s.id
        JOIN ratings y ON y.annotation_id = s.id AND x.response_id < y.response_id
        JOIN annotations ai ON ai.task_id = s.task_id AND ai.user_id = :ai_id
        JOIN ratings ax ON ax.annotation_id = ai.id AND ax.response_id = x.response_id
        JOIN ratings ay ON ay.annotation_id = ai.id AND ay.response_id = y.response_id
        WHERE x.rank <> y.rank AND ax.rank <> ay.rank
        GROUP BY s.prefill_shown
    """), params):
        arm = arms[row.shown]
        arm.ai_agreement, arm.ai_pairs = (row.agree / row.pairs if row.pairs else None), row.pairs
    annotator = session.get(User, prompt_set.pre_annotator_id) if prompt_set.pre_annotator_id else None
    return PrefillStudy(pre_annotator=annotator.username if annotator else None, shown=arms[True], hidden=arms[False])
