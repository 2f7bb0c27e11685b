"""JSON shapes of jobs and their metrics."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from app.db.enums import JobKind, JobStatus
from app.db.models import Job
from app.services.jobs import eta_s


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: JobKind
    status: JobStatus
    params: dict[str, Any]
    queue: str
    created_by_id: int | None
    prompt_set_id: int | None
    model_id: int | None
    progress_done: int
    progress_total: int
    eta_s: float | None = None
    attempts: int
    cancel_requested: bool
    worker: str | None
    error: str | None
    traceback: str | None
    result: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None


class JobMetricOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    step: int
    name: str
    value: float


def job_out(job: Job) -> JobOut:
    """The job with its estimated time to finish."""
    return JobOut.model_validate(job).model_copy(update={"eta_s": eta_s(job)})
