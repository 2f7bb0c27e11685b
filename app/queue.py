"""The task queue, web side: queueing a job and cancelling it (procrastinate on
our own PostgreSQL).

Procrastinate owns the queue mechanics (transactional defer, row locks with
SKIP LOCKED, worker heartbeats, retries, abort requests, periodic tasks, named
queues). Our `jobs` table is the product's record of a run; each queued
procrastinate job carries only our `jobs.id` and names the `run_job` task,
which the workers define and run (trainer/worker.py).

Deferring and cancelling go through the caller's own psycopg connection, so
they are part of the caller's transaction. Nothing here imports the trainer.
"""

from typing import Any

import procrastinate
from procrastinate.manager import JobManager

DEFAULT_QUEUE = "default"
GPU_QUEUE = "gpu"
QUEUES = (DEFAULT_QUEUE, GPU_QUEUE)
RUN_JOB_TASK = "run_job"  # the workers' task (trainer/worker.py) that runs one of our jobs


def processes_queue(queue: str, processes: int) -> str:
    """Where a job of `processes` processes waits: "gpu-2p" for two on the gpu queue (the queue
    itself for one). A worker listens on these up to the processes it can start (with_processes)."""
    return queue if processes <= 1 else f"{queue}-{processes}p"


def with_processes(queues: list[str], max_processes: int) -> list[str]:
    """A worker's queues and their multi-process queues up to max_processes."""
    return [processes_queue(q, n) for q in queues for n in range(1, max(1, max_processes) + 1)]

# Deferring/cancelling on a caller's connection needs a *sync* connector. This
# one is never opened: every call passes its connection.
_sync_manager = JobManager(procrastinate.SyncPsycopgConnector())


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
