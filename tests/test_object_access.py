"""Object-level access: every route that takes an object id, tried with REAL ids
by every user who may not see that object.

tests/test_roles.py tries each route with ids that do not exist. Here the ids are
those of a small world of real objects whose every text is marked SECRET: a
labeler's leased task and annotated task, their draft demonstration, a job, a
model, an engineer's API token, the sets and the labeler's account. A user who
may not see an object gets 403 or 404 (an anonymous visitor 401, or a redirect
to the sign-in page) and none of its content, with a malformed request (the
error paths re-render pages) as well as a well-formed one.

OBJECT_RULES says, for every route with an `{..._id}` path parameter, who may
not see its object beyond the roles the route refuses outright (ROUTES in
tests/test_roles.py). It is checked against the app's route table: a new route
with an id parameter fails test_every_route_with_an_object_id_has_an_object_rule
until it is given a rule here.

Actors:
  anonymous, labeler, engineer, admin   a user of that role who owns none of the objects
  owner paused / owner archived / owner removed
      the labeler who holds the task and the draft, once their sets are paused,
      archived, or restricted to other labelers
"""

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import delete, select

from app.db.base import utcnow
from app.db.enums import AssignmentStatus, JobKind, JobStatus, PromptSetKind, PromptSetStatus, Role
from app.db.models import (
    Annotation,
    ApiToken,
    Assignment,
    Demonstration,
    Job,
    PromptSet,
    PromptSetLabeler,
    User,
)
from app.services import annotations, auth, demonstrations
from app.services.assignment import lease_next_task
from tests.conftest import csrf_of, login
from tests.factories import add_prompt, make_model, make_prompt_set, make_task, make_user
from tests.test_roles import ALLOWED, ROUTES, registered_routes

SECRET = "SECRET"
ID_PARAM = re.compile(r"\{(\w+_id)\}")
ROLE_ACTORS = {None: "anonymous", Role.labeler: "labeler", Role.engineer: "engineer", Role.admin: "admin"}
OWNER_STATES = ("owner paused", "owner archived", "owner removed")

# The labeler's own objects: another labeler, and an admin (who passes labeler
# routes but holds no lease and wrote nothing), may not see them.
OWN = ("labeler", "admin")
# A task or draft to be written: nor may its owner once the set is closed to them.
TO_WRITE = OWN + OWNER_STATES
# Every user the route lets in may see every such object (admins see all; jobs and
# models are shared by every engineer): only the roles the route refuses are tried.
SHARED: tuple[str, ...] = ()

