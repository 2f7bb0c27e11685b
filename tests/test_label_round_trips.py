"""How many round trips to the database the labeling loop costs.

The labeling loop (GET /api/v1/label/next, POST /api/v1/label/{task}) is what
labelers wait on, many at once: every statement is a round trip to PostgreSQL
and CPU on both sides. These tests count what each request sends on the app's
own engine (real commits, as in production) and fail when someone adds one, so
a new round trip on the hot path is a decision, not an accident. The figures
are in README ("Performance of the labeling loop").
"""

import re
from collections import Counter
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from app.config import Settings
from app.db import session as db_session
from tests.conftest import login
from tests.factories import make_prompt_set, make_task, make_user

# Most round trips each request may make: statements, COMMIT and ROLLBACK, and the
# pool's liveness check of each connection taken (pool_pre_ping).
NEXT_NEW_LEASE = 9
NEXT_SAME_LEASE = 6
SUBMIT = 7


@contextmanager
def counting(engine):
    """Counts what the engine sends: statements by their first word, and COMMITs."""
    counts: Counter = Counter()

    def on_execute(conn, cursor, statement, parameters, context, executemany):
        counts[re.match(r"\s*(\w+)", statement).group(1).upper()] += 1

    def on_commit(conn):
        counts["COMMIT"] += 1

    def on_rollback(conn):
        counts["ROLLBACK"] += 1

    def on_checkout(dbapi_conn, record, proxy):
        counts["CHECKOUT"] += 1

    hooks = [(engine, "before_cursor_execute", on_execute), (engine, "commit", on_commit),
             (engine, "rollback", on_rollback), (engine.pool, "checkout", on_checkout)]
    for target, name, fn in hooks:
        event.listen(target, name, fn)
    try:
        yield counts
    finally:
        for target, name, fn in hooks:
            event.remove(target, name, fn)


def _round_trips(engine, counts: Counter) -> int:
    pings = counts["CHECKOUT"] if engine.pool._pre_ping else 0
    return pings + sum(v for k, v in counts.items() if k != "CHECKOUT")


@pytest.fixture
def live_client(engine, committed, tmp_path):
    """The app on the app's own engine and sessions (no test transaction around them)."""
    from app.main import create_app

    app = create_app(Settings(data_dir=tmp_path, secret_key="round-trips-secret"))
    with TestClient(app, follow_redirects=False) as client:
        yield client


def test_the_labeling_loop_sends_few_statements(engine, live_client):
    with db_session.session_scope() as s:
        labeler = make_user(s)
        prompt_set = make_prompt_set(s, k=4, overlap=3)
        for _ in range(3):
            make_task(s, prompt_set)
    token = login(live_client, labeler)
    headers = {"X-CSRF-Token": token}
    for round_ in range(2):
        with counting(engine) as new_lease:
            task = live_client.get("/api/v1/label/next").json()["task"]
        with counting(engine) as same_lease:
            assert live_client.get("/api/v1/label/next").json()["task"]["id"] == task["id"]
        ids = [r["id"] for r in task["responses"]]
        body = {"idempotency_key": f"round-trips-{round_}-{task['id']}",
                "ratings": {str(rid): 7 - i for i, rid in enumerate(ids)},
                "ranks": {str(rid): i + 1 for i, rid in enumerate(ids)}}
        with counting(engine) as submit:
            answer = live_client.post(f"/api/v1/label/{task['id']}", json=body, headers=headers)
        assert answer.status_code == 201, answer.text
    assert _round_trips(engine, new_lease) <= NEXT_NEW_LEASE, dict(new_lease)
    assert _round_trips(engine, same_lease) <= NEXT_SAME_LEASE, dict(same_lease)
    assert _round_trips(engine, submit) <= SUBMIT, dict(submit)
