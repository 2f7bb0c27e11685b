"""Demonstrations as a writer makes them: lease the next prompt of a demonstration set,
submit an answer (both through the demonstration service)."""

from datetime import datetime

from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import Demonstration, User
from app.services import demonstrations as demos

LEASE_S = 1800  # how long a leased prompt stays the writer's


def lease_demo(session: Session, user: User, now: datetime | None = None) -> Demonstration | None:
    """The writer's next prompt (a draft demonstration), None when none is left."""
    return demos.lease_next_demonstration(session, user=user, now=now or utcnow(), lease_s=LEASE_S)


def submit_demo(session: Session, user: User, demo: Demonstration, text: str = "A fine answer.",
                now: datetime | None = None) -> demos.SubmitResult:
    """The draft submitted with `text`."""
    return demos.submit_demonstration(session, user=user, demonstration_id=demo.id, text=text,
                                      now=now or utcnow(), lease_s=LEASE_S)
