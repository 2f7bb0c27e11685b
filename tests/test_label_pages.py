"""The labeling pages and the labeler JSON API, through the ASGI client."""

import re
from datetime import timedelta

from sqlalchemy import func, select

from app.db.base import utcnow
from app.db.enums import AssignmentStatus, PromptSetStatus, Role
from app.db.models import Annotation, Assignment, Comparison, Rating
from app.services import annotations
from app.services.annotations import RESPONSE_FLAGS
from app.services.assignment import lease_next_task
from tests.conftest import login
from tests.factories import make_prompt_set, make_task, make_user

HX = {"HX-Request": "true"}


def hidden(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no hidden {name}"
    return match.group(1)


def form_for(html: str, task, ratings, ranks, **extra) -> dict:
    ids = [item.response_id for item in task.items]
    data = {"idempotency_key": hidden(html, "idempotency_key"), "started_at": hidden(html, "started_at")}
    data |= {f"rating-{rid}": str(v) for rid, v in zip(ids, ratings) if v is not None}
    data |= {f"rank-{rid}": str(v) for rid, v in zip(ids, ranks) if v is not None}
    return data | extra


def setup(session, *, k=3, tasks=2, **set_kwargs):
    labeler = make_user(session)
    prompt_set = make_prompt_set(session, k=k, **set_kwargs)
    made = [make_task(session, prompt_set) for _ in range(tasks)]
    session.commit()
    return labeler, prompt_set, made


def test_label_page_shows_the_leased_task_in_its_stored_order(client, session):
    labeler, prompt_set, tasks = setup(session, instructions="Prefer **short** answers.")
    texts = [item.response.text for item in tasks[0].items]
    login(client, labeler)
    page = client.get("/label")
    assert page.status_code == 200
    html = page.text
    assert tasks[0].prompt.text in html
    # A, B, C in the stored shuffled order.
    positions = [html.index(text) for text in texts]
    assert positions == sorted(positions)
    assert [m for m in re.findall(r'id="response-([A-I])"', html)] == ["A", "B", "C"]
    assert re.search(r'<details class="instructions"[^>]*>\s*<summary>Instructions</summary>', html)
    assert "Prefer <strong>short</strong> answers." in html
    for _, label in RESPONSE_FLAGS:
        assert label in html
    assert "Not a real request" in html
    assert html.count('type="radio"') == 3 * 7
    assert "/static/node_modules/sortablejs/Sortable.min.js" in html and "/static/js/label.js" in html
    assert len(hidden(html, "idempotency_key")) >= 16
    assert 'id="count-today">0<' in html and 'id="count-total">0<' in html
    assert 'id="keyboard-help"' in html
    # A reload gives the same task, with a fresh form key.
    again = client.get("/label").text
    assert f'data-task-id="{tasks[0].id}"' in again
    assert hidden(again, "idempotency_key") != hidden(html, "idempotency_key")


def test_earlier_turns_of_a_multi_turn_prompt_are_shown(client, client_as, session):
    prompt_set = make_prompt_set(session, k=2)
    make_task(session, prompt_set, messages=[
        {"role": "user", "content": "What is a haiku?"},
        {"role": "assistant", "content": "A short Japanese poem."},
        {"role": "user", "content": "Write one about rain."},
    ])
    session.commit()
    client_as("labeler")
    html = client.get("/label").text
    assert "Earlier turns (2)" in html
    assert html.index("What is a haiku?") < html.index("A short Japanese poem.") < html.index("Write one about rain.")


def test_all_done_when_nothing_is_left(client, client_as, session):
    client_as("labeler")
    html = client.get("/label").text
    assert 'id="all-done"' in html and "All done" in html
    fragment = client.get("/label", headers=HX).text
    assert fragment.lstrip().startswith('<section id="label-task"')
    assert "<html" not in fragment


def test_htmx_submit_stores_and_swaps_in_the_next_task(client, session):
    labeler, _, tasks = setup(session)
    token = login(client, labeler)
    html = client.get("/label").text
    started = float(hidden(html, "started_at"))
    a, b, c = [item.response_id for item in tasks[0].items]
    data = form_for(html, tasks[0], [6, 4, 2], [1, 2, 2], comment="fine",
                    prompt_flags="unclear") | {f"flags-{c}": "hallucination"}
    data["started_at"] = f"{started - 30:.3f}"  # the labeler took 30 seconds
    response = client.post(f"/label/{tasks[0].id}/submit", data=data, headers=HX | {"X-CSRF-Token": token})
    assert response.status_code == 200
    fragment = response.text
    assert fragment.lstrip().startswith('<section id="label-task"') and "<html" not in fragment
    assert f'data-task-id="{tasks[1].id}"' in fragment
    assert f"Saved task {tasks[0].id}." in fragment
    assert 'id="count-today">1<' in fragment and 'id="count-total">1<' in fragment
    annotation = session.scalar(select(Annotation).where(Annotation.user_id == labeler.id))
    assert annotation.comment == "fine" and annotation.prompt_flags == ["unclear"]
    assert 30 <= annotation.time_spent_s < 60
    flags = dict(session.execute(select(Rating.response_id, Rating.flags)
                                 .where(Rating.annotation_id == annotation.id)).all())
    assert flags == {a: [], b: [], c: ["hallucination"]}
    pairs = set(session.execute(select(Comparison.chosen_response_id, Comparison.rejected_response_id)
                                .where(Comparison.annotation_id == annotation.id)).all())
    assert pairs == {(a, b), (a, c)}  # b and c tied


def test_double_submit_of_one_form_stores_one_annotation(client, session):
    labeler, _, tasks = setup(session)
    token = login(client, labeler)
    html = client.get("/label").text
    data = form_for(html, tasks[0], [6, 4, 2], [1, 2, 3])
    first = client.post(f"/label/{tasks[0].id}/submit", data=data, headers=HX | {"X-CSRF-Token": token})
    second = client.post(f"/label/{tasks[0].id}/submit", data=data, headers=HX | {"X-CSRF-Token": token})
    assert first.status_code == second.status_code == 200
    assert f'data-task-id="{tasks[1].id}"' in second.text
    assert "was already saved" in second.text
    assert session.scalar(select(func.count(Annotation.id))) == 1


def test_invalid_submit_returns_422_with_errors_and_the_input_kept(client, session):
    labeler, _, tasks = setup(session)
    token = login(client, labeler)
    html = client.get("/label").text
    a, b, c = [item.response_id for item in tasks[0].items]
    key = hidden(html, "idempotency_key")
    # B has no rating, C no rank; what was entered must come back.
    data = form_for(html, tasks[0], [5, None, 3], [2, 1, None], comment="half <b>done</b>",
                    prompt_flags="harmful") | {f"flags-{a}": "moral_judgment"}
    response = client.post(f"/label/{tasks[0].id}/submit", data=data, headers=HX | {"X-CSRF-Token": token})
    assert response.status_code == 422
    out = response.text
    assert out.lstrip().startswith('<section id="label-task"')
    assert f'id="error-rating-{b}"' in out and "rate B from 1" in out
    assert f'id="error-rank-{c}"' in out and "put C in a rank slot" in out
    assert re.search(rf'name="rating-{a}" value="5"[^>]*\n?\s*checked', out)
    assert re.search(rf'name="rating-{c}" value="3"[^>]*\n?\s*checked', out)
    assert not re.search(rf'name="rating-{b}" value="\d"[^>]*\n?\s*checked', out)
    assert f'name="rank-{a}" value="2"' in out and f'name="rank-{b}" value="1"' in out
    assert re.search(rf'name="flags-{a}" value="moral_judgment"\s*checked', out)
    assert re.search(r'name="prompt_flags" value="harmful"\s*checked', out)
    assert "half &lt;b&gt;done&lt;/b&gt;</textarea>" in out
    assert hidden(out, "idempotency_key") == key
    assert session.scalar(select(func.count(Annotation.id))) == 0
    # Without htmx: the whole page, also 422.
    page = client.post(f"/label/{tasks[0].id}/submit", data=data | {"csrf_token": token})
    assert page.status_code == 422 and "<html" in page.text


def test_submit_without_htmx_redirects_back_to_label(client, session):
    labeler, _, tasks = setup(session)
    token = login(client, labeler)
    html = client.get("/label").text
    data = form_for(html, tasks[0], [7, 5, 1], [1, 2, 3], csrf_token=token)
    response = client.post(f"/label/{tasks[0].id}/submit", data=data)
    assert response.status_code == 303 and response.headers["location"] == "/label"
    assert f"Saved task {tasks[0].id}." in client.get("/label").text


def test_submit_after_the_lease_ran_out_is_refused(client, session):
    labeler, _, tasks = setup(session, tasks=1)
    token = login(client, labeler)
    html = client.get("/label").text
    assignment = session.scalar(select(Assignment).where(Assignment.user_id == labeler.id))
    assignment.expires_at -= timedelta(hours=1)
    session.commit()
    data = form_for(html, tasks[0], [7, 5, 1], [1, 2, 3])
    response = client.post(f"/label/{tasks[0].id}/submit", data=data, headers=HX | {"X-CSRF-Token": token})
    assert response.status_code == 409
    assert "ran out" in response.text


def test_skip_needs_a_reason_then_gives_the_next_task(client, session):
    labeler, _, tasks = setup(session)
    token = login(client, labeler)
    html = client.get("/label").text
    a = tasks[0].items[0].response_id
    data = form_for(html, tasks[0], [4, None, None], [None, None, None])
    refused = client.post(f"/label/{tasks[0].id}/skip", data=data, headers=HX | {"X-CSRF-Token": token})
    assert refused.status_code == 422 and "choose or write a reason" in refused.text
    assert re.search(rf'name="rating-{a}" value="4"[^>]*\n?\s*checked', refused.text)
    data |= {"skip_reason": "Other", "skip_reason_other": "I do not read French"}
    response = client.post(f"/label/{tasks[0].id}/skip", data=data, headers=HX | {"X-CSRF-Token": token})
    assert response.status_code == 200
    assert f'data-task-id="{tasks[1].id}"' in response.text and f"Skipped task {tasks[0].id}." in response.text
    row = session.scalar(select(Assignment).where(Assignment.task_id == tasks[0].id))
    assert (row.status, row.skip_reason) == (AssignmentStatus.skipped, "I do not read French")


def test_history_lists_submissions_and_edit_replaces_comparisons(client, session):
    labeler, _, tasks = setup(session, k=2)
    token = login(client, labeler)
    html = client.get("/label").text
    a, b = [item.response_id for item in tasks[0].items]
    client.post(f"/label/{tasks[0].id}/submit", data=form_for(html, tasks[0], [6, 2], [1, 2]),
                headers=HX | {"X-CSRF-Token": token})
    annotation = session.scalar(select(Annotation))
    history = client.get("/label/history")
    assert history.status_code == 200
    assert tasks[0].prompt.text in history.text
    assert f'href="/label/annotations/{annotation.id}/edit"' in history.text
    edit_page = client.get(f"/label/annotations/{annotation.id}/edit")
    assert edit_page.status_code == 200
    page = edit_page.text
    assert re.search(rf'name="rating-{a}" value="6"[^>]*\n?\s*checked', page)
    assert f'name="rank-{b}" value="2"' in page
    assert f'action="/label/annotations/{annotation.id}"' in page
    # Invalid edit: 422 with the input kept; then a valid one swaps the ranking.
    bad = client.post(f"/label/annotations/{annotation.id}", headers=HX | {"X-CSRF-Token": token},
                      data={f"rating-{a}": "9", f"rating-{b}": "3", f"rank-{a}": "2", f"rank-{b}": "1"})
    assert bad.status_code == 422 and "must be a whole number from 1 to 7" in bad.text
    ok = client.post(f"/label/annotations/{annotation.id}", headers=HX | {"X-CSRF-Token": token},
                     data={f"rating-{a}": "2", f"rating-{b}": "5", f"rank-{a}": "2", f"rank-{b}": "1"})
    assert ok.status_code == 200 and ok.headers["HX-Redirect"] == "/label/history"
    assert session.execute(select(Comparison.chosen_response_id, Comparison.rejected_response_id,
                                  Comparison.rating_margin)).all() == [(b, a, 3)]
    # Past the window: no edit link, and the edit page refuses.
    annotation.created_at -= timedelta(hours=25)
    session.commit()
    assert f'/label/annotations/{annotation.id}/edit"' not in client.get("/label/history").text
    assert client.get(f"/label/annotations/{annotation.id}/edit").status_code == 409


def test_another_labelers_annotation_cannot_be_edited(client, client_as, session):
    owner, _, tasks = setup(session, k=2)
    lease_next_task(session, user=owner, now=utcnow(), lease_s=1800)
    a, b = [item.response_id for item in tasks[0].items]
    stored = annotations.submit_annotation(session, user=owner, task_id=tasks[0].id, ratings={a: 5, b: 4},
                                           ranks={a: 1, b: 2}, idempotency_key="owner-key-123", now=utcnow())
    token = client_as("labeler").headers["X-CSRF-Token"]
    assert client.get(f"/label/annotations/{stored.annotation.id}/edit").status_code == 404
    response = client.post(f"/label/annotations/{stored.annotation.id}", headers={"X-CSRF-Token": token},
                           data={f"rating-{a}": "1", f"rating-{b}": "1", f"rank-{a}": "1", f"rank-{b}": "1"})
    assert response.status_code == 404


def test_model_text_is_escaped(client, client_as, session):
    prompt_set = make_prompt_set(session, k=2, instructions="<img src=x onerror=alert(1)>")
    make_task(session, prompt_set, texts=["<script>window.__xss=1</script>", "**bold** <b>raw</b>"],
              messages=[{"role": "user", "content": "<script>alert(2)</script>"}])
    session.commit()
    client_as("labeler")
    html = client.get("/label").text
    assert "<script>window.__xss" not in html and "<script>alert(2)" not in html and "<img src=x" not in html
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in html
    assert "<strong>bold</strong> &lt;b&gt;raw&lt;/b&gt;" in html


def test_admins_may_label_engineers_may_not(client, client_as, session):
    setup(session, tasks=1)
    engineer = make_user(session, role=Role.engineer)
    login(client, engineer)
    assert client.get("/label").status_code == 403
    client.cookies.clear()
    client_as("admin")
    assert 'id="label-form"' in client.get("/label").text


# ---- JSON API ----

def test_api_next_and_submit(client, session):
    labeler, prompt_set, tasks = setup(session, k=3, tasks=1)
    token = login(client, labeler)
    headers = {"X-CSRF-Token": token}
    body = client.get("/api/v1/label/next").json()
    task = body["task"]
    assert task["id"] == tasks[0].id and task["prompt_set_name"] == prompt_set.name
    assert [r["label"] for r in task["responses"]] == ["A", "B", "C"]
    assert [r["id"] for r in task["responses"]] == [item.response_id for item in tasks[0].items]
    assert {f["key"] for f in body["response_flags"]} >= {"hallucination", "harmful_advice"}
    assert client.get("/api/v1/label/next").json()["task"]["id"] == tasks[0].id  # same lease
    ids = [r["id"] for r in task["responses"]]
    bad = client.post(f"/api/v1/label/{tasks[0].id}", headers=headers, json={
        "idempotency_key": "api-key-000001", "ratings": {str(ids[0]): 9}, "ranks": {}})
    assert bad.status_code == 422
    problem = bad.json()
    assert problem["errors"][f"rating-{ids[0]}"].startswith("the rating of A")
    assert f"rank-{ids[2]}" in problem["errors"]
    payload = {"idempotency_key": "api-key-000001", "ratings": {str(i): v for i, v in zip(ids, [7, 3, 5])},
               "ranks": {str(i): v for i, v in zip(ids, [1, 3, 2])}, "time_spent_s": 12.5,
               "flags": {str(ids[1]): ["hallucination"]}}
    created = client.post(f"/api/v1/label/{tasks[0].id}", headers=headers, json=payload)
    assert created.status_code == 201, created.text
    assert created.json() | {"annotation_id": 0} == {
        "annotation_id": 0, "task_id": tasks[0].id, "created": True, "comparisons": 3, "warnings": []}
    retried = client.post(f"/api/v1/label/{tasks[0].id}", headers=headers, json=payload)
    assert retried.status_code == 200 and retried.json()["annotation_id"] == created.json()["annotation_id"]
    assert client.get("/api/v1/label/next").json() | {"response_flags": [], "prompt_flags": []} == {
        "task": None, "today": 1, "total": 1, "response_flags": [], "prompt_flags": []}


# ---- access: a labeler reads only the tasks they hold ----

def _secret_task(session):
    """A task leased by its owner, every piece of it marked secret."""
    owner = make_user(session)
    prompt_set = make_prompt_set(session, k=2, name="secret-set-name", instructions="SECRET-INSTRUCTIONS")
    task = make_task(session, prompt_set, texts=["SECRET-RESPONSE-ONE", "SECRET-RESPONSE-TWO"],
                     messages=[{"role": "user", "content": "SECRET-PROMPT"}])
    lease_next_task(session, user=owner, now=utcnow(), lease_s=1800)
    return owner, task


SECRETS = ("SECRET-PROMPT", "SECRET-RESPONSE", "SECRET-INSTRUCTIONS", "secret-set-name")


def test_an_invalid_submit_or_skip_never_shows_a_task_the_labeler_does_not_hold(client, client_as, session):
    _, task = _secret_task(session)
    token = client_as("labeler").headers["X-CSRF-Token"]
    a, b = [item.response_id for item in task.items]
    attempts = {
        "submit without a form key": (f"/label/{task.id}/submit", {f"rating-{a}": "5", f"rank-{a}": "1"}),
        "skip without a reason": (f"/label/{task.id}/skip", {"skip_reason": ""}),
    }
    for what, (url, data) in attempts.items():
        for headers in (HX, {}):
            response = client.post(url, data=data, headers=headers | {"X-CSRF-Token": token})
            assert response.status_code == 404, (what, response.status_code)
            assert not [s for s in SECRETS if s in response.text], what
    assert session.scalar(select(func.count(Annotation.id))) == 0


def test_a_late_submit_from_a_replica_with_a_slow_clock_is_refused(app, client, session, monkeypatch):
    """Overlap 1: a's lease ran out by the database's clock and b took the task. a's web
    replica runs five minutes slow, so by its own clock the lease is still good."""
    from datetime import UTC, datetime

    from fastapi.testclient import TestClient

    a, _, tasks = setup(session, tasks=1)
    b = make_user(session)
    token = login(client, a)
    html = client.get("/label").text
    row = session.scalar(select(Assignment).where(Assignment.user_id == a.id))
    row.expires_at = session.scalar(select(func.clock_timestamp())) - timedelta(seconds=1)
    session.commit()
    with TestClient(app, follow_redirects=False) as other:
        b_token = login(other, b)
        b_html = other.get("/label").text
        assert f'data-task-id="{tasks[0].id}"' in b_html
        monkeypatch.setattr("app.routes.label.utcnow", lambda: datetime.now(UTC) - timedelta(minutes=5))
        late = client.post(f"/label/{tasks[0].id}/submit", data=form_for(html, tasks[0], [7, 5, 1], [1, 2, 3]),
                           headers=HX | {"X-CSRF-Token": token})
        assert late.status_code == 409 and "ran out" in late.text
        assert session.scalar(select(func.count(Annotation.id))) == 0
        stored = other.post(f"/label/{tasks[0].id}/submit", data=form_for(b_html, tasks[0], [1, 5, 7], [3, 2, 1]),
                            headers=HX | {"X-CSRF-Token": b_token})
        assert stored.status_code == 200 and f"Saved task {tasks[0].id}." in stored.text
    assert session.scalar(select(Annotation.user_id)) == b.id
    assert session.scalar(select(func.count(Annotation.id))) == 1


def test_a_submit_to_a_paused_set_is_refused_and_shows_none_of_it(client, session):
    owner, task = _secret_task(session)
    token = login(client, owner)
    html = client.get("/label").text
    assert "SECRET-PROMPT" in html
    task.prompt_set.status = PromptSetStatus.paused
    session.commit()
    a, b = [item.response_id for item in task.items]
    for data in (form_for(html, task, [5, 4], [1, 2]), {f"rating-{a}": "9"}):
        response = client.post(f"/label/{task.id}/submit", data=data, headers=HX | {"X-CSRF-Token": token})
        assert response.status_code == 403, response.text
        assert "paused" in response.text
        assert not [s for s in SECRETS if s in response.text]
    assert session.scalar(select(func.count(Annotation.id))) == 0
