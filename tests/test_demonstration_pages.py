"""The writing page, the review queue and the SFT form, through the ASGI client."""

import json
import re

from sqlalchemy import func, select

from app.db.base import utcnow
from app.db.enums import DemonstrationStatus, JobKind, JobStatus, ModelKind, Role, Split
from app.db.models import Demonstration, Job, Model, Response
from app.services import demonstrations as demos
from tests.conftest import login
from tests.factories import LEASE_S, add_prompt, demo_set, lease_demo, make_user, submit_demo

HX = {"HX-Request": "true"}


def hidden(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no hidden {name}"
    return match.group(1)


def relogin(client, user) -> None:
    client.post("/logout")
    del client.headers["X-CSRF-Token"]  # the new session has a new token
    client.headers["X-CSRF-Token"] = login(client, user)


def demo_id(html: str) -> int:
    return int(re.search(r'data-demonstration-id="(\d+)"', html).group(1))


def test_writing_page_shows_the_prompt_instructions_and_an_autosaving_editor(client, client_as, session):
    s = demo_set(session)
    add_prompt(session, s, "Explain **tides**.", messages=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Explain **tides**."}])
    client_as("labeler")
    html = client.get("/demonstrate").text
    assert "Explain <strong>tides</strong>." in html and "Answer <strong>kindly</strong>." in html
    assert "Earlier turns (2)" in html
    assert 'hx-trigger="keyup changed delay:2s, every 10s"' in html
    assert "/static/js/demonstrate.js" in html and "Not a real request" in html
    assert "Start from the model" not in html  # no model answer for this prompt


def test_draft_survives_a_reload_and_the_preview_escapes_html(client, client_as, session):
    s = demo_set(session)
    add_prompt(session, s, "Write a poem.")
    client_as("labeler")
    html = client.get("/demonstrate").text
    did = demo_id(html)
    saved = client.post(f"/demonstrate/{did}/draft", headers=HX, data={
        "text": "Roses <b>are</b> red", "started_at": hidden(html, "started_at"), "time_base": "0",
        "prompt_flags": ["unclear"]})
    assert saved.status_code == 200 and "Draft saved at" in saved.text
    again = client.get("/demonstrate").text
    assert demo_id(again) == did
    assert "Roses &lt;b&gt;are&lt;/b&gt; red</textarea>" in again
    assert re.search(r'value="unclear"\s+checked', again)
    preview = client.post("/demonstrate/preview", headers=HX, data={"text": "<script>alert(1)</script> **bold**"})
    assert "<script>" not in preview.text and "&lt;script&gt;" in preview.text and "<strong>bold</strong>" in preview.text


def test_submit_swaps_in_the_next_prompt_and_a_second_submit_stores_nothing(client, client_as, session):
    s = demo_set(session)
    add_prompt(session, s, "First prompt")
    add_prompt(session, s, "Second prompt")
    client_as("labeler")
    html = client.get("/demonstrate").text
    did = demo_id(html)
    empty = client.post(f"/demonstrate/{did}/submit", headers=HX, data={"text": "  "})
    assert empty.status_code == 422 and "write your response" in empty.text
    form = {"text": "My answer.", "started_at": hidden(html, "started_at"), "time_base": "0"}
    nxt = client.post(f"/demonstrate/{did}/submit", headers=HX, data=form)
    assert nxt.status_code == 200 and "Submitted." in nxt.text and "Second prompt" in nxt.text
    again = client.post(f"/demonstrate/{did}/submit", headers=HX, data=form | {"text": "changed"})
    assert "already submitted" in again.text
    assert session.scalar(select(func.count(Demonstration.id))) == 2  # the submitted one and the new lease
    assert session.get(Demonstration, did).text == "My answer."
    # Without htmx: a redirect back to the page.
    plain = client.post(f"/demonstrate/{demo_id(nxt.text)}/submit", data={"text": "Second answer."})
    assert plain.status_code == 303 and plain.headers["location"] == "/demonstrate"
    assert "All done" in client.get("/demonstrate").text


def test_skip_needs_a_reason(client, client_as, session):
    s = demo_set(session)
    add_prompt(session, s, "Unclear prompt")
    client_as("labeler")
    did = demo_id(client.get("/demonstrate").text)
    refused = client.post(f"/demonstrate/{did}/skip", headers=HX, data={"skip_reason": ""})
    assert refused.status_code == 422 and "choose or write a reason" in refused.text
    done = client.post(f"/demonstrate/{did}/skip", headers=HX, data={"skip_reason": "The prompt is unclear"})
    assert done.status_code == 200 and "All done" in done.text
    assert session.get(Demonstration, did).status == DemonstrationStatus.skipped


def test_start_from_the_model_answer_records_edit_mode(client, client_as, session):
    s = demo_set(session)
    prompt = add_prompt(session, s, "Summarise the news.")
    session.add(Response(prompt_id=prompt.id, sample_index=0, text="The model's *summary*."))
    session.flush()
    client_as("labeler")
    html = client.get("/demonstrate").text
    assert "Start from the model" in html
    edited = client.post(f"/demonstrate/{demo_id(html)}/from-model", headers=HX)
    assert "The model&#39;s *summary*.</textarea>" in edited.text and "started from the model" in edited.text
    assert session.get(Demonstration, demo_id(html)).edit_mode


def test_admin_reviews_from_the_queue(client, session):
    s = demo_set(session)
    admin, alice = make_user(session, role=Role.admin), make_user(session)
    add_prompt(session, s, "P1")
    d1 = lease_demo(session, alice)
    submit_demo(session, alice, d1, text="Answer **one**")
    add_prompt(session, s, "P2")
    d2 = lease_demo(session, alice)
    submit_demo(session, alice, d2, text="Answer two")
    add_prompt(session, s, "P3")
    d3 = lease_demo(session, alice)
    submit_demo(session, alice, d3, text="Answr three")
    client.headers["X-CSRF-Token"] = login(client, admin)
    page = client.get("/admin/demonstrations").text
    assert "3 waiting" in page and "Answer <strong>one</strong>" in page and alice.username in page

    accepted = client.post(f"/admin/demonstrations/{d1.id}/accept", headers=HX)
    assert 'data-status="accepted"' in accepted.text and f"by {admin.username}" in accepted.text
    no_reason = client.post(f"/admin/demonstrations/{d2.id}/reject", headers=HX, data={"reason": ""})
    assert no_reason.status_code == 422 and 'data-status="submitted"' in no_reason.text
    rejected = client.post(f"/admin/demonstrations/{d2.id}/reject", headers=HX, data={"reason": "Too short"})
    assert 'data-status="rejected"' in rejected.text and "Too short" in rejected.text
    edited = client.post(f"/admin/demonstrations/{d3.id}/edit", headers=HX, data={"text": "Answer three"})
    assert 'data-status="accepted"' in edited.text
    page = client.get("/admin/demonstrations").text
    assert "0 waiting" in page and "67%" in page  # alice: 2 accepted of 3 reviewed

    # The labeler reads why one was rejected on the writing page.
    relogin(client, alice)
    writing = client.get("/demonstrate").text
    assert "Recently rejected (1)" in writing and "Too short" in writing
    relogin(client, admin)
    export = client.get(f"/admin/demonstrations/export?prompt_set_id={s.id}&format=messages")
    rows = [json.loads(line) for line in export.text.splitlines()]
    assert [r["messages"][-1]["content"] for r in rows] == ["Answer **one**", "Answer three"]
    assert "attachment" in export.headers["content-disposition"]


def test_import_errors_come_back_with_line_numbers_and_store_nothing(client, client_as, session):
    s = demo_set(session)
    client_as("admin")
    bad = '{"prompt": "ok", "response": "fine"}\n{"prompt": "no answer"}\n'
    response = client.post("/admin/demonstrations/import", headers=HX,
                           data={"prompt_set_id": str(s.id), "content": bad, "status": "accepted"})
    assert response.status_code == 422 and "line 2: missing &#39;response&#39;" in response.text
    assert 'id="demo-import"' in response.text and "no answer" in response.text  # the pasted text is kept
    assert session.scalar(select(func.count(Demonstration.id))) == 0
    good = client.post("/admin/demonstrations/import",
                       data={"prompt_set_id": str(s.id), "content": bad.splitlines()[0], "status": "accepted"})
    assert good.status_code == 303
    assert len(demos.accepted_demonstrations(session, prompt_set_ids=[s.id])) == 1


def test_engineer_starts_an_sft_job_from_the_form(client, session, tiny_model_dir):
    s = demo_set(session)
    admin = make_user(session, role=Role.admin)
    base = Model(name="tiny-base", kind=ModelKind.sft, path=str(tiny_model_dir), source="test")
    session.add(base)
    session.flush()
    engineer = make_user(session, role=Role.engineer)
    client.headers["X-CSRF-Token"] = login(client, engineer)
    page = client.get("/sft").text
    assert "tiny-base" in page and s.name in page and "(0 accepted)" in page
    form = {"base_model_id": str(base.id), "prompt_set_ids": [str(s.id)], "epochs": "2", "learning_rate": "1e-3",
            "lr_schedule": "cosine", "warmup_ratio": "0", "batch_size": "4", "gradient_accumulation_steps": "1",
            "max_length": "128", "lora_r": "0", "lora_alpha": "16", "seed": "3", "packing": "1"}
    refused = client.post("/sft", headers=HX, data=form | {"epochs": "0"})
    assert refused.status_code == 422
    assert "must be 1..100" in refused.text and "at least 2 are needed" in refused.text
    for i, split in enumerate([Split.train, Split.validation]):
        add_prompt(session, s, f"Q{i}", split=split)
    demos.import_demonstrations(session, prompt_set=s, user=admin, now=utcnow(),
                                data='{"prompt": "Q0", "response": "A0"}\n{"prompt": "Q1", "response": "A1"}')
    started = client.post("/sft", data=form)
    assert started.status_code == 303
    job = session.scalar(select(Job).where(Job.kind == JobKind.train_sft))
    assert started.headers["location"] == f"/jobs/{job.id}" and job.status == JobStatus.queued
    assert job.params["base_model_id"] == base.id and job.params["prompt_set_ids"] == [s.id]
    assert job.params["config"]["epochs"] == 2 and job.params["config"]["seed"] == 3
    assert job.params["config"]["packing"] is True and job.params["config"]["learning_rate"] == 1e-3
    assert job.queue == "gpu"


def test_a_refused_skip_or_submit_never_shows_another_labelers_prompt(client, client_as, session):
    s = demo_set(session, name="secret-demo-set")
    add_prompt(session, s, "SECRET-DEMO-PROMPT")
    owner = make_user(session)
    demo = lease_demo(session, owner)
    demos.save_draft(session, user=owner, demonstration_id=demo.id, text="SECRET-DRAFT", now=utcnow(), lease_s=LEASE_S)
    client_as("labeler")
    attempts = {
        "skip without a reason": ("skip", {"skip_reason": ""}),
        "submit without text": ("submit", {"text": ""}),
        "skip": ("skip", {"skip_reason": "The prompt is unclear"}),
    }
    for what, (action, data) in attempts.items():
        for headers in (HX, {}):
            response = client.post(f"/demonstrate/{demo.id}/{action}", headers=headers, data=data)
            assert response.status_code in (403, 404), (what, response.status_code)
            assert not [x for x in ("SECRET-DEMO-PROMPT", "SECRET-DRAFT", "secret-demo-set", "kindly")
                        if x in response.text], what
    assert session.get(Demonstration, demo.id).status == DemonstrationStatus.draft


def test_a_late_submit_from_a_replica_with_a_slow_clock_is_refused(app, client, session, monkeypatch):
    """Overlap 1: a's draft ran out by the database's clock and b holds the prompt. a's web
    replica runs five minutes slow, so by its own clock the lease is still good."""
    from datetime import UTC, datetime, timedelta

    from fastapi.testclient import TestClient

    s = demo_set(session, overlap=1)
    add_prompt(session, s, "Only prompt")
    a, b = make_user(session), make_user(session)
    client.headers["X-CSRF-Token"] = login(client, a)
    did = demo_id(client.get("/demonstrate").text)
    draft = session.get(Demonstration, did)
    draft.expires_at = session.scalar(select(func.clock_timestamp())) - timedelta(seconds=1)
    session.commit()
    with TestClient(app, follow_redirects=False) as other:
        other.headers["X-CSRF-Token"] = login(other, b)
        assert "Only prompt" in other.get("/demonstrate").text
        monkeypatch.setattr("app.routes.demonstrations.utcnow", lambda: datetime.now(UTC) - timedelta(minutes=5))
        late = client.post(f"/demonstrate/{did}/submit", headers=HX, data={"text": "Late answer."})
        assert late.status_code == 409 and "ran out" in late.text
    assert session.get(Demonstration, did).status == DemonstrationStatus.draft
    assert session.scalar(select(func.count(Demonstration.id)).where(
        Demonstration.status == DemonstrationStatus.submitted)) == 0
