"""Alembic environment: migrates the database the app is configured for."""

from alembic import context

from app.db import models  # noqa: F401  (registers the tables)
from app.db.base import Base
from app.db.session import get_engine

# The job queue (procrastinate) owns its tables; our migrations install them
# but autogenerate must not try to drop them.
QUEUE_PREFIX = "procrastinate_"


def include_object(obj, name, type_, reflected, compare_to):
    if type_ == "table" and name and name.startswith(QUEUE_PREFIX):
        return False
    if type_ in ("index", "unique_constraint", "foreign_key_constraint"):
        table = getattr(getattr(obj, "table", None), "name", "") or ""
        if table.startswith(QUEUE_PREFIX):
            return False
    return True


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        with get_engine().connect() as connection:
            _run(connection)
    else:
        _run(connection)


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        include_object=include_object,
        compare_type=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
