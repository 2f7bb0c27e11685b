"""Accounts: creation, passwords, activation."""

import re
import secrets
from collections.abc import Sequence
from datetime import datetime

from pwdlib import PasswordHash
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from app.db.enums import AssignmentStatus, Role
from app.db.models import Assignment, User
from app.services.errors import Conflict, Invalid, NotAllowed, NotFound
from app.services.sessions import revoke_sessions

_hasher = PasswordHash.recommended()  # argon2id
# A hash of a random password, verified against when the user does not exist,
# so a login for an unknown name takes as long as one for a known name.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{2,64}$")
MIN_PASSWORD_LENGTH = 8


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password: str, password_hash: str | None) -> bool:
    if password_hash is None:
        _hasher.verify(password, _DUMMY_HASH)
        return False
    return _hasher.verify(password, password_hash)


def check_password_rules(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise Invalid(
            f"Password must be at least {MIN_PASSWORD_LENGTH} characters.",
            errors={"password": f"at least {MIN_PASSWORD_LENGTH} characters"},
        )


def check_new_password(user: User, password: str) -> None:
    """Whether `password` may become the user's: raises Conflict for an AI labeler (it has
    no password and never signs in), Invalid for a password too short."""
    if user.is_ai:
        raise Conflict(f"'{user.username}' is an AI labeler: it has no password and never signs in.")
    check_password_rules(password)


def get_user(session: Session, user_id: int) -> User:
    """The user with this id; raises NotFound."""
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"No user with id {user_id}.")
    return user


def get_user_by_name(session: Session, username: str) -> User | None:
    return session.scalar(select(User).where(User.username == username))


def list_users(session: Session, *, role: Role | None = None) -> Sequence[User]:
    query = select(User).order_by(User.username).options(selectinload(User.judge_model))
    if role is not None:
        query = query.where(User.role == role)
    return session.scalars(query).all()


def create_user(session: Session, *, username: str, password: str, role: Role | str) -> User:
    """Create an active account; raises Invalid for a bad name/password/role, Conflict if taken."""
    username = username.strip()
    if not USERNAME_RE.match(username):
        raise Invalid(
            "Username must be 2-64 letters, digits or . _ @ -",
            errors={"username": "2-64 letters, digits or . _ @ -"},
        )
    try:
        role = Role(role)
    except ValueError:
        choices = ", ".join(r.value for r in Role)
        raise Invalid(f"Unknown role '{role}'; choose one of {choices}.", errors={"role": "unknown role"})
    check_password_rules(password)
    if get_user_by_name(session, username) is not None:
        raise Conflict(f"A user named '{username}' already exists.", errors={"username": "already taken"})
    user = User(username=username, role=role, password_hash=hash_password(password))
    session.add(user)
    session.commit()
    return user


def set_password(session: Session, *, user: User, password: str) -> None:
    """Reset user's password (an admin or the CLI): every session of theirs ends
    and their API tokens are revoked, since whoever had the old password may hold them."""
    check_new_password(user, password)
    user.password_hash = hash_password(password)
    revoke_sessions(session, user=user, api_tokens=True)
    session.commit()


def change_password(session: Session, *, user: User, current_password: str, new_password: str) -> None:
    """The user's own change of password, proven by the current one; ends every
    session of theirs. Raises Invalid for a wrong current or a too short new password."""
    if not verify_password(current_password, user.password_hash):
        raise Invalid("The current password is wrong.", errors={"current_password": "wrong password"})
    check_password_rules(new_password)
    user.password_hash = hash_password(new_password)
    revoke_sessions(session, user=user)
    session.commit()


def set_active(session: Session, *, user: User, active: bool, by: User | None = None,
               now: datetime | None = None) -> None:
    """Activate or deactivate; a deactivated labeler's open leases are released at once.
    `by` is the admin doing it (None: the command line). Raises NotAllowed when an
    admin would deactivate their own account (no one might be left to undo it)."""
    if by is not None and by.id == user.id and not active:
        raise NotAllowed("You cannot deactivate your own account; ask another admin.")
    user.is_active = active
    if not active:
        from app.db.base import utcnow

        revoke_sessions(session, user=user)
        for assignment in session.scalars(
            select(Assignment).where(
                Assignment.user_id == user.id, Assignment.status == AssignmentStatus.active
            )
        ):
            assignment.status = AssignmentStatus.released
            assignment.finished_at = now or utcnow()
    session.commit()


def ensure_first_admin(
    session: Session, *, username: str, password: str | None
) -> tuple[User | None, str | None]:
    """Create an admin if there is none. Returns (admin, generated password or None)."""
    if session.scalar(select(User.id).where(User.role == Role.admin).limit(1)) is not None:
        return None, None
    generated = None
    if not password:
        password = generated = secrets.token_urlsafe(12)
    user = create_user(session, username=username, password=password, role=Role.admin)
    return user, generated
