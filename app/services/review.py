"""Review and correction of labeled tasks.

An admin opens a labeled task and reads every labeler's ratings, ranking, flags and
comment side by side with the consensus, then either accepts the task (the
annotations stand) or writes a corrected ranking, used one of two ways:
- `training`: the correction replaces the task's annotations in the reward model's
  data and in the comparisons export (app/services/export); the labelers'
  annotations stay stored and keep counting in agreement;
- `gold`: the task becomes a gold task with the correction as its expected answer
  (app/services/gold), so it leaves the training data and scores the labelers.

Each review is a row of task_reviews with its reviewer and time; a new review of the
same task is a new row (the latest is the task's state, the others its history).
Nothing of the labelers' work is changed or deleted.

The review queue orders a set's labeled tasks by disagreement: over the pairs of
labelers of a task and the response pairs both judged, the share on which their
preferences oppose, a strict preference against a tie counting half. Pairs where
both tied are left out. Excluded annotations are left out, as in agreement.
"""

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, func, select, text
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.orm import Session, selectinload

from app.db.enums import CorrectionUse, ReviewDecision
from app.db.models import Annotation, Prompt, Task, TaskReview, User
from app.services import gold
from app.services.errors import Conflict, Invalid
from app.services.prompt_sets import get_prompt_set
from app.services.validation import check_text

LETTERS = gold.LETTERS
MAX_NOTE = 2000
QUEUE_VIEWS = ("open", "reviewed", "all")


def current_reviews() -> Select:
    """SELECT the latest review of every reviewed task (DISTINCT ON task): the task's state."""
    return (
        select(TaskReview)
        .ext(distinct_on(TaskReview.task_id))
        .order_by(TaskReview.task_id, TaskReview.id.desc())
    )


def training_corrections() -> Any:
    """Subquery: the current reviews that are corrections used as training data."""
    current = current_reviews().subquery()
    return (
        select(current)
        .where(current.c.decision == ReviewDecision.corrected, current.c.use == CorrectionUse.training)
        .subquery("corrections")
    )


# ---- the queue --------------------------------------------------------------------------

_DISAGREEMENT = text("""
    WITH p AS (
        SELECT a.task_id, a.user_id, x.response_id AS ri, y.response_id AS rj, sign(y.rank - x.rank)::int AS pref
        FROM annotations a
        JOIN tasks t ON t.id = a.task_id
        JOIN ratings x ON x.annotation_id = a.id
        JOIN ratings y ON y.annotation_id = a.id AND x.response_id < y.response_id
        WHERE t.prompt_set_id = :set_id AND NOT a.excluded
          AND (CAST(:task_id AS integer) IS NULL OR a.task_id = CAST(:task_id AS integer))
    )
    SELECT p.task_id,
           (count(*) FILTER (WHERE p.pref * q.pref < 0)
            + 0.5 * count(*) FILTER (WHERE (p.pref = 0) <> (q.pref = 0)))::float
           / nullif(count(*) FILTER (WHERE p.pref <> 0 OR q.pref <> 0), 0) AS disagreement,
           count(*) FILTER (WHERE p.pref <> 0 OR q.pref <> 0) AS compared
    FROM p JOIN p q ON q.task_id = p.task_id AND q.ri = p.ri AND q.rj = p.rj AND p.user_id < q.user_id
    GROUP BY p.task_id
""")


@dataclass
class QueueItem:
    task_id: int
    prompt_text: str
    labels: int  # annotations that count (not excluded)
    disagreement: float | None  # None with fewer than two labelers
    compared: int  # (labeler pair, response pair) judgements compared
    is_gold: bool
    review: TaskReview | None

    @property
    def status(self) -> str:
        if self.review is None:
            return "open"
        if self.review.decision == ReviewDecision.accepted:
            return "accepted"
        return f"corrected ({self.review.use.value})"


@dataclass
class ReviewCounts:
    accepted: int = 0
    training: int = 0
    gold: int = 0

    @property
    def reviewed(self) -> int:
        return self.accepted + self.training + self.gold


def review_counts(session: Session, *, prompt_set_id: int) -> ReviewCounts:
    """How many of the set's tasks stand accepted, corrected for training, corrected as gold."""
    current = current_reviews().join(Task, Task.id == TaskReview.task_id).where(
        Task.prompt_set_id == prompt_set_id).subquery()
    counts = ReviewCounts()
    for decision, use, n in session.execute(
        select(current.c.decision, current.c.use, func.count()).group_by(current.c.decision, current.c.use)
    ):
        if decision == ReviewDecision.accepted:
            counts.accepted += n
        elif use == CorrectionUse.training:
            counts.training += n
        else:
            counts.gold += n
    return counts


