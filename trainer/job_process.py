"""One process of a multi-process job, started N times by `accelerate launch` from the worker
(trainer/processes.py):

    python -m accelerate.commands.launch --multi_gpu --num_processes N ... \\
        -m trainer.job_process --job-id ID --outcome DIR

Each process reads the job, builds its JobContext and runs the job's handler, the
same one a one-process job runs in the worker; the trainers shard their batches
by the launcher's rank (trainer/distributed.py). Only rank 0 writes to the job
(progress, metrics) and registers the model (JobContext.main). Each process
writes its outcome to DIR/outcome-<rank>.json: {"result", "model_id"}, or
{"error", "traceback"} when it failed, or {"cancelled"}; the worker reads them
when the launcher exits and records the job's outcome itself.

A worker killed outright (SIGKILL, out of memory) cannot stop its runs: each process
watches the worker that launched it (RLHF_WORKER_PID) and exits when it is gone, so
no run goes on training beside the one that the job's recovery starts.
"""

import argparse
import json
import logging
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

from app.config import get_settings
from app.db.models import Job
from app.db.session import new_session
from app.logs import configure_logging
from trainer.jobs import JobCancelled, JobContext, JobFailed, resolve_handler

log = logging.getLogger("trainer.job_process")

WORKER_WATCH_S = 1.0  # how often a process checks that its worker is still there


def outcome_path(directory: Path, rank: int) -> Path:
    return Path(directory) / f"outcome-{rank}.json"


def _write(directory: Path, rank: int, outcome: dict[str, Any]) -> None:
    path = outcome_path(directory, rank)
    path.with_suffix(".tmp").write_text(json.dumps(outcome, default=str))
    path.with_suffix(".tmp").replace(path)  # whole or absent when the worker reads it


def running(process: psutil.Process) -> bool:
    """Still running: not ended, not a zombie (is_running compares the start time too, so a new
    process given the same id is not this one)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def exit_with_the_worker(pid: int) -> None:
    """Exit this process (status 1) as soon as the worker with this pid is gone."""
    try:
        worker = psutil.Process(pid)
    except psutil.NoSuchProcess:
        os._exit(1)

    def watch() -> None:
        while running(worker):
            time.sleep(WORKER_WATCH_S)
        log.warning("the worker (pid %d) that launched this run is gone: stopping", pid)
        os._exit(1)

    threading.Thread(target=watch, name="worker-watch", daemon=True).start()


def run(job_id: int, outcome_dir: Path) -> int:
    """Run this process's part of the job; the exit status (0 when it succeeded)."""
    settings = get_settings()
    rank = int(os.environ.get("RANK", "0") or 0)
    with new_session() as session:
        job = session.get(Job, job_id)
        if job is None:
            _write(outcome_dir, rank, {"error": f"Job {job_id} does not exist."})
            return 1
        kind, params, worker = job.kind, dict(job.params), job.worker or "worker"
    ctx = JobContext(job_id=job_id, kind=kind, params=params, settings=settings, worker=worker, main=rank == 0)
    try:
        result = resolve_handler(kind)(ctx)
    except JobCancelled as exc:
        _write(outcome_dir, rank, {"cancelled": exc.reason})
        return 0
    except JobFailed as exc:
        _write(outcome_dir, rank, {"error": str(exc), "traceback": traceback.format_exc()})
        return 1
    except Exception as exc:  # noqa: BLE001 - recorded for the worker, which fails the job with it
        log.exception("job %s failed in process %d", job_id, rank)
        _write(outcome_dir, rank, {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        return 1
    _write(outcome_dir, rank, {"result": dict(result or {}), "model_id": ctx.model_id})
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job-id", type=int, required=True)
    parser.add_argument("--outcome", type=Path, required=True, help="directory for outcome-<rank>.json")
    args = parser.parse_args()
    configure_logging(get_settings().log_level)
    if worker_pid := os.environ.get("RLHF_WORKER_PID"):
        exit_with_the_worker(int(worker_pid))
    code = run(args.job_id, args.outcome)
    import torch.distributed as dist

    if code == 0 and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(code)


if __name__ == "__main__":
    main()
