"""The JSON API of demonstrations: a labeler leases, drafts, submits (idempotently)
and skips; an admin reviews, imports and exports."""

import json

from sqlalchemy import func, select

from app.db.enums import Role
from app.db.models import Demonstration
from app.services import auth
from tests.conftest import login
from tests.factories import add_prompt, demo_set, make_user


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


def wendys_draft_and_mallory(client, session) -> tuple[int, dict[str, str]]:
    """Wendy leases a demonstration; then mallory signs in: (its id, mallory's headers)."""
    s = demo_set(session)
    add_prompt(session, s, "Mine?")
    session.commit()
    as_labeler(client, session, "wendy")
    demo_id = client.get("/api/v1/demonstrations/next").json()["demonstration"]["id"]
    client.cookies.clear()
    headers = as_labeler(client, session, "mallory")
    return demo_id, headers


def test_a_labeler_cannot_touch_another_labelers_demonstration(client, session):
    demo_id, headers = wendys_draft_and_mallory(client, session)
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


def test_admin_edit_accepts_the_new_text_and_lists_by_status(client, session):
    s = demo_set(session)
    add_prompt(session, s, "Edit me?")
    session.commit()
    admin = admin_headers(session)
    headers = as_labeler(client, session, "wendy")
    demo_id = client.get("/api/v1/demonstrations/next").json()["demonstration"]["id"]
    client.post(f"/api/v1/demonstrations/{demo_id}/submit", headers=headers, json={"text": "Draft answer."})
    client.cookies.clear()

    assert client.post(f"/api/v1/demonstrations/{demo_id}/edit", headers=admin, json={"text": ""}).status_code == 422
    edited = client.post(f"/api/v1/demonstrations/{demo_id}/edit", headers=admin, json={"text": "A better answer."})
    assert edited.status_code == 200, edited.text
    assert (edited.json()["status"], edited.json()["text"]) == ("accepted", "A better answer.")
    assert client.get("/api/v1/demonstrations", headers=admin).json() == []
    accepted = client.get("/api/v1/demonstrations", headers=admin, params={"status": "accepted", "prompt_set_id": s.id})
    assert [d["id"] for d in accepted.json()] == [demo_id]
    assert client.get("/api/v1/demonstrations", headers=admin,
                      params={"status": "accepted", "prompt_set_id": s.id + 1}).json() == []
    bad = client.get("/api/v1/demonstrations", headers=admin, params={"status": "bogus"})
    assert bad.status_code == 422 and "status" in bad.json()["errors"]
    exported = client.get(f"/api/v1/prompt-sets/{s.id}/demonstrations.jsonl", headers=admin).text
    assert json.loads(exported)["messages"][-1] == {"role": "assistant", "content": "A better answer."}


def test_a_labeler_cannot_skip_another_labelers_demonstration(client, session):
    demo_id, headers = wendys_draft_and_mallory(client, session)
    response = client.post(f"/api/v1/demonstrations/{demo_id}/skip", headers=headers, json={"reason": "Mine now"})
    assert response.status_code == 403
    assert session.get(Demonstration, demo_id).status == "draft"


def test_import_takes_a_json_list_or_the_jsonl_itself(client, session):
    s = demo_set(session)
    session.commit()
    admin = admin_headers(session)
    bad = client.post(f"/api/v1/prompt-sets/{s.id}/demonstrations", headers=admin,
                      json=[{"prompt": "One?", "response": "One."}, {"prompt": "Two?"}])
    assert bad.status_code == 422 and "line 2" in json.dumps(bad.json())
    assert session.scalar(select(func.count(Demonstration.id))) == 0
    wrong_status = client.post(f"/api/v1/prompt-sets/{s.id}/demonstrations", headers=admin, params={"status": "draft"},
                               json=[{"prompt": "One?", "response": "One."}])
    assert wrong_status.status_code == 422 and "status" in wrong_status.json()["errors"]

    listed = client.post(f"/api/v1/prompt-sets/{s.id}/demonstrations", headers=admin, params={"status": "submitted"},
                         json=[{"prompt": "One?", "response": "One."},
                               {"messages": [{"role": "user", "content": "Two?"},
                                             {"role": "assistant", "content": "Two."}]}])
    assert listed.status_code == 200, listed.text
    assert (listed.json()["added"], listed.json()["prompts_added"]) == (2, 2)
    assert len(client.get("/api/v1/demonstrations", headers=admin, params={"prompt_set_id": s.id}).json()) == 2

    jsonl = client.post(f"/api/v1/prompt-sets/{s.id}/demonstrations",
                        headers=admin | {"Content-Type": "application/jsonl"},
                        content='{"prompt": "Three?", "response": "Three."}\n{"prompt": "One?", "response": "1"}\n')
    assert jsonl.status_code == 200, jsonl.text
    assert (jsonl.json()["added"], jsonl.json()["duplicates_existing"]) == (1, 1)
    pasted_list = client.post(f"/api/v1/prompt-sets/{s.id}/demonstrations", headers=admin,
                              json={"content": '[{"prompt": "Four?", "response": "Four."}]'})
    assert pasted_list.status_code == 200 and pasted_list.json()["added"] == 1
