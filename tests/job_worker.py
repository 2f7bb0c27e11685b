"""A real worker process for the queue tests, with one extra, predictable workload.

    python -m tests.job_worker --queues gpu

runs trainer.worker.run_worker (the same code as `rlhf worker`) after
registering a "steps" handler for train_sft jobs: it takes params
{"steps": n, "step_s": seconds, "log": path} and, step by step, checks for
cancellation, reports progress and a metric, and sleeps. It appends
"start <pid> <time>" and "end <pid> <time>" lines to the log file so a test can
tell which process ran the job and when. Queue mechanics under test (locks,
heartbeats, stalled-job recovery, cancel, retry) are all the real ones.
"""

import argparse
import os
import time

from app.config import get_settings
from app.db.enums import JobKind
from app.logs import configure_logging
from trainer.jobs import JobContext, handler


def _note(path: str | None, what: str) -> None:
    if path:
        with open(path, "a") as f:
            f.write(f"{what} {os.getpid()} {time.time():.3f}\n")


@handler(JobKind.train_sft)
def steps_job(ctx: JobContext) -> dict:
    steps, step_s, log = int(ctx.params["steps"]), float(ctx.params.get("step_s", 0.05)), ctx.params.get("log")
    _note(log, "start")
    for step in range(steps):
        ctx.check_cancelled()
        time.sleep(step_s)
        ctx.progress(step + 1, steps)
        ctx.metrics(step, {"loss": 1.0 / (step + 1)})
    _note(log, "end")
    return {"steps": steps, "pid": os.getpid()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queues", default="default,gpu")
    args = parser.parse_args()
    from trainer.worker import run_worker

    settings = get_settings()
    configure_logging(settings.log_level)
    run_worker(settings, queues=[q for q in args.queues.split(",") if q])


if __name__ == "__main__":
    main()
