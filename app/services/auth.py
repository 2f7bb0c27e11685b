"""Logging in, rate limiting failed logins, and personal API tokens."""

import hashlib
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.enums import Role
from app.db.models import ApiToken, LoginAttempt, User
from app.services.errors import Invalid, NotAllowed, NotFound, RateLimited
from app.services.sessions import TOUCH_EVERY
from app.services.users import get_user_by_name, verify_password
from app.services.validation import check_text

TOKEN_PREFIX = "rlhf_"


# First key of pg_advisory_xact_lock(int, int) for sign-in attempts; the second is the address's hash.
_LOGIN_LOCK = 0x51C_1A


def authenticate(
    session: Session,
    *,
    username: str,
    password: str,
    address: str,
    max_failures: int,
    max_address_failures: int,
    window_s: int,
    now: datetime | None = None,
) -> User:
    """The user for these credentials. Raises RateLimited after max_failures failures
    for this account from this address, or max_address_failures from this address
    in all, within the window; Invalid for wrong credentials.

    Failures are never counted per account alone, so guessing from one address
    cannot lock the owner out from another. Checking the counts and recording the
    attempt are serialised per address, so parallel guesses get at most the limit
    verified."""
    now = now or utcnow()
    # NUL can be neither queried nor stored, and no username holds one (users.USERNAME_RE).
    username = username.strip().replace("\x00", "")
    address = address[:64]
    since = now - timedelta(seconds=window_s)
    # Held until the commit below; both counts are of this address's attempts.
    session.execute(select(func.pg_advisory_xact_lock(_LOGIN_LOCK, func.hashtext(address))))
    # Attempts older than the window count for nothing: pruned here, so the table holds
    # about one window of attempts (a range scan of ix_login_attempts_at).
    session.execute(delete(LoginAttempt).where(LoginAttempt.at < since))
    failed = LoginAttempt.succeeded.is_(False)
    by_pair, by_address = session.execute(
        select(
            func.count().filter(failed, LoginAttempt.username == username[:64]),
            func.count().filter(failed),
        ).where(LoginAttempt.address == address, LoginAttempt.at >= since)
    ).one()
    if by_pair >= max_failures or by_address >= max_address_failures:
        session.commit()  # nothing written; releases the lock
        minutes = max(1, window_s // 60)
        raise RateLimited(
            f"Too many failed sign-in attempts from your address. Try again in {minutes} minutes."
        )
    # Recorded as a failure before the (slow) password check and committed at once:
    # the lock is released for the check, yet a parallel guess already counts this one.
    attempt = LoginAttempt(username=username[:64], address=address, succeeded=False, at=now)
    session.add(attempt)
    session.commit()
    user = get_user_by_name(session, username)
    ok = verify_password(password, user.password_hash if user else None)
    # An AI labeler never signs in (app/services/ai_labelers): refused like a wrong password.
    if not ok or user is None or not user.is_active or user.is_ai:
        raise Invalid("Wrong username or password, or the account is deactivated.")
    attempt.succeeded = True
    user.last_login_at = now
    session.commit()
    return user


def _token_hash(raw: str) -> str:
    # Tokens are 256 random bits: a fast hash is enough (no dictionary to guess from).
    return hashlib.sha256(raw.encode()).hexdigest()


def create_api_token(session: Session, *, user: User, name: str) -> tuple[ApiToken, str]:
    """A new bearer token; the raw value is returned once and only its hash is stored."""
    if not user.can(Role.engineer):
        raise NotAllowed("Only engineers and admins can create API tokens.")
    name = check_text(name.strip(), "name")
    if not name or len(name) > 100:
        raise Invalid("Give the token a name of 1-100 characters.", errors={"name": "1-100 characters"})
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(user=user, name=name, prefix=raw[:12], token_hash=_token_hash(raw))
    session.add(token)
    session.commit()
    return token, raw


def list_api_tokens(session: Session, *, user: User) -> Sequence[ApiToken]:
    return session.scalars(
        select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.created_at.desc())
    ).all()


def revoke_api_token(session: Session, *, user: User, token_id: int) -> None:
    token = session.get(ApiToken, token_id)
    if token is None or token.user_id != user.id:
        raise NotFound(f"No token with id {token_id}.")
    token.revoked_at = token.revoked_at or utcnow()
    session.commit()


def user_for_token(session: Session, raw: str, *, now: datetime | None = None) -> User | None:
    """The active user owning this unrevoked token, or None. One indexed read per call;
    last_used_at is written at most once a minute (as a session's last_seen_at)."""
    now = now or utcnow()
    row = session.execute(
        select(ApiToken, User).join(User, ApiToken.user_id == User.id)
        .where(ApiToken.token_hash == _token_hash(raw))
    ).first()
    if row is None:
        return None
    token, user = row
    if token.revoked_at is not None or not user.is_active or user.is_ai:
        return None
    if token.last_used_at is None or now - token.last_used_at >= TOUCH_EVERY:
        token.last_used_at = now
        session.commit()
    return user
