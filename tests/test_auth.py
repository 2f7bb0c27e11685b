"""Signing in, sessions, CSRF, rate limiting and API tokens."""

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from app.db.base import utcnow
from app.db.enums import Role
from app.db.models import LoginAttempt
from app.services import auth
from app.services.errors import Invalid, RateLimited
from tests.conftest import csrf_of, login
from tests.factories import TEST_PASSWORD, make_user


def test_login_with_right_password_opens_home(client, session):
    user = make_user(session, role=Role.labeler)
    login(client, user)
    page = client.get("/")
    assert page.status_code == 200
    assert user.username in page.text


def test_wrong_password_is_refused(client, session):
    user = make_user(session)
    token = csrf_of(client)
    response = client.post("/login", data={"username": user.username, "password": "wrong-password", "csrf_token": token})
    assert response.status_code == 422
    assert "Wrong username or password" in response.text
    assert client.get("/").status_code == 302


def test_deactivated_user_cannot_sign_in(client, session):
    user = make_user(session, is_active=False)
    token = csrf_of(client)
    response = client.post("/login", data={"username": user.username, "password": TEST_PASSWORD, "csrf_token": token})
    assert response.status_code == 422
    assert client.get("/api/v1/me").status_code == 401


def test_deactivation_ends_an_open_session(client, session):
    user = make_user(session)
    login(client, user)
    assert client.get("/api/v1/me").status_code == 200
    user.is_active = False
    session.flush()
    assert client.get("/api/v1/me").status_code == 401


def test_post_without_csrf_token_is_refused(client, session):
    admin = make_user(session, role=Role.admin)
    login(client, admin)
    response = client.post("/admin/users", data={"username": "newbie", "password": "long-enough-pw", "role": "labeler"})
    assert response.status_code == 403
    assert "security token" in response.text
    response = client.post("/admin/users", data={"username": "newbie", "password": "long-enough-pw",
                                                  "role": "labeler", "csrf_token": "forged"})
    assert response.status_code == 403


def test_login_form_itself_needs_csrf(client, session):
    user = make_user(session)
    csrf_of(client)
    response = client.post("/login", data={"username": user.username, "password": TEST_PASSWORD})
    assert response.status_code == 403


def _sign_in(session, username, password, address, *, max_failures=5, max_address_failures=20, now=None):
    return auth.authenticate(session, username=username, password=password, address=address,
                             max_failures=max_failures, max_address_failures=max_address_failures,
                             window_s=900, now=now)


def test_failures_throttle_the_account_from_that_address_only(session):
    user = make_user(session)
    for _ in range(5):
        with pytest.raises(Invalid):
            _sign_in(session, user.username, "nope", "10.0.0.1")
    with pytest.raises(RateLimited, match="Try again in 15 minutes"):
        _sign_in(session, user.username, TEST_PASSWORD, "10.0.0.1")
    # The owner, from another address, still signs in: guessing cannot lock them out.
    assert _sign_in(session, user.username, TEST_PASSWORD, "10.0.0.2").id == user.id
    # After the window the right password works from the guessing address too.
    later = utcnow() + timedelta(seconds=901)
    assert _sign_in(session, user.username, TEST_PASSWORD, "10.0.0.1", now=later).id == user.id


def test_attempts_older_than_the_window_are_pruned_at_the_next_sign_in(session):
    """The table holds about one window of attempts, not every sign-in ever made."""
    user = make_user(session)
    for address in ("10.0.1.1", "10.0.1.2"):
        with pytest.raises(Invalid):
            _sign_in(session, user.username, "nope", address)
    assert _sign_in(session, user.username, TEST_PASSWORD, "10.0.1.3").id == user.id
    recent = utcnow() + timedelta(seconds=600)  # within the 900 s window of all three
    _sign_in(session, user.username, TEST_PASSWORD, "10.0.1.4", now=recent)
    assert session.scalar(select(func.count()).select_from(LoginAttempt)) == 4
    # From any address, a sign-in after the window deletes every older attempt (of all addresses).
    later = utcnow() + timedelta(seconds=1000)
    _sign_in(session, user.username, TEST_PASSWORD, "10.0.1.5", now=later)
    left = session.execute(select(LoginAttempt.address).order_by(LoginAttempt.at)).scalars().all()
    assert left == ["10.0.1.4", "10.0.1.5"]


def test_failures_across_accounts_throttle_the_address(session):
    users = [make_user(session) for _ in range(4)]
    for u in users:
        with pytest.raises(Invalid):
            _sign_in(session, u.username, "nope", "192.0.2.7", max_address_failures=4)
    other = make_user(session)
    with pytest.raises(RateLimited):
        _sign_in(session, other.username, TEST_PASSWORD, "192.0.2.7", max_address_failures=4)
    assert _sign_in(session, other.username, TEST_PASSWORD, "192.0.2.8", max_address_failures=4).id == other.id


def test_parallel_wrong_guesses_verify_at_most_the_limit(engine, committed, monkeypatch):
    from app.db.session import new_session

    with new_session() as s:
        username = make_user(s).username
        s.commit()
    verified: list[str] = []
    real_verify = auth.verify_password

    def counting_verify(password: str, password_hash: str | None) -> bool:
        verified.append(password)
        return real_verify(password, password_hash)

    monkeypatch.setattr(auth, "verify_password", counting_verify)
    start = threading.Barrier(20)

    def guess(i: int) -> str:
        with new_session() as s:
            start.wait()
            try:
                _sign_in(s, username, f"wrong-{i}", "198.51.100.9")
            except Invalid:
                return "wrong"
            except RateLimited:
                return "throttled"
            return "signed in"

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(guess, range(20)))
    assert len(verified) == 5, f"{len(verified)} parallel guesses were verified"
    assert sorted(results) == ["throttled"] * 15 + ["wrong"] * 5


