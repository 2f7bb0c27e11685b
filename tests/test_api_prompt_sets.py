"""The prompt-set JSON API: create, read, import (JSON body or file), start."""

import json

import pytest
from sqlalchemy import func, select

from app.db.enums import JobStatus, Role
from app.db.models import Prompt, PromptSet
from app.services import auth
from tests.conftest import login
from tests.factories import make_user


@pytest.fixture
def api(client, session):
    """A client authenticated with an admin's bearer token (no cookie, no CSRF)."""
    admin = make_user(session, role=Role.admin)
    _, raw = auth.create_api_token(session, user=admin, name="tests")
    client.headers["Authorization"] = f"Bearer {raw}"
    return client


def prompt_count(session, set_id: int) -> int:
    return session.scalar(select(func.count()).where(Prompt.prompt_set_id == set_id))


def create(api, **body) -> dict:
    response = api.post("/api/v1/prompt-sets", json={"name": "api set"} | body)
    assert response.status_code == 201, response.text
    return response.json()


def test_create_returns_the_set_with_defaults_and_counts(api):
    body = create(api, k=3, overlap=2, instructions="Rank by **helpfulness**.")
    assert body["status"] == "draft" and body["k"] == 3 and body["overlap"] == 2
    assert body["train_ratio"] == 0.8 and body["temperature"] == 1.0
    assert body["counts"]["prompts"] == 0 and body["generation_job"] is None

    listed = api.get("/api/v1/prompt-sets").json()
    assert [s["id"] for s in listed] == [body["id"]]
    assert api.get(f"/api/v1/prompt-sets/{body['id']}").json()["name"] == "api set"


def test_create_with_bad_settings_is_a_422_problem_naming_the_fields(api, session):
    response = api.post("/api/v1/prompt-sets", json={"name": "x", "k": 12, "train_ratio": 0.3})
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["errors"]["k"] == "must be 2..9"
    assert "must add up to 1" in problem["errors"]["ratios"]
    assert session.scalar(select(func.count()).select_from(PromptSet)) == 0


def test_taken_name_is_a_409(api):
    create(api)
    response = api.post("/api/v1/prompt-sets", json={"name": "API SET"})
    assert response.status_code == 409 and response.json()["errors"] == {"name": "already taken"}


def test_import_as_json_body(api, session):
    set_id = create(api)["id"]
    content = "".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(10)) + '{"prompt": "prompt 0"}\n'
    response = api.post(f"/api/v1/prompt-sets/{set_id}/prompts", json={"format": "jsonl", "content": content})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["added"] == 10 and result["duplicates"] == 1 and result["duplicates_in_file"] == 1
    assert sum(result["per_split"].values()) == 10
    assert api.get(f"/api/v1/prompt-sets/{set_id}").json()["counts"]["prompts"] == 10 == prompt_count(session, set_id)


def test_import_as_multipart_csv_file(api, session):
    set_id = create(api)["id"]
    csv = b'prompt,source\n"line one\nline two",manual\nsecond,web\n'
    response = api.post(f"/api/v1/prompt-sets/{set_id}/prompts", files={"file": ("p.csv", csv, "text/csv")})
    assert response.status_code == 200, response.text
    assert response.json()["added"] == 2
    texts = session.scalars(select(Prompt.text).where(Prompt.prompt_set_id == set_id).order_by(Prompt.id)).all()
    assert texts == ["line one\nline two", "second"]


def test_bad_import_lists_line_errors_and_stores_nothing(api, session):
    set_id = create(api)["id"]
    content = '{"prompt": "ok"}\n{"prompt": "ok too"}\n{"messages": [{"role": "robot", "content": "x"}]}\n'
    response = api.post(f"/api/v1/prompt-sets/{set_id}/prompts", json={"format": "jsonl", "content": content})
    assert response.status_code == 422
    problem = response.json()
    assert problem["errors"] == ["line 3: 'messages'[0].role must be one of system, user, assistant (got \"robot\")"]
    assert problem["detail"].startswith("Nothing was imported")
    assert prompt_count(session, set_id) == 0


