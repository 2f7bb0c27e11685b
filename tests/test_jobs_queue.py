"""The job queue against real PostgreSQL and real worker processes: deferral in
one transaction, cancel, retry, and recovery from a worker killed mid-job."""

import os
import signal
import time

import pytest
from sqlalchemy import create_engine, func, select, text

from app.db.enums import JobKind, JobStatus
from app.db.models import Job, JobMetric
from app.db.session import new_session
from app.services import jobs
from app.services.errors import Conflict, Invalid, NotFound
from tests.workers import load_job, pid_of, queue_status, wait_for, workers  # noqa: F401 (fixture)
from trainer.recovery import recover_stalled_jobs


def steps_job(session, steps: int, step_s: float = 0.05, log=None) -> Job:
    params = {"steps": steps, "step_s": step_s, "log": str(log) if log else None}
    return jobs.enqueue_job(session, kind=JobKind.train_sft, params=params)


def run_log(path) -> list[tuple[str, int, float]]:
    if not path.exists():
        return []
    return [(w, int(p), float(t)) for w, p, t in (line.split() for line in path.read_text().splitlines())]


# ---- deferral --------------------------------------------------------------------

def test_deferral_writes_job_and_queue_job_in_one_transaction(committed, database_url):
    observer = create_engine(database_url)

    def counts():
        with observer.connect() as conn:
            return (conn.scalar(text("SELECT count(*) FROM jobs")),
                    conn.scalar(text("SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'run_job'")))

    try:
        with new_session() as session:
            job = jobs.enqueue_job(session, kind=JobKind.generate, params={"prompt_set_id": 7}, commit=False)
            assert job.queue_job_id is not None
            assert counts() == (0, 0)  # nothing visible before the commit
            session.commit()
        assert counts() == (1, 1)
        with observer.connect() as conn:
            row = conn.execute(text("SELECT queue_name, args, status FROM procrastinate_jobs WHERE id = :i"),
                               {"i": job.queue_job_id}).one()
        assert row == ("gpu", {"job_id": job.id}, "todo")

        with new_session() as session:
            jobs.enqueue_job(session, kind=JobKind.generate, params={"prompt_set_id": 8}, commit=False)
            session.rollback()
        assert counts() == (1, 1)  # rolled back together
    finally:
        observer.dispose()


def test_enqueue_rejects_bad_input_and_writes_nothing(session):
    with pytest.raises(Invalid, match="Unknown job kind"):
        jobs.enqueue_job(session, kind="bake_cake", params={})
    with pytest.raises(Invalid, match="not valid JSON"):
        jobs.enqueue_job(session, kind=JobKind.generate, params={"x": float("nan")})
    with pytest.raises(Invalid, match="queue"):
        jobs.enqueue_job(session, kind=JobKind.generate, params={}, queue=" ")
    assert session.scalar(select(func.count()).select_from(Job)) == 0


def test_get_job_of_unknown_id_is_not_found(session):
    with pytest.raises(NotFound):
        jobs.get_job(session, 123456)


# ---- a worker process runs jobs ------------------------------------------------------

def test_worker_process_runs_a_job_and_records_progress_and_metrics(workers, tmp_path):
    proc = workers.start()
    with new_session() as session:
        job = steps_job(session, steps=5, log=tmp_path / "runs.log")
    done = wait_for(lambda: load_job(job.id).status.finished and load_job(job.id), 60, "the job to finish",
                    workers)
    assert done.status == JobStatus.succeeded, done.error
    assert (done.progress_done, done.progress_total) == (5, 5)
    assert done.attempts == 1 and pid_of(done) == proc.pid
    assert done.result == {"steps": 5, "pid": proc.pid}
    with new_session() as session:
        steps = session.scalars(select(JobMetric.step).where(JobMetric.job_id == job.id, JobMetric.name == "loss")
                                .order_by(JobMetric.step)).all()
    assert steps == [0, 1, 2, 3, 4]


def test_worker_only_takes_jobs_of_its_queues(workers):
    workers.start(queues="default")
    with new_session() as session:
        on_gpu = steps_job(session, steps=1)
        on_default = jobs.enqueue_job(session, kind=JobKind.train_sft, params={"steps": 1, "step_s": 0},
                                      queue="default")
    wait_for(lambda: load_job(on_default.id).status == JobStatus.succeeded, 60, "the default-queue job", workers)
    time.sleep(1)
    assert load_job(on_gpu.id).status == JobStatus.queued


