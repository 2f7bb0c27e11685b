"""The FastAPI application: middleware, error handlers, routers, static files."""

import logging
import secrets
import time
import uuid
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings, get_settings
from app.errors import body_too_large, http_error, install_error_handlers
from app.logs import request_id_var  # also installs the request-id log record factory
from app.private_files import write_private_file
from app.routes import account, admin_users, api, api_prompt_sets, auth, health, home, prompt_sets
from app.routes import api_label, label
from app.routes import api_quality, quality
from app.routes import api_jobs, jobs
from app.routes import demonstrations, demonstrations_admin
from app.routes import api_demonstrations, api_models, api_training, models, training
from app.routes import api_docs
from app.routes.deps import verify_csrf
from app.routes.uploads import UPLOAD_PATH
from app.schemas import PROBLEM_RESPONSES
from app.web import ROOT, SECURITY_HEADERS


access_log = logging.getLogger("app.access")


class RequestIdMiddleware:
    """Gives every request an id (or keeps the caller's X-Request-ID) for the logs,
    and logs one line per request: method, path (no query string: it may hold
    secrets), status, duration."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # Latin-1 maps every byte to a character: an id that is not UTF-8 is replaced, not a 500.
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")[:64]
        request_id = incoming if incoming.isascii() and incoming.isprintable() and incoming else uuid.uuid4().hex[:16]
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if not scope["path"].startswith("/static/"):
                access_log.info("%s %s %d %.1fms", scope["method"], scope["path"], status,
                                (time.perf_counter() - started) * 1000)
            request_id_var.reset(token)


class SecurityHeadersMiddleware:
    """Adds app.web.SECURITY_HEADERS (CSP, nosniff, referrer policy) to every response,
    pages, API, static files and errors alike, unless the route set its own."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimitMiddleware:
    """Bounds every request body before anything parses it: a Content-Length over the
    limit is refused at once, and a body without one (chunked) is counted as it
    streams and stopped as soon as it passes the limit. Import routes take files and
    get the larger upload limit. The 413 is worded by app/errors.py, like any error.

    It sits inside the session middleware, so an HTML error page can be rendered."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_upload_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_upload_bytes if UPLOAD_PATH.fullmatch(scope["path"]) else self.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
            response = await http_error(Request(scope), body_too_large(limit))
            return await response(scope, receive, send)
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise body_too_large(limit)
            return message

        await self.app(scope, counted_receive, send)


def session_secret(settings: Settings) -> str:
    """The configured secret, or one generated once and kept in the data directory
    (mode 0600; replicas starting together all end up with the first one written)."""
    if settings.secret_key is not None and settings.secret_key.get_secret_value():
        return settings.secret_key.get_secret_value()
    path = Path(settings.data_dir) / "secret_key"
    if not path.exists():
        write_private_file(path, secrets.token_urlsafe(48), replace=False)
    return path.read_text().strip()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="RLHF Workbench",
        openapi_url="/api/v1/openapi.json",
        docs_url=None,  # app.routes.api_docs serves Swagger UI from our own static files
        redoc_url=None,
        dependencies=[Depends(verify_csrf)],
        responses=PROBLEM_RESPONSES,
    )
    app.state.settings = settings  # what SettingsDep gives routes
    # Added first, so it runs inside the session middleware (added after it).
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       max_upload_bytes=settings.max_upload_bytes)
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(settings),
        session_cookie="rlhf_session",
        max_age=settings.session_max_age_s,
        same_site="lax",
        https_only=settings.secure_cookies,
    )
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
    install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=str(ROOT / "static")), name="static")
    for module in (health, auth, home, admin_users, account, api, prompt_sets, api_prompt_sets, label, api_label,
                   quality, api_quality):
        app.include_router(module.router)
    for module in (jobs, api_jobs):
        app.include_router(module.router)
    for module in (demonstrations, demonstrations_admin):
        app.include_router(module.router)
    app.include_router(training.sft_router)
    for module in (training, models, api_training, api_models, api_demonstrations):
        app.include_router(module.router)
    app.include_router(api_docs.router)
    return app