def review_queue(session: Session, *, prompt_set_id: int, show: str = "open", limit: int = 100) -> list[QueueItem]:
    """The set's labeled tasks, most disagreed first (tasks with one labeler last): `open`
    the unreviewed ones, `reviewed` the reviewed ones, `all` both (open first). Raises
    NotFound, Invalid (show)."""
    get_prompt_set(session, prompt_set_id)
    if show not in QUEUE_VIEWS:
        raise Invalid(f"Unknown view '{show[:20]}'; choose one of {', '.join(QUEUE_VIEWS)}.",
                      errors={"show": f"choose one of {', '.join(QUEUE_VIEWS)}"})
    disagreement = {row.task_id: row for row in session.execute(_DISAGREEMENT, {"set_id": prompt_set_id,
                                                                               "task_id": None})}
    current = current_reviews().subquery()
    labels = (select(func.count(Annotation.id)).where(Annotation.task_id == Task.id, Annotation.excluded.is_(False))
              .correlate(Task).scalar_subquery())
    query = (
        select(Task.id, Prompt.text, Task.is_gold, labels.label("labels"), current.c.id.label("review_id"))
        .join(Prompt, Prompt.id == Task.prompt_id)
        .outerjoin(current, current.c.task_id == Task.id)
        .where(Task.prompt_set_id == prompt_set_id,
               select(Annotation.id).where(Annotation.task_id == Task.id).exists())
    )
    if show == "open":
        query = query.where(current.c.id.is_(None), Task.is_gold.is_(False))
    elif show == "reviewed":
        query = query.where(current.c.id.is_not(None))
    rows = session.execute(query).all()
    reviews = {r.id: r for r in session.scalars(
        select(TaskReview).where(TaskReview.id.in_([r.review_id for r in rows if r.review_id]))
        .options(selectinload(TaskReview.reviewer)))}
    items = []
    for row in rows:
        d = disagreement.get(row.id)
        items.append(QueueItem(
            task_id=row.id, prompt_text=row.text, labels=row.labels, is_gold=row.is_gold,
            disagreement=d.disagreement if d is not None else None, compared=d.compared if d is not None else 0,
            review=reviews.get(row.review_id),
        ))
    items.sort(key=lambda i: (i.review is not None, i.disagreement is None, -(i.disagreement or 0.0),
                              -i.labels, i.task_id))
    return items[:limit]


# ---- one task ---------------------------------------------------------------------------

@dataclass
class LabelerColumn:
    """One labeler's annotation of the task, by response id."""

    annotation: Annotation
    username: str
    likert: dict[int, int]
    rank: dict[int, int]
    flags: dict[int, list[str]]


@dataclass
class Consensus:
    """The counted annotations' view of each response: mean rank and rating, and the
    ranking those mean ranks give (equal means share a rank)."""

    mean_rank: dict[int, float] = field(default_factory=dict)
    mean_likert: dict[int, float] = field(default_factory=dict)
    rank: dict[int, int] = field(default_factory=dict)
    labelers: int = 0


@dataclass
class TaskForReview:
    task: Task
    columns: list[LabelerColumn]
    consensus: Consensus
    disagreement: float | None
    reviews: list[TaskReview]  # newest first

    @property
    def current(self) -> TaskReview | None:
        return self.reviews[0] if self.reviews else None

    def letters(self, ranking: dict[str, Any] | None) -> str:
        """A ranking {response_id: rank} by display letters, best first: "B > A = C"."""
        if not ranking:
            return ""
        by_rank: dict[int, list[str]] = {}
        letter = {item.response_id: LETTERS[item.position] for item in self.task.items}
        for rid, rank in ranking.items():
            by_rank.setdefault(int(rank), []).append(letter.get(int(rid), "?"))
        return " > ".join(" = ".join(sorted(g)) for _, g in sorted(by_rank.items()))


def _consensus(task: Task, columns: list[LabelerColumn]) -> Consensus:
    counted = [c for c in columns if not c.annotation.excluded]
    consensus = Consensus(labelers=len(counted))
    if not counted:
        return consensus
    for item in task.items:
        rid = item.response_id
        ranks = [c.rank[rid] for c in counted if rid in c.rank]
        likerts = [c.likert[rid] for c in counted if rid in c.likert]
        if ranks:
            consensus.mean_rank[rid] = sum(ranks) / len(ranks)
        if likerts:
            consensus.mean_likert[rid] = sum(likerts) / len(likerts)
    # Competition ranking ("1, 1, 3"), as labelers' ties are stored.
    for rid, mean in consensus.mean_rank.items():
        consensus.rank[rid] = 1 + sum(1 for v in consensus.mean_rank.values() if round(v, 6) < round(mean, 6))
    return consensus


