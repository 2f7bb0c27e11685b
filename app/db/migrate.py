"""Run Alembic programmatically, on the process's engine."""

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from app.db.session import get_engine

ROOT = Path(__file__).resolve().parents[2]

# The job queue (procrastinate) owns its tables; our first migration installs
# them, but autogenerate must not propose dropping them.
QUEUE_PREFIX = "procrastinate_"


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    if type_ == "table" and name and name.startswith(QUEUE_PREFIX):
        return False
    table = getattr(getattr(obj, "table", None), "name", "") or ""
    return not table.startswith(QUEUE_PREFIX)


def alembic_config(engine: Engine | None = None) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["engine"] = engine
    return cfg


def _with_connection(fn, engine: Engine | None, *args) -> None:
    engine = engine or get_engine()
    with engine.begin() as connection:
        cfg = alembic_config(engine)
        cfg.attributes["connection"] = connection
        fn(cfg, *args)


def upgrade(revision: str = "head", engine: Engine | None = None) -> None:
    _with_connection(command.upgrade, engine, revision)


def downgrade(revision: str, engine: Engine | None = None) -> None:
    _with_connection(command.downgrade, engine, revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine | None = None) -> str | None:
    engine = engine or get_engine()
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
