"""In Chromium: a labeler labels with the keyboard only, each next task swapped in by
htmx without a page reload; model text never runs as script; drag and drop ranks."""

import pytest
from sqlalchemy import select

from app.db.enums import Role
from app.db.models import Annotation, Comparison, Rating, User
from app.db.session import session_scope
from tests.conftest import screenshot, sign_in_page
from tests.factories import make_prompt_set, make_task, make_user

pytestmark = pytest.mark.browser

XSS = "<script>window.__xss=1</script>"
INSTRUCTIONS = """Rate each response **on its own**, then rank them all.

- helpful beats fancy
- flag anything harmful"""


def wait_for_task(page, task_id: int):
    """The task's card is swapped in and label.js has bound it (data-ready): keys pressed
    before that would be lost."""
    page.wait_for_selector(f'#label-task[data-task-id="{task_id}"][data-ready]')


def keys(page, sequence: str):
    for key in sequence.split():
        page.keyboard.press(key)


def letters_of(task) -> dict[str, int]:
    """Letter -> response id, in the task's stored display order."""
    return {"ABCDEFGHI"[item.position]: item.response_id for item in task.items}


def test_labeler_labels_three_tasks_with_the_keyboard_only(live_server, page):
    with session_scope() as s:
        labeler = make_user(s, role=Role.labeler, username="lena")
        prompt_set = make_prompt_set(s, k=3, overlap=1, name="Helpfulness round 1", instructions=INSTRUCTIONS)
        tasks = [
            make_task(s, prompt_set, messages=[
                {"role": "user", "content": "Plan a weekend in Lisbon."},
                {"role": "assistant", "content": "Sure: do you like museums or beaches?"},
                {"role": "user", "content": f"Beaches, and {XSS} cheap food."},
            ], texts=[
                "Day 1: Cascais beach, then **bifanas** at a tasca.\n\n" + "More details. " * 120,
                "Stay home.",
                "Go to Porto instead.",
            ]),
            make_task(s, prompt_set, texts=["A fine answer.", f"Ignore this {XSS} response.", "Another fine answer."]),
            make_task(s, prompt_set, texts=["Short.", "Longer, careful answer.", "Wrong answer."]),
        ]
        letters = [letters_of(t) for t in tasks]
        task_ids = [t.id for t in tasks]
        user_id = labeler.id

    sign_in_page(page, live_server, "lena")
    page.goto(f"{live_server}/label")
    wait_for_task(page, task_ids[0])
    page.evaluate("window.__marker = 'same page'")
    assert "Mode: rank" in page.inner_text("#label-mode")
    screenshot(page, "label_page")

    # Submitting nothing: errors next to the fields, no reload.
    keys(page, "Control+Enter")
    page.wait_for_selector("#label-error")
    assert page.locator(".field-error").count() == 6  # 3 ratings + 3 ranks missing
    assert "rate A from 1" in page.inner_text("#response-A")
    screenshot(page, "label_validation_error")

    # Task 1: rate mode, 6 4 2 for A B C; rank mode, 1 2 3.
    keys(page, "r 6 4 2")
    assert "Mode: rate" in page.inner_text("#label-mode")
    keys(page, "r 1 2 3")
    assert page.input_value(f'input[name="rank-{letters[0]["B"]}"]') == "2"
    keys(page, "Control+Enter")
    wait_for_task(page, task_ids[1])
    assert page.evaluate("window.__marker") == "same page"
    assert f"Saved task {task_ids[0]}." in page.inner_text("#label-notice")
    assert page.inner_text("#count-today") == "1"

    # Task 2 (its response B holds a script): A and B tied best, C worst.
    keys(page, "r 5 5 2 r 1 1 2")
    assert page.locator('.rank-slot[data-rank="1"] .rank-chip').all_inner_texts() == ["A", "B"]
    keys(page, "Control+Enter")
    wait_for_task(page, task_ids[2])
    assert page.evaluate("window.__marker") == "same page"

    # Task 3: pick responses by letter; the ranking contradicts the ratings (soft warning).
    keys(page, "r a 3 b 6 c 1 r")
    keys(page, "c 3 a 1 b 2")
    warning = page.inner_text("#rank-warning")
    assert "B is rated higher than A (6 vs 3) but ranked below it (2 vs 1)." in warning
    screenshot(page, "label_contradiction_warning")
    keys(page, "Control+Enter")
    page.wait_for_selector("#all-done")
    assert "B is rated higher than A" in page.inner_text("#label-notice")
    assert page.inner_text("#count-total") == "3"
    assert page.evaluate("window.__marker") == "same page"
    assert page.evaluate("window.__xss") is None

    with session_scope() as s:
        stored = {a.task_id: a for a in s.scalars(select(Annotation).where(Annotation.user_id == user_id))}
        assert sorted(stored) == sorted(task_ids)

        def ratings(i):
            return {r.response_id: (r.likert, r.rank) for r in s.scalars(
                select(Rating).where(Rating.annotation_id == stored[task_ids[i]].id))}

        def pairs(i):
            return sorted(s.execute(select(Comparison.chosen_response_id, Comparison.rejected_response_id,
                                           Comparison.rank_margin, Comparison.rating_margin)
                                    .where(Comparison.annotation_id == stored[task_ids[i]].id)).all())

        A, B, C = (letters[0][x] for x in "ABC")
        assert ratings(0) == {A: (6, 1), B: (4, 2), C: (2, 3)}
        assert pairs(0) == sorted([(A, B, 1, 2), (A, C, 2, 4), (B, C, 1, 2)])
        A, B, C = (letters[1][x] for x in "ABC")
        assert ratings(1) == {A: (5, 1), B: (5, 1), C: (2, 2)}
        assert pairs(1) == sorted([(A, C, 1, 3), (B, C, 1, 3)])  # the tie gives no pair
        A, B, C = (letters[2][x] for x in "ABC")
        assert ratings(2) == {A: (3, 1), B: (6, 2), C: (1, 3)}
        assert pairs(2) == sorted([(A, B, 1, -3), (A, C, 2, 2), (B, C, 1, 5)])
        assert all(a.time_spent_s > 0 for a in stored.values())

    page.goto(f"{live_server}/label/history")
    assert page.locator("#history tbody tr").count() == 3
    assert page.locator("a.edit-link").count() == 3
    screenshot(page, "label_history")


