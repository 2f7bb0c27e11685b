"""The task queue: procrastinate on our own PostgreSQL.

Procrastinate owns the queue mechanics (transactional defer, row locks with
SKIP LOCKED, worker heartbeats, retries, abort requests, periodic tasks, named
queues). Our `jobs` table is the product's record of a run; each queued
procrastinate job carries only our `jobs.id` and runs `run_job`, which looks the
kind up in trainer/jobs.py's handler registry.

The App below is never opened in the web process: deferring and cancelling go
through `defer_run_job` / `cancel_queue_job` on the caller's own psycopg
connection, so they are part of the caller's transaction. Workers
(trainer/worker.py) open it with a pool of their own.

Nothing here imports torch: the task bodies import the trainer lazily.
"""

from typing import Any

import procrastinate
from procrastinate import exceptions as pq_exceptions
from procrastinate import sql as pq_sql
from procrastinate.manager import JobManager
from procrastinate.retry import BaseRetryStrategy, RetryDecision

DEFAULT_QUEUE = "default"
GPU_QUEUE = "gpu"
QUEUES = (DEFAULT_QUEUE, GPU_QUEUE)
RUN_JOB_TASK = "run_job"
RECOVER_TASK = "recover_stalled_jobs"


class JobLocked(Exception):
    """Another process holds the job's run lock: it is still running it."""


class _RunJobRetry(BaseRetryStrategy):
    """Retry a run only when the worker itself stopped it (shutdown) or another
    process still holds it; a handler's own error fails the job (retrying would
    repeat it), and the page offers a manual retry."""

    def get_retry_decision(self, *, exception: BaseException, job) -> RetryDecision | None:
        if isinstance(exception, JobLocked):
            from app.config import get_settings

            # By then a run that only looked stalled has ended or shown it is alive.
            return RetryDecision(retry_in={"seconds": max(1, round(get_settings().worker_stalled_after_s))})
        # A JobAborted reaches the strategy only when the worker shuts down
        # (procrastinate does not retry user-requested aborts).
        if isinstance(exception, pq_exceptions.JobAborted):
            return RetryDecision(retry_in={"seconds": 0})
        return None


# No connection parameters: a worker opens the app with its own pool
# (trainer.worker), and the web process never opens it.
app = procrastinate.App(connector=procrastinate.PsycopgConnector())

# Deferring/cancelling on a caller's connection needs a *sync* connector; the
# App's async one (once a worker has opened it) only takes async connections.
# This one is never opened: every call passes its connection.
_sync_manager = JobManager(procrastinate.SyncPsycopgConnector())


@app.task(name=RUN_JOB_TASK, queue=DEFAULT_QUEUE, pass_context=True, retry=_RunJobRetry())
def run_job(context: procrastinate.JobContext, job_id: int) -> None:
    """Run our job `job_id` in this worker (a thread of it: procrastinate runs
    sync tasks off the event loop, so heartbeats go on meanwhile)."""
    from trainer.worker import execute_job

    execute_job(job_id, queue_context=context)


# The queueing lock keeps at most one of these waiting, so a deployment with no
# worker on the default queue does not pile them up.
@app.periodic(cron="* * * * *", periodic_id="stalled")
@app.task(name=RECOVER_TASK, queue=DEFAULT_QUEUE, pass_context=False, queueing_lock=RECOVER_TASK)
def recover_stalled_jobs_task(timestamp: int) -> None:
    """Every minute on some free worker: jobs of dead workers are retried or failed.
    (Busy workers also check on their own, see trainer.worker.)"""
    from app.config import get_settings
    from app.db.session import session_scope
    from app.services.jobs import recover_stalled_jobs

    settings = get_settings()
    with session_scope() as session:
        recover_stalled_jobs(session, stalled_after_s=settings.worker_stalled_after_s,
                             max_attempts=settings.job_max_attempts)


def defer_run_job(connection: Any, *, job_id: int, queue: str) -> int:
    """Queue `run_job(job_id)` on `queue` inside the transaction of `connection`
    (a psycopg 3 connection); returns procrastinate's job id."""
    deferrer = procrastinate.tasks.configure_task(
        name=RUN_JOB_TASK, job_manager=_sync_manager, queue=queue, connection=connection
    )
    return deferrer.defer(job_id=job_id)


def cancel_queue_job(connection: Any, *, queue_job_id: int, abort: bool) -> bool:
    """Cancel a queued procrastinate job (abort=False), or also ask a running one
    to abort (abort=True). True when something changed."""
    return _sync_manager.cancel_job_by_id(queue_job_id, abort=abort, connection=connection)


def queue_job_status(connection: Any, queue_job_id: int) -> str | None:
    """procrastinate's status of a job ('todo', 'doing', ...), None if it is gone."""
    rows = _sync_manager.connector.execute_query_all_with_connection(
        connection, "SELECT status FROM procrastinate_jobs WHERE id = %(id)s", id=queue_job_id
    )
    return rows[0]["status"] if rows else None


def stalled_queue_jobs(connection: Any, *, stalled_after_s: float) -> list[dict[str, Any]]:
    """Running procrastinate jobs whose worker has no fresh heartbeat (or is gone),
    locked FOR UPDATE in the caller's transaction so two checkers never act on
    the same job."""
    rows = _sync_manager.connector.execute_query_all_with_connection(
        connection,
        pq_sql.queries["select_stalled_jobs_by_heartbeat"],
        queue=None, task_name=RUN_JOB_TASK, seconds_since_heartbeat=stalled_after_s,
    )
    if not rows:
        return []
    ids = [row["id"] for row in rows]
    # Re-read under a row lock: between the select and now another checker may
    # have retried a job that a live worker already took again.
    return _sync_manager.connector.execute_query_all_with_connection(
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
    _sync_manager.connector.execute_query_one_with_connection(
        connection, pq_sql.queries["retry_job"], job_id=queue_job_id, retry_at=None,
        new_priority=None, new_queue_name=None, new_lock=None,
    )


def fail_queue_job(connection: Any, queue_job_id: int) -> None:
    _sync_manager.connector.execute_query_one_with_connection(
        connection, pq_sql.queries["finish_job"], job_id=queue_job_id, status="failed",
        delete_job=False,
    )