def task_for_review(session: Session, *, prompt_set_id: int, task_id: int) -> TaskForReview:
    """The task with every annotation (excluded ones too, marked), the consensus of the
    counted ones, its disagreement and its reviews. Raises NotFound."""
    task = gold.get_task(session, prompt_set_id=prompt_set_id, task_id=task_id)
    annotations = session.execute(
        select(Annotation, User.username).join(User, User.id == Annotation.user_id)
        .where(Annotation.task_id == task.id).options(selectinload(Annotation.ratings))
        .order_by(User.username)
    ).all()
    columns = [
        LabelerColumn(annotation=a, username=name,
                      likert={r.response_id: r.likert for r in a.ratings},
                      rank={r.response_id: r.rank for r in a.ratings},
                      flags={r.response_id: list(r.flags or []) for r in a.ratings})
        for a, name in annotations
    ]
    row = session.execute(_DISAGREEMENT, {"set_id": prompt_set_id, "task_id": task.id}).first()
    reviews = list(session.scalars(
        select(TaskReview).where(TaskReview.task_id == task.id).order_by(TaskReview.id.desc())
        .options(selectinload(TaskReview.reviewer))
    ))
    return TaskForReview(task=task, columns=columns, consensus=_consensus(task, columns),
                         disagreement=row.disagreement if row else None, reviews=reviews)


def _labeled(session: Session, prompt_set_id: int, task_id: int) -> Task:
    task = gold.get_task(session, prompt_set_id=prompt_set_id, task_id=task_id)
    if session.scalar(select(func.count(Annotation.id)).where(Annotation.task_id == task.id)) == 0:
        raise Conflict(f"Task {task.id} has no annotations yet: there is nothing to review.")
    return task


def _note(note: str | None) -> str:
    note = (note or "").strip()
    if len(note) > MAX_NOTE:
        raise Invalid(f"The note is {len(note)} characters long; keep it under {MAX_NOTE}.",
                      errors={"note": f"at most {MAX_NOTE} characters"})
    return check_text(note, "note")


def accept_task(session: Session, *, prompt_set_id: int, task_id: int, reviewer: User,
                note: str | None = "") -> TaskReview:
    """Record that the reviewer accepts the task's annotations as they are. Raises
    NotFound, Conflict (no annotations yet), Invalid (note)."""
    task = _labeled(session, prompt_set_id, task_id)
    review = TaskReview(task_id=task.id, reviewer_id=reviewer.id, decision=ReviewDecision.accepted,
                        note=_note(note))
    session.add(review)
    session.commit()
    return review


def correct_task(session: Session, *, prompt_set_id: int, task_id: int, reviewer: User,
                 ranking: dict[Any, Any] | None, use: Any, note: str | None = "") -> TaskReview:
    """Record the reviewer's corrected ranking ({response_id: rank 1..K} for every response,
    ties allowed, not all equal) and use it as training data in place of the task's
    annotations (`training`) or as its gold answer (`gold`, which marks the task gold).
    Raises NotFound, Conflict (no annotations yet), Invalid (naming rank_<id>, use, note)."""
    task = _labeled(session, prompt_set_id, task_id)
    errors: dict[str, str] = {}
    try:
        clean_use = CorrectionUse(use)
    except ValueError:
        clean_use = None
        errors["use"] = "choose training (replaces the annotations in training data) or gold"
    try:
        clean = gold.expected_ranking(task, ranking=ranking or {})
    except Invalid as exc:
        errors |= exc.errors if isinstance(exc.errors, dict) else {"ranking": "; ".join(exc.errors)}
    clean_note = _note(note)
    if errors:
        detail = "; ".join(f"{k}: {v}" for k, v in errors.items())
        raise Invalid(f"The correction of task {task.id} is not valid ({detail}).", errors=errors)
    review = TaskReview(task_id=task.id, reviewer_id=reviewer.id, decision=ReviewDecision.corrected,
                        ranking=clean, use=clean_use, note=clean_note)
    session.add(review)
    if clean_use == CorrectionUse.gold:
        gold.mark_gold(session, prompt_set_id=prompt_set_id, task_id=task.id, ranking=clean)  # commits both
    else:
        session.commit()
    return review
