"""Liveness and readiness probes (no authentication, for load balancers)."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.db import migrate
from app.db.session import get_engine

router = APIRouter(include_in_schema=False)


@router.get("/healthz")
def healthz():
    return {"status": "ok"}


@router.get("/readyz")
def readyz():
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
        current = migrate.current_revision()
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        return JSONResponse({"status": "unavailable", "database": f"unreachable: {type(exc).__name__}"}, 503)
    head = migrate.head_revision()
    if current != head:
        return JSONResponse({"status": "unavailable", "database": "ok", "migrations": f"at {current}, head is {head}"}, 503)
    return {"status": "ok", "database": "ok", "migrations": current}
