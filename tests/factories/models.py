"""Registered models, written with the ORM (no files are checked)."""

import itertools
from pathlib import Path

from sqlalchemy.orm import Session

from app.db.enums import ModelKind
from app.db.models import Model

_counter = itertools.count(1)


def make_model(session: Session, path: Path | str = "models/x", *, name: str | None = None,
               kind: ModelKind = ModelKind.sft, is_default: bool = False) -> Model:
    model = Model(name=name or f"model-{next(_counter)}", kind=kind, path=str(path), source="test",
                  is_default=is_default)
    session.add(model)
    session.flush()
    return model
