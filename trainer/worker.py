"""The job runner: the procrastinate app and tasks that run our jobs, and the
workers that take them.

The web side queues `run_job` tasks (app/queue.py); this module defines them.
`rlhf worker --queues gpu` runs `run_worker` in the foreground; the
`start_background_worker` thread runs one in-process. Either way the
procrastinate worker fetches `run_job` tasks with row locks, runs each in a
thread while its event loop keeps the heartbeat going, and `execute_job` turns
one into a handler call (trainer/jobs.py) with our `jobs` row kept in step:
running, progress, metrics, then succeeded / failed (message + traceback) /
cancelled / queued again. Jobs of dead workers are settled by
trainer/recovery.py, on every worker (at an interval, even while busy) and by a
periodic task.

A job whose params ask for several processes runs as a group of training
processes under `accelerate launch` (trainer/processes.py), watched from the
same thread. Each worker advertises its devices (app/services/worker_devices.py)
and listens on the queues of the process counts it can start ("gpu-2p" ...).

Two guards make sure no job runs twice at once:
1. procrastinate hands a job to one worker (SELECT ... FOR UPDATE SKIP LOCKED);
2. a run holds a PostgreSQL advisory lock on the job id for its whole duration,
   on a connection of its own. A worker that dies loses its connection and so
   its lock; a worker that is only slow (so its job looked stalled and was
   retried) still holds it, and the second run waits instead of starting.
"""

import asyncio
import logging
import os
import socket
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import procrastinate
import psycopg
from procrastinate import exceptions as pq_exceptions
from procrastinate import worker as pq_worker
from procrastinate.job_context import AbortReason
from procrastinate.retry import BaseRetryStrategy, RetryDecision

from app import queue
from app.config import Settings, get_settings
from app.db.session import get_engine, libpq_url, new_session
from app.services import jobs, worker_devices
from trainer.jobs import JobCancelled, JobContext, JobFailed, resolve_handler
from trainer.processes import Devices, local_devices, run_processes
from trainer.recovery import Recovery, recover_stalled_jobs

log = logging.getLogger(__name__)

RECOVER_TASK = "recover_stalled_jobs"


class JobLocked(Exception):
    """Another process holds the job's run lock: it is still running it."""


class _RunJobRetry(BaseRetryStrategy):
    """Retry a run only when the worker itself stopped it (shutdown) or another
    process still holds it; a handler's own error fails the job (retrying would
    repeat it), and the page offers a manual retry."""

    def get_retry_decision(self, *, exception: BaseException, job) -> RetryDecision | None:
        if isinstance(exception, JobLocked):
            # By then a run that only looked stalled has ended or shown it is alive.
            return RetryDecision(retry_in={"seconds": max(1, round(get_settings().worker_stalled_after_s))})
        # A JobAborted reaches the strategy only when the worker shuts down
        # (procrastinate does not retry user-requested aborts).
        if isinstance(exception, pq_exceptions.JobAborted):
            return RetryDecision(retry_in={"seconds": 0})
        return None


# No connection parameters: a worker opens the app with its own pool (_serve).
app = procrastinate.App(connector=procrastinate.PsycopgConnector())


@app.task(name=queue.RUN_JOB_TASK, queue=queue.DEFAULT_QUEUE, pass_context=True, retry=_RunJobRetry())
def run_job(context: procrastinate.JobContext, job_id: int) -> None:
    """Run our job `job_id` in this worker (a thread of it: procrastinate runs
    sync tasks off the event loop, so heartbeats go on meanwhile)."""
    execute_job(job_id, queue_context=context)


# The queueing lock keeps at most one of these waiting, so a deployment with no
# worker on the default queue does not pile them up.
@app.periodic(cron="* * * * *", periodic_id="stalled")
@app.task(name=RECOVER_TASK, queue=queue.DEFAULT_QUEUE, pass_context=False, queueing_lock=RECOVER_TASK)
def recover_stalled_jobs_task(timestamp: int) -> None:
    """Every minute on some free worker: jobs of dead workers are retried or failed.
    (Busy workers also check on their own, see _recovery_loop.)"""
    recover_once(get_settings())


