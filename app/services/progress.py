"""A prompt set's labeling progress: tasks by state, labels per hour, time to finish.

States of a task of the set's current round (gold tasks are counted apart:
every labeler sees them, so they are never "done"):
- done: labeled by as many labelers as the set's overlap;
- in progress: fewer labels than the overlap but at least one, or leased to a
  labeler right now (an active, unexpired assignment);
- waiting: no label and no lease.

The current rate is the number of (non-gold) labels in the last
`rate_window_h` hours divided by that window; when the first label of the set
is younger than the window, by the hours since that label (at least one).
The estimate divides the labels still needed by that rate.

A demonstration set's progress (`demonstration_progress`) counts its prompts,
those done (as many submitted or accepted demonstrations as the overlap asks)
and its demonstrations by status.
"""

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.enums import DemonstrationStatus
from app.db.models import Demonstration, Prompt, PromptSet
from app.services.agreement import HUMAN_AUTHOR
from app.services.demonstrations.leases import HOLDING
from app.services.prompt_sets import count_prompts, get_prompt_set


@dataclass
class HourCount:
    hour: datetime  # start of the hour, UTC
    labels: int


@dataclass
class SetProgress:
    prompt_set_id: int
    overlap: int
    tasks: int  # non-gold tasks of the current round
    waiting: int
    in_progress: int
    done: int
    gold_tasks: int
    labels_needed: int  # labels still missing to bring every task to the overlap
    labels_total: int  # non-gold labels ever submitted on the set
    rate_per_hour: float  # current rate, non-gold labels per hour
    rate_window_h: float
    eta_hours: float | None  # 0 when finished; None when work is left but the rate is 0
    per_hour: list[HourCount] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.labels_needed == 0


def set_progress(session: Session, *, prompt_set_id: int, now: datetime | None = None,
                 hours: int = 48, rate_window_h: float = 24.0) -> SetProgress:
    """Progress figures of one set; `hours` of labels-per-hour history up to now. Raises NotFound."""
    prompt_set = get_prompt_set(session, prompt_set_id)
    now = now or utcnow()
    params = {"set_id": prompt_set_id, "now": now, "overlap": prompt_set.overlap, "round": prompt_set.round}
    states = session.execute(text("""
        SELECT count(*) FILTER (WHERE NOT t.is_gold) AS tasks,
               count(*) FILTER (WHERE NOT t.is_gold AND t.num_labels >= :overlap) AS done,
               count(*) FILTER (WHERE NOT t.is_gold AND t.num_labels < :overlap AND (t.num_labels > 0 OR EXISTS (
                   SELECT 1 FROM assignments s
                   WHERE s.task_id = t.id AND s.status = 'active' AND s.expires_at > :now
               ))) AS in_progress,
               count(*) FILTER (WHERE t.is_gold) AS gold,
               coalesce(sum(greatest(:overlap - t.num_labels, 0)) FILTER (WHERE NOT t.is_gold), 0) AS needed
        FROM tasks t
        WHERE t.prompt_set_id = :set_id AND t.round = :round
    """), params).one()

    window_start = now - timedelta(hours=rate_window_h)
    rate_row = session.execute(text(f"""
        SELECT count(*) AS total,
               count(*) FILTER (WHERE a.created_at > :start AND a.created_at <= :now) AS recent,
               min(a.created_at) AS first
        FROM annotations a JOIN tasks t ON t.id = a.task_id
        WHERE t.prompt_set_id = :set_id AND NOT t.is_gold AND {HUMAN_AUTHOR}  -- labelers' work only
    """), params | {"start": window_start}).one()
    window_h = rate_window_h
    if rate_row.first is not None and rate_row.first > window_start:
        window_h = max((now - rate_row.first).total_seconds() / 3600, 1.0)
    rate = rate_row.recent / window_h if rate_row.recent else 0.0
    needed = int(states.needed)
    eta = 0.0 if needed == 0 else (needed / rate if rate > 0 else None)

    # Hours with no label show as 0: generate_series gives every hour of the range.
    per_hour = [
        HourCount(hour=row.hour, labels=row.labels)
        for row in session.execute(text(f"""
            SELECT h.hour, count(a.id) AS labels
            FROM generate_series(date_trunc('hour', CAST(:now AS timestamptz), 'UTC') - make_interval(hours => :hours - 1),
                                 date_trunc('hour', CAST(:now AS timestamptz), 'UTC'), interval '1 hour') AS h(hour)
            LEFT JOIN (
                SELECT a.id, a.created_at FROM annotations a JOIN tasks t ON t.id = a.task_id
                WHERE t.prompt_set_id = :set_id AND NOT t.is_gold AND {HUMAN_AUTHOR}
            ) a ON date_trunc('hour', a.created_at, 'UTC') = h.hour
            GROUP BY h.hour ORDER BY h.hour
        """), params | {"hours": hours})
    ]
    return SetProgress(
        prompt_set_id=prompt_set_id,
        overlap=prompt_set.overlap,
        tasks=states.tasks,
        done=states.done,
        in_progress=states.in_progress,
        waiting=states.tasks - states.done - states.in_progress,
        gold_tasks=states.gold,
        labels_needed=needed,
        labels_total=rate_row.total,
        rate_per_hour=rate,
        rate_window_h=window_h,
        eta_hours=eta,
        per_hour=per_hour,
    )


@dataclass
class DemonstrationProgress:
    prompts: int = 0
    # Prompts with as many submitted or accepted demonstrations as the overlap asks.
    prompts_done: int = 0
    by_status: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in DemonstrationStatus})


def demonstration_progress(session: Session, prompt_set: PromptSet) -> DemonstrationProgress:
    """Progress figures of one demonstration set."""
    progress = DemonstrationProgress()
    progress.prompts = count_prompts(session, prompt_set.id)
    for status, n in session.execute(
        select(Demonstration.status, func.count()).join(Prompt, Prompt.id == Demonstration.prompt_id)
        .where(Prompt.prompt_set_id == prompt_set.id).group_by(Demonstration.status)
    ):
        progress.by_status[DemonstrationStatus(status).value] = n
    per_prompt = (
        select(func.count(Demonstration.id).label("n")).join(Prompt, Prompt.id == Demonstration.prompt_id)
        .where(Prompt.prompt_set_id == prompt_set.id, Demonstration.status.in_(HOLDING))
        .group_by(Demonstration.prompt_id).subquery()
    )
    progress.prompts_done = session.scalar(
        select(func.count()).select_from(per_prompt).where(per_prompt.c.n >= prompt_set.overlap)
    ) or 0
    return progress