def test_handler_error_fails_the_job_with_message_and_traceback(workers):
    workers.start()
    with new_session() as session:
        job = jobs.enqueue_job(session, kind=JobKind.train_sft, params={"step_s": 0})  # no "steps"
    failed = wait_for(lambda: load_job(job.id).status.finished and load_job(job.id), 60, "the job to fail", workers)
    assert failed.status == JobStatus.failed
    assert failed.error == "KeyError: 'steps'"
    assert "Traceback" in failed.traceback and "steps_job" in failed.traceback
    # The queue records its outcome just after ours.
    wait_for(lambda: queue_status(failed.queue_job_id) == "failed", 10, "the queue job to fail", workers)


# ---- cancel and retry ----------------------------------------------------------------

def test_cancel_queued_job_never_runs(workers, tmp_path):
    with new_session() as session:
        job = steps_job(session, steps=3, log=tmp_path / "runs.log")
        cancelled = jobs.request_cancel(session, job_id=job.id)
    assert cancelled.status == JobStatus.cancelled
    assert queue_status(job.queue_job_id) == "cancelled"

    workers.start()
    with new_session() as session:
        later = steps_job(session, steps=1)
    wait_for(lambda: load_job(later.id).status == JobStatus.succeeded, 60, "a later job to run", workers)
    assert load_job(job.id).status == JobStatus.cancelled
    assert run_log(tmp_path / "runs.log") == []
    with new_session() as session, pytest.raises(Conflict, match="nothing to cancel"):
        jobs.request_cancel(session, job_id=job.id)


def test_cancel_running_job_stops_it_at_its_next_step(workers, tmp_path):
    workers.start()
    with new_session() as session:
        job = steps_job(session, steps=400, step_s=0.05, log=tmp_path / "runs.log")
    wait_for(lambda: load_job(job.id).progress_done >= 2, 60, "the job to make progress", workers)
    with new_session() as session:
        asked = jobs.request_cancel(session, job_id=job.id)
    assert asked.status == JobStatus.running and asked.cancel_requested
    stopped = wait_for(lambda: load_job(job.id).status.finished and load_job(job.id), 10, "the job to stop", workers)
    assert stopped.status == JobStatus.cancelled
    assert stopped.progress_done < 400
    assert [w for w, _, _ in run_log(tmp_path / "runs.log")] == ["start"]  # never reached its end
    wait_for(lambda: queue_status(job.queue_job_id) == "aborted", 10, "the queue job to be aborted", workers)


def test_retry_runs_a_new_attempt_of_a_cancelled_job(workers):
    with new_session() as session:
        job = steps_job(session, steps=2)
        jobs.request_cancel(session, job_id=job.id)
        retry = jobs.retry_job(session, job_id=job.id)
        assert retry.id != job.id and retry.status == JobStatus.queued
        assert (retry.kind, retry.params, retry.queue) == (job.kind, job.params, job.queue)
        assert retry.result == {"retry_of": job.id}
        with pytest.raises(Conflict, match="already being retried"):
            jobs.retry_job(session, job_id=job.id)
        assert [j.id for j in jobs.retries_of(session, job.id)] == [retry.id]
    workers.start()
    done = wait_for(lambda: load_job(retry.id).status.finished and load_job(retry.id), 60, "the retry", workers)
    assert done.status == JobStatus.succeeded
    assert done.result["retry_of"] == job.id and done.result["steps"] == 2
    with new_session() as session, pytest.raises(Conflict, match="Only a failed or cancelled job"):
        jobs.retry_job(session, job_id=retry.id)


# ---- dead workers ------------------------------------------------------------------------