OBJECT_RULES: dict[str, tuple[str, ...]] = {
    # labeling
    "POST /label/{task_id}/submit": TO_WRITE,
    "POST /api/v1/label/{task_id}": TO_WRITE,
    # Giving a task back needs only the lease, whatever the set's state, and shows nothing of it.
    "POST /label/{task_id}/skip": OWN,
    # A labeler's submitted work stays theirs to read and edit whatever becomes of the set.
    "GET /label/annotations/{annotation_id}/edit": OWN,
    "POST /label/annotations/{annotation_id}": OWN,
    # writing demonstrations
    "POST /demonstrate/{demonstration_id}/draft": TO_WRITE,
    "POST /demonstrate/{demonstration_id}/from-model": TO_WRITE,
    "POST /demonstrate/{demonstration_id}/submit": TO_WRITE,
    "POST /demonstrate/{demonstration_id}/skip": TO_WRITE,
    "PUT /api/v1/demonstrations/{demonstration_id}/draft": TO_WRITE,
    "POST /api/v1/demonstrations/{demonstration_id}/submit": TO_WRITE,
    "POST /api/v1/demonstrations/{demonstration_id}/skip": TO_WRITE,
    # an engineer's own API tokens
    "POST /account/tokens/{token_id}/revoke": ("engineer", "admin"),
    # reviewing demonstrations (admins)
    "POST /api/v1/demonstrations/{demonstration_id}/accept": SHARED,
    "POST /api/v1/demonstrations/{demonstration_id}/reject": SHARED,
    "POST /api/v1/demonstrations/{demonstration_id}/edit": SHARED,
    "POST /admin/demonstrations/{demonstration_id}/accept": SHARED,
    "POST /admin/demonstrations/{demonstration_id}/reject": SHARED,
    "POST /admin/demonstrations/{demonstration_id}/edit": SHARED,
    # models and jobs (engineers)
    "GET /api/v1/models/{model_id}": SHARED,
    "GET /api/v1/models/{model_id}/samples": SHARED,
    "POST /api/v1/models/{model_id}/promote": SHARED,
    "GET /models/{model_id}": SHARED,
    "POST /models/{model_id}/promote": SHARED,
    "GET /jobs/{job_id}": SHARED,
    "POST /jobs/{job_id}/cancel": SHARED,
    "POST /jobs/{job_id}/retry": SHARED,
    "GET /api/v1/jobs/{job_id}": SHARED,
    "GET /api/v1/jobs/{job_id}/metrics": SHARED,
    "POST /api/v1/jobs/{job_id}/cancel": SHARED,
    "POST /api/v1/jobs/{job_id}/retry": SHARED,
    # evaluations (engineers; results name the models, so labelers are refused outright)
    "GET /evaluations/{prompt_set_id}": SHARED,
    "GET /evaluations/{prompt_set_id}/votes.jsonl": SHARED,
    "GET /api/v1/evaluations/{prompt_set_id}": SHARED,
    "GET /api/v1/evaluations/{prompt_set_id}/votes": SHARED,
    "POST /evaluations/{prompt_set_id}/figures": SHARED,
    "POST /api/v1/evaluations/{prompt_set_id}/figures": SHARED,
    # accounts (admins)
    "PATCH /api/v1/users/{user_id}": SHARED,
    "POST /admin/users/{user_id}/active": SHARED,
    "POST /admin/users/{user_id}/password": SHARED,
    # prompt sets, quality and export (admins)
    "POST /api/v1/prompt-sets/{prompt_set_id}/demonstrations": SHARED,
    "GET /api/v1/prompt-sets/{prompt_set_id}/demonstrations.jsonl": SHARED,
    "GET /admin/prompt-sets/{prompt_set_id}": SHARED,
    "GET /admin/prompt-sets/{prompt_set_id}/status": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/settings": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/prompts": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/preferences": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/ai-settings": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/ai-label": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/start": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/pause": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/resume": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/archive": SHARED,
    "GET /api/v1/prompt-sets/{prompt_set_id}": SHARED,
    "PATCH /api/v1/prompt-sets/{prompt_set_id}": SHARED,
    "POST /api/v1/prompt-sets/{prompt_set_id}/prompts": SHARED,
    "POST /api/v1/prompt-sets/{prompt_set_id}/preferences": SHARED,
    "PUT /api/v1/prompt-sets/{prompt_set_id}/ai-settings": SHARED,
    "POST /api/v1/prompt-sets/{prompt_set_id}/ai-label": SHARED,
    "POST /api/v1/prompt-sets/{prompt_set_id}/start": SHARED,
    "POST /api/v1/prompt-sets/{prompt_set_id}/pause": SHARED,
    "POST /api/v1/prompt-sets/{prompt_set_id}/resume": SHARED,
    "POST /api/v1/prompt-sets/{prompt_set_id}/archive": SHARED,
    "PUT /api/v1/prompt-sets/{prompt_set_id}/task-order": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/task-order": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/score-tasks": SHARED,
    # The reward model's scores of a set's tasks: for engineers and admins, never labelers (refused outright).
    "GET /api/v1/prompt-sets/{prompt_set_id}/task-scores": SHARED,
    "POST /api/v1/prompt-sets/{prompt_set_id}/task-scores": SHARED,
    "GET /admin/prompt-sets/{prompt_set_id}/quality": SHARED,
    "GET /admin/prompt-sets/{prompt_set_id}/quality/figures": SHARED,
    "GET /admin/prompt-sets/{prompt_set_id}/quality/labelers": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/quality/labelers/{user_id}/exclude": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/quality/labelers/{user_id}/include": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/quality/allowed": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/quality/allowed/{user_id}/remove": SHARED,
    "GET /admin/prompt-sets/{prompt_set_id}/quality/gold/form": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/quality/gold/{task_id}": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/quality/gold/{task_id}/unmark": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/quality/gold-rate": SHARED,
    "GET /admin/prompt-sets/{prompt_set_id}/quality/trust": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/quality/trust-rules": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/quality/labelers/{user_id}/quarantine": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/quality/labelers/{user_id}/release": SHARED,
    # Reviewing reads and judges any labeler's work: admins only, every task of every set.
    "GET /admin/prompt-sets/{prompt_set_id}/review": SHARED,
    "GET /admin/prompt-sets/{prompt_set_id}/review/{task_id}": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/review/{task_id}/accept": SHARED,
    "POST /admin/prompt-sets/{prompt_set_id}/review/{task_id}/correct": SHARED,
    "GET /api/v1/prompt-sets/{prompt_set_id}/review-queue": SHARED,
    "POST /api/v1/prompt-sets/{prompt_set_id}/tasks/{task_id}/reviews": SHARED,
    "GET /api/v1/prompt-sets/{prompt_set_id}/trust": SHARED,
    "PUT /api/v1/prompt-sets/{prompt_set_id}/trust-rules": SHARED,
    "POST /api/v1/prompt-sets/{prompt_set_id}/labelers/{user_id}/quarantine": SHARED,
    "POST /api/v1/prompt-sets/{prompt_set_id}/labelers/{user_id}/release": SHARED,
    "GET /admin/prompt-sets/{prompt_set_id}/export": SHARED,
    "GET /admin/prompt-sets/{prompt_set_id}/export/download": SHARED,
    "GET /admin/prompt-sets/{prompt_set_id}/export/meta": SHARED,
    "GET /api/v1/prompt-sets/{prompt_set_id}/agreement": SHARED,
    "GET /api/v1/prompt-sets/{prompt_set_id}/progress": SHARED,
    "GET /api/v1/prompt-sets/{prompt_set_id}/prefill-study": SHARED,
    "GET /api/v1/prompt-sets/{prompt_set_id}/export": SHARED,
    "GET /api/v1/prompt-sets/{prompt_set_id}/export/meta": SHARED,
    "POST /api/v1/prompt-sets/{prompt_set_id}/labelers/{user_id}/exclude": SHARED,
    "POST /api/v1/prompt-sets/{prompt_set_id}/labelers/{user_id}/include": SHARED,
}


