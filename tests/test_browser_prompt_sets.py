"""In Chromium, against a live server and a real worker with a tiny model: an admin
creates a prompt set, uploads prompts, starts it and watches generation until
the tasks are ready, without reloading the page."""

import json

import pytest

from app.config import Settings
from app.db.enums import ModelKind, Role
from app.db.models import Model
from app.db.session import session_scope
from tests.conftest import screenshot, sign_in_page
from tests.factories import make_user

pytestmark = pytest.mark.browser

PROMPTS = ["Name a colour.", "Say hello politely.", "What is two plus two?"]


@pytest.fixture
def worker(live_server, database_url, tmp_path):
    """One in-process worker on the test database, as `rlhf serve` runs it."""
    from trainer.worker import start_background_worker

    settings = Settings(data_dir=tmp_path, database_url=database_url, artifacts_dir=tmp_path / "artifacts",
                        device="cpu", worker_poll_interval_s=0.5)
    background = start_background_worker(settings)
    assert background.wait_ready(30), "the worker did not start"
    yield background
    background.stop(timeout=30)


def test_admin_uploads_prompts_and_watches_generation_until_tasks_are_ready(
        live_server, worker, page, tiny_model_dir, tmp_path):
    with session_scope() as s:
        make_user(s, role=Role.admin, username="boss")
        s.add(Model(name="tiny-sft", kind=ModelKind.sft, path=str(tiny_model_dir), source="test", is_default=True))

    sign_in_page(page, live_server, "boss")

    # Create the set; a bad K comes back next to its field with the other values kept.
    page.click("nav >> text=Prompt sets")
    page.wait_for_url(f"{live_server}/admin/prompt-sets")
    page.click("text=New prompt set")
    page.fill("#prompt-set-form input[name=name]", "Politeness")
    page.fill("#prompt-set-form textarea[name=instructions]", "Prefer the **polite** answer.")
    page.fill("#prompt-set-form input[name=k]", "12")
    page.evaluate("document.querySelector('#prompt-set-form input[name=k]').removeAttribute('max')")
    page.click("#prompt-set-form button[type=submit]")
    page.wait_for_selector("#prompt-set-form .field-error")
    assert "must be 2..9" in page.inner_text("#prompt-set-form")
    assert page.input_value("#prompt-set-form input[name=name]") == "Politeness"
    screenshot(page, "prompt_set_new_error")
    page.fill("#prompt-set-form input[name=k]", "2")
    page.fill("#prompt-set-form input[name=max_new_tokens]", "8")
    assert "tiny-sft" in page.inner_text("#prompt-set-form select[name=generator_model_id]")
    page.click("#prompt-set-form button[type=submit]")
    page.wait_for_selector("#prompt-set-import")
    assert "Created the prompt set 'Politeness'" in page.inner_text("#flashes")
    assert page.inner_text("#prompt-set-state") == "draft"
    detail_url = page.url

    # A file with a bad line is refused with its line number; nothing is stored.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    page.set_input_files("#prompt-set-import input[type=file]", str(bad))
    page.click("#prompt-set-import button[type=submit]")
    page.wait_for_selector("#prompt-set-import [role=alert]")
    assert "line 2: the last message must be from the user" in page.inner_text("#prompt-set-import")
    assert page.inner_text("[data-count=prompts]") == "0"
    screenshot(page, "prompt_set_import_error")

    good = tmp_path / "prompts.jsonl"
    good.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS + PROMPTS[:1]))
    page.set_input_files("#prompt-set-import input[type=file]", str(good))
    page.click("#prompt-set-import button[type=submit]")
    page.wait_for_selector("text=Imported 3 prompts")
    assert "Skipped 1 duplicate" in page.inner_text("#flashes")
    assert page.inner_text("[data-count=prompts]") == "3"

    # Start: the page then follows the generation job by itself.
    page.click("#prompt-set-actions button[value=start]")
    page.wait_for_selector("text=Generation of responses is queued")
    assert page.url == detail_url and page.inner_text("#prompt-set-state") == "active"
    page.evaluate("window.notReloaded = true")
    screenshot(page, "prompt_set_generating")
    page.wait_for_selector("#prompt-set-status[data-job-status=succeeded]", timeout=180_000)
    assert page.evaluate("window.notReloaded") is True, "the page was reloaded"
    assert page.inner_text("[data-count=tasks-ready]") == "3"
    assert page.inner_text("[data-count=responses]") == "6"
    assert "100%" in page.inner_text("#prompt-set-status") or "3 of 3" in page.inner_text("#prompt-set-status")
    screenshot(page, "prompt_set_ready")

    page.click("text=← Prompt sets")
    row = page.locator("tr[data-name=Politeness]")
    assert "active" in row.inner_text() and "succeeded" in row.inner_text()
    screenshot(page, "prompt_sets_list")
