"""Dependency aliases, declared once: the session, the current user, role checks."""

import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.config import Settings
from app.db.enums import Role
from app.db.models import User
from app.db import session as db_session
from app.services import auth, sessions
from app.services.errors import NotAllowed, NotAuthenticated

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
# The key of the server-side session's token in the signed cookie.
SESSION_KEY = "sid"


# Dependencies that do no I/O are `async def`: FastAPI runs a plain `def` one in
# the thread pool, and each such hop costs more than the work (see README,
# "Performance of the labeling loop"). Those that talk to the database stay plain
# functions.

async def get_session() -> AsyncIterator[Session]:
    """The request's database session. Opening one does no I/O (a connection is
    taken on first use), and neither does closing one whose transaction ended
    (committed): only a session still in a transaction is closed in the thread
    pool, as giving its connection back rolls it back."""
    if db_session.is_configured():
        session = db_session.new_session()
    else:  # the first request of the process may start the embedded database
        session = await run_in_threadpool(db_session.new_session)
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


async def get_app_settings(request: Request) -> Settings:
    # The settings the app was created with (create_app keeps them in app.state).
    return request.app.state.settings


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def get_optional_user(request: Request, session: SessionDep, settings: SettingsDep) -> User | None:
    """The user of a bearer token or of the session cookie; None when anonymous.
    The cookie holds a server-side session's token, so revoked, expired and
    idle sessions end at once, whatever the signed cookie still says."""
    raw = _bearer(request)
    if raw is not None:
        user = auth.user_for_token(session, raw)
        if user is None:
            raise NotAuthenticated("The API token is unknown, revoked, or its user is deactivated.")
    else:
        token = request.session.get(SESSION_KEY)
        user = None
        if isinstance(token, str):
            user = sessions.user_for_session(
                session, token, max_age_s=settings.session_max_age_s, idle_s=settings.session_idle_s
            )
            if user is None:
                request.session.clear()
    request.state.user = user
    return user


def sign_in(request: Request, session: Session, settings: Settings, user: User) -> None:
    """Start a server-side session for user and put its token in this browser's
    cookie; the rest of the cookie (CSRF token, flashes) starts afresh."""
    request.session.clear()
    request.session[SESSION_KEY] = sessions.start_session(
        session, user=user, max_age_s=settings.session_max_age_s, idle_s=settings.session_idle_s
    )


def sign_out(request: Request, session: Session) -> None:
    """End this browser's server-side session and empty its cookie."""
    token = request.session.get(SESSION_KEY)
    if isinstance(token, str):
        sessions.end_session(session, token)
    request.session.clear()


OptionalUser = Annotated[User | None, Depends(get_optional_user)]


async def get_current_user(user: OptionalUser) -> User:
    if user is None:
        raise NotAuthenticated("Please sign in.")
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


class RequireRole:
    """Passes users with one of the roles (admins always pass); 403 for others."""

    def __init__(self, *roles: Role):
        self.roles = roles

    async def __call__(self, user: CurrentUser) -> User:
        if not user.can(*self.roles):
            wanted = " or ".join(r.value for r in self.roles) or "admin"
            raise NotAllowed(f"This page is for {wanted} accounts.")
        return user


AdminUser = Annotated[User, Depends(RequireRole(Role.admin))]
EngineerUser = Annotated[User, Depends(RequireRole(Role.engineer))]
LabelerUser = Annotated[User, Depends(RequireRole(Role.labeler))]


async def verify_csrf(request: Request, user: OptionalUser) -> None:
    """Every state-changing request made with the session cookie must carry the
    session's CSRF token, in the X-CSRF-Token header (htmx) or a csrf_token field."""
    if request.method in SAFE_METHODS or _bearer(request) is not None:
        return
    expected = request.session.get("csrf")
    sent = request.headers.get("X-CSRF-Token")
    if not sent:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data") and user is None:
            # A multipart body is parsed (files spooled to disk) only for a signed-in user:
            # no signed-out visitor's upload is ever read. (Sign-in forms are urlencoded.)
            raise NotAuthenticated("Please sign in.")
        if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            sent = (await request.form()).get("csrf_token")
    if not expected or not isinstance(sent, str) or not hmac.compare_digest(expected, sent):
        raise NotAllowed("The form has expired or lacks its security token; reload the page and try again.")