def test_rate_limit_message_shows_on_the_login_page(client, session):
    user = make_user(session)
    token = csrf_of(client)
    for _ in range(5):
        client.post("/login", data={"username": user.username, "password": "bad", "csrf_token": token})
    response = client.post("/login", data={"username": user.username, "password": TEST_PASSWORD, "csrf_token": token})
    assert response.status_code == 429
    assert "Too many failed sign-in attempts" in response.text


def test_password_is_hashed_with_argon2(session):
    user = make_user(session)
    assert user.password_hash.startswith("$argon2id$")
    assert TEST_PASSWORD not in user.password_hash


def test_session_cookie_is_httponly_and_samesite_lax(client, session):
    user = make_user(session)
    token = csrf_of(client)
    response = client.post("/login", data={"username": user.username, "password": TEST_PASSWORD, "csrf_token": token})
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie


def test_login_redirect_stays_on_this_site(client, session):
    user = make_user(session)
    token = csrf_of(client)
    response = client.post("/login", data={"username": user.username, "password": TEST_PASSWORD,
                                           "csrf_token": token, "next": "//evil.example/"})
    assert response.headers["location"] == "/"


def test_api_token_works_as_bearer_and_stops_when_revoked(client, session):
    engineer = make_user(session, role=Role.engineer)
    token, raw = auth.create_api_token(session, user=engineer, name="notebook")
    assert raw.startswith("rlhf_") and raw not in token.token_hash
    headers = {"Authorization": f"Bearer {raw}"}
    me = client.get("/api/v1/me", headers=headers)
    assert me.status_code == 200 and me.json()["username"] == engineer.username
    # Bearer requests need no CSRF token: no cookie is involved.
    assert client.get("/api/v1/users", headers=headers).status_code == 403
    auth.revoke_api_token(session, user=engineer, token_id=token.id)
    assert client.get("/api/v1/me", headers=headers).status_code == 401


def test_api_token_use_is_written_at_most_once_a_minute(session):
    engineer = make_user(session, role=Role.engineer)
    token, raw = auth.create_api_token(session, user=engineer, name="script")
    first = utcnow()
    assert auth.user_for_token(session, raw, now=first).id == engineer.id
    assert token.last_used_at == first
    # A script calling in a loop costs a read per call, not a write.
    assert auth.user_for_token(session, raw, now=first + timedelta(seconds=59)).id == engineer.id
    assert token.last_used_at == first
    later = first + timedelta(seconds=61)
    assert auth.user_for_token(session, raw, now=later).id == engineer.id
    assert token.last_used_at == later


def test_token_page_shows_a_new_token_once(client, session):
    engineer = make_user(session, role=Role.engineer)
    csrf = login(client, engineer)
    page = client.post("/account/tokens", data={"name": "ci", "csrf_token": csrf})
    assert page.status_code == 200
    assert "rlhf_" in page.text and "not shown again" in page.text
    listing = client.get("/account/tokens").text
    assert "ci" in listing and "not shown again" not in listing


def test_labelers_cannot_create_api_tokens(session):
    labeler = make_user(session, role=Role.labeler)
    with pytest.raises(Exception, match="engineers and admins"):
        auth.create_api_token(session, user=labeler, name="x")


def test_admin_creates_user_and_bad_input_names_the_field(client, session):
    admin = make_user(session, role=Role.admin)
    csrf = login(client, admin)
    bad = client.post("/admin/users", data={"username": "x", "password": "short", "role": "labeler", "csrf_token": csrf},
                      headers={"HX-Request": "true"})
    assert bad.status_code == 422
    assert "Username must be 2-64" in bad.text
    ok = client.post("/admin/users", data={"username": "newlabeler", "password": "long-enough-pw",
                                           "role": "labeler", "csrf_token": csrf})
    assert ok.status_code == 303
    assert "newlabeler" in client.get("/admin/users").text


def test_api_errors_are_json_problems(client, session):
    response = client.get("/api/v1/me")
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["title"] == "Sign in required"
    admin = make_user(session, role=Role.admin)
    csrf = login(client, admin)
    dup = client.post("/api/v1/users", json={"username": admin.username, "password": "long-enough-pw"},
                      headers={"X-CSRF-Token": csrf})
    assert dup.status_code == 409 and "already exists" in dup.json()["detail"]


def test_unknown_page_is_a_friendly_404(client, session):
    login(client, make_user(session))
    response = client.get("/no/such/page")
    assert response.status_code == 404
    assert "There is nothing at /no/such/page" in response.text


def test_every_response_carries_a_request_id(client):
    response = client.get("/healthz", headers={"X-Request-ID": "abc123"})
    assert response.headers["x-request-id"] == "abc123"
    assert len(client.get("/healthz").headers["x-request-id"]) == 16


def test_readyz_reports_database_and_migrations(client):
    body = client.get("/readyz").json()
    assert body["status"] == "ok" and body["database"] == "ok"


def test_logs_carry_the_request_id_and_no_password(client, session, caplog):
    import logging

    user = make_user(session)
    token = csrf_of(client)
    with caplog.at_level(logging.INFO):
        client.post("/login", data={"username": user.username, "password": TEST_PASSWORD, "csrf_token": token},
                    headers={"X-Request-ID": "req-42"})
    lines = [r for r in caplog.records if r.name == "app.access"]
    assert any("POST /login 303" in r.getMessage() and r.request_id == "req-42" for r in lines)
    assert all(TEST_PASSWORD not in r.getMessage() for r in caplog.records)
