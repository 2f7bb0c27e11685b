"""In Chromium, under the app's Content-Security-Policy: an admin (who may also label
and train) walks the main pages; the browser blocks nothing and fetches nothing from
another origin, and the bars sized by script (no style attributes) have their sizes."""

import pytest
from sqlalchemy import update

from app.db.enums import JobKind, JobStatus, PromptSetKind, PromptSetStatus, Role
from app.db.models import Job, JobMetric
from app.db.session import session_scope
from app.services import jobs
from tests.conftest import sign_in_page
from tests.factories import add_prompt, bulk_seed, make_model, make_prompt_set, make_task, make_user

pytestmark = pytest.mark.browser


def test_main_pages_break_no_rule_of_the_content_security_policy(live_server, page, tmp_path):
    with session_scope() as s:
        make_user(s, role=Role.admin, username="chief")
        ann, bob = make_user(s, username="ann"), make_user(s, username="bob")
        rated = make_prompt_set(s, k=3, overlap=2, name="Rated set")
        s.flush()
        bulk_seed(s.connection().connection.driver_connection, prompt_set_id=rated.id, tasks=10, k=3, overlap=2,
                  labelers={ann.id: "consistent", bob.id: "random"}, seed=1, span_h=10)
        rated.status = PromptSetStatus.paused  # the labeling page gives the task below
        to_label = make_prompt_set(s, k=2, name="To label", instructions="Be **kind**. ![logo](https://x.example/l.png)")
        make_task(s, to_label, texts=["First ![img](https://x.example/a.png) answer.", "Second answer."])
        demo_set = make_prompt_set(s, kind=PromptSetKind.demonstration, name="To write")
        add_prompt(s, demo_set, "Write a haiku.")
        model = make_model(s, tmp_path, name="tiny")
        job = jobs.enqueue_job(s, kind=JobKind.generate, params={"prompt_set_id": to_label.id}, commit=False)
        s.execute(update(Job).where(Job.id == job.id).values(status=JobStatus.running, progress_done=3,
                                                             progress_total=10, prompt_set_id=to_label.id))
        s.add_all(JobMetric(job_id=job.id, step=step, name="loss", value=1.0 / step) for step in range(1, 6))
        ids = {"rated": rated.id, "to_label": to_label.id, "model": model.id, "job": job.id}

    blocked: list[str] = []
    page.on("console", lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None)
    elsewhere: list[str] = []
    page.on("request", lambda r: elsewhere.append(r.url) if not r.url.startswith((live_server, "data:")) else None)

    sign_in_page(page, live_server, "chief")

    def visit(path: str, ready: str) -> None:
        page.goto(f"{live_server}{path}")
        page.wait_for_selector(ready)
        page.wait_for_load_state("networkidle")
        assert not blocked, f"{path}: {blocked}"
        assert not elsewhere, f"{path}: {elsewhere}"

    def width(selector: str) -> float:
        return page.locator(selector).first.evaluate("el => el.getBoundingClientRect().width")

    visit("/label", "#label-task")
    assert page.locator("#label-task a.image-link").count() == 2  # the images of instructions and response
    visit("/demonstrate", "#demo-text")
    visit("/admin/prompt-sets", "main table")
    visit(f"/admin/prompt-sets/{ids['to_label']}", "#generation-job")
    assert width("[data-width='30.0'], [data-width='30']") > 0  # 3 of 10 done
    visit(f"/admin/prompt-sets/{ids['rated']}/quality", "#labelers")
    page.wait_for_function("() => document.querySelector('#labels-per-hour').width > 0")  # Chart.js drew
    assert width(".bar > span") > 0 and width(".progress.stacked .done") > 0
    assert page.locator(".histogram i").first.evaluate("el => el.style.height").endswith("%")
    visit(f"/admin/prompt-sets/{ids['rated']}/export", "main form")
    visit("/admin/demonstrations", "main")
    visit("/jobs", "#job-table")
    visit(f"/jobs/{ids['job']}", "#job-status")
    page.wait_for_selector("canvas[data-metric=loss]:not([data-points='0'])")
    assert width("#job-status .progress > span") > 0
    visit("/models", "main table")
    visit(f"/models/{ids['model']}", "main h1")
    visit("/training/reward", "main form")
    visit("/account/tokens", "main form")
    visit("/api/v1/docs", ".swagger-ui .info")
    page.click("#operations-api-me_api_v1_me_get .opblock-summary")  # Swagger UI works: an operation opens
    page.wait_for_selector(".opblock.is-open")
    assert not blocked and not elsewhere