@dataclass
class World:
    ids: dict[str, int]  # path parameter -> the id of the secret object
    owner: User
    someone: User  # another labeler, the only one left on the sets in "owner removed"
    ranking_set: PromptSet
    demo_set: PromptSet
    response_ids: list[int]  # of the leased task
    annotated_response_ids: list[int]


def build_world(session) -> World:
    owner, someone = make_user(session), make_user(session)
    token_owner = make_user(session, role=Role.engineer)
    ranking = make_prompt_set(session, k=2, name="SECRET-SET-ranking", instructions="SECRET-INSTRUCTIONS")
    done = make_task(session, ranking, texts=["SECRET-RESPONSE-1", "SECRET-RESPONSE-2"],
                     messages=[{"role": "user", "content": "SECRET-PROMPT-annotated"}])
    held = make_task(session, ranking, texts=["SECRET-RESPONSE-3", "SECRET-RESPONSE-4"],
                     messages=[{"role": "user", "content": "SECRET-PROMPT-leased"}])
    # The owner labels `done` (the older task, offered first), then holds a lease on `held`.
    assert lease_next_task(session, user=owner, now=utcnow(), lease_s=1800).task.id == done.id
    d1, d2 = [item.response_id for item in done.items]
    annotation = annotations.submit_annotation(
        session, user=owner, task_id=done.id, ratings={d1: 6, d2: 2}, ranks={d1: 1, d2: 2},
        comment="SECRET-COMMENT", idempotency_key="owner-secret-key", now=utcnow()).annotation
    assert lease_next_task(session, user=owner, now=utcnow(), lease_s=1800).task.id == held.id
    demo_set = make_prompt_set(session, kind=PromptSetKind.demonstration, name="SECRET-SET-demo",
                               instructions="SECRET-DEMO-INSTRUCTIONS")
    add_prompt(session, demo_set, "SECRET-DEMO-PROMPT")
    draft = demonstrations.lease_next_demonstration(session, user=owner, now=utcnow(), lease_s=1800)
    demonstrations.save_draft(session, user=owner, demonstration_id=draft.id, text="SECRET-DRAFT", now=utcnow(),
                              lease_s=1800)
    model = make_model(session, "/nowhere/SECRET-MODEL-PATH", name="SECRET-MODEL")
    job = Job(kind=JobKind.generate, status=JobStatus.failed, params={"note": "SECRET-JOB-PARAMS"},
              error="SECRET-JOB-ERROR", prompt_set_id=ranking.id, created_by_id=token_owner.id)
    session.add(job)
    token, _ = auth.create_api_token(session, user=token_owner, name="SECRET-TOKEN")
    session.commit()
    return World(
        ids={"task_id": held.id, "annotation_id": annotation.id, "demonstration_id": draft.id,
             "prompt_set_id": ranking.id, "user_id": owner.id, "job_id": job.id, "model_id": model.id,
             "token_id": token.id},
        owner=owner, someone=someone, ranking_set=ranking, demo_set=demo_set,
        response_ids=[item.response_id for item in held.items], annotated_response_ids=[d1, d2],
    )


