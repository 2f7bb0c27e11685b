"""Server-side sessions: sign-out, password changes and resets, deactivation and
expiry end them on the server, whatever the signed cookie still says."""

import base64
import hashlib
import json
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db.base import utcnow
from app.db.enums import Role
from app.db.models import UserSession
from app.services import auth, sessions, users
from tests.conftest import csrf_of, login
from tests.factories import TEST_PASSWORD, make_user


def _second_client(app) -> TestClient:
    return TestClient(app, follow_redirects=False)


def _session_row(session, user) -> UserSession:
    return session.scalars(select(UserSession).where(UserSession.user_id == user.id)).one()


def test_signed_out_cookie_no_longer_signs_in(client, session):
    user = make_user(session)
    csrf = login(client, user)
    stolen = dict(client.cookies)
    assert client.post("/logout", data={"csrf_token": csrf}).status_code == 303
    # A copy of the cookie taken before sign-out is dead too.
    replay = _second_client(client.app)
    replay.cookies.update(stolen)
    assert replay.get("/api/v1/me").status_code == 401


def test_password_reset_ends_sessions_and_revokes_api_tokens(client, session):
    engineer = make_user(session, role=Role.engineer)
    login(client, engineer)
    _, raw = auth.create_api_token(session, user=engineer, name="notebook")
    bearer = {"Authorization": f"Bearer {raw}"}
    assert client.get("/api/v1/me", headers=bearer).status_code == 200
    users.set_password(session, user=engineer, password="a-new-password-1")
    assert client.get("/api/v1/me").status_code == 401
    assert client.get("/api/v1/me", headers=bearer).status_code == 401


def test_admin_reset_through_the_page_ends_the_users_sessions(client, session):
    labeler = make_user(session)
    labeler_client = _second_client(client.app)
    login(labeler_client, labeler)
    csrf = login(client, make_user(session, role=Role.admin))
    response = client.post(f"/admin/users/{labeler.id}/password",
                           data={"password": "reset-by-admin-1", "csrf_token": csrf})
    assert response.status_code == 303
    assert labeler_client.get("/api/v1/me").status_code == 401


def test_password_change_signs_out_other_devices_and_keeps_this_one(client, session):
    engineer = make_user(session, role=Role.engineer)
    _, raw = auth.create_api_token(session, user=engineer, name="ci")
    other_device = _second_client(client.app)
    login(other_device, engineer)
    csrf = login(client, engineer)
    response = client.post("/account/password", data={
        "current_password": TEST_PASSWORD, "new_password": "changed-password-1", "csrf_token": csrf})
    assert response.status_code == 303
    assert client.get("/api/v1/me").status_code == 200
    assert other_device.get("/api/v1/me").status_code == 401
    # A change (not a reset) keeps the user's API tokens.
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {raw}"}).status_code == 200


def test_password_change_needs_the_current_password(client, session):
    user = make_user(session)
    csrf = login(client, user)
    response = client.post("/account/password", data={
        "current_password": "not-my-password", "new_password": "changed-password-1", "csrf_token": csrf})
    assert response.status_code == 422
    assert "current password is wrong" in response.text
    short = client.post("/account/password", data={
        "current_password": TEST_PASSWORD, "new_password": "short", "csrf_token": csrf})
    assert short.status_code == 422 and "at least 8 characters" in short.text
    assert client.get("/api/v1/me").status_code == 200


def test_deactivation_ends_sessions_for_good(client, session):
    user = make_user(session)
    login(client, user)
    users.set_active(session, user=user, active=False)
    users.set_active(session, user=user, active=True)
    # Re-activation does not bring the old session back.
    assert client.get("/api/v1/me").status_code == 401


def test_sign_out_everywhere_ends_every_session(client, session):
    user = make_user(session)
    other_device = _second_client(client.app)
    login(other_device, user)
    csrf = login(client, user)
    assert client.post("/account/sign-out-everywhere", data={"csrf_token": csrf}).status_code == 303
    assert client.get("/api/v1/me").status_code == 401
    assert other_device.get("/api/v1/me").status_code == 401


def test_sign_out_everywhere_needs_a_signed_in_user(client):
    response = client.post("/account/sign-out-everywhere", data={"csrf_token": csrf_of(client)})
    assert response.status_code in (302, 303) and response.headers["location"].startswith("/login")


def test_idle_session_ends_after_the_idle_timeout(client, session):
    user = make_user(session)
    login(client, user)
    row = _session_row(session, user)
    row.last_seen_at = utcnow() - timedelta(hours=12, seconds=1)  # the default idle timeout
    session.flush()
    assert client.get("/api/v1/me").status_code == 401
    assert session.scalars(select(UserSession).where(UserSession.user_id == user.id)).all() == []


def test_idle_timeout_and_lifetime_come_from_settings(client, session, settings):
    client.app.state.settings = settings.model_copy(update={"session_idle_s": 60, "session_max_age_s": 3600})
    user = make_user(session)
    login(client, user)
    row = _session_row(session, user)
    row.last_seen_at = utcnow() - timedelta(seconds=50)
    session.flush()
    assert client.get("/api/v1/me").status_code == 200
    row.last_seen_at = utcnow() - timedelta(seconds=61)
    session.flush()
    assert client.get("/api/v1/me").status_code == 401

    login(client, user)
    row = _session_row(session, user)
    row.created_at = utcnow() - timedelta(seconds=3601)  # in use a second ago, but past its lifetime
    session.flush()
    assert client.get("/api/v1/me").status_code == 401


def test_last_seen_is_written_at_most_once_a_minute(session):
    user = make_user(session)
    start = utcnow()
    raw = sessions.start_session(session, user=user, max_age_s=3600, idle_s=600, now=start)
    row = _session_row(session, user)
    assert sessions.user_for_session(session, raw, max_age_s=3600, idle_s=600,
                                     now=start + timedelta(seconds=30)).id == user.id
    assert row.last_seen_at == start
    later = start + timedelta(seconds=61)
    assert sessions.user_for_session(session, raw, max_age_s=3600, idle_s=600, now=later).id == user.id
    assert row.last_seen_at == later


def test_cookie_holds_a_token_whose_hash_alone_is_stored(client, session):
    user = make_user(session)
    login(client, user)
    payload = client.cookies.get("rlhf_session").split(".")[0]
    data = json.loads(base64.b64decode(payload + "=" * (-len(payload) % 4)))
    assert set(data) == {"sid", "csrf"}  # no user id: only the server knows whose session it is
    assert _session_row(session, user).id == hashlib.sha256(data["sid"].encode()).hexdigest()