def test_import_body_must_be_json_or_a_file(api):
    set_id = create(api)["id"]
    response = api.post(f"/api/v1/prompt-sets/{set_id}/prompts", json={"format": "xml", "content": "x"})
    assert response.status_code == 422
    assert any(e.startswith("format:") for e in response.json()["errors"])
    response = api.post(f"/api/v1/prompt-sets/{set_id}/prompts", json={"format": "jsonl", "content": ""})
    assert response.status_code == 422 and "file is empty" in response.json()["detail"]


def test_import_into_unknown_set_is_404(api):
    response = api.post("/api/v1/prompt-sets/424242/prompts", json={"content": '{"prompt": "x"}'})
    assert response.status_code == 404


def test_start_activates_and_queues_generation(api, session):
    set_id = create(api)["id"]
    assert api.post(f"/api/v1/prompt-sets/{set_id}/start").status_code == 409  # no prompts yet
    api.post(f"/api/v1/prompt-sets/{set_id}/prompts", json={"content": '{"prompt": "hello"}\n'})

    response = api.post(f"/api/v1/prompt-sets/{set_id}/start")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "active"
    assert body["generation_job"]["status"] == JobStatus.queued.value
    assert api.post(f"/api/v1/prompt-sets/{set_id}/start").status_code == 409


def test_pause_resume_archive_and_patch(api):
    set_id = create(api)["id"]
    assert api.patch(f"/api/v1/prompt-sets/{set_id}", json={"k": 5}).json()["k"] == 5
    assert api.patch(f"/api/v1/prompt-sets/{set_id}", json={"k": 1}).status_code == 422
    api.post(f"/api/v1/prompt-sets/{set_id}/prompts", json={"content": '{"prompt": "hello"}\n'})
    api.post(f"/api/v1/prompt-sets/{set_id}/start")
    assert api.post(f"/api/v1/prompt-sets/{set_id}/pause").json()["status"] == "paused"
    assert api.post(f"/api/v1/prompt-sets/{set_id}/resume").json()["status"] == "active"
    assert api.post(f"/api/v1/prompt-sets/{set_id}/archive").json()["status"] == "archived"
    response = api.post(f"/api/v1/prompt-sets/{set_id}/prompts", json={"content": '{"prompt": "more"}\n'})
    assert response.status_code == 409


def test_session_users_need_the_csrf_header_for_imports(client, session):
    admin = make_user(session, role=Role.admin)
    token = login(client, admin)
    set_id = client.post("/api/v1/prompt-sets", json={"name": "s"}, headers={"X-CSRF-Token": token}).json()["id"]
    body = {"content": '{"prompt": "x"}'}
    assert client.post(f"/api/v1/prompt-sets/{set_id}/prompts", json=body).status_code == 403
    assert client.post(f"/api/v1/prompt-sets/{set_id}/prompts", json=body,
                       headers={"X-CSRF-Token": token}).status_code == 200


def test_engineers_cannot_use_the_prompt_set_api(client, session):
    engineer = make_user(session, role=Role.engineer)
    _, raw = auth.create_api_token(session, user=engineer, name="t")
    response = client.get("/api/v1/prompt-sets", headers={"Authorization": f"Bearer {raw}"})
    assert response.status_code == 403


def test_too_big_upload_names_its_real_size_and_the_limit(api, session):
    set_id = create(api)["id"]
    big = b'{"prompt": "x"}\n' * (25 * 1024 * 1024 // 16)
    response = api.post(f"/api/v1/prompt-sets/{set_id}/prompts", files={"file": ("big.jsonl", big)})
    assert response.status_code == 422
    assert response.json()["errors"] == [
        "file is 25 MB (26,214,400 bytes); the limit is 20 MB. Split it into smaller files."]
    assert prompt_count(session, set_id) == 0