# ---- what each route is sent ------------------------------------------------------

@dataclass
class Payload:
    form: dict[str, Any] | None = None
    json: Any = None


def _ranking_form(ids: list[int], **extra) -> dict[str, Any]:
    return {f"rating-{r}": "4" for r in ids} | {f"rank-{r}": str(i + 1) for i, r in enumerate(ids)} | extra


def _ranking_json(ids: list[int], key: str) -> dict[str, Any]:
    return {"idempotency_key": key, "ratings": {str(r): 4 for r in ids},
            "ranks": {str(r): i + 1 for i, r in enumerate(ids)}}


# A malformed request first (the error paths re-render pages, and used to show the
# object before checking access), then a well-formed one (the action itself).
PAYLOADS: dict[str, Callable[[World], list[Payload]]] = {
    "POST /label/{task_id}/submit": lambda w: [
        Payload(form={f"rating-{w.response_ids[0]}": "9"}),
        Payload(form=_ranking_form(w.response_ids, idempotency_key="intruder-form-key", started_at="0")),
    ],
    "POST /label/{task_id}/skip": lambda w: [
        Payload(form={"skip_reason": ""}), Payload(form={"skip_reason": "I cannot judge this topic"}),
    ],
    "POST /label/annotations/{annotation_id}": lambda w: [
        Payload(form={f"rating-{w.annotated_response_ids[0]}": "9"}),
        Payload(form=_ranking_form(w.annotated_response_ids)),
    ],
    "POST /api/v1/label/{task_id}": lambda w: [
        Payload(json={"idempotency_key": "intruder-api-key", "ratings": {}, "ranks": {}}),
        Payload(json=_ranking_json(w.response_ids, "intruder-api-key")),
    ],
    "POST /demonstrate/{demonstration_id}/draft": lambda w: [Payload(form={"text": "overwritten"})],
    "POST /demonstrate/{demonstration_id}/submit": lambda w: [
        Payload(form={"text": ""}), Payload(form={"text": "A stolen answer."}),
    ],
    "POST /demonstrate/{demonstration_id}/skip": lambda w: [
        Payload(form={"skip_reason": ""}), Payload(form={"skip_reason": "The prompt is unclear"}),
    ],
    "PUT /api/v1/demonstrations/{demonstration_id}/draft": lambda w: [Payload(json={"text": "overwritten"})],
    "POST /api/v1/demonstrations/{demonstration_id}/submit": lambda w: [
        Payload(json={"text": ""}), Payload(json={"text": "A stolen answer."}),
    ],
    "POST /api/v1/demonstrations/{demonstration_id}/skip": lambda w: [
        Payload(json={"reason": ""}), Payload(json={"reason": "Too hard"}),
    ],
}


def id_routes(app) -> list[tuple[str, str]]:
    return [(m, p) for m, p in registered_routes(app) if ID_PARAM.search(p)]


def test_every_route_with_an_object_id_has_an_object_rule(app):
    routes = {f"{m} {p}" for m, p in id_routes(app)}
    missing = sorted(routes - OBJECT_RULES.keys())
    stale = sorted(OBJECT_RULES.keys() - routes)
    assert not missing, f"routes taking an object id without an entry in OBJECT_RULES: {missing}"
    assert not stale, f"OBJECT_RULES lists routes that no longer exist: {stale}"
    assert not PAYLOADS.keys() - routes, "PAYLOADS lists routes that no longer exist"
    assert {"task_id", "annotation_id", "demonstration_id", "prompt_set_id", "job_id", "model_id"} \
        <= {name for _, p in id_routes(app) for name in ID_PARAM.findall(p)}


# ---- the matrix ---------------------------------------------------------------------

