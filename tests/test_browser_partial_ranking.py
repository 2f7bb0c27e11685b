"""In Chromium, keyboard only: a labeler ranks only the top 2 of 4 responses on a set
with partial rankings, then marks every response of the next task unacceptable ("All
bad", key X) with a reason. Screenshots under test-artifacts/screenshots."""

import pytest
from sqlalchemy import select

from app.db.enums import Role
from app.db.models import Annotation, Comparison, Rating
from app.db.session import session_scope
from tests.conftest import screenshot, sign_in_page
from tests.factories import make_prompt_set, make_task, make_user
from tests.test_browser_label import keys, letters_of, wait_for_task

pytestmark = pytest.mark.browser


def test_labeler_ranks_the_top_k_and_marks_all_bad_with_the_keyboard_only(live_server, page):
    with session_scope() as s:
        labeler = make_user(s, role=Role.labeler, username="topaz")
        prompt_set = make_prompt_set(s, k=4, top_k=2, overlap=1, name="Top two of four")
        tasks = [
            make_task(s, prompt_set, texts=["Paris.", "Paris, on the Seine.", "Lyon.", "I don't know."]),
            make_task(s, prompt_set, texts=["Buy lottery tickets.", "Rob a bank.", "Borrow from a loan shark.",
                                            "Sell your kidney."]),
        ]
        letters = [letters_of(t) for t in tasks]
        task_ids = [t.id for t in tasks]
        user_id = labeler.id

    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    sign_in_page(page, live_server, "topaz")
    page.goto(f"{live_server}/label")
    wait_for_task(page, task_ids[0])
    page.evaluate("window.__marker = 'same page'")
    help_text = page.inner_text("#keyboard-help")
    assert "rank only the best 2" in help_text and "marks all responses unacceptable" in help_text
    assert page.locator(".rank-slot:not(.rank-pool)").count() == 2
    assert "tied last" in page.inner_text(".rank-pool .slot-label")
    assert not page.is_visible("#all-bad-reason")  # asked for only once "all bad" is chosen

    # Task 1: rate A..D, then rank A first; 3 is no slot here, so C stays unranked.
    keys(page, "r 6 7 3 1 r a 1 c 3")
    assert page.input_value(f'input[name="rank-{letters[0]["C"]}"]') == ""
    keys(page, "Control+Enter")  # one ranked of two: refused, next to the board
    page.wait_for_selector("#error-ranks")
    assert "rank exactly 2 responses" in page.inner_text("#error-ranks")
    wait_for_task(page, task_ids[0])
    assert not page.is_visible("#all-bad-reason")
    screenshot(page, "label_top_k_refused")
    keys(page, "b 2")  # A best, B second; C and D unranked, tied last
    assert page.locator('.rank-pool .rank-chip').all_inner_texts() == ["C", "D"]
    screenshot(page, "label_top_k")
    keys(page, "Control+Enter")
    wait_for_task(page, task_ids[1])
    assert f"Saved task {task_ids[0]}." in page.inner_text("#label-notice")

    # Task 2: a rank first, then X: the ranking is cleared and the cursor is in the reason.
    keys(page, "a 1 x")
    assert page.is_checked("#all-bad-check")
    assert page.input_value(f'input[name="rank-{letters[1]["A"]}"]') == ""
    assert page.evaluate("document.activeElement.id") == "all-bad-reason"
    keys(page, "Control+Enter")  # no reason: refused; htmx puts the cursor back in the reason (same id)
    page.wait_for_selector("#error-all_bad_reason")
    wait_for_task(page, task_ids[1])
    assert page.evaluate("document.activeElement.id") == "all-bad-reason"
    page.keyboard.type("Every answer is harmful or illegal advice.")
    screenshot(page, "label_all_bad")
    keys(page, "Control+Enter")
    page.wait_for_selector("#all-done")
    assert page.inner_text("#count-total") == "2"
    assert page.evaluate("window.__marker") == "same page"
    assert errors == []

    with session_scope() as s:
        stored = {a.task_id: a for a in s.scalars(select(Annotation).where(Annotation.user_id == user_id))}
        top, bad = stored[task_ids[0]], stored[task_ids[1]]
        A, B, C, D = (letters[0][x] for x in "ABCD")
        assert top.top_k == 2 and not top.all_bad
        assert dict(s.execute(select(Rating.response_id, Rating.rank).where(Rating.annotation_id == top.id)).all()) \
            == {A: 1, B: 2, C: 3, D: 3}
        assert sorted(s.execute(select(Comparison.chosen_response_id, Comparison.rejected_response_id)
                                .where(Comparison.annotation_id == top.id)).all()) == sorted(
            [(A, B), (A, C), (A, D), (B, C), (B, D)])
        assert bad.all_bad and bad.all_bad_reason == "Every answer is harmful or illegal advice."
        assert s.scalar(select(Comparison.id).where(Comparison.annotation_id == bad.id)) is None

    page.goto(f"{live_server}/label/history")
    assert page.locator("#history .badge.all-bad").count() == 1
    screenshot(page, "label_history_all_bad")
