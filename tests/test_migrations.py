"""The migrations build the schema the models describe, and undo it."""

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import make_url

from app.db import migrate
from app.db.migrate import include_object
from app.db.base import Base
from tests.conftest import drop_database, recreate_database



def test_upgrade_matches_models_and_downgrade_removes_everything(database_url):
    url = make_url(database_url)
    scratch = url.set(database=f"{url.database}_migrations").render_as_string(hide_password=False)
    recreate_database(scratch)
    engine = create_engine(scratch)
    try:
        migrate.upgrade("head", engine=engine)
        assert migrate.current_revision(engine) == migrate.head_revision()
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"include_object": include_object, "compare_type": True,
                            "compare_server_default": True}
            )
            diff = compare_metadata(context, Base.metadata)
        assert diff == [], f"models and migrations differ: {diff}"
        tables = set(inspect(engine).get_table_names())
        assert {"users", "annotations", "comparisons", "jobs", "procrastinate_jobs"} <= tables

        migrate.downgrade("base", engine=engine)
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        # And back up again: downgrade left nothing behind that blocks a re-install.
        migrate.upgrade("head", engine=engine)
    finally:
        engine.dispose()
        drop_database(scratch)
