"""In Chromium: an engineer watches a generation job run to its end and cancels another."""

import pytest

from app.config import Settings
from app.db.enums import JobKind, Role
from app.db.session import session_scope
from app.services import jobs
from tests.conftest import screenshot, sign_in_page
from tests.factories import make_model, make_prompt_set, make_user

pytestmark = pytest.mark.browser


def test_job_pages_update_live_while_a_worker_runs_the_job(live_server, page, tiny_model_dir):
    from trainer.worker import start_background_worker

    with session_scope() as s:
        make_user(s, role=Role.engineer, username="eng")
        model = make_model(s, tiny_model_dir)
        prompt_set = make_prompt_set(s, model=model, prompts=[f"Question {i}?" for i in range(6)], k=2,
                                     max_new_tokens=12)
        s.flush()
        job = jobs.enqueue_job(s, kind=JobKind.generate, params={"prompt_set_id": prompt_set.id, "batch_size": 2},
                               commit=False)
        waiting = jobs.enqueue_job(s, kind=JobKind.generate, params={"prompt_set_id": prompt_set.id},
                                   queue="elsewhere", commit=False)
        job_id, waiting_id = job.id, waiting.id

    sign_in_page(page, live_server, "eng")
    page.click("nav >> text=Jobs")
    page.wait_for_selector(f"#job-{job_id}[data-status=queued]")
    assert page.get_attribute("#job-table", "data-polling") == "on"
    screenshot(page, "jobs_list_queued")

    # Nothing runs the "elsewhere" queue: cancel that job from its page.
    page.click(f"#job-{waiting_id} a")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#job-status button:has-text('Cancel')")
    page.wait_for_selector("#job-status[data-status=cancelled]")
    assert "Cancelled before it started." in page.inner_text("#job-status")
    assert page.locator("#job-status button:has-text('Retry')").count() == 1

    page.goto(f"{live_server}/jobs/{job_id}")
    page.wait_for_selector("#job-status[data-status=queued]")
    worker = start_background_worker(Settings(device="cpu", worker_poll_interval_s=0.2, worker_heartbeat_s=0.5,
                                              worker_shutdown_timeout_s=2))
    try:
        # No reload: the fragment polls itself until the job has finished.
        page.wait_for_selector("#job-status[data-status=succeeded]", timeout=90_000)
    finally:
        worker.stop()
    text = page.inner_text("#job-status")
    assert "6 / 6 (100%)" in text and "tasks" in text and "responses_per_s" in text
    assert page.get_attribute("#job-status", "hx-trigger") is None  # polling stopped
    screenshot(page, "job_detail_succeeded")

    page.click("text=← Jobs")
    page.wait_for_selector(f"#job-{job_id}[data-status=succeeded]")
    assert page.get_attribute("#job-table", "data-polling") == "off"
    screenshot(page, "jobs_list")
