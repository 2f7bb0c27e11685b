"""Bulk inserts that skip rows already there (INSERT ... ON CONFLICT DO NOTHING) and say
which went in (RETURNING).

Through the Core connection, which sends the rows as multi-row INSERTs
(insertmanyvalues). Given the same rows as executemany parameters, the ORM's bulk
insert runs an ON CONFLICT ... RETURNING insert one row at a time and splices the
results quadratically: 10k prompts took 20 s instead of 1.
"""

from collections.abc import Sequence
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session


def insert_new(session: Session, model: type, rows: Sequence[dict[str, Any]], *, conflict: Sequence[str],
               returning: Any) -> list[Any]:
    """Insert rows of `model` (keyed by attribute name, as the ORM names them), skipping any that
    conflict on the unique columns `conflict`; the `returning` column of the rows that went in."""
    if not rows:
        return []
    column_of = {attr.key: attr.columns[0].key for attr in inspect(model).column_attrs}  # Prompt.meta: "metadata"
    statement = pg_insert(model).on_conflict_do_nothing(index_elements=list(conflict)).returning(returning)
    params = [{column_of[key]: value for key, value in row.items()} for row in rows]
    return list(session.connection().execute(statement, params).scalars())