def _set_state(session, world: World, state: str | None) -> None:
    """Close (or, with None, reopen) the owner's sets."""
    for prompt_set in (world.ranking_set, world.demo_set):
        prompt_set.status = {"owner paused": PromptSetStatus.paused,
                             "owner archived": PromptSetStatus.archived}.get(state, PromptSetStatus.active)
        session.execute(delete(PromptSetLabeler).where(PromptSetLabeler.prompt_set_id == prompt_set.id))
        if state == "owner removed":
            session.add(PromptSetLabeler(prompt_set_id=prompt_set.id, user_id=world.someone.id))
    session.commit()


def _actors(route: str) -> list[str]:
    refused = [name for role, name in ROLE_ACTORS.items() if role not in ALLOWED[ROUTES[route]]]
    return refused + [a for a in OBJECT_RULES[route] if a not in refused]


def _expected(actor: str, path: str) -> set[int]:
    if actor == "anonymous":  # a page redirects to the sign-in page, htmx is told to
        return {401} if path.startswith("/api/") else {302, 401}
    return {403, 404}


def _snapshot(session, world: World) -> dict[str, Any]:
    """What a refused request could have changed."""
    session.expire_all()
    return {
        "assignments": sorted(session.execute(select(Assignment.task_id, Assignment.user_id, Assignment.status))),
        "annotations": sorted(session.execute(select(Annotation.id, Annotation.user_id, Annotation.comment,
                                                     Annotation.updated_at))),
        "demonstrations": sorted(session.execute(select(Demonstration.id, Demonstration.status,
                                                        Demonstration.text))),
        "sets": sorted(session.execute(select(PromptSet.id, PromptSet.status, PromptSet.name, PromptSet.gold_rate))),
        "jobs": sorted(session.execute(select(Job.id, Job.status, Job.cancel_requested))),
        "tokens": sorted(session.execute(select(ApiToken.id, ApiToken.revoked_at))),
        "users": sorted(session.execute(select(User.id, User.is_active, User.password_hash))),
    }


def test_no_user_sees_or_changes_an_object_that_is_not_theirs(app, session, capsys):
    world = build_world(session)
    users = {
        "labeler": make_user(session), "engineer": make_user(session, role=Role.engineer),
        "admin": make_user(session, role=Role.admin),
    }
    session.commit()
    before = _snapshot(session, world)
    assert "SECRET-DRAFT" in str(before["demonstrations"])
    assert (world.ids["task_id"], world.owner.id, AssignmentStatus.active) in before["assignments"]
    pairs = requests = 0
    failures: list[str] = []
    with contextlib.ExitStack() as stack:
        clients: dict[str, tuple[TestClient, str]] = {}
        for name in ("anonymous", *users, "owner"):
            client = stack.enter_context(TestClient(app, follow_redirects=False))
            token = csrf_of(client) if name == "anonymous" else login(
                client, world.owner if name == "owner" else users[name])
            clients[name] = (client, token)
        for state in (None, *OWNER_STATES):
            _set_state(session, world, state)
            for method, path in id_routes(app):
                route = f"{method} {path}"
                tried = _actors(route)
                actors = [a for a in tried if a not in OWNER_STATES] if state is None else \
                    [a for a in tried if a == state]
                url = ID_PARAM.sub(lambda m: str(world.ids[m.group(1)]), path)
                for actor in actors:
                    pairs += 1
                    client, token = clients["owner" if actor in OWNER_STATES else actor]
                    payloads = PAYLOADS.get(route, lambda w: [Payload()])(world)
                    variants = [{}] if path.startswith("/api/") else [{}, {"HX-Request": "true"}]
                    for payload in payloads:
                        for extra in variants:
                            requests += 1
                            response = client.request(method, url, data=payload.form, json=payload.json,
                                                      headers={"X-CSRF-Token": token} | extra)
                            where = f"{route} as {actor}{' (htmx)' if extra else ''} with {payload}"
                            if response.status_code not in _expected(actor, path):
                                failures.append(f"{where}: {response.status_code} {response.text[:200]}")
                            elif SECRET in response.text:
                                failures.append(f"{where}: the body shows {SECRET} content")
        _set_state(session, world, None)
    assert not failures, "\n".join(failures)
    assert _snapshot(session, world) == before, "a refused request changed something"
    routes = len(id_routes(app))
    with capsys.disabled():
        print(f"\nobject access matrix: {routes} routes with an object id, {pairs} route x actor pairs,"
              f" {requests} requests")
    assert pairs >= 2 * routes
