"""In Chromium: an engineer evaluates a trained policy against the default SFT model,
two labelers vote blind with the keyboard, and the results page shows the win rate,
the leaderboard and the automatic figures (reward model, KL) computed from it."""

import pytest
from sqlalchemy import select

from app.config import Settings
from app.db.enums import JobKind, JobStatus, ModelKind, Role
from app.db.models import Job, PromptSet, Task, Vote
from app.db.session import session_scope
from tests.conftest import screenshot, sign_in_page
from tests.factories import make_model, make_user
from tests.test_generate import run_generate
from tests.workers import load_job
from trainer.worker import execute_job

pytestmark = pytest.mark.browser

PROMPTS = "\n".join(f'{{"prompt": "Give me one tip about topic {i}."}}' for i in range(4))


def wait_for_task(page, task_id: str | None = None):
    """The next A/B card is swapped in and label.js has bound it."""
    selector = f'#label-task[data-task-id="{task_id}"][data-ready]' if task_id else "#label-task[data-ready]"
    page.wait_for_selector(selector)


def test_engineer_evaluates_a_policy_against_sft_and_labelers_vote_blind(live_server, browser, page,
                                                                         tiny_model_dir, tiny_reward_dir, tmp_path):
    with session_scope() as s:
        make_model(s, tiny_reward_dir, name="tiny-rm", kind=ModelKind.reward)
        sft = make_model(s, tiny_model_dir, name="tiny-sft-default", is_default=True)
        policy = make_model(s, tiny_model_dir, name="tiny-ppo-policy", kind=ModelKind.policy)
        policy.parent_id = sft.id
        make_user(s, role=Role.engineer, username="erin")
        make_user(s, role=Role.labeler, username="lena")
        make_user(s, role=Role.labeler, username="liam")
        sft_id, policy_id = sft.id, policy.id

    # The engineer creates the evaluation.
    sign_in_page(page, live_server, "erin")
    page.goto(f"{live_server}/evaluations")
    page.click("#new-evaluation")
    page.fill("input[name=name]", "Round 1 check")
    page.check(f'input[name=model_ids][value="{sft_id}"]')
    # One model only: refused next to the field, nothing created.
    page.fill("#prompts", PROMPTS)
    page.click("#create-evaluation")
    page.wait_for_selector("#error-model_ids")
    assert "at least 2" in page.inner_text("#error-model_ids")
    page.check(f'input[name=model_ids][value="{policy_id}"]')
    page.fill("input[name=overlap]", "2")
    page.fill("input[name=max_new_tokens]", "12")
    page.click("#create-evaluation")
    page.wait_for_url(f"{live_server}/evaluations/*")
    assert "Win rates" in page.inner_text("#win-rates")
    with session_scope() as s:
        set_id = s.scalar(select(PromptSet.id).where(PromptSet.name == "Round 1 check"))
    # The worker's generate job (run here): one response per prompt and model, the A/B tasks.
    job = load_job(run_generate(set_id))
    assert job.status == JobStatus.succeeded, job.traceback
    assert job.result["tasks"] == 4

    # Two labelers vote with the keyboard: lena always 1 (A), liam 2 (B) with "much", then a tie and both bad.
    plans = {"lena": ["1", "1 s", "1", "1"], "liam": ["2 m", "2", "3", "4"]}
    for username, votes in plans.items():
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        labeler_page = context.new_page()
        labeler_page.set_default_timeout(15_000)
        sign_in_page(labeler_page, live_server, username)
        labeler_page.goto(f"{live_server}/label")
        for i, keys in enumerate(votes):
            wait_for_task(labeler_page)
            task_id = labeler_page.get_attribute("#label-task", "data-task-id")
            html = labeler_page.content()
            assert "tiny-sft-default" not in html and "tiny-ppo-policy" not in html
            if username == "lena" and i == 0:
                screenshot(labeler_page, "evaluation_label_page")
                # Enter with no choice: the error is shown beside the choices, no reload.
                labeler_page.keyboard.press("Enter")
                labeler_page.wait_for_selector("#error-vote")
                wait_for_task(labeler_page, task_id)
            for key in keys.split():
                labeler_page.keyboard.press(key)
            labeler_page.keyboard.press("Enter")
            labeler_page.wait_for_selector(f'#label-task[data-ready]:not([data-task-id="{task_id}"])')
        assert labeler_page.locator("#all-done").count() == 1
        context.close()

    with session_scope() as s:
        votes = s.scalars(select(Vote).join(Task, Task.id == Vote.task_id).where(Task.prompt_set_id == set_id)).all()
        outcomes = sorted(v.outcome.value for v in votes)
        assert outcomes == sorted(["a"] * 4 + ["b", "b", "tie", "both_bad"])
        assert sorted(str(v.strength) for v in votes if v.strength) == ["much", "slightly"]

    page.goto(f"{live_server}/evaluations/{set_id}")
    row = page.locator("#pairs .pair-row").first
    assert row.locator("td").nth(2).inner_text() == "8"  # votes
    win_rate = row.locator(".win-rate").inner_text()
    assert win_rate.endswith("%")
    assert "–" in row.locator(".interval").inner_text()
    assert page.locator("#per-labeler h3").count() == 2
    # Both models are on the leaderboard, the default SFT model anchored at 1000.
    board = page.locator("#set-leaderboard")
    assert board.locator("tbody tr").count() == 2
    assert "1000" in board.locator(f'tr[data-model-id="{sft_id}"]').inner_text()
    # The automatic figures: the engineer starts the job; the worker's run (here) fills the tables.
    assert page.locator("#reward-pairs").count() == 0
    page.click("#figures-button")
    page.wait_for_selector(".flash >> text=being computed")
    with session_scope() as s:
        figures_id = s.scalar(select(Job.id).where(Job.kind == JobKind.eval_figures))
    execute_job(figures_id, settings=Settings(device="cpu", data_dir=tmp_path))
    assert load_job(figures_id).status == JobStatus.succeeded
    page.reload()
    figures = page.locator("#reward-pairs .reward-pair").first
    assert figures.locator(".rm-win-rate").inner_text() == "50.0%"  # the same weights write the same texts: ties
    assert figures.locator("td").nth(2).inner_text() == win_rate  # the labelers' figure beside it
    assert page.locator(f'#lengths tr[data-model-id="{policy_id}"] .kl').inner_text().split()[0] in ("0.000", "-0.000")
    assert page.locator(f'#lengths tr[data-model-id="{sft_id}"] .kl').inner_text() == "–"
    screenshot(page, "evaluation_results")
    page.goto(f"{live_server}/leaderboard")
    assert page.locator("#leaderboard tbody tr").count() == 2
    screenshot(page, "evaluation_leaderboard")
