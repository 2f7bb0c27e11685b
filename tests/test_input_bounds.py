"""Bad input gets a clear 4xx, never a 500: ids past the integer columns, huge or
non-ASCII numbers, deep JSON, lone surrogates, NaN, odd headers, huge pages."""

import json

import pytest

from app.config import Settings
from app.db.enums import PromptSetKind, Role
from app.services import auth
from tests.conftest import csrf_of, login
from tests.factories import add_prompt, make_model, make_prompt_set, make_task, make_user

HUGE_ID = 357933402691  # past PostgreSQL's integer (2**31 - 1)


def bearer(client, session, role: Role = Role.admin) -> dict[str, str]:
    user = make_user(session, role=role)
    _, raw = auth.create_api_token(session, user=user, name="tests")
    return {"Authorization": f"Bearer {raw}"}


def problem(response, status: int = 422) -> dict:
    assert response.status_code == status, response.text
    return response.json()


# ---- ids --------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, body", [
    ("GET", f"/api/v1/prompt-sets/{HUGE_ID}", None),
    ("POST", f"/api/v1/prompt-sets/{HUGE_ID}/start", None),
    ("GET", f"/api/v1/jobs/{HUGE_ID}", None),
    ("GET", f"/api/v1/jobs/{HUGE_ID}/metrics", None),
    ("POST", f"/api/v1/jobs/{HUGE_ID}/cancel", None),
    ("POST", f"/api/v1/jobs/{HUGE_ID}/retry", None),
    ("GET", f"/api/v1/jobs?prompt_set_id={HUGE_ID}", None),
    ("GET", f"/api/v1/models/{HUGE_ID}", None),
    ("GET", f"/api/v1/models/{HUGE_ID}/samples", None),
    ("POST", f"/api/v1/models/{HUGE_ID}/promote", {"prompt_set_id": 1}),
    ("POST", "/api/v1/models/1/promote", {"prompt_set_id": HUGE_ID}),
    ("POST", "/api/v1/training/reward", {"prompt_set_ids": [HUGE_ID]}),
    ("POST", "/api/v1/training/sft", {"prompt_set_ids": [1], "base_model_id": HUGE_ID}),
    ("POST", "/api/v1/training/ppo", {"prompt_set_ids": [1], "reward_model_id": HUGE_ID}),
    ("POST", f"/api/v1/demonstrations/{HUGE_ID}/accept", None),
    ("GET", f"/api/v1/demonstrations?prompt_set_id={HUGE_ID}", None),
    ("PATCH", f"/api/v1/users/{HUGE_ID}", {"is_active": True}),
    ("GET", "/api/v1/jobs?offset=99999999999999999999", None),
    ("GET", "/api/v1/demonstrations?offset=99999999999999999999", None),
])
def test_api_id_or_offset_past_the_integer_range_is_a_422(client, session, method, path, body):
    response = client.request(method, path, json=body, headers=bearer(client, session))
    assert "errors" in problem(response)


@pytest.mark.parametrize("role, path", [
    (Role.admin, f"/admin/prompt-sets/{HUGE_ID}"),
    (Role.admin, f"/admin/prompt-sets/{HUGE_ID}/quality"),
    (Role.engineer, f"/jobs/{HUGE_ID}"),
    (Role.engineer, f"/models/{HUGE_ID}"),
    (Role.labeler, "/label/history?page=99999999999999999999"),
    (Role.labeler, "/label/history?page=0"),
])
def test_page_with_an_id_or_page_past_the_range_is_a_422(client, client_as, session, role, path):
    client_as(role)
    assert client.get(path).status_code == 422


def test_demonstration_labeler_sent_to_a_huge_id_gets_a_422(client, client_as, session):
    token = client_as("labeler").headers["X-CSRF-Token"]
    response = client.put(f"/api/v1/demonstrations/{HUGE_ID}/draft", json={"text": "x"},
                          headers={"X-CSRF-Token": token})
    assert problem(response)["errors"]


# ---- numbers in the label form and API -----------------------------------------------

@pytest.fixture
def leased(client, session):
    labeler = make_user(session)
    task = make_task(session, make_prompt_set(session, k=2))
    session.commit()
    token = login(client, labeler)
    assert client.get("/label").status_code == 200  # leases the task
    return task, [item.response_id for item in task.items], token


def _submit_api(client, task, token, ratings, ranks, **extra):
    body = {"idempotency_key": "fuzz-key-0001", "ratings": ratings, "ranks": ranks} | extra
    return client.post(f"/api/v1/label/{task.id}", json=body, headers={"X-CSRF-Token": token})