def test_job_of_a_killed_worker_is_retried_by_the_other_and_never_run_twice_at_once(workers, tmp_path):
    log = tmp_path / "runs.log"
    first, second = workers.start(), workers.start()
    with new_session() as session:
        job = steps_job(session, steps=60, step_s=0.05, log=log)
    running = wait_for(lambda: (j := load_job(job.id)).progress_done >= 3 and j, 60, "the job to run", workers)
    victim = pid_of(running)
    survivor = {first.pid, second.pid} - {victim}
    assert victim in (first.pid, second.pid)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()

    seen = set()

    def finished():
        j = load_job(job.id)
        seen.add(j.status)
        return j.status.finished and j

    done = wait_for(finished, 60, "the job to finish on the other worker", workers)
    assert done.status == JobStatus.succeeded, done.error
    assert seen <= {JobStatus.running, JobStatus.queued, JobStatus.succeeded}
    assert done.attempts == 2
    assert {pid_of(done)} == survivor
    runs = run_log(log)
    assert [(w, p) for w, p, _ in runs] == [("start", victim), ("start", *survivor), ("end", *survivor)]
    assert runs[1][2] > killed_at  # the second run began only after the first process was dead
    assert done.progress_done == 60


def test_job_of_a_dead_worker_fails_visibly_after_its_last_attempt(workers, tmp_path):
    first = workers.start(RLHF_JOB_MAX_ATTEMPTS="1")
    with new_session() as session:
        job = steps_job(session, steps=400, step_s=0.05)
    wait_for(lambda: load_job(job.id).progress_done >= 2, 60, "the job to run", workers)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    workers.start(RLHF_JOB_MAX_ATTEMPTS="1")
    failed = wait_for(lambda: load_job(job.id).status.finished and load_job(job.id), 60, "the job to fail",
                      workers)
    assert failed.status == JobStatus.failed
    assert "stopped responding" in failed.error and f":{first.pid}" in failed.error
    assert queue_status(job.queue_job_id) == "failed"


def test_recovery_closes_a_running_row_whose_queue_job_has_ended(committed):
    with new_session() as session:
        job = steps_job(session, steps=1)
        session.execute(text("UPDATE procrastinate_jobs SET status = 'failed' WHERE id = :i"),
                        {"i": job.queue_job_id})
        session.execute(text("UPDATE jobs SET status = 'running', heartbeat_at = now() - interval '1 hour'"
                             " WHERE id = :i"), {"i": job.id})
        session.commit()
        done = recover_stalled_jobs(session, stalled_after_s=60, max_attempts=3)
    assert [(r.job_id, r.action) for r in done] == [(job.id, "closed")]
    closed = load_job(job.id)
    assert closed.status == JobStatus.failed and "without recording an outcome" in closed.error


def test_a_job_still_held_by_another_process_waits_for_it(workers, database_url, tmp_path):
    """The second guard: a run holds an advisory lock on its job; a worker that
    gets the job while another process holds it (a run that only looked stalled)
    puts it back instead of running it alongside."""
    import psycopg

    from app.db.session import libpq_url

    log = tmp_path / "runs.log"
    with new_session() as session:
        job = steps_job(session, steps=2, log=log)
    holder = psycopg.connect(libpq_url(database_url), autocommit=True)
    try:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", (jobs.RUN_LOCK_KEY, job.id))
        workers.start()
        wait_for(lambda: "running elsewhere" in workers.logs(), 60, "the worker to find the job locked", workers)
        assert load_job(job.id).status == JobStatus.queued and run_log(log) == []
    finally:
        holder.close()  # the other "run" ends
    done = wait_for(lambda: load_job(job.id).status.finished and load_job(job.id), 60, "the job to run", workers)
    assert done.status == JobStatus.succeeded and done.attempts == 1
    assert [w for w, _, _ in run_log(log)] == ["start", "end"]


def test_stopping_a_worker_puts_its_running_job_back_in_the_queue(workers, tmp_path):
    log = tmp_path / "runs.log"
    first = workers.start(RLHF_WORKER_SHUTDOWN_TIMEOUT_S="0.5")
    with new_session() as session:
        job = steps_job(session, steps=60, step_s=0.05, log=log)
    wait_for(lambda: load_job(job.id).progress_done >= 2, 60, "the job to run", workers)
    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 0
    requeued = load_job(job.id)
    assert requeued.status == JobStatus.queued and "shut down" in requeued.error
    assert requeued.attempts == 0  # a shutdown is not the job's fault
    assert queue_status(job.queue_job_id) == "todo"

    second = workers.start()
    done = wait_for(lambda: load_job(job.id).status.finished and load_job(job.id), 60, "the job to finish", workers)
    assert done.status == JobStatus.succeeded and pid_of(done) == second.pid and done.attempts == 1
    assert [(w, p) for w, p, _ in run_log(log)] == [("start", first.pid), ("start", second.pid), ("end", second.pid)]
