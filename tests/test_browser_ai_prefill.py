"""In Chromium: on a set with pre-annotation, the labeler finds the AI labeler's ranking
pre-filled with a notice, rates the responses with the keyboard and submits the ranking
unchanged; the annotation records the pre-fill as shown and not changed."""

import pytest
from sqlalchemy import select

from app.db.enums import ModelKind, Role
from app.db.models import Annotation
from app.db.session import session_scope
from app.services import ai_labelers, annotations
from tests.conftest import screenshot, sign_in_page
from tests.factories import make_model, make_prompt_set, make_task, make_user
from tests.test_browser_label import keys, letters_of, wait_for_task

pytestmark = pytest.mark.browser


def test_labeler_confirms_a_pre_filled_ranking(live_server, page):
    with session_scope() as s:
        labeler = make_user(s, role=Role.labeler, username="prefill-pat")
        rm = make_model(s, "models/rm", kind=ModelKind.reward, name="prefill-rm")
        prompt_set = make_prompt_set(s, k=3, overlap=1, name="Pre-annotated")
        s.commit()
        ai = ai_labelers.create_ai_labeler(s, username="prefill-ai", judge_model_id=rm.id)
        # Tasks until one falls in the shown half; the others are full already (not handed out).
        while True:
            task = make_task(s, prompt_set, texts=["Paris.", "Lyon.", "I don't know."], shuffle=False)
            if annotations.prefill_arm(task.id):
                break
            task.num_labels = 1
        ai_labelers.store_ranking(s, ai_user=ai, task_id=task.id, ranks=[1, 3, 2], now=task.created_at)
        s.commit()
        ai_labelers.update_ai_settings(s, prompt_set_id=prompt_set.id, pre_annotator_id=ai.id)
        task_id, letters, user_id = task.id, letters_of(task), labeler.id

    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    sign_in_page(page, live_server, "prefill-pat")
    page.goto(f"{live_server}/label")
    wait_for_task(page, task_id)
    assert "pre-filled" in page.inner_text("#prefill-notice")
    # A first, C second, B last: the AI's ranking, already in the slots.
    assert page.input_value(f'input[name="rank-{letters["A"]}"]') == "1"
    assert page.input_value(f'input[name="rank-{letters["B"]}"]') == "3"
    assert page.input_value(f'input[name="rank-{letters["C"]}"]') == "2"
    assert page.locator('.rank-slot[data-rank="1"] .rank-chip').all_inner_texts() == ["A"]
    screenshot(page, "label_prefill")
    keys(page, "r 6 2 4")  # ratings of A, B, C; the ranking stays as pre-filled
    keys(page, "Control+Enter")
    page.wait_for_selector("#all-done")
    assert errors == []

    with session_scope() as s:
        stored = s.scalar(select(Annotation).where(Annotation.user_id == user_id))
        assert stored.task_id == task_id and stored.prefill_shown is True and stored.prefill_changed is False
