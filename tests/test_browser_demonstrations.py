"""In Chromium: a labeler writes a demonstration, reloads mid-way and finds the draft,
submits; an admin accepts it; an engineer starts SFT from the dashboard and watches
the job (run by a real `rlhf worker` process) finish with a tiny model."""

import pytest
from sqlalchemy import select

from app.db.base import utcnow
from app.db.enums import DemonstrationStatus, ModelKind, PromptSetKind, Role
from app.db.models import Demonstration, Model
from app.db.session import session_scope
from app.services import demonstrations as demos
from tests.conftest import screenshot, sign_in_page
from tests.factories import add_prompt, make_prompt_set, make_user
from tests.workers import workers  # noqa: F401 (fixture)

pytestmark = pytest.mark.browser

XSS = "<script>window.__xss=1</script>"


def signed_in(browser, live_server, username):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    sign_in_page(page, live_server, username)
    return page


def test_write_review_and_fine_tune(live_server, browser, workers, tiny_model_dir):  # noqa: F811
    with session_scope() as s:
        make_user(s, role=Role.labeler, username="wendy")
        admin = make_user(s, role=Role.admin, username="ada")
        make_user(s, role=Role.engineer, username="eli")
        demo_set = make_prompt_set(s, kind=PromptSetKind.demonstration, name="Helpful answers",
                                   instructions="Answer in **two sentences** at most.")
        add_prompt(s, demo_set, f"Why is the sky blue? {XSS}")
        s.add(Model(name="tiny-llama", kind=ModelKind.sft, path=str(tiny_model_dir), source="test"))
        s.flush()
        # One accepted demonstration imported earlier, so training has two prompts.
        demos.import_demonstrations(s, prompt_set=demo_set, user=admin, now=utcnow(),
                                    data='{"prompt": "What is two plus two?", "response": "Four."}')
        set_id = demo_set.id
    workers.start(cli=True)  # the real `rlhf worker`; it boots while the people below work

    # 1. The labeler writes, reloads mid-way (the draft is on the server), and submits.
    page = signed_in(browser, live_server, "wendy")
    page.goto(f"{live_server}/demonstrate")
    assert "Why is the sky blue? <script>" in page.inner_text("#prompt-text")  # shown as text, never run
    assert page.evaluate("window.__xss") is None
    assert "two sentences" in page.inner_text("#instructions")
    page.locator("#demo-text").press_sequentially("Sunlight is **scattered** by air", delay=20)
    page.wait_for_selector("#draft-status:has-text('Draft saved')", timeout=20_000)
    page.wait_for_selector("#demo-preview strong:has-text('scattered')")
    assert page.inner_text("#demo-count") == "32 characters · 5 words"
    screenshot(page, "demonstration_editor")
    page.reload()
    assert page.input_value("#demo-text") == "Sunlight is **scattered** by air"
    assert "Draft restored" in page.inner_text("#draft-status")
    page.locator("#demo-text").press("End")
    page.locator("#demo-text").press_sequentially(", and blue light the most.", delay=5)
    screenshot(page, "demonstration_after_reload")
    page.click("#demo-submit")
    page.wait_for_selector("#all-done")
    assert "Submitted." in page.inner_text("#demo-notice")
    assert page.inner_text("#count-submitted") == "1"
    with session_scope() as s:
        mine = s.scalar(select(Demonstration).where(Demonstration.status == DemonstrationStatus.submitted))
        assert mine.text == "Sunlight is **scattered** by air, and blue light the most."
        assert mine.time_spent_s > 0

    # 2. The admin accepts it from the review queue.
    page = signed_in(browser, live_server, "ada")
    page.goto(f"{live_server}/admin/demonstrations")
    item = page.locator(".review-item").first
    assert "wendy" in item.inner_text() and "scattered" in item.locator(".review-text strong").inner_text()
    screenshot(page, "demonstration_review_queue")
    item.locator("button.accept").click()
    page.wait_for_selector(".review-item[data-status=accepted]")
    assert "accepted by ada" in page.inner_text(".review-item .review-done")
    page.goto(f"{live_server}/admin/demonstrations")
    assert "100%" in page.inner_text("#demo-labelers")
    screenshot(page, "demonstration_review_done")

    # 3. The engineer starts SFT on the tiny model and watches it finish.
    page = signed_in(browser, live_server, "eli")
    page.goto(f"{live_server}/sft")
    page.select_option("select[name=base_model_id]", label="tiny-llama (sft)")
    page.check(f"input[name=prompt_set_ids][value='{set_id}']")
    for name, value in {"epochs": "2", "batch_size": "2", "learning_rate": "0.001", "max_length": "96"}.items():
        page.fill(f"input[name={name}]", value)
    screenshot(page, "sft_form")
    page.click("#sft-start")
    page.wait_for_url(f"{live_server}/jobs/*")
    page.wait_for_selector("#job-state:has-text('succeeded')", timeout=180_000)
    assert "tiny-llama SFT" in page.inner_text("#job-result")
    assert "val_loss" in page.inner_text("#job-metrics")
    screenshot(page, "sft_job_succeeded")
    # The new model and its parent answered the same validation prompts: read them side by side.
    page.click("#job-model-link")
    page.wait_for_selector("#samples .sample-pair")
    assert "tiny-llama" in page.inner_text("#model-lineage")
    pair = page.locator("#samples .sample-pair").first
    assert pair.locator(".sample[data-stage=before]").count() == 1 and pair.locator(".sample[data-stage=after]").count() == 1
    screenshot(page, "sft_model_side_by_side")
    page.goto(f"{live_server}/sft")
    assert "tiny-llama SFT" in page.inner_text("#sft-models")