@pytest.mark.parametrize("value", ["9" * 5000, "٣"])
def test_label_form_rating_that_is_no_small_ascii_number_is_a_422(client, leased, value):
    task, (a, b), token = leased
    form = {"idempotency_key": "fuzz-key-0001", f"rating-{a}": value, f"rating-{b}": "3",
            f"rank-{a}": "1", f"rank-{b}": "2", "csrf_token": token}
    response = client.post(f"/label/{task.id}/submit", data=form)
    assert response.status_code == 422
    assert "whole number from 1 to 7" in response.text


@pytest.mark.parametrize("key", ["9" * 5000, "²"])
def test_label_form_field_named_with_an_odd_number_is_a_422(client, leased, key):
    task, (a, b), token = leased
    form = {"idempotency_key": "fuzz-key-0001", f"rating-{key}": "3", f"rating-{a}": "3", f"rating-{b}": "3",
            f"rank-{a}": "1", f"rank-{b}": "2", f"rank-{key}": "1", "csrf_token": token}
    response = client.post(f"/label/{task.id}/submit", data=form)
    assert response.status_code in (303, 422)  # unknown fields are ignored or refused, never a 500


@pytest.mark.parametrize("ratings_of", [
    lambda a, b: {"9" * 5000: 3, str(a): 3, str(b): 3},
    lambda a, b: {str(a): "9" * 5000, str(b): 3},
])
def test_api_rating_key_or_value_with_more_digits_than_python_parses_is_a_422(client, leased, ratings_of):
    task, (a, b), token = leased
    response = _submit_api(client, task, token, ratings_of(a, b), {str(a): 1, str(b): 2})
    assert problem(response)["errors"]


# ---- text PostgreSQL cannot store --------------------------------------------------

SURROGATE = "\ud800"


def _raw_json(body: dict) -> bytes:
    """JSON as a client may send it: json.dumps escapes a lone surrogate as \\ud800."""
    return json.dumps(body).encode()


def test_api_comment_with_a_lone_surrogate_is_a_422_naming_the_field(client, leased):
    task, (a, b), token = leased
    body = {"idempotency_key": "fuzz-key-0001", "ratings": {str(a): 3, str(b): 3}, "ranks": {str(a): 1, str(b): 2},
            "comment": f"fine {SURROGATE}"}
    response = client.post(f"/api/v1/label/{task.id}", content=_raw_json(body),
                           headers={"X-CSRF-Token": token, "Content-Type": "application/json"})
    assert "comment" in problem(response)["errors"]


@pytest.fixture
def demo_lease(client, session):
    s = make_prompt_set(session, kind=PromptSetKind.demonstration)
    add_prompt(session, s, "Why is the sky blue?")
    session.commit()
    token = login(client, make_user(session))
    demo = client.get("/api/v1/demonstrations/next").json()["demonstration"]
    return demo["id"], {"X-CSRF-Token": token, "Content-Type": "application/json"}


@pytest.mark.parametrize("method, action, body, field", [
    ("PUT", "draft", {"text": f"draft {SURROGATE}"}, "text"),
    ("POST", "submit", {"text": f"done {SURROGATE}"}, "text"),
    ("POST", "skip", {"reason": f"unclear {SURROGATE}"}, "reason"),
])
def test_demonstration_text_with_a_lone_surrogate_is_a_422(client, demo_lease, method, action, body, field):
    demo_id, headers = demo_lease
    response = client.request(method, f"/api/v1/demonstrations/{demo_id}/{action}", content=_raw_json(body),
                              headers=headers)
    assert field in problem(response)["errors"]


# ---- imports ---------------------------------------------------------------------

@pytest.fixture
def import_url(client, session):
    prompt_set = make_prompt_set(session)
    session.commit()
    client.headers.update(bearer(client, session))
    return f"/api/v1/prompt-sets/{prompt_set.id}/prompts"