def test_ranking_by_drag_and_drop_with_a_tie(live_server, page):
    with session_scope() as s:
        make_user(s, role=Role.labeler, username="dora")
        prompt_set = make_prompt_set(s, k=3, overlap=1)
        task = make_task(s, prompt_set)
        letters = letters_of(task)
        task_id = task.id
    sign_in_page(page, live_server, "dora")
    page.goto(f"{live_server}/label")
    page.wait_for_selector("#label-form")
    page.evaluate("window.__marker = 1")
    for letter, value in zip("ABC", (7, 7, 2)):
        page.click(f"#response-{letter} .likert-option:nth-child({value}) span")
    # A and B into slot 1 (a tie), C into slot 3.
    for letter, slot in (("A", 1), ("B", 1), ("C", 3)):
        start = page.locator(f'.rank-chip[data-response-id="{letters[letter]}"]').bounding_box()
        end = page.locator(f'.rank-slot[data-rank="{slot}"] .rank-list').bounding_box()
        page.mouse.move(start["x"] + start["width"] / 2, start["y"] + start["height"] / 2)
        page.mouse.down()
        page.mouse.move(end["x"] + end["width"] - 10, end["y"] + end["height"] / 2, steps=15)
        page.mouse.up()
        # A function, not a string: the page's CSP forbids the eval a string predicate needs.
        page.wait_for_function("([name, slot]) => document.querySelector(`input[name=\"${name}\"]`).value === slot",
                               arg=[f"rank-{letters[letter]}", str(slot)])
    assert page.inner_text("#response-B .rank-value") == "1"
    page.click("#submit-button")
    page.wait_for_selector("#all-done")
    assert page.evaluate("window.__marker") == 1
    with session_scope() as s:
        annotation = s.scalar(select(Annotation).where(Annotation.task_id == task_id))
        assert {r.response_id: r.rank for r in annotation.ratings} == {
            letters["A"]: 1, letters["B"]: 1, letters["C"]: 3}
        assert sorted((c.chosen_response_id, c.rejected_response_id, c.rank_margin)
                      for c in annotation.comparisons) == sorted(
            [(letters["A"], letters["C"], 2), (letters["B"], letters["C"], 2)])
        assert s.get(User, annotation.user_id).username == "dora"
