"""The Jobs pages and the jobs JSON API."""

import re

from sqlalchemy import update

from app.db.base import utcnow
from app.db.enums import JobKind, JobStatus, Role
from app.db.models import Job
from app.services import jobs
from tests.conftest import login
from tests.factories import make_user


def make_job(session, **values) -> Job:
    job = jobs.enqueue_job(session, kind=JobKind.generate, params={"prompt_set_id": 3})
    if values:
        session.execute(update(Job).where(Job.id == job.id).values(**values))
        session.commit()
        session.refresh(job)
    return job


def test_job_list_shows_status_progress_and_eta_and_polls_while_running(client, client_as, session):
    client_as("engineer")
    running = make_job(session, status=JobStatus.running, progress_done=25, progress_total=100,
                       started_at=utcnow())
    page = client.get("/jobs")
    assert page.status_code == 200
    row = re.search(rf'<tr id="job-{running.id}".*?</tr>', page.text, re.S).group(0)
    assert 'class="badge running"' in row and "25 / 100 (25%)" in row and "left" in row
    assert 'hx-trigger="every 2s"' in page.text

    fragment = client.get("/jobs", headers={"HX-Request": "true"})
    assert fragment.text.lstrip().startswith('<section class="card" id="job-table"')
    assert "<html" not in fragment.text

    session.execute(update(Job).values(status=JobStatus.succeeded, finished_at=utcnow()))
    session.commit()
    finished = client.get("/jobs", headers={"HX-Request": "true"})
    assert 'data-polling="off"' in finished.text and "hx-trigger" not in finished.text


def test_job_list_filters_by_status(client, client_as, session):
    client_as("engineer")
    queued = make_job(session)
    failed = make_job(session, status=JobStatus.failed)
    page = client.get("/jobs?status=failed")
    assert f'id="job-{failed.id}"' in page.text and f'id="job-{queued.id}"' not in page.text


def test_job_page_shows_error_traceback_metrics_and_result(client, client_as, session):
    client_as("engineer")
    job = make_job(session, status=JobStatus.failed, error="RuntimeError: out of memory",
                   traceback="Traceback (most recent call last):\n  boom", result={"responses": 12},
                   finished_at=utcnow(), started_at=utcnow())
    jobs.record_metrics(session, job_id=job.id, step=0, values={"loss": 0.5, "kl": 0.01})
    jobs.record_metrics(session, job_id=job.id, step=1, values={"loss": 0.25})
    page = client.get(f"/jobs/{job.id}")
    assert page.status_code == 200
    assert "RuntimeError: out of memory" in page.text and "boom" in page.text
    assert 'id="job-metrics"' in page.text and "0.25" in page.text
    assert "responses" in page.text and 'action="/jobs/%d/retry"' % job.id in page.text
    assert "hx-trigger" not in page.text  # finished: no polling


def test_cancel_from_the_page_swaps_the_status_fragment(client, client_as, session):
    token = client_as("engineer").headers["X-CSRF-Token"]
    job = make_job(session)
    response = client.post(f"/jobs/{job.id}/cancel", headers={"HX-Request": "true", "X-CSRF-Token": token})
    assert response.status_code == 200
    assert response.text.lstrip().startswith('<section class="card" id="job-status" data-status="cancelled"')
    assert "Cancelled before it started." in response.text

    again = client.post(f"/jobs/{job.id}/cancel", headers={"HX-Request": "true", "X-CSRF-Token": token})
    assert again.status_code == 409 and "nothing to cancel" in again.text


def test_retry_from_the_page_opens_the_new_job(client, session):
    user = make_user(session, role=Role.engineer)
    token = login(client, user)
    job = make_job(session, status=JobStatus.failed)
    response = client.post(f"/jobs/{job.id}/retry", data={"csrf_token": token})
    assert response.status_code == 303
    new_id = int(response.headers["location"].rsplit("/", 1)[1])
    new = session.get(Job, new_id)
    assert new.status == JobStatus.queued and new.result == {"retry_of": job.id} and new.created_by_id == user.id
    assert f'href="/jobs/{job.id}"' in client.get(f"/jobs/{new_id}").text


def test_jobs_api_lists_gets_cancels_and_returns_metrics(client, client_as, session):
    token = client_as("engineer").headers["X-CSRF-Token"]
    job = make_job(session, status=JobStatus.running, progress_done=1, progress_total=4, started_at=utcnow())
    jobs.record_metrics(session, job_id=job.id, step=3, values={"loss": 1.5})

    listed = client.get("/api/v1/jobs").json()
    assert [j["id"] for j in listed] == [job.id]
    one = client.get(f"/api/v1/jobs/{job.id}").json()
    assert one["status"] == "running" and one["progress_total"] == 4 and one["eta_s"] is not None
    metrics = client.get(f"/api/v1/jobs/{job.id}/metrics").json()
    assert [{k: m[k] for k in ("step", "name", "value")} for m in metrics] == [{"step": 3, "name": "loss", "value": 1.5}]
    # A live chart asks only for what was written since the last value it has.
    jobs.record_metrics(session, job_id=job.id, step=4, values={"loss": 1.25, "accuracy": 0.5})
    newer = client.get(f"/api/v1/jobs/{job.id}/metrics", params={"after_id": metrics[-1]["id"]}).json()
    assert sorted((m["step"], m["name"]) for m in newer) == [(4, "accuracy"), (4, "loss")]

    cancelled = client.post(f"/api/v1/jobs/{job.id}/cancel", headers={"X-CSRF-Token": token}).json()
    assert cancelled["cancel_requested"] is True and cancelled["status"] == "running"
    missing = client.get("/api/v1/jobs/999999")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
