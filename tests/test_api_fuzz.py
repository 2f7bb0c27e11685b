"""Property-based fuzzing of the whole JSON API with schemathesis.

Every operation under /api/v1 gets generated requests (valid and invalid ones:
huge ids, odd strings, missing fields...) as each role: the admin and the
labeler with their signed-in cookie and CSRF header, the engineer with a bearer
token. Two checks on every response: no server error, and the body matches the
response schema the OpenAPI document declares for its status.

Generated ids are swapped, for most examples, for real ones seeded in the
database (a prompt set with tasks leased to the labeler, a demonstration, jobs,
models), so requests reach past the 404s into the services. Each (operation,
role) runs in its own rolled-back transaction, so a generated request that
archives a set or deactivates a user never disturbs the next operation.
"""

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, settings
from pwdlib.hashers.argon2 import Argon2Hasher
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from app.config import Settings
from app.db.base import utcnow
from app.db.enums import JobKind, JobStatus, ModelKind, PromptSetKind, Role
from app.db.models import Job, JobMetric, User
from app.main import create_app
from app.routes.deps import get_session
from app.services import assignment, auth, jobs
from app.services import demonstrations as demos
from tests.conftest import login
from tests.factories import TEST_PASSWORD, add_prompt, make_model, make_prompt_set, make_task
from tests.test_roles import ROUTES

# Examples per operation for each role it serves, and for each role it refuses (the
# refusal is checked, the generated input matters less). Schemathesis sends a few
# requests per example (valid and invalid ones, other methods): about 3,000 in all,
# 1.5 minutes on the 2-core CI machine.
MAX_EXAMPLES = 8
MAX_EXAMPLES_REFUSED = 2
ROLES = ("admin", "engineer", "labeler")
# Who may use each access level of tests/test_roles.py (admins pass every role check).
SERVED = {"public": set(ROLES), "user": set(ROLES), "labeler": {"labeler", "admin"},
          "engineer": {"engineer", "admin"}, "admin": {"admin"}}
# Share of generated ids replaced with a real one (the rest stay as generated: huge, zero, negative...).
REAL_ID_SHARE = 0.7

APP = create_app(Settings(secret_key="fuzz-secret"))  # with a key set, nothing is written to the data dir
schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", APP)
# For the roles an operation refuses: no coverage phase (every boundary case of the
# schema, whatever max_examples says); a few generated requests show the refusal is clean.
refusing_schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", APP)
refusing_schema.config.phases.update(phases=["examples", "fuzzing"])
# Argon2id with the cheapest parameters: signing in verifies with the parameters stored
# in the hash, so the sign-ins of this module take milliseconds, not half a minute.
PASSWORD_HASH = Argon2Hasher(time_cost=1, memory_cost=1024, parallelism=1).hash(TEST_PASSWORD)


@dataclass
class Tally:
    operations: set[str] = field(default_factory=set)
    examples: int = 0
    server_errors: list[str] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)  # responses by status code


TALLY = Tally()


@dataclass
class World:
    headers: dict[str, dict[str, str]]
    ids: dict[str, list[int]]


def _user(session, role: Role, name: str) -> User:
    user = User(username=name, role=role, password_hash=PASSWORD_HASH, is_active=True)
    session.add(user)
    session.flush()
    return user


def _served(node_name: str, role: str) -> bool:
    # Node names read "test_...[GET /api/v1/jobs/{job_id}][engineer]".
    operation = node_name.split("[", 1)[1].split("]", 1)[0]
    return role in SERVED[ROUTES[operation]]


