"""Server-side sign-in sessions: started at sign-in, checked on every request,
ended by sign-out, expiry, a password change or reset, and deactivation."""

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import ApiToken, User, UserSession

# last_seen_at is written at most this often: a labeler moving fast through
# tasks costs one indexed read per request, not a write.
TOUCH_EVERY = timedelta(minutes=1)


def _hash(raw: str) -> str:
    # Session tokens are 256 random bits: a fast hash is enough, and a leaked
    # table row cannot be replayed as a cookie.
    return hashlib.sha256(raw.encode()).hexdigest()


def start_session(session: Session, *, user: User, max_age_s: int, idle_s: int, now: datetime | None = None) -> str:
    """A new session for user; returns the raw token for the cookie (only its hash is stored).
    Expired sessions of all users are deleted on the way."""
    now = now or utcnow()
    session.execute(delete(UserSession).where(or_(
        UserSession.created_at < now - timedelta(seconds=max_age_s),
        UserSession.last_seen_at < now - timedelta(seconds=idle_s),
    )))
    raw = secrets.token_urlsafe(32)
    session.add(UserSession(id=_hash(raw), user_id=user.id, created_at=now, last_seen_at=now))
    session.commit()
    return raw


def user_for_session(
    session: Session, raw: str, *, max_age_s: int, idle_s: int, now: datetime | None = None
) -> User | None:
    """The active user of this live session, or None when it is unknown, revoked,
    past its absolute lifetime or idle too long. One indexed read per call."""
    now = now or utcnow()
    row = session.execute(
        select(UserSession, User).join(User, UserSession.user_id == User.id).where(UserSession.id == _hash(raw))
    ).first()
    if row is None:
        return None
    user_session, user = row
    expired = (now - user_session.created_at > timedelta(seconds=max_age_s)
               or now - user_session.last_seen_at > timedelta(seconds=idle_s))
    if expired or not user.is_active:
        session.delete(user_session)
        session.commit()
        return None
    if now - user_session.last_seen_at >= TOUCH_EVERY:
        user_session.last_seen_at = now
        session.commit()
    return user


def end_session(session: Session, raw: str) -> None:
    """Sign-out: the session is deleted, so its cookie no longer signs anyone in."""
    session.execute(delete(UserSession).where(UserSession.id == _hash(raw)))
    session.commit()


def revoke_sessions(session: Session, *, user: User, api_tokens: bool = False, now: datetime | None = None) -> None:
    """End every session of user (and revoke their API tokens when asked), in the
    caller's transaction: the caller commits together with the change that calls for it."""
    session.execute(delete(UserSession).where(UserSession.user_id == user.id))
    if api_tokens:
        session.execute(
            update(ApiToken)
            .where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
            .values(revoked_at=now or utcnow())
        )


def end_all_sessions(session: Session, *, user: User) -> None:
    """Sign user out on every device ("sign out everywhere")."""
    revoke_sessions(session, user=user)
    session.commit()
