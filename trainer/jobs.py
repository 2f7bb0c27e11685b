"""The job handler registry and the context a handler runs with.

A handler is a plain function `handler(ctx: JobContext) -> dict | None`; what it
returns becomes the job's result. Register one per job kind:

    from trainer.jobs import JobContext, handler

    @handler(JobKind.train_reward)
    def train_reward_job(ctx: JobContext) -> dict:
        for step in range(n):
            ctx.check_cancelled()          # stops here when cancelled from the page
            ...
            ctx.progress(step + 1, n)
            ctx.metrics(step, {"loss": loss})
        model = register_model(...); ctx.set_model(model.id)
        return {"accuracy": acc}

or, without importing the module at worker start, add a "module:function"
line to HANDLERS below (the worker imports it when the first such job runs).
"""

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from importlib import import_module
from typing import Any

from app.config import Settings
from app.db.enums import JobKind
from app.db.session import new_session

Handler = Callable[["JobContext"], Mapping[str, Any] | None]

# Job kind -> handler, or "module:function" imported on first use.
HANDLERS: dict[JobKind, Handler | str] = {
    JobKind.generate: "trainer.generate:generate_job",
    JobKind.train_sft: "trainer.sft_job:train_sft_job",
    JobKind.train_reward: "trainer.reward_job:train_reward_job",
    JobKind.train_ppo: "trainer.ppo_job:train_ppo_job",
    JobKind.train_dpo: "trainer.dpo_job:train_dpo_job",
    JobKind.best_of_n: "trainer.best_of_n_job:best_of_n_job",
    JobKind.eval_figures: "trainer.eval_figures_job:eval_figures_job",
    JobKind.ai_label: "trainer.ai_label_job:ai_label_job",
    JobKind.score_tasks: "trainer.score_tasks_job:score_tasks_job",
}


def handler(kind: JobKind) -> Callable[[Handler], Handler]:
    """Decorator: register `func` as the handler of jobs of `kind`."""

    def register(func: Handler) -> Handler:
        HANDLERS[JobKind(kind)] = func
        return func

    return register


def resolve_handler(kind: JobKind) -> Handler:
    target = HANDLERS.get(JobKind(kind))
    if target is None:
        raise LookupError(f"No handler is registered for jobs of kind '{kind}'.")
    if isinstance(target, str):
        module, _, name = target.partition(":")
        func = getattr(import_module(module), name)
        # Importing the module may have registered a handler itself; prefer that.
        target = HANDLERS[JobKind(kind)] if callable(HANDLERS[JobKind(kind)]) else func
        HANDLERS[JobKind(kind)] = target
    return target


class JobCancelled(Exception):
    """Raised by JobContext.check_cancelled: the job must stop now."""

    def __init__(self, reason: str, *, shutdown: bool = False):
        super().__init__(reason)
        self.reason = reason
        # True when the worker is shutting down: the job is queued again, not cancelled.
        self.shutdown = shutdown


class JobFailed(Exception):
    """A handler's way to fail with a message fit for the page (no traceback shown).
    `details` (a job's training processes' output, say) is recorded as its traceback."""

    def __init__(self, message: str, *, details: str | None = None):
        super().__init__(message)
        self.details = details


@dataclass
class JobContext:
    job_id: int
    kind: JobKind
    params: dict[str, Any]
    settings: Settings
    worker: str = "worker"
    # procrastinate's abort check (None outside a worker, e.g. in a test calling a handler).
    should_abort: Callable[[], bool] | None = None
    is_shutdown: Callable[[], bool] | None = None
    # Check the database at most this often (seconds); progress writes also check.
    cancel_check_interval_s: float = 0.5
    # False in the processes of a multi-process run other than the first (trainer/job_process.py):
    # there progress, metrics and set_model do nothing, and nothing is registered (trainer/runs.py).
    main: bool = True
    model_id: int | None = None
    _last_check: float = field(default=0.0, repr=False)

    def new_session(self):
        return new_session()

    @cached_property
    def device(self):
        """cuda > mps > cpu, or Settings.device (RLHF_DEVICE) when set."""
        from trainer.models import pick_device

        return pick_device(self.settings.device)

    @cached_property
    def dtype(self):
        """bf16 on CUDA where supported, float32 elsewhere."""
        from trainer.models import pick_dtype

        return pick_dtype(self.device)

    def check_cancelled(self, *, force: bool = False) -> None:
        """Raise JobCancelled when the job was cancelled (from the page or the API)
        or the worker is shutting down. Cheap enough to call every step."""
        if self.is_shutdown is not None and self.is_shutdown():
            raise JobCancelled("The worker is shutting down.", shutdown=True)
        if self.should_abort is not None and self.should_abort():
            raise JobCancelled("Cancelled.")
        now = time.monotonic()
        if not force and now - self._last_check < self.cancel_check_interval_s:
            return
        self._last_check = now
        from app.services import jobs

        with new_session() as session:
            if jobs.is_cancel_requested(session, job_id=self.job_id):
                raise JobCancelled("Cancelled.")

    def progress(self, done: int, total: int, *, session=None) -> None:
        """Progress done/total (also a heartbeat). Pass the session whose
        transaction holds the work just done, so both commit together; the
        caller then commits."""
        if not self.main:
            return
        from app.services import jobs

        if session is not None:
            jobs.record_progress(session, job_id=self.job_id, done=done, total=total, commit=False)
            return
        with new_session() as own:
            jobs.record_progress(own, job_id=self.job_id, done=done, total=total)

    def metrics(self, step: int, values: Mapping[str, float], *, session=None) -> None:
        """Scalars of one step, for the live curves."""
        if not self.main:
            return
        from app.services import jobs

        if session is not None:
            jobs.record_metrics(session, job_id=self.job_id, step=step, values=values, commit=False)
            return
        with new_session() as own:
            jobs.record_metrics(own, job_id=self.job_id, step=step, values=values)

    def set_model(self, model_id: int) -> None:
        """The model this job produced (recorded with its outcome)."""
        if self.main:
            self.model_id = model_id
