"""In Chromium, the loop closed by an engineer: train a reward model on labeled
rankings from the dashboard and watch its curves grow, run PPO against it, read the
policy's samples side by side, and make the policy generate the set's next round;
and the other two methods side by side with PPO: a DPO run and a best-of-N run
started from the dashboard, then a best-of-N round (a real `rlhf worker` process
runs the jobs on a tiny model)."""

import pytest

from sqlalchemy import func, select

from app.db.enums import JobKind, JobStatus, ModelKind, Role, Split
from app.db.models import Job, Prompt, PromptSet, Task
from app.db.session import session_scope
from tests.conftest import screenshot, sign_in_page
from tests.factories import make_model, make_user, ranked_set
from tests.workers import workers  # noqa: F401 (fixture)

pytestmark = pytest.mark.browser


def start_run(page, live_server: str, settings: dict[str, str], shot: str, *, name: str | None = None) -> None:
    """Fill the run form's settings (and the run's name), screenshot the form, start the run and
    land on its job page."""
    for field, value in settings.items():
        page.fill(f"input[name={field}]", value)
    if name is not None:
        page.fill("input[name=name]", name)
    screenshot(page, shot)
    page.evaluate("() => window.scrollTo(0, 0)")  # the full-page screenshot leaves the page scrolled oddly
    page.click("#run-start")
    page.wait_for_url(f"{live_server}/jobs/*")


def test_reward_model_then_ppo_then_next_round(live_server, page, workers, tiny_model_dir):  # noqa: F811
    with session_scope() as s:
        make_user(s, role=Role.engineer, username="eng")
        alice = make_user(s, username="alice")
        make_model(s, tiny_model_dir, name="tiny-llama", is_default=True)
        prompt_set = ranked_set(s, alice, prompts=24, name="word soup")
        s.flush()
        set_id = prompt_set.id
        # Samples before/after come from the held-out validation split only.
        held_out = s.scalar(select(func.count()).select_from(Prompt).where(
            Prompt.prompt_set_id == set_id, Prompt.split == Split.validation))
    assert 0 < held_out < 24
    workers.start(cli=True)

    page.set_default_timeout(15_000)
    sign_in_page(page, live_server, "eng")

    # 1. A reward model from the dashboard; a bad value first comes back beside its field.
    page.click("nav >> text=Reward model")
    page.check(f"input[name=prompt_set_ids][value='{set_id}']")
    page.fill("input[name=epochs]", "0")
    page.locator("input[name=epochs]").evaluate("e => e.removeAttribute('min')")
    page.click("#run-start")
    page.wait_for_selector("#run-error")
    assert "must be 1..100" in page.inner_text("#run-form")
    start_run(page, live_server, {"epochs": "3", "learning_rate": "0.001", "batch_size": "4", "max_length": "96",
                                  "warmup_ratio": "0"}, "reward_form", name="tiny RM")
    # The curves fill in while it runs, without a reload.
    page.wait_for_selector("canvas[data-metric=loss]", timeout=120_000)
    page.wait_for_selector("#job-state:has-text('succeeded')", timeout=180_000)
    page.wait_for_selector("#job-charts[data-complete=true]", state="attached", timeout=15_000)
    assert int(page.get_attribute("canvas[data-metric=val_accuracy]", "data-points")) >= 3
    # Once the job has finished the chart holds one point per step of the metric.
    loss_steps = page.evaluate(
        "async () => (await (await fetch(document.getElementById('job-charts').dataset.metricsUrl)).json())"
        ".filter(m => m.name === 'loss').length")
    assert loss_steps >= 6 and int(page.get_attribute("canvas[data-metric=loss]", "data-points")) == loss_steps
    screenshot(page, "reward_job_curves")

    # The registry lists the new reward model under its base model; its page shows lineage and metrics.
    page.click("nav >> text=Models")
    row = page.locator("#model-table tr", has_text="tiny RM")
    assert "reward" in row.inner_text() and "tiny-llama" in row.inner_text() and "val. accuracy" in row.inner_text()
    screenshot(page, "model_registry")
    row.locator("a", has_text="tiny RM").click()
    page.wait_for_selector("#model-lineage")
    assert "tiny-llama" in page.inner_text("#model-lineage") and "val_accuracy" in page.inner_text("#model-metrics")
    assert page.locator("#promote").count() == 0  # a reward model generates nothing
    screenshot(page, "reward_model_page")

    # 2. PPO against it, from the dashboard.
    page.click("nav >> text=PPO")
    page.select_option("select[name=reward_model_id]", label="tiny RM (reward)")
    page.check(f"input[name=prompt_set_ids][value='{set_id}']")
    start_run(page, live_server, {"steps": "2", "batch_size": "4", "mini_batch_size": "2", "ppo_epochs": "1",
                                  "learning_rate": "0.0001", "max_new_tokens": "8"}, "ppo_form", name="tiny policy")
    page.wait_for_selector("#job-state:has-text('succeeded')", timeout=180_000)
    page.wait_for_selector("canvas[data-metric=kl]")
    screenshot(page, "ppo_job_curves")

    # 3. The policy's page: lineage SFT + RM, samples before and after.
    page.click("#job-model-link")
    page.wait_for_selector("#samples .sample-pair")
    lineage = page.inner_text("#model-lineage")
    assert "tiny-llama" in lineage and "tiny RM" in lineage
    assert page.locator("#samples .sample-pair").count() == held_out
    assert page.locator("#samples .sample[data-stage=before]").count() == held_out
    screenshot(page, "policy_side_by_side")

    # 4. It generates the next round of the set.
    page.select_option("select[name=prompt_set_id]", label="word soup (active, round 1)")
    page.click("#promote-button")
    page.wait_for_selector(".flash:has-text('Round 2')")
    assert "generation job" in page.inner_text("#model-generates")
    screenshot(page, "policy_promoted")
    with session_scope() as s:
        prompt_set = s.get(PromptSet, set_id)
        assert prompt_set.round == 2 and prompt_set.generator_model.name == "tiny policy"
        generate = s.query(Job).filter(Job.kind == JobKind.generate, Job.prompt_set_id == set_id).one()
        assert generate.status in (JobStatus.queued, JobStatus.running, JobStatus.succeeded)


