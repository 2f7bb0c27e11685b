"""Accounts: every test user has the same password."""

import itertools

from sqlalchemy.orm import Session

from app.db.enums import Role
from app.db.models import User
from app.services.users import hash_password

TEST_PASSWORD = "correct-horse-9"

_counter = itertools.count(1)


def make_user(session: Session, *, role: Role | str = Role.labeler, username: str | None = None,
              password: str = TEST_PASSWORD, is_active: bool = True) -> User:
    role = Role(role)
    user = User(
        username=username or f"{role.value}{next(_counter)}",
        role=role,
        password_hash=hash_password(password),
        is_active=is_active,
    )
    session.add(user)
    session.flush()
    return user
