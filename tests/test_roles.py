"""Every registered route, tried by every role and by an anonymous visitor.

ROUTES is the access rule of each route, as data: a route missing here fails
the test, so a new route cannot ship without a decision on who may use it.

  public    anyone, signed in or not
  user      any signed-in user
  labeler   labelers (and admins)
  engineer  engineers (and admins)
  admin     admins only
"""

import pytest
from fastapi.routing import APIRoute

from app.db.enums import Role
from tests.conftest import csrf_of, login
from tests.factories import make_user

ROUTES: dict[str, str] = {
    "GET /api/v1/training/settings": "engineer",
    "POST /api/v1/training/sft": "engineer",
    "POST /api/v1/training/reward": "engineer",
    "POST /api/v1/training/ppo": "engineer",
    "POST /api/v1/training/dpo": "engineer",
    "POST /api/v1/training/best-of-n": "engineer",
    "POST /api/v1/training/estimate": "engineer",
    "GET /api/v1/models": "engineer",
    "GET /api/v1/models/{model_id}": "engineer",
    "GET /api/v1/models/{model_id}/samples": "engineer",
    "POST /api/v1/models/{model_id}/promote": "engineer",
    "GET /api/v1/demonstrations/next": "labeler",
    "PUT /api/v1/demonstrations/{demonstration_id}/draft": "labeler",
    "POST /api/v1/demonstrations/{demonstration_id}/submit": "labeler",
    "POST /api/v1/demonstrations/{demonstration_id}/skip": "labeler",
    "GET /api/v1/demonstrations": "admin",
    "POST /api/v1/demonstrations/{demonstration_id}/accept": "admin",
    "POST /api/v1/demonstrations/{demonstration_id}/reject": "admin",
    "POST /api/v1/demonstrations/{demonstration_id}/edit": "admin",
    "POST /api/v1/prompt-sets/{prompt_set_id}/demonstrations": "admin",
    "GET /api/v1/prompt-sets/{prompt_set_id}/demonstrations.jsonl": "admin",
    "GET /evaluations": "engineer",
    "GET /evaluations/new": "engineer",
    "POST /evaluations": "engineer",
    "GET /evaluations/{prompt_set_id}": "engineer",
    "GET /evaluations/{prompt_set_id}/votes.jsonl": "engineer",
    "POST /evaluations/{prompt_set_id}/figures": "engineer",
    "GET /api/v1/evaluations": "engineer",
    "POST /api/v1/evaluations": "engineer",
    "GET /api/v1/evaluations/{prompt_set_id}": "engineer",
    "GET /api/v1/evaluations/{prompt_set_id}/votes": "engineer",
    "POST /api/v1/evaluations/{prompt_set_id}/figures": "engineer",
    "GET /leaderboard": "engineer",
    "GET /api/v1/leaderboard": "engineer",
    "GET /training/reward": "engineer",
    "POST /training/reward": "engineer",
    "GET /training/ppo": "engineer",
    "POST /training/ppo": "engineer",
    "GET /training/dpo": "engineer",
    "POST /training/dpo": "engineer",
    "GET /training/best-of-n": "engineer",
    "POST /training/best-of-n": "engineer",
    "GET /models": "engineer",
    "GET /models/{model_id}": "engineer",
    "POST /models/{model_id}/promote": "engineer",
    "GET /jobs": "engineer",
    "GET /jobs/{job_id}": "engineer",
    "POST /jobs/{job_id}/cancel": "engineer",
    "POST /jobs/{job_id}/retry": "engineer",
    "GET /api/v1/jobs": "engineer",
    "GET /api/v1/jobs/{job_id}": "engineer",
    "GET /api/v1/jobs/{job_id}/metrics": "engineer",
    "POST /api/v1/jobs/{job_id}/cancel": "engineer",
    "POST /api/v1/jobs/{job_id}/retry": "engineer",
    "GET /demonstrate": "labeler",
    "POST /demonstrate/preview": "labeler",
    "POST /demonstrate/{demonstration_id}/draft": "labeler",
    "POST /demonstrate/{demonstration_id}/from-model": "labeler",
    "POST /demonstrate/{demonstration_id}/submit": "labeler",
    "POST /demonstrate/{demonstration_id}/skip": "labeler",
    "GET /admin/demonstrations": "admin",
    "POST /admin/demonstrations/{demonstration_id}/accept": "admin",
    "POST /admin/demonstrations/{demonstration_id}/reject": "admin",
    "POST /admin/demonstrations/{demonstration_id}/edit": "admin",
    "POST /admin/demonstrations/import": "admin",
    "GET /admin/demonstrations/export": "admin",
    "GET /sft": "engineer",
    "POST /sft": "engineer",
    "GET /healthz": "public",
    "GET /readyz": "public",
    "GET /login": "public",
    "POST /login": "public",
    "POST /logout": "public",
    "GET /": "user",
    "GET /api/v1/me": "user",
    "GET /api/v1/users": "admin",
    "POST /api/v1/users": "admin",
    "POST /api/v1/users/ai": "admin",
    "PATCH /api/v1/users/{user_id}": "admin",
    "GET /admin/users": "admin",
    "POST /admin/users": "admin",
    "POST /admin/users/ai": "admin",
    "POST /admin/users/{user_id}/active": "admin",
    "POST /admin/users/{user_id}/password": "admin",
    "GET /account/password": "user",
    "POST /account/password": "user",
    "POST /account/sign-out-everywhere": "user",
    "GET /account/tokens": "engineer",
    "POST /account/tokens": "engineer",
    "POST /account/tokens/{token_id}/revoke": "engineer",
    "GET /admin/prompt-sets": "admin",
    "GET /admin/prompt-sets/new": "admin",
    "POST /admin/prompt-sets": "admin",
    "GET /admin/prompt-sets/{prompt_set_id}": "admin",
    "GET /admin/prompt-sets/{prompt_set_id}/status": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/settings": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/prompts": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/preferences": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/ai-settings": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/ai-label": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/start": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/pause": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/resume": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/archive": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/task-order": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/score-tasks": "admin",
    "GET /api/v1/prompt-sets": "admin",
    "POST /api/v1/prompt-sets": "admin",
    "GET /api/v1/prompt-sets/{prompt_set_id}": "admin",
    "PATCH /api/v1/prompt-sets/{prompt_set_id}": "admin",
    "POST /api/v1/prompt-sets/{prompt_set_id}/prompts": "admin",
    "POST /api/v1/prompt-sets/{prompt_set_id}/preferences": "admin",
    "PUT /api/v1/prompt-sets/{prompt_set_id}/ai-settings": "admin",
    "POST /api/v1/prompt-sets/{prompt_set_id}/ai-label": "admin",
    "POST /api/v1/prompt-sets/{prompt_set_id}/start": "admin",
    "POST /api/v1/prompt-sets/{prompt_set_id}/pause": "admin",
    "POST /api/v1/prompt-sets/{prompt_set_id}/resume": "admin",
    "POST /api/v1/prompt-sets/{prompt_set_id}/archive": "admin",
    "PUT /api/v1/prompt-sets/{prompt_set_id}/task-order": "admin",
    "GET /api/v1/prompt-sets/{prompt_set_id}/task-scores": "engineer",
    "POST /api/v1/prompt-sets/{prompt_set_id}/task-scores": "engineer",
    "GET /label": "labeler",
    "POST /label/{task_id}/submit": "labeler",
    "POST /label/{task_id}/skip": "labeler",
    "GET /label/history": "labeler",
    "GET /label/annotations/{annotation_id}/edit": "labeler",
    "POST /label/annotations/{annotation_id}": "labeler",
    "GET /api/v1/label/next": "labeler",
    "POST /api/v1/label/{task_id}": "labeler",
    # quality control (app/routes/quality.py, app/routes/api_quality.py)
    "GET /admin/prompt-sets/{prompt_set_id}/quality": "admin",
    "GET /admin/prompt-sets/{prompt_set_id}/quality/figures": "admin",
    "GET /admin/prompt-sets/{prompt_set_id}/quality/labelers": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/quality/labelers/{user_id}/exclude": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/quality/labelers/{user_id}/include": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/quality/allowed": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/quality/allowed/{user_id}/remove": "admin",
    "GET /admin/prompt-sets/{prompt_set_id}/quality/gold/form": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/quality/gold/{task_id}": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/quality/gold/{task_id}/unmark": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/quality/gold-rate": "admin",
    "GET /admin/prompt-sets/{prompt_set_id}/quality/trust": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/quality/trust-rules": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/quality/labelers/{user_id}/quarantine": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/quality/labelers/{user_id}/release": "admin",
    # review and correction, labeler trust (app/routes/review.py, app/routes/api_review.py)
    "GET /api/v1/prompt-sets/{prompt_set_id}/review-queue": "admin",
    "POST /api/v1/prompt-sets/{prompt_set_id}/tasks/{task_id}/reviews": "admin",
    "GET /api/v1/prompt-sets/{prompt_set_id}/trust": "admin",
    "PUT /api/v1/prompt-sets/{prompt_set_id}/trust-rules": "admin",
    "POST /api/v1/prompt-sets/{prompt_set_id}/labelers/{user_id}/quarantine": "admin",
    "POST /api/v1/prompt-sets/{prompt_set_id}/labelers/{user_id}/release": "admin",
    "GET /admin/prompt-sets/{prompt_set_id}/review": "admin",
    "GET /admin/prompt-sets/{prompt_set_id}/review/{task_id}": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/review/{task_id}/accept": "admin",
    "POST /admin/prompt-sets/{prompt_set_id}/review/{task_id}/correct": "admin",
    "GET /admin/prompt-sets/{prompt_set_id}/export": "admin",
    "GET /admin/prompt-sets/{prompt_set_id}/export/download": "admin",
    "GET /admin/prompt-sets/{prompt_set_id}/export/meta": "admin",
    "GET /api/v1/prompt-sets/{prompt_set_id}/agreement": "admin",
    "GET /api/v1/prompt-sets/{prompt_set_id}/progress": "admin",
    "GET /api/v1/prompt-sets/{prompt_set_id}/prefill-study": "admin",
    "GET /api/v1/prompt-sets/{prompt_set_id}/export": "admin",
    "GET /api/v1/prompt-sets/{prompt_set_id}/export/meta": "admin",
    "POST /api/v1/prompt-sets/{prompt_set_id}/labelers/{user_id}/exclude": "admin",
    "POST /api/v1/prompt-sets/{prompt_set_id}/labelers/{user_id}/include": "admin",
}