def test_dpo_and_best_of_n_from_the_dashboard_then_a_best_of_n_round(live_server, page, workers, tiny_model_dir,  # noqa: F811
                                                                      tiny_reward_dir):
    with session_scope() as s:
        make_user(s, role=Role.engineer, username="eng")
        alice = make_user(s, username="alice")
        sft = make_model(s, tiny_model_dir, name="tiny-llama", is_default=True)
        make_model(s, tiny_reward_dir, name="tiny RM", kind=ModelKind.reward, is_default=True)
        prompt_set = ranked_set(s, alice, prompts=10, name="word soup")
        s.flush()
        set_id, sft_id = prompt_set.id, sft.id
    workers.start()  # `python -m`: the code of this checkout, whichever package the console script points to
    sign_in_page(page, live_server, "eng")

    # The dashboard sets the three methods side by side, each linking to its form.
    methods = page.locator("#policy-methods")
    assert [methods.locator(f"a[href='/training/{m}']").count() for m in ("ppo", "dpo", "best-of-n")] == [1, 1, 1]
    screenshot(page, "policy_methods_dashboard")

    # 1. DPO from the dashboard, on the labelers' rankings only (imported judgements left out).
    methods.locator("a[href='/training/dpo']").click()
    page.wait_for_selector("#run-form")
    page.check(f"input[name=prompt_set_ids][value='{set_id}']")
    page.select_option("select[name=include_imported]", "no")
    start_run(page, live_server, {"epochs": "1", "batch_size": "4", "learning_rate": "0.0001", "max_length": "96",
                                  "validation_samples": "2", "max_new_tokens": "8"}, "dpo_form", name="tiny DPO")
    page.wait_for_selector("#job-state:has-text('succeeded')", timeout=180_000)
    page.goto(f"{live_server}/")
    page.locator("#policy-methods a[href='/training/dpo']").click()
    row = page.locator("#runs tr", has_text="tiny DPO")
    assert "succeeded" in row.inner_text()
    screenshot(page, "dpo_runs")

    # 2. Best-of-N from the dashboard, one form style: the same run card, model selects and set checkboxes.
    page.goto(f"{live_server}/")
    page.locator("#policy-methods a[href='/training/best-of-n']").click()
    page.wait_for_selector("#run-form")
    page.select_option("select[name=reward_model_id]", label="tiny RM (reward, default)")
    page.check(f"input[name=prompt_set_ids][value='{set_id}']")
    page.select_option("select[name=use]", "report")
    start_run(page, live_server, {"n": "4", "max_new_tokens": "8", "max_prompts": "3", "batch_size": "8"},
              "best_of_n_form")
    page.wait_for_selector("#job-state:has-text('succeeded')", timeout=180_000)
    page.goto(f"{live_server}/training/best-of-n")
    row = page.locator("#runs tbody tr").first
    assert "succeeded" in row.inner_text() and "4" in row.inner_text()  # N = 4
    screenshot(page, "best_of_n_runs")

    # 3. The next round of the set as the best K = 4 of N = 6 samples by the reward model.
    page.goto(f"{live_server}/models/{sft_id}")
    page.select_option("select[name=prompt_set_id]", label="word soup (active, round 1)")
    page.fill("input[name=best_of_n]", "6")
    page.select_option("select[name=best_of_n_reward_model_id]", label="tiny RM (default)")
    page.click("#promote-button")
    page.wait_for_selector(".flash:has-text('the best 4 of 6 samples per prompt')")
    assert "best 4 of 6 by tiny RM" in page.inner_text("#model-generates")
    page.locator("#model-generates a.generation-job").click()
    page.wait_for_selector("#job-state:has-text('succeeded')", timeout=180_000)
    screenshot(page, "best_of_n_round_job")
    with session_scope() as s:
        tasks = s.query(Task).filter(Task.prompt_set_id == set_id, Task.round == 2).all()
        assert len(tasks) == 10
        assert all(len(t.items) == 4 and t.selection["n"] == 6 and len(t.selection["candidates"]) == 6 for t in tasks)
