"""In Chromium: an admin opens the review queue of a set where two labelers disagree,
reviews the most disagreed task side by side, writes a corrected ranking, and sees
the correction counted in the queue and on the quality page."""

import pytest

from app.db.enums import Role
from app.db.session import session_scope
from tests.conftest import screenshot, sign_in_page
from tests.factories import annotate, make_prompt_set, make_user, task_with_ids

pytestmark = pytest.mark.browser


def test_admin_corrects_a_disagreed_task_and_sees_it_counted(live_server, page):
    with session_scope() as s:
        admin = make_user(s, role=Role.admin, username="chief")
        ann, bob = make_user(s, username="ann"), make_user(s, username="bob")
        ps = make_prompt_set(s, k=3, overlap=2, name="Helpfulness round 2")
        agreed, agreed_ids = task_with_ids(s, ps)
        annotate(s, agreed, agreed_ids, ann, [1, 2, 3])
        annotate(s, agreed, agreed_ids, bob, [1, 2, 3])
        split, split_ids = task_with_ids(s, ps)
        annotate(s, split, split_ids, ann, [1, 2, 3], flags=["unsafe"])
        annotate(s, split, split_ids, bob, [3, 2, 1])
        set_id, split_id, agreed_id = ps.id, split.id, agreed.id
        # Display letters of the split task's responses, in sample order.
        letters = {item.response_id: "ABC"[item.position] for item in split.items}
        best_letter = letters[split_ids[1]]

    sign_in_page(page, live_server, "chief")
    page.goto(f"{live_server}/admin/prompt-sets/{set_id}/quality")
    assert "Reviewed tasks: 0" in page.inner_text("#quality-reviews")
    page.click("text=Review tasks")
    page.wait_for_url(f"{live_server}/admin/prompt-sets/{set_id}/review")
    # Most disagreed first.
    rows = page.locator("#review-queue tbody tr")
    assert rows.nth(0).get_attribute("data-task") == str(split_id)
    assert rows.nth(1).get_attribute("data-task") == str(agreed_id)
    assert "100%" in rows.nth(0).inner_text()

    rows.nth(0).locator("a").click()
    page.wait_for_url(f"{live_server}/admin/prompt-sets/{set_id}/review/{split_id}")
    table = page.inner_text("#side-by-side")
    assert "ann" in table and "bob" in table and "unsafe" in table and "Consensus" in table
    # Both labelers' ranks of the first response, side by side: 1 (ann) and 3 (bob).
    first = page.locator(f"#side-by-side tr[data-response='{split_ids[0]}']").inner_text()
    assert "rank 1" in first and "rank 3" in first

    # The correction: the second response best, then the third, then the first; for training.
    page.fill(f"input[name=rank_{split_ids[0]}]", "3")
    page.fill(f"input[name=rank_{split_ids[1]}]", "1")
    page.fill(f"input[name=rank_{split_ids[2]}]", "2")
    page.check("input[name=use][value=training]")
    page.fill("#correct input[name=note]", "the second answer is the only correct one")
    screenshot(page, "review_task")
    page.click("#correct button[type=submit]")
    # On to the next open task.
    page.wait_for_url(f"{live_server}/admin/prompt-sets/{set_id}/review/{agreed_id}")
    assert f"Task #{split_id} corrected" in page.inner_text("#flashes")

    page.goto(f"{live_server}/admin/prompt-sets/{set_id}/review/{split_id}")
    history = page.inner_text("#review-history")
    assert "corrected for training" in history and "chief" in history and best_letter + " > " in history
    page.goto(f"{live_server}/admin/prompt-sets/{set_id}/review?show=reviewed")
    row = page.locator(f"#review-queue tr[data-task='{split_id}']")
    assert "corrected (training)" in row.inner_text()
    assert "Reviewed tasks: 1" in page.inner_text("#review-counts")
    page.goto(f"{live_server}/admin/prompt-sets/{set_id}/quality")
    counted = page.inner_text("#quality-reviews")
    assert "Reviewed tasks: 1" in counted and "1 corrected for training" in counted
    assert page.locator("#trust tr[data-username=ann]").count() == 1
    screenshot(page, "review_counted")