@pytest.fixture
def world(session, tmp_path, request) -> World:
    """Users of each role and one of everything the API addresses by id, in the test's transaction."""
    role = request.node.callspec.params["role"]
    if _served(request.node.name, role) != request.node.name.startswith("test_api_as_a_role_it_serves["):
        pytest.skip("the other test covers this role")
    APP.dependency_overrides[get_session] = lambda: session
    now = utcnow()
    admin = _user(session, Role.admin, "fuzz-admin")
    engineer = _user(session, Role.engineer, "fuzz-engineer")
    labeler = _user(session, Role.labeler, "fuzz-labeler")
    other = _user(session, Role.labeler, "fuzz-other")

    sft = make_model(session, tmp_path, name="fuzz-sft", is_default=True)
    reward = make_model(session, tmp_path, name="fuzz-rm", kind=ModelKind.reward)
    ranking = make_prompt_set(session, k=2)
    tasks = [make_task(session, ranking) for _ in range(2)]
    demo_set = make_prompt_set(session, kind=PromptSetKind.demonstration)
    add_prompt(session, demo_set, "Why is the sky blue?")
    add_prompt(session, demo_set, "Name a prime number.")
    session.commit()
    assignment.lease_next_task(session, user=labeler, now=now, lease_s=3600)
    demo = demos.lease_next_demonstration(session, user=labeler, now=now, lease_s=3600)
    queued = jobs.enqueue_job(session, kind=JobKind.generate, params={"n": 1}, prompt_set_id=ranking.id)
    failed = Job(kind=JobKind.train_reward, status=JobStatus.failed, params={}, queue="gpu", error="boom",
                 finished_at=now)
    session.add(failed)
    session.flush()
    session.add(JobMetric(job_id=failed.id, step=1, name="loss", value=0.5))
    session.commit()

    _, raw = auth.create_api_token(session, user=engineer, name="fuzz")
    headers = {"engineer": {"Authorization": f"Bearer {raw}"}}
    if role in ("admin", "labeler"):  # signed in through the login form, like a browser
        with TestClient(APP, follow_redirects=False) as client:
            token = login(client, admin if role == "admin" else labeler)
            headers[role] = {"X-CSRF-Token": token, "Cookie": f"rlhf_session={client.cookies['rlhf_session']}"}
    ids = {
        "prompt_set_id": [ranking.id, demo_set.id], "task_id": [t.id for t in tasks],
        "job_id": [queued.id, failed.id], "model_id": [sft.id, reward.id],
        "demonstration_id": [demo.id], "user_id": [labeler.id, other.id],
        "base_model_id": [sft.id], "policy_model_id": [sft.id], "reference_model_id": [sft.id],
        "reward_model_id": [reward.id], "generator_model_id": [sft.id],
    }
    ids["prompt_set_ids"] = ids["sft_set_ids"] = ids["prompt_set_id"]
    ids["labeler_ids"] = ids["user_id"]
    yield World(headers=headers, ids=ids)
    APP.dependency_overrides.clear()


def _swap_ids(values: dict[str, Any] | None, ids: dict[str, list[int]], rng: random.Random) -> None:
    """Replace most generated ids by real ones, in place."""
    if not isinstance(values, dict):
        return
    for name, value in values.items():
        real = ids.get(name)
        if real is None or rng.random() > REAL_ID_SHARE:
            continue
        values[name] = [rng.choice(real)] if isinstance(value, list) else rng.choice(real)


def _run(case, role: str, world: World, session) -> None:
    rng = random.Random(repr((case.path_parameters, case.query, case.body)))
    for part in (case.path_parameters, case.query, case.body):
        _swap_ids(part, world.ids, rng)
    TALLY.operations.add(case.operation.label)
    TALLY.examples += 1
    where = f"{role} {case.method} {case.formatted_path}"
    try:
        response = case.call(headers=world.headers[role])
    except Exception as exc:  # an exception that escaped the app is a server error too
        TALLY.server_errors.append(f"{where}: {exc!r}")
        session.rollback()
        raise
    if response.status_code >= 500:
        TALLY.server_errors.append(f"{where}: {response.status_code}")
        session.rollback()  # the app's own sessions end with the request; this shared one must too
    TALLY.statuses[response.status_code] += 1
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])


FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate])  # no shrinking: the report lists the request as sent


@schema.parametrize()
@pytest.mark.parametrize("role", ROLES)
@settings(max_examples=MAX_EXAMPLES, **FUZZ)
def test_api_as_a_role_it_serves(case, role, world, session):
    _run(case, role, world, session)


@refusing_schema.parametrize()
@pytest.mark.parametrize("role", ROLES)
@settings(max_examples=MAX_EXAMPLES_REFUSED, **FUZZ)
def test_api_as_a_role_it_refuses(case, role, world, session):
    _run(case, role, world, session)


def test_fuzz_found_no_server_errors(capsys):
    """Runs after the operations above (pytest keeps the file's order): prints the figures."""
    with capsys.disabled():
        print(f"\nschemathesis: {len(TALLY.operations)} operations, {TALLY.examples} examples (requests),"
              f" {len(TALLY.server_errors)} server errors")
        for error in TALLY.server_errors[:30]:
            print(f"  {error}")
        print(f"  responses by status: {dict(sorted(TALLY.statuses.items()))}")
    assert TALLY.examples, "no operation ran"
    assert not TALLY.server_errors


def test_error_responses_are_declared_as_the_problems_they_are():
    """FastAPI's default 422 (HTTPValidationError, application/json) is not what app/errors.py sends."""
    doc = APP.openapi()
    assert "HTTPValidationError" not in json.dumps(doc)
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            for status in ("4XX", "5XX"):
                content = operation["responses"][status]["content"]
                assert content["application/problem+json"]["schema"]["title"] == "Problem", (method, path)