def _database_url() -> str:
    """The database of this process's engine (configured from the settings on first
    use), so the queue, the run locks and the sessions all use the same one."""
    return libpq_url(get_engine().url.render_as_string(hide_password=False))


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@contextmanager
def _run_lock(job_id: int, settings: Settings) -> Iterator[bool]:
    """Hold the job's advisory lock on a dedicated connection for the whole run.
    Yields False when another process holds it."""
    conn = psycopg.connect(_database_url(), autocommit=True)
    try:
        got = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (jobs.RUN_LOCK_KEY, job_id)).fetchone()[0]
        yield bool(got)
    finally:
        conn.close()  # releases the lock


def execute_job(job_id: int, *, queue_context: procrastinate.JobContext | None = None,
                settings: Settings | None = None) -> None:
    """Run our job `job_id` to its end and record the outcome. Raises
    procrastinate's JobAborted when it was stopped (so the queue marks it
    aborted, and requeues it when the worker is shutting down), re-raises a
    handler's error after recording it, and raises JobLocked when another
    process is still running it."""
    settings = settings or get_settings()
    name = worker_name()
    with _run_lock(job_id, settings) as acquired:
        if not acquired:
            log.warning("job %s is still held by another process; retrying later", job_id)
            raise JobLocked(f"job {job_id} is running elsewhere")
        with new_session() as session:
            job = jobs.mark_running(session, job_id=job_id, worker=name)
            if job is None:
                log.info("job %s is finished or cancelled; not running it", job_id)
                return
            kind, params = job.kind, dict(job.params)

        ctx = JobContext(
            job_id=job_id, kind=kind, params=params, settings=settings, worker=name,
            should_abort=queue_context.should_abort if queue_context else None,
            is_shutdown=(lambda: queue_context.abort_reason() == AbortReason.SHUTDOWN)
            if queue_context else None,
        )
        processes = int(params.get("processes") or 1)
        log.info("job %s (%s, %d process%s) started on %s", job_id, kind.value, processes,
                 "es" if processes > 1 else "", name)
        try:
            ctx.check_cancelled(force=True)
            if processes > 1:
                result = run_processes(ctx, processes, local_devices(settings.device))
            else:
                result = resolve_handler(kind)(ctx)
        except JobCancelled as exc:
            with new_session() as session:
                if exc.shutdown:
                    jobs.mark_requeued(session, job_id=job_id, count_attempt=False,
                                       reason="Stopped because its worker shut down; queued again.")
                else:
                    jobs.mark_cancelled(session, job_id=job_id, reason=exc.reason)
            log.info("job %s stopped: %s", job_id, exc.reason)
            raise pq_exceptions.JobAborted(exc.reason) from None
        except JobFailed as exc:
            with new_session() as session:
                jobs.mark_failed(session, job_id=job_id, error=str(exc),
                                 traceback=exc.details or traceback.format_exc())
            log.warning("job %s failed: %s", job_id, exc)
            raise
        except Exception as exc:
            with new_session() as session:
                jobs.mark_failed(session, job_id=job_id, error=f"{type(exc).__name__}: {exc}",
                                 traceback=traceback.format_exc())
            log.exception("job %s failed", job_id)
            raise
        with new_session() as session:
            jobs.mark_succeeded(session, job_id=job_id, result=dict(result or {}), model_id=ctx.model_id)
        log.info("job %s succeeded", job_id)


def recover_once(settings: Settings) -> list[Recovery]:
    with new_session() as session:
        done = recover_stalled_jobs(session, stalled_after_s=settings.worker_stalled_after_s,
                                         max_attempts=settings.job_max_attempts)
    for r in done:
        log.warning("job %s of a dead worker: %s", r.job_id, r.action)
    return done


async def _recovery_loop(settings: Settings) -> None:
    """Look for jobs of dead workers at start and then every interval. Runs even
    while this worker is busy with a long job (the periodic task cannot)."""
    while True:
        try:
            await asyncio.to_thread(recover_once, settings)
        except Exception:
            log.exception("stalled-job check failed; trying again later")
        await asyncio.sleep(settings.worker_recovery_interval_s)


def _advertise(queues: Sequence[str] | None, devices: Devices) -> None:
    with new_session() as session:
        worker_devices.advertise(session, worker=worker_name(), queues=list(queues or []),
                                 cuda_devices=devices.cuda, cpu_count=devices.cpu_count,
                                 memory_bytes=devices.memory_bytes, max_processes=devices.max_processes)


def _seen() -> None:
    with new_session() as session:
        worker_devices.seen(session, worker=worker_name())


