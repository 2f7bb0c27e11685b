"""Jobs: the product's record of a generation or training run, linked to its queue job.

The web side queues, lists, cancels and retries jobs; the worker side
(trainer/worker.py) marks them running, writes progress, metrics and the
outcome, and trainer/recovery.py settles the jobs of dead workers. Queue
mechanics (locks, heartbeats, retries) are procrastinate's: app/queue.py queues
and cancels, the workers run; this module keeps our `jobs` row in step.

No torch here: the web process imports this module.
"""

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app import queue
from app.db.base import utcnow
from app.db.enums import JobKind, JobStatus
from app.db.models import Job, JobMetric
from app.services.errors import Conflict, Invalid, NotFound

ACTIVE_STATUSES = (JobStatus.queued, JobStatus.running)
# Key space of our advisory locks (pg_advisory_*(key, id)): "RJ" for run locks.
RUN_LOCK_KEY = 0x524A
RECOVERY_LOCK_KEY = 0x5245
MAX_ERROR_CHARS = 2_000
MAX_TRACEBACK_CHARS = 50_000


def driver_connection(session: Session) -> Any:
    """The psycopg connection under the session's current transaction (queue calls
    made on it are part of that transaction)."""
    return session.connection().connection.driver_connection


# ---- queueing ------------------------------------------------------------------

