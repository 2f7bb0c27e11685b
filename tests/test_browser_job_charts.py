"""In Chromium: a job page's live curves end with every value the job wrote, also one
committed after a value with a later id (two writers), which polling by id alone misses."""

import pytest
from sqlalchemy import text, update

from app.db.enums import JobKind, JobStatus, Role
from app.db.models import Job, JobMetric
from app.db.session import session_scope
from app.services import jobs
from tests.conftest import sign_in_page
from tests.factories import make_user

pytestmark = pytest.mark.browser


def points(page) -> int:
    return int(page.get_attribute("canvas[data-metric=loss]", "data-points"))


def test_the_curves_of_a_finished_job_hold_a_value_committed_late_with_an_early_id(live_server, page):
    with session_scope() as s:
        make_user(s, role=Role.engineer, username="eng")
        job = jobs.enqueue_job(s, kind=JobKind.train_reward, params={}, commit=False)
        s.execute(update(Job).where(Job.id == job.id).values(status=JobStatus.running))
        # The id a slow writer took before the others wrote theirs.
        early_id = s.scalar(text("SELECT nextval(pg_get_serial_sequence('job_metrics', 'id'))"))
        s.add_all(JobMetric(job_id=job.id, step=step, name="loss", value=1.0 / step) for step in (1, 2, 3))
        job_id = job.id

    sign_in_page(page, live_server, "eng")
    page.goto(f"{live_server}/jobs/{job_id}")
    page.wait_for_function("() => document.querySelector('canvas[data-metric=loss]')?.dataset.points === '3'")

    with session_scope() as s:
        s.add(JobMetric(job_id=job_id, step=5, name="loss", value=0.2))
    page.wait_for_function("() => document.querySelector('canvas[data-metric=loss]').dataset.points === '4'")

    with session_scope() as s:  # the slow writer commits last, with its early id, as the job ends
        s.add(JobMetric(id=early_id, job_id=job_id, step=4, name="loss", value=0.25))
        s.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.succeeded))
    page.wait_for_selector("#job-state:has-text('succeeded')")
    page.wait_for_selector("#job-charts[data-complete=true]", state="attached")
    assert points(page) == 5