def _forget() -> None:
    with new_session() as session:
        worker_devices.forget(session, worker=worker_name())


async def _devices_loop(settings: Settings) -> None:
    """Say at every heartbeat that this worker (its advertised devices) is alive."""
    while True:
        await asyncio.sleep(settings.worker_heartbeat_s)
        try:
            await asyncio.to_thread(_seen)
        except Exception:
            log.exception("could not record this worker's heartbeat; trying again")


def _make_worker(settings: Settings, queues: Sequence[str] | None, concurrency: int,
                 install_signal_handlers: bool) -> pq_worker.Worker:
    return pq_worker.Worker(
        app=app,
        queues=list(queues) if queues else None,
        name=worker_name(),
        concurrency=concurrency,
        fetch_job_polling_interval=settings.worker_poll_interval_s,
        abort_job_polling_interval=min(5.0, settings.worker_poll_interval_s),
        shutdown_graceful_timeout=settings.worker_shutdown_timeout_s,
        # Our jobs table is the record; finished queue rows only take space.
        delete_jobs="successful",
        install_signal_handlers=install_signal_handlers,
        update_heartbeat_interval=settings.worker_heartbeat_s,
        stalled_worker_timeout=settings.worker_stalled_after_s,
    )


async def _serve(settings: Settings, queues: Sequence[str] | None, concurrency: int,
                 install_signal_handlers: bool, on_ready=None) -> None:
    devices = await asyncio.to_thread(local_devices, settings.device)
    if queues:  # and the queues of the multi-process jobs it can start
        queues = queue.with_processes(list(queues), devices.max_processes)
    connector = procrastinate.PsycopgConnector(conninfo=_database_url(), min_size=1, max_size=concurrency + 4)
    with app.replace_connector(connector):
        async with app.open_async():
            worker = _make_worker(settings, queues, concurrency, install_signal_handlers)
            await asyncio.to_thread(_advertise, queues, devices)
            loops = [asyncio.create_task(_recovery_loop(settings), name="recover_stalled_jobs"),
                     asyncio.create_task(_devices_loop(settings), name="worker_devices")]
            if on_ready is not None:
                on_ready(worker, asyncio.get_running_loop())
            try:
                await worker.run()
            finally:
                for task in loops:
                    task.cancel()
                await asyncio.gather(*loops, return_exceptions=True)
                await asyncio.to_thread(_forget)


def run_worker(settings: Settings, queues: Sequence[str] | None = None, concurrency: int = 1) -> None:
    """Run a worker in the foreground until SIGINT/SIGTERM (then running jobs get
    worker_shutdown_timeout_s to finish before they are stopped and queued again)."""
    queues = list(queues) if queues else [q.strip() for q in settings.worker_queues.split(",") if q.strip()]
    log.info("worker %s listening on queues %s", worker_name(), ", ".join(queues))
    asyncio.run(_serve(settings, queues, concurrency, install_signal_handlers=True))


class BackgroundWorker:
    """A worker on its own thread and event loop, for `rlhf serve`."""

    def __init__(self, settings: Settings, queues: Sequence[str] | None, concurrency: int = 1):
        self._ready = threading.Event()
        self._worker: pq_worker.Worker | None = None
        self._error: BaseException | None = None

        def on_ready(worker, loop):
            self._worker = worker
            self._ready.set()

        def target():
            try:
                asyncio.run(_serve(settings, queues, concurrency, install_signal_handlers=False,
                                   on_ready=on_ready))
            except BaseException as exc:  # noqa: BLE001 - reported by stop() and the log
                self._error = exc
                log.exception("the in-process worker stopped")
            finally:
                self._ready.set()

        self.thread = threading.Thread(target=target, name="rlhf-worker", daemon=True)
        self.thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def stop(self, timeout: float | None = 60) -> None:
        """Stop taking jobs; running ones finish or are stopped and queued again."""
        self._ready.wait(timeout)
        if self._worker is not None:
            self._worker.stop()  # thread-safe: schedules the stop on the worker's loop
        self.thread.join(timeout)


def start_background_worker(settings: Settings, queues: Sequence[str] | None = None,
                            concurrency: int = 1) -> BackgroundWorker:
    queues = list(queues) if queues else [q.strip() for q in settings.worker_queues.split(",") if q.strip()]
    log.info("starting an in-process worker on queues %s", ", ".join(queues))
    return BackgroundWorker(settings, queues, concurrency)