def enqueue_job(
    session: Session,
    *,
    kind: JobKind | str,
    params: Mapping[str, Any],
    created_by_id: int | None = None,
    prompt_set_id: int | None = None,
    queue: str = queue.GPU_QUEUE,
    commit: bool = True,
) -> Job:
    """Write the job's row and queue it for a worker, in one transaction (both or
    neither). Commits unless commit=False (the caller's transaction then decides).
    Raises Invalid for an unknown kind, a bad queue name or parameters that are
    not a JSON object."""
    try:
        kind = JobKind(kind)
    except ValueError:
        raise Invalid(f"Unknown job kind '{kind}'.", errors={"kind": "unknown job kind"}) from None
    if not isinstance(params, Mapping):
        raise Invalid("Job parameters must be a JSON object.", errors={"params": "must be an object"})
    try:
        params = json.loads(json.dumps(dict(params), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise Invalid(f"Job parameters are not valid JSON: {exc}.", errors={"params": str(exc)}) from None
    queue_name = (queue or "").strip()
    if not queue_name or len(queue_name) > 50:
        raise Invalid("A queue name is 1 to 50 characters.", errors={"queue": "1 to 50 characters"})
    job = Job(kind=kind, params=params, created_by_id=created_by_id, prompt_set_id=prompt_set_id,
              queue=queue_name, status=JobStatus.queued)
    session.add(job)
    session.flush()  # the id goes into the queue job
    job.queue_job_id = _defer(session, job)
    session.flush()
    if commit:
        session.commit()
    return job


def _defer(session: Session, job: Job) -> int:
    from app import queue as queue_module  # the parameter `queue` shadows the module above

    return queue_module.defer_run_job(driver_connection(session), job_id=job.id, queue=job.queue)


def get_job(session: Session, job_id: int) -> Job:
    """The job with this id; raises NotFound."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"No job with id {job_id}.")
    return job


def list_jobs(
    session: Session,
    *,
    status: JobStatus | str | None = None,
    kind: JobKind | str | None = None,
    prompt_set_id: int | None = None,
    limit: int = 100,
    offset: int = 0,
) -> Sequence[Job]:
    """Newest first."""
    query = select(Job).order_by(Job.id.desc()).limit(limit).offset(offset)
    if status is not None:
        query = query.where(Job.status == JobStatus(status))
    if kind is not None:
        query = query.where(Job.kind == JobKind(kind))
    if prompt_set_id is not None:
        query = query.where(Job.prompt_set_id == prompt_set_id)
    return session.scalars(query).all()


def any_active(session: Session) -> bool:
    return bool(session.scalar(select(func.count()).where(Job.status.in_(ACTIVE_STATUSES))))


def list_metrics(session: Session, job_id: int, *, after_id: int | None = None) -> Sequence[JobMetric]:
    """The job's metrics ordered by step, then name; with after_id, only those written
    after that metric (in the order written: what a live chart appends)."""
    query = select(JobMetric).where(JobMetric.job_id == job_id)
    if after_id is not None:
        return session.scalars(query.where(JobMetric.id > after_id).order_by(JobMetric.id)).all()
    return session.scalars(query.order_by(JobMetric.step, JobMetric.name)).all()


@dataclass
class MetricTable:
    names: list[str]
    # (step, {name: value})
    rows: list[tuple[int, dict[str, float]]]


def metric_table(session: Session, job_id: int) -> MetricTable:
    """Metrics as one row per step, one column per name."""
    by_step: dict[int, dict[str, float]] = {}
    names: dict[str, None] = {}
    for m in list_metrics(session, job_id):
        by_step.setdefault(m.step, {})[m.name] = m.value
        names.setdefault(m.name)
    return MetricTable(names=list(names), rows=sorted(by_step.items()))


def retries_of(session: Session, job_id: int) -> Sequence[Job]:
    """Jobs started by retrying this one."""
    return session.scalars(
        select(Job).where(Job.result["retry_of"].as_integer() == job_id).order_by(Job.id)
    ).all()


def eta_s(job: Job, now: datetime | None = None) -> float | None:
    """Seconds left at the rate of this run so far; None when unknown."""
    if job.status != JobStatus.running or job.started_at is None:
        return None
    if job.progress_done <= 0 or job.progress_total <= job.progress_done:
        return None
    elapsed = ((now or utcnow()) - job.started_at).total_seconds()
    return max(0.0, elapsed / job.progress_done * (job.progress_total - job.progress_done))


# ---- cancel and retry ----------------------------------------------------------

def request_cancel(session: Session, *, job_id: int) -> Job:
    """Cancel a queued job at once; ask a running one to stop at its next step
    (its worker then marks it cancelled). Raises NotFound, or Conflict when the
    job has already finished."""
    job = _locked(session, job_id)
    if job.status.finished:
        raise Conflict(f"Job #{job.id} has already {_finished_word(job.status)}; there is nothing to cancel.")
    conn = driver_connection(session)
    if job.status == JobStatus.queued:
        if job.queue_job_id is None or queue.cancel_queue_job(conn, queue_job_id=job.queue_job_id, abort=False):
            finish(job, JobStatus.cancelled, error="Cancelled before it started.")
            session.commit()
            return job
        if queue.queue_job_status(conn, job.queue_job_id) != "doing":
            # Not waiting, not running: nothing will ever run it.
            finish(job, JobStatus.cancelled, error="Cancelled before it started.")
            session.commit()
            return job
    # Running (or just taken by a worker): the worker checks the flag at each
    # step; the abort request also reaches procrastinate's should_abort().
    job.cancel_requested = True
    if job.queue_job_id is not None:
        queue.cancel_queue_job(conn, queue_job_id=job.queue_job_id, abort=True)
    session.commit()
    return job


def retry_job(session: Session, *, job_id: int, user_id: int | None = None) -> Job:
    """Queue a new attempt of a failed or cancelled job, with the same kind,
    parameters and queue; the new job records which one it retries. Raises
    NotFound, or Conflict for a job that is queued, running or succeeded."""
    old = _locked(session, job_id)
    if old.status not in (JobStatus.failed, JobStatus.cancelled):
        raise Conflict(f"Only a failed or cancelled job can be retried; job #{old.id} is {old.status.value}.")
    existing = session.scalar(
        select(Job).where(Job.result["retry_of"].as_integer() == old.id,
                          Job.status.in_(ACTIVE_STATUSES))
    )
    if existing is not None:
        raise Conflict(f"Job #{old.id} is already being retried as job #{existing.id}.")
    new = enqueue_job(session, kind=old.kind, params=old.params, created_by_id=user_id or old.created_by_id,
                      prompt_set_id=old.prompt_set_id, queue=old.queue, commit=False)
    new.result = {"retry_of": old.id}
    session.commit()
    return new


def _locked(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None:
        raise NotFound(f"No job with id {job_id}.")
    return job


def _finished_word(status: JobStatus) -> str:
    return {JobStatus.succeeded: "succeeded", JobStatus.failed: "failed",
            JobStatus.cancelled: "been cancelled"}[status]


def finish(job: Job, status: JobStatus, *, error: str | None = None, tb: str | None = None) -> None:
    """End the job's row with this status, message and traceback. Does not commit."""
    job.status = status
    job.finished_at = utcnow()
    job.error = error[:MAX_ERROR_CHARS] if error else None
    job.traceback = tb[-MAX_TRACEBACK_CHARS:] if tb else None


# ---- the worker's side -----------------------------------------------------------

def mark_running(session: Session, *, job_id: int, worker: str) -> Job | None:
    """Start a run of the job. None when it must not run: it is gone, already
    finished, or its cancellation was asked before it started (it is then
    marked cancelled)."""
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None or job.status.finished:
        session.commit()
        return None
    if job.cancel_requested:
        finish(job, JobStatus.cancelled, error="Cancelled before it started.")
        session.commit()
        return None
    now = utcnow()
    job.status = JobStatus.running
    job.attempts += 1
    job.worker = worker[:200]
    job.started_at = now
    job.heartbeat_at = now
    job.finished_at = None
    job.error = None
    job.traceback = None
    job.progress_done = 0
    job.progress_total = 0
    session.commit()
    return job


def record_progress(session: Session, *, job_id: int, done: int, total: int, commit: bool = True) -> None:
    """Progress of the running job (also a heartbeat). With commit=False it joins
    the caller's transaction, so results and progress land together."""
    if done < 0 or total < 0:
        raise Invalid(f"Progress must not be negative (got {done}/{total}).")
    session.execute(
        update(Job).where(Job.id == job_id)
        .values(progress_done=done, progress_total=total, heartbeat_at=func.now())
    )
    if commit:
        session.commit()


def heartbeat(session: Session, *, job_id: int, commit: bool = True) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=func.now()))
    if commit:
        session.commit()


