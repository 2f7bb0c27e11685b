"""Helpers for tests that run real worker processes against the test database."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from app.db.models import Job
from app.db.session import new_session

ROOT = Path(__file__).resolve().parents[1]

# Seconds, not minutes: heartbeats every 0.5 s, a worker silent for 3 s is dead.
FAST_WORKER_ENV = {
    "RLHF_WORKER_POLL_INTERVAL_S": "0.2",
    "RLHF_WORKER_HEARTBEAT_S": "0.5",
    "RLHF_WORKER_STALLED_AFTER_S": "3",
    "RLHF_WORKER_RECOVERY_INTERVAL_S": "0.5",
    "RLHF_WORKER_SHUTDOWN_TIMEOUT_S": "5",
    "RLHF_JOB_MAX_ATTEMPTS": "3",
    "RLHF_LOG_LEVEL": "INFO",
    "RLHF_DEVICE": "cpu",
    "PYTHONUNBUFFERED": "1",
}


class Workers:
    """Starts worker processes; stops (or kills) what is left at teardown."""

    def __init__(self, database_url: str, tmp_path: Path):
        self.database_url = database_url
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []

    def start(self, *, queues: str = "gpu", cli: bool = False, **env: str) -> subprocess.Popen:
        """`cli`: the real `rlhf worker` command; otherwise `python -m tests.job_worker`
        (the same worker plus the test's "steps" handler)."""
        full_env = {**os.environ, **FAST_WORKER_ENV, **env,
                    "DATABASE_URL": self.database_url, "RLHF_DATA_DIR": str(self.tmp_path / "data")}
        if cli:
            script = ROOT / ".venv" / "bin" / "rlhf"  # the installed console script, where setup made one
            entry = [str(script)] if script.exists() else [sys.executable, "-c", "from app.cli import main; main()"]
            cmd = [*entry, "worker", "--queues", queues]
        else:
            cmd = [sys.executable, "-m", "tests.job_worker", "--queues", queues]
        log = open(self.tmp_path / f"worker-{len(self.procs)}.log", "w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- worker {i} ---\n" + (self.tmp_path / f"worker-{i}.log").read_text()[-4000:]
                         for i in range(len(self.procs)))

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def workers(committed, database_url, tmp_path):
    # Depends on `committed` so the workers stop before the tables are truncated.
    w = Workers(database_url, tmp_path)
    yield w
    w.stop_all()


def wait_for(predicate: Callable[[], object], timeout: float = 30, what: str = "condition",
             workers: Workers | None = None, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = "\n" + workers.logs() if workers else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


def load_job(job_id: int) -> Job:
    with new_session() as session:
        job = session.get(Job, job_id)
        session.expunge_all()
        return job


def queue_status(queue_job_id: int) -> str | None:
    with new_session() as session:
        return session.scalar(text("SELECT status::text FROM procrastinate_jobs WHERE id = :i"),
                              {"i": queue_job_id})


def pid_of(job: Job) -> int:
    return int(job.worker.rsplit(":", 1)[1])
