"""The JSON API of demonstrations: a labeler leases, drafts, submits (idempotently)
and skips; an admin reviews, imports and exports."""

import json

from sqlalchemy import func, select

from app.db.enums import Role
from app.db.models import Demonstration
from app.services import auth
from tests.conftest import login, make_user
from tests.test_demonstrations import add_prompt, demo_set


def as_labeler(client, session, username: str) -> dict[str, str]:
    """Labelers use the API with their signed-in session (and its CSRF token)."""
    token = login(client, make_user(session, username=username))
    return {"X-CSRF-Token": token}


def admin_headers(session) -> dict[str, str]:
    admin = make_user(session, role=Role.admin, username="ada")
    _, raw = auth.create_api_token(session, user=admin, name="tests")
    return {"Authorization": f"Bearer {raw}"}


def test_write_submit_twice_review_and_export(client, session):
    s = demo_set(session)
    add_prompt(session, s, "Why is the sky blue?")
    session.commit()
    admin = admin_headers(session)
    headers = as_labeler(client, session, "wendy")

    nxt = client.get("/api/v1/demonstrations/next").json()["demonstration"]
    assert nxt["messages"] == [{"role": "user", "content": "Why is the sky blue?"}]
    assert nxt["instructions"] == "Answer **kindly**." and nxt["status"] == "draft"
    demo_id = nxt["id"]
    draft = client.put(f"/api/v1/demonstrations/{demo_id}/draft", headers=headers,
                       json={"text": "Rayleigh", "time_spent_s": 12}).json()
    assert draft["saved"] and draft["holds_lease"] and draft["demonstration"]["text"] == "Rayleigh"
    assert client.get("/api/v1/demonstrations/next").json()["demonstration"]["text"] == "Rayleigh"  # the same one

    body = {"text": "Rayleigh scattering.", "prompt_flags": ["unclear"]}
    first = client.post(f"/api/v1/demonstrations/{demo_id}/submit", headers=headers, json=body).json()
    again = client.post(f"/api/v1/demonstrations/{demo_id}/submit", headers=headers, json=body).json()
    assert (first["already"], again["already"]) == (False, True)
    assert first["demonstration"]["status"] == "submitted" and first["demonstration"]["prompt_flags"] == ["unclear"]
    assert session.scalar(select(func.count(Demonstration.id))) == 1
    assert client.get("/api/v1/demonstrations/next").json() == {"demonstration": None}

    client.cookies.clear()
    queue = client.get("/api/v1/demonstrations", headers=admin).json()
    assert [d["id"] for d in queue] == [demo_id]
    accepted = client.post(f"/api/v1/demonstrations/{demo_id}/accept", headers=admin).json()
    assert accepted["status"] == "accepted" and accepted["reviewed_by_id"] is not None
    exported = client.get(f"/api/v1/prompt-sets/{s.id}/demonstrations.jsonl", headers=admin,
                          params={"format": "prompt_completion"})
    rows = [json.loads(line) for line in exported.text.splitlines()]
    assert rows[0]["completion"] == [{"role": "assistant", "content": "Rayleigh scattering."}]
    assert client.get(f"/api/v1/prompt-sets/{s.id}/demonstrations.jsonl", headers=admin,
                      params={"format": "nope"}).status_code == 422


def test_reject_needs_a_reason_and_skip_needs_one_too(client, session):
    s = demo_set(session)
    for text in ("First?", "Second?"):
        add_prompt(session, s, text)
    session.commit()
    admin = admin_headers(session)
    headers = as_labeler(client, session, "wendy")
    demo_id = client.get("/api/v1/demonstrations/next").json()["demonstration"]["id"]
    client.post(f"/api/v1/demonstrations/{demo_id}/submit", headers=headers, json={"text": "An answer."})
    second = client.get("/api/v1/demonstrations/next").json()["demonstration"]["id"]
    assert client.post(f"/api/v1/demonstrations/{second}/skip", headers=headers, json={"reason": ""}).status_code == 422
    skipped = client.post(f"/api/v1/demonstrations/{second}/skip", headers=headers, json={"reason": "Too hard"})
    assert skipped.json()["status"] == "skipped" and skipped.json()["skip_reason"] == "Too hard"

    client.cookies.clear()
    missing = client.post(f"/api/v1/demonstrations/{demo_id}/reject", headers=admin, json={"reason": " "})
    assert missing.status_code == 422 and "reason" in missing.json()["errors"]
    rejected = client.post(f"/api/v1/demonstrations/{demo_id}/reject", headers=admin, json={"reason": "Too short."})
    assert rejected.json()["status"] == "rejected" and rejected.json()["reject_reason"] == "Too short."


def test_a_labeler_cannot_touch_another_labelers_demonstration(client, session):
    s = demo_set(session)
    add_prompt(session, s, "Mine?")
    session.commit()
    as_labeler(client, session, "wendy")
    demo_id = client.get("/api/v1/demonstrations/next").json()["demonstration"]["id"]
    client.cookies.clear()
    headers = as_labeler(client, session, "mallory")
    response = client.post(f"/api/v1/demonstrations/{demo_id}/submit", headers=headers, json={"text": "Stolen."})
    assert response.status_code == 403
    assert client.put(f"/api/v1/demonstrations/{demo_id}/draft", headers=headers, json={"text": "x"}).status_code == 403
    assert session.get(Demonstration, demo_id).text == ""
    assert client.get("/api/v1/demonstrations").status_code == 403  # the review queue is for admins


def test_import_is_all_or_nothing_with_line_numbers(client, session):
    s = demo_set(session)
    session.commit()
    admin = admin_headers(session)
    good = '{"prompt": "One?", "response": "One."}'
    bad = client.post(f"/api/v1/prompt-sets/{s.id}/demonstrations", headers=admin,
                      json={"format": "jsonl", "content": good + '\n{"prompt": "Two?"}\nnot json'})
    assert bad.status_code == 422
    text = json.dumps(bad.json())
    assert "line 2" in text and "line 3" in text
    assert session.scalar(select(func.count(Demonstration.id))) == 0
    ok = client.post(f"/api/v1/prompt-sets/{s.id}/demonstrations", headers=admin,
                     json={"format": "jsonl", "content": good})
    assert ok.status_code == 200 and ok.json()["added"] == 1