# Framework routes that are public by design (the schema and its viewer).
FRAMEWORK = {"/api/v1/openapi.json", "/api/v1/docs", "/docs/oauth2-redirect", "/api/v1/docs/oauth2-redirect"}

ALLOWED = {
    "public": {None, Role.labeler, Role.engineer, Role.admin},
    "user": {Role.labeler, Role.engineer, Role.admin},
    "labeler": {Role.labeler, Role.admin},
    "engineer": {Role.engineer, Role.admin},
    "admin": {Role.admin},
}


def _walk(routes):
    """(full path, route) of every API route; an included router (the /api/v1 router
    holds the area routers) lists its routes with their prefixes joined."""
    for route in routes:
        if hasattr(route, "effective_route_contexts"):
            for context in route.effective_route_contexts():
                if isinstance(context.original_route, APIRoute):
                    yield context.path, context.original_route
        elif isinstance(route, APIRoute):
            yield route.path, route


def registered_routes(app) -> list[tuple[str, str]]:
    return [
        (method, path)
        for path, route in _walk(app.routes)
        for method in sorted(route.methods - {"HEAD"})
    ]


def test_every_route_has_an_access_rule(app):
    routes = {f"{m} {p}" for m, p in registered_routes(app) if p not in FRAMEWORK}
    missing = sorted(routes - ROUTES.keys())
    stale = sorted(ROUTES.keys() - routes)
    assert not missing, f"routes without an entry in ROUTES: {missing}"
    assert not stale, f"ROUTES lists routes that no longer exist: {stale}"


