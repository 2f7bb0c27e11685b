"""Engineer pages: the job list and one job's progress, error, metrics and result."""

from fastapi import APIRouter, Request
from sqlalchemy import select

from app.db.enums import JobKind, JobStatus
from app.db.models import Job, User
from app.routes.deps import EngineerUser, SessionDep
from app.schemas.common import Id
from app.services import jobs
from app.web import fragment_or_redirect, redirect, render, templates

router = APIRouter(prefix="/jobs", include_in_schema=False)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


templates.env.filters["duration"] = format_duration


def _list_context(session, status: str | None, kind: str | None) -> dict:
    status_value = JobStatus(status) if status in JobStatus.__members__ else None
    kind_value = JobKind(kind) if kind in JobKind.__members__ else None
    found = jobs.list_jobs(session, status=status_value, kind=kind_value, limit=200)
    return {
        "jobs": found, "eta": {j.id: jobs.eta_s(j) for j in found},
        "polling": any(j.status in jobs.ACTIVE_STATUSES for j in found),
        "status": status_value.value if status_value else "", "kind": kind_value.value if kind_value else "",
        "statuses": list(JobStatus), "kinds": list(JobKind),
        "users": {uid: name for uid, name in session.execute(select(User.id, User.username).where(
            User.id.in_({j.created_by_id for j in found if j.created_by_id})))},
    }


@router.get("")
def list_page(request: Request, session: SessionDep, user: EngineerUser,
              status: str | None = None, kind: str | None = None):
    return render(request, "pages/jobs_list.html", _list_context(session, status, kind), block="job_table")


def _detail_context(session, job: Job) -> dict:
    return {
        "job": job, "eta": jobs.eta_s(job),
        "metrics": jobs.metric_table(session, job.id), "retries": jobs.retries_of(session, job.id),
        "created_by": session.get(User, job.created_by_id) if job.created_by_id else None,
        "polling": job.status in jobs.ACTIVE_STATUSES,
    }


@router.get("/{job_id}")
def detail_page(request: Request, session: SessionDep, user: EngineerUser, job_id: Id):
    job = jobs.get_job(session, job_id)
    return render(request, "pages/jobs_detail.html", _detail_context(session, job), block="job_status")


@router.post("/{job_id}/cancel")
def cancel(request: Request, session: SessionDep, user: EngineerUser, job_id: Id):
    job = jobs.request_cancel(session, job_id=job_id)
    return fragment_or_redirect(request, f"/jobs/{job.id}", lambda: render(
        request, "pages/jobs_detail.html", _detail_context(session, job), block="job_status"))


@router.post("/{job_id}/retry")
def retry(request: Request, session: SessionDep, user: EngineerUser, job_id: Id):
    new = jobs.retry_job(session, job_id=job_id, user_id=user.id)
    return redirect(request, f"/jobs/{new.id}")
