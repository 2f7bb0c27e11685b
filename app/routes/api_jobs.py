"""JSON API of jobs: list, one job, its metrics, cancel and retry."""

from typing import Annotated

from fastapi import APIRouter, Query

from app.db.enums import JobKind, JobStatus
from app.routes.deps import EngineerUser, SessionDep
from app.schemas.common import Id, Offset
from app.schemas.jobs import JobMetricOut, JobOut, job_out
from app.services import jobs

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get("", response_model=list[JobOut])
def list_jobs(
    session: SessionDep,
    user: EngineerUser,
    status: JobStatus | None = None,
    kind: JobKind | None = None,
    prompt_set_id: Id | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Offset = 0,
):
    """Newest first."""
    found = jobs.list_jobs(session, status=status, kind=kind, prompt_set_id=prompt_set_id, limit=limit, offset=offset)
    return [job_out(j) for j in found]


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: Id, session: SessionDep, user: EngineerUser):
    return job_out(jobs.get_job(session, job_id))


@router.get("/{job_id}/metrics", response_model=list[JobMetricOut])
def get_metrics(job_id: Id, session: SessionDep, user: EngineerUser,
                after_id: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None):
    """By step; with after_id, only the values written since (a live chart polls this way)."""
    jobs.get_job(session, job_id)
    return jobs.list_metrics(session, job_id, after_id=after_id)


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel(job_id: Id, session: SessionDep, user: EngineerUser):
    """Queued: cancelled at once. Running: stops at its next step (status shows when)."""
    return job_out(jobs.request_cancel(session, job_id=job_id))


@router.post("/{job_id}/retry", response_model=JobOut, status_code=201)
def retry(job_id: Id, session: SessionDep, user: EngineerUser):
    """A new job with the same kind and parameters as a failed or cancelled one."""
    return job_out(jobs.retry_job(session, job_id=job_id, user_id=user.id))