def _fill(path: str) -> str:
    # Path parameters point at ids that do not exist: allowed roles get 404/422, never 401/403.
    import re

    return re.sub(r"\{[^}]+\}", "999999", path)


@pytest.mark.parametrize("role", [None, Role.labeler, Role.engineer, Role.admin], ids=lambda r: r or "anonymous")
def test_role_matrix(app, client, session, role):
    if role is not None:
        user = make_user(session, role=role)
        token = login(client, user)
    else:
        token = csrf_of(client)
    for method, path in registered_routes(app):
        # Signing in or out would change whose requests the rest are (the sign-outs
        # have their own tests in test_sessions.py).
        if path in FRAMEWORK or method == "POST" and path in ("/login", "/logout", "/account/sign-out-everywhere"):
            continue
        rule = ROUTES[f"{method} {path}"]
        url = _fill(path)
        response = client.request(method, url, headers={"X-CSRF-Token": token})
        got = response.status_code
        where = f"{method} {path} as {role or 'anonymous'}"
        assert got < 500, f"{where}: server error {got}"
        if role in ALLOWED[rule]:
            assert got not in (401, 403), f"{where}: refused with {got}"
        elif role is None:
            expected = 401 if path.startswith("/api/") else 302
            assert got == expected, f"{where}: expected {expected}, got {got}"
            if got == 302:
                assert response.headers["location"].startswith("/login")
        else:
            assert got == 403, f"{where}: expected 403, got {got}"