@pytest.mark.parametrize("content", [
    "[" * 100_000,
    '{"prompt": "hi", "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "[" + '{"prompt": "hi", "metadata": {"x": ' + "[" * 5000 + "]" * 5000 + "}}]",
])
def test_deeply_nested_json_import_is_a_422(client, import_url, content):
    response = client.post(import_url, json={"content": content})
    assert "nested" in problem(response)["detail"]


@pytest.mark.parametrize("content", [
    '{"prompt": "hi", "metadata": {"x": NaN}}',
    '[{"prompt": "hi", "metadata": {"x": Infinity}}]',
    '{"prompt": "hi", "score": -Infinity}',
])
def test_nan_or_infinity_in_import_metadata_is_a_422_with_its_line(client, import_url, content):
    body = problem(client.post(import_url, json={"content": content}))
    assert "line 1" in body["errors"][0] and ("NaN" in body["detail"] or "Infinity" in body["detail"])


@pytest.mark.parametrize("content", [
    '{"prompt": "hi \\ud800"}',
    '[{"messages": [{"role": "user", "content": "a\\udfffb"}]}]',
    '{"prompt": "hi", "metadata": {"note": "\\ud83d"}}',
    '{"prompt": "hi", "id": "x\\ud800"}',
])
def test_lone_surrogate_in_an_imported_prompt_is_a_422_with_its_line(client, import_url, content):
    body = problem(client.post(import_url, json={"content": content}))
    assert "line 1" in body["errors"][0] and "surrogate" in body["detail"]


def test_deeply_nested_demonstration_import_is_a_422(client, session):
    s = make_prompt_set(session, kind=PromptSetKind.demonstration)
    session.commit()
    response = client.post(f"/api/v1/prompt-sets/{s.id}/demonstrations", content="[" * 100_000,
                           headers=bearer(client, session) | {"Content-Type": "application/json"})
    assert "nested" in problem(response)["detail"]


def test_demonstration_import_with_nan_or_a_surrogate_is_a_422(client, session):
    s = make_prompt_set(session, kind=PromptSetKind.demonstration)
    session.commit()
    headers = bearer(client, session) | {"Content-Type": "application/jsonl"}
    url = f"/api/v1/prompt-sets/{s.id}/demonstrations"
    nan = client.post(url, content='{"prompt": "q", "response": "a", "metadata": {"x": NaN}}', headers=headers)
    assert "line 1" in problem(nan)["errors"][0]
    surrogate = client.post(url, content='{"prompt": "q", "response": "a \\ud800"}', headers=headers)
    assert "surrogate" in problem(surrogate)["detail"]


# ---- headers ---------------------------------------------------------------------

def test_request_id_header_that_is_not_utf8_gets_a_fresh_id(client):
    response = client.get("/healthz", headers={"X-Request-ID": b"\xff\xfe\xfd"})
    assert response.status_code == 200
    assert response.headers["x-request-id"].isalnum()


# ---- body size -------------------------------------------------------------------

class TestBodyLimits:
    """With limits lowered to a few KiB: 2 KiB for JSON and forms, 8 KiB for uploads."""

    @pytest.fixture
    def settings(self, tmp_path):
        return Settings(data_dir=tmp_path, secret_key="test-secret-key-for-sessions",
                        max_body_bytes=2048, max_upload_bytes=8192)

    def test_defaults_are_one_mib_for_bodies_and_64_mib_for_uploads(self, monkeypatch):
        assert (Settings().max_body_bytes, Settings().max_upload_bytes) == (1024 * 1024, 64 * 1024 * 1024)
        monkeypatch.setenv("RLHF_MAX_BODY_BYTES", "4096")
        assert Settings().max_body_bytes == 4096

    def test_declared_length_over_the_limit_is_a_413_before_anything_runs(self, client):
        response = client.post("/api/v1/prompt-sets", json={"name": "x" * 3000})  # signed out, even
        body = problem(response, 413)
        assert "2 KiB" in body["detail"] and "limit" in body["detail"]

    def test_streamed_body_without_a_length_is_cut_off_at_the_limit(self, client, session):
        chunks = (b'{"name": "' + b"x" * 1000, b"x" * 1000, b"x" * 1000, b'"}')
        response = client.post("/api/v1/prompt-sets", content=iter(chunks),
                               headers=bearer(client, session) | {"Content-Type": "application/json"})
        assert "content-length" not in response.request.headers
        assert "limit" in problem(response, 413)["detail"]

    def test_import_routes_take_the_upload_limit(self, client, session):
        prompt_set = make_prompt_set(session)
        session.commit()
        headers = bearer(client, session)
        url = f"/api/v1/prompt-sets/{prompt_set.id}/prompts"
        content = "\n".join(f'{{"prompt": "Prompt number {i} {"y" * 40}"}}' for i in range(80))
        assert 4000 < len(content) < 7000
        assert client.post(url, json={"content": content}, headers=headers).status_code == 200
        assert problem(client.post(url, json={"content": content * 2}, headers=headers), 413)

    def test_html_form_over_the_limit_gets_an_error_page(self, client, client_as, session):
        token = client_as("admin").headers["X-CSRF-Token"]
        response = client.post("/admin/prompt-sets", data={"name": "x" * 3000, "csrf_token": token})
        assert response.status_code == 413 and "text/html" in response.headers["content-type"]
        assert "larger than the limit" in response.text


def test_signed_out_multipart_post_is_refused_without_parsing_the_body(client, monkeypatch):
    from starlette.requests import Request

    parsed = []
    original = Request.form
    monkeypatch.setattr(Request, "form", lambda self, **kw: parsed.append(1) or original(self, **kw))
    response = client.post("/admin/prompt-sets/1/prompts", files={"file": ("p.jsonl", b'{"prompt": "hi"}\n')},
                           data={"csrf_token": csrf_of(client)})
    assert response.status_code == 302 and response.headers["location"].startswith("/login")
    assert parsed == []


# ---- ids typed into forms: parsed by the services -----------------------------------

def test_form_ids_past_the_integer_range_are_invalid_not_database_errors(session, tmp_path):
    from app.services import models, training
    from app.services.errors import Invalid
    from tests.factories import make_model

    model = make_model(session, tmp_path, is_default=True)
    ranking = make_prompt_set(session)
    with pytest.raises(Invalid) as raised:
        models.promote_generator(session, model_id=model.id, prompt_set_id=str(HUGE_ID), user_id=None)
    assert "prompt_set_id" in raised.value.errors
    with pytest.raises(Invalid) as raised:
        models.promote_generator(session, model_id=str(HUGE_ID), prompt_set_id=str(ranking.id), user_id=None)
    assert "model_id" in raised.value.errors
    with pytest.raises(Invalid) as raised:
        training.start_sft_job(session, user_id=None, base_model_id=str(HUGE_ID), prompt_set_ids=["²"], values={})
    assert {"base_model_id", "prompt_set_ids"} <= set(raised.value.errors)


def test_gold_ranking_keyed_by_a_non_ascii_digit_is_invalid(session):
    from app.services import gold
    from app.services.errors import Invalid

    task = make_task(session, make_prompt_set(session, k=2))
    with pytest.raises(Invalid):
        gold.expected_ranking(task, ranking={"²": 1, str(task.items[0].response_id): 2})


@pytest.mark.parametrize("labelers", ["²", str(HUGE_ID)])
def test_export_filtered_by_an_odd_labeler_id_is_a_422(client, session, labelers):
    prompt_set = make_prompt_set(session)
    session.commit()
    response = client.get(f"/api/v1/prompt-sets/{prompt_set.id}/export/meta?labelers={labelers}",
                          headers=bearer(client, session))
    assert "labelers" in problem(response)["errors"]


@pytest.mark.parametrize("value", ["²", str(HUGE_ID)])
def test_review_page_for_an_odd_set_id_shows_every_set(client, client_as, session, value):
    client_as("admin")
    assert client.get(f"/admin/demonstrations?prompt_set_id={value}").status_code == 200


def test_run_name_with_a_nul_from_a_form_is_invalid(session):
    """A urlencoded form can carry %00; the name used to reach a query and fail there."""
    from app.services import models, training
    from app.services.errors import Invalid

    with pytest.raises(Invalid) as raised:
        training.start_sft_job(session, user_id=None, base_model_id=None, prompt_set_ids=[], values={}, name="a\x00b")
    assert "NUL" in raised.value.errors["name"]
    with pytest.raises(Invalid) as raised:
        training.start_reward_job(session, user_id=None, values={}, base_model_id=None, prompt_set_ids=[],
                                  labeler_ids=None, name="a\x00b")
    assert "NUL" in raised.value.errors["name"]


def test_sign_in_with_a_nul_in_the_username_is_a_failed_attempt(client):
    response = client.post("/login", data={"username": "ad\x00min", "password": "x", "csrf_token": csrf_of(client)})
    assert response.status_code in (200, 401, 422)
    assert "Wrong username or password" in response.text


def test_api_token_named_with_a_nul_is_invalid(session):
    from app.services.errors import Invalid

    with pytest.raises(Invalid) as raised:
        auth.create_api_token(session, user=make_user(session, role=Role.engineer), name="ci\x00")
    assert "NUL" in raised.value.errors["name"]