def record_metrics(session: Session, *, job_id: int, step: int, values: Mapping[str, float],
                   commit: bool = True) -> None:
    """Scalars of one step, for the curves. Writing a step again replaces its values.
    Non-finite values are skipped (a chart cannot draw them)."""
    rows = [{"job_id": job_id, "step": int(step), "name": str(name)[:100], "value": float(value)}
            for name, value in values.items() if math.isfinite(float(value))]
    if rows:
        stmt = insert(JobMetric).values(rows)
        session.execute(stmt.on_conflict_do_update(
            index_elements=["job_id", "name", "step"], set_={"value": stmt.excluded.value}))
    heartbeat(session, job_id=job_id, commit=False)
    if commit:
        session.commit()


def is_cancel_requested(session: Session, *, job_id: int) -> bool:
    """True when someone asked to cancel the job, or it has ended without this run
    (gone, or failed/cancelled by the stalled-job check). A row put back to
    queued by that check while this run is in fact alive is no reason to stop:
    the run holds the job's lock, so no other run starts, and its outcome counts."""
    row = session.execute(select(Job.cancel_requested, Job.status).where(Job.id == job_id)).one_or_none()
    session.rollback()  # a fresh snapshot next time; never holds a transaction open
    return row is None or row.cancel_requested or JobStatus(row.status).finished


def mark_succeeded(session: Session, *, job_id: int, result: Mapping[str, Any] | None = None,
                   model_id: int | None = None) -> None:
    job = _locked(session, job_id)
    if job.status.finished:
        session.commit()
        return
    finish(job, JobStatus.succeeded)
    job.result = {**(job.result or {}), **dict(result or {})}
    if job.progress_total and job.progress_done < job.progress_total:
        job.progress_done = job.progress_total
    if model_id is not None:
        job.model_id = model_id
    session.commit()


def mark_failed(session: Session, *, job_id: int, error: str, traceback: str | None = None) -> None:
    """The message is for the page; the traceback for the engineer."""
    job = _locked(session, job_id)
    if job.status.finished:
        session.commit()
        return
    finish(job, JobStatus.failed, error=error, tb=traceback)
    session.commit()


def mark_cancelled(session: Session, *, job_id: int, reason: str = "Cancelled.") -> None:
    job = _locked(session, job_id)
    if job.status.finished:
        session.commit()
        return
    finish(job, JobStatus.cancelled, error=reason)
    session.commit()


def mark_requeued(session: Session, *, job_id: int, reason: str, count_attempt: bool = True) -> None:
    """The run stopped without an outcome and the queue will run the job again."""
    job = _locked(session, job_id)
    if job.status.finished:
        session.commit()
        return
    requeue(job, reason, count_attempt=count_attempt)
    session.commit()


def requeue(job: Job, reason: str, *, count_attempt: bool = True) -> None:
    """Show the job's row as queued again, saying why. Does not commit."""
    job.status = JobStatus.queued
    job.worker = None
    job.error = reason[:MAX_ERROR_CHARS]
    if not count_attempt and job.attempts > 0:
        job.attempts -= 1


def set_job_model(session: Session, *, job_id: int, model_id: int, commit: bool = True) -> None:
    """Record the model a job produced."""
    session.execute(update(Job).where(Job.id == job_id).values(model_id=model_id))
    if commit:
        session.commit()
