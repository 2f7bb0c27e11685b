"""Jobs of dead workers: procrastinate jobs whose worker stopped heartbeating are
retried or failed, and our `jobs` rows are kept in step.

Every worker runs `recover_stalled_jobs` at start and then at an interval (and
the periodic task of trainer/worker.py runs it on some free worker each
minute). The queue rows are read and changed on the caller's own connection, in
the transaction that also changes our rows.
"""

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import procrastinate
from procrastinate import sql as pq_sql
from sqlalchemy import text
from sqlalchemy.orm import Session

from app import queue
from app.db.base import utcnow
from app.db.enums import JobStatus
from app.db.models import Job
from app.services import jobs

# Only its *_with_connection calls are used (each takes the caller's connection):
# it is never opened.
_connector = procrastinate.SyncPsycopgConnector()


@dataclass
class Recovery:
    job_id: int
    action: str  # "retried" | "failed" | "cancelled" | "closed"


def recover_stalled_jobs(session: Session, *, stalled_after_s: float, max_attempts: int) -> list[Recovery]:
    """Jobs whose worker stopped heartbeating are retried (up to max_attempts runs)
    or failed with a message saying so; our rows left running or queued by a queue
    job that has ended are closed. Safe to run from several workers at once: one
    advisory lock serialises the checkers and the queue rows are locked."""
    session.execute(text("SELECT pg_advisory_xact_lock(:k, 0)"), {"k": jobs.RECOVERY_LOCK_KEY})
    conn = jobs.driver_connection(session)
    done: list[Recovery] = []
    for row in stalled_queue_jobs(conn, stalled_after_s=stalled_after_s):
        job_id = (row["args"] or {}).get("job_id")
        job = session.get(Job, job_id, with_for_update=True, populate_existing=True) if job_id else None
        lost = f"its worker ({job.worker or 'unknown'}) stopped responding" if job else ""
        if job is None or job.status.finished:
            fail_queue_job(conn, row["id"])
            continue
        if job.cancel_requested:
            fail_queue_job(conn, row["id"])
            jobs.finish(job, JobStatus.cancelled, error=f"Cancelled ({lost} before it could stop).")
            done.append(Recovery(job.id, "cancelled"))
        elif job.attempts < max_attempts:
            retry_queue_job(conn, row["id"])
            jobs.requeue(job, f"Run {job.attempts} of {max_attempts} stopped: {lost}. Queued again.")
            done.append(Recovery(job.id, "retried"))
        else:
            fail_queue_job(conn, row["id"])
            jobs.finish(job, JobStatus.failed, error=(
                f"Gave up after {job.attempts} runs: {lost} each time. "
                "Retry it once the workers are healthy."))
            done.append(Recovery(job.id, "failed"))
    done += _close_orphans(session, stalled_after_s=stalled_after_s)
    session.commit()
    return done


def _close_orphans(session: Session, *, stalled_after_s: float) -> list[Recovery]:
    """Our rows queued or running whose queue job has ended or vanished: the run
    crashed between the two updates. Fail them visibly instead of showing them
    running forever."""
    cutoff = utcnow() - timedelta(seconds=stalled_after_s)
    rows = session.execute(text(
        """SELECT j.id, pj.status AS queue_status
             FROM jobs j LEFT JOIN procrastinate_jobs pj ON pj.id = j.queue_job_id
            WHERE j.status IN ('queued', 'running')
              AND coalesce(j.heartbeat_at, j.created_at) < :cutoff
              AND (pj.id IS NULL OR pj.status IN ('succeeded', 'failed', 'cancelled', 'aborted'))
            FOR UPDATE OF j"""), {"cutoff": cutoff}).all()
    out = []
    for job_id, queue_status in rows:
        job = session.get(Job, job_id, populate_existing=True)
        assert job is not None
        what = f"ended as '{queue_status}'" if queue_status else "is gone"
        jobs.finish(job, JobStatus.failed, error=f"Its queue job {what} without recording an outcome. Retry it.")
        out.append(Recovery(job.id, "closed"))
    return out


# ---- the queue rows ---------------------------------------------------------------

def stalled_queue_jobs(connection: Any, *, stalled_after_s: float) -> list[dict[str, Any]]:
    """Running procrastinate jobs whose worker has no fresh heartbeat (or is gone),
    locked FOR UPDATE in the caller's transaction so two checkers never act on
    the same job."""
    rows = _connector.execute_query_all_with_connection(
        connection,
        pq_sql.queries["select_stalled_jobs_by_heartbeat"],
        queue=None, task_name=queue.RUN_JOB_TASK, seconds_since_heartbeat=stalled_after_s,
    )
    if not rows:
        return []
    ids = [row["id"] for row in rows]
    # Re-read under a row lock: between the select and now another checker may
    # have retried a job that a live worker already took again.
    return _connector.execute_query_all_with_connection(
        connection,
        """SELECT job.id, job.args, job.attempts, job.worker_id
             FROM procrastinate_jobs job
             LEFT JOIN procrastinate_workers w ON w.id = job.worker_id
            WHERE job.id = ANY(%(ids)s) AND job.status = 'doing'
              AND (job.worker_id IS NULL
                   OR w.last_heartbeat < NOW() - make_interval(secs => %(secs)s))
            FOR UPDATE OF job""",
        ids=ids, secs=stalled_after_s,
    )


def retry_queue_job(connection: Any, queue_job_id: int) -> None:
    """Put a stalled ('doing') job back to 'todo' for another worker."""
    _connector.execute_query_one_with_connection(
        connection, pq_sql.queries["retry_job"], job_id=queue_job_id, retry_at=None,
        new_priority=None, new_queue_name=None, new_lock=None,
    )


def fail_queue_job(connection: Any, queue_job_id: int) -> None:
    _connector.execute_query_one_with_connection(
        connection, pq_sql.queries["finish_job"], job_id=queue_job_id, status="failed",
        delete_job=False,
    )
