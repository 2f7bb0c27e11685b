"""In Chromium: an engineer reads the leaderboard, opens the best policy and finds the
evaluation evidence beside "Make generator", then sorts the registry by rating."""

import pytest

from app.db.enums import ModelKind, Role
from app.db.session import session_scope
from tests.conftest import screenshot, sign_in_page
from tests.factories import make_evaluation, make_model, make_prompt_set, make_user
from tests.test_leaderboard import cast_votes

pytestmark = pytest.mark.browser


def test_engineer_reads_the_leaderboard_and_the_evidence_beside_make_generator(live_server, page):
    with session_scope() as s:
        engineer = make_user(s, role=Role.engineer, username="eng")
        sft = make_model(s, name="smol-sft", is_default=True)
        policy = make_model(s, name="ppo-round-2", kind=ModelKind.policy)
        policy.parent_id = sft.id
        weak = make_model(s, name="ppo-round-1", kind=ModelKind.policy)
        weak.parent_id = sft.id
        s.flush()
        make_evaluation(s, [sft, policy, weak], prompts=90, seed=4)
        make_prompt_set(s, k=4, name="Helpfulness")  # a ranking set the policy could generate for
        cast_votes(s, {sft.id: 1.0, policy.id: 3.0, weak.id: 0.5}, 90, seed=4)
        s.commit()
        policy_id, username = policy.id, engineer.username

    sign_in_page(page, live_server, username)
    page.click("nav >> text=Leaderboard")
    rows = page.locator("#leaderboard tbody tr")
    assert rows.evaluate_all("rows => rows.map(r => r.querySelector('td a').textContent)") == [
        "ppo-round-2", "smol-sft", "ppo-round-1"]
    assert "1000" in rows.nth(1).inner_text() and "anchor" in rows.nth(1).inner_text()
    screenshot(page, "leaderboard")

    page.click("#leaderboard >> text=ppo-round-2")
    page.wait_for_url(f"{live_server}/models/{policy_id}")
    evidence = page.locator("#promote #evaluation-evidence")
    assert "Against its parent smol-sft" in evidence.inner_text()
    assert page.locator("#promote #promote-button").is_visible()
    screenshot(page, "model_evidence")

    page.goto(f"{live_server}/models")
    page.select_option("#model-sort", "rating")
    page.click("#model-filters button[type=submit]")
    page.wait_for_url("**/models?*sort=rating*")
    names = page.locator("#model-table tbody tr td:first-child a").all_inner_texts()
    assert names[:3] == ["ppo-round-2", "smol-sft", "ppo-round-1"]
