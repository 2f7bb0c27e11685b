"""The one place that turns errors into responses: a JSON problem under /api/v1,
an error fragment for htmx, a friendly page for browsers."""

import logging
from http import HTTPStatus
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.services.errors import DomainError, NotAuthenticated
from app.web import SECURITY_HEADERS, is_htmx, render

log = logging.getLogger(__name__)

API_PREFIX = "/api/"


def _problem(status: int, title: str, detail: str, errors=None) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def _respond(request: Request, status: int, title: str, detail: str, errors=None) -> Response:
    if request.url.path.startswith(API_PREFIX):
        return _problem(status, title, detail, errors)
    if status == 401:
        target = "/login?next=" + quote(request.url.path)
        if is_htmx(request):
            return Response(status_code=401, headers={"HX-Redirect": target})
        return RedirectResponse(target, status_code=302)
    context = {"status": status, "title": title, "detail": detail, "errors": errors}
    if is_htmx(request):
        # 422 is swapped by htmx (see base.html); other errors show in the error area.
        return render(request, "partials/_error.html", context, status_code=status)
    return render(request, "pages/error.html", context, status_code=status)


def _size(n: int) -> str:
    mib = n / (1024 * 1024)
    return f"{mib:g} MiB" if mib >= 1 else f"{n / 1024:g} KiB"


def body_too_large(limit: int) -> HTTPException:
    """The error for a request body over `limit` bytes (a FastAPI HTTPException, so
    FastAPI passes it on unchanged when it is raised while a body is being read)."""
    return HTTPException(413, f"The request body is larger than the limit of {_size(limit)} ({limit:,} bytes)."
                              " Send less at once, or split the file.")


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """The response for an HTTP error, raised by a route or by a middleware."""
    title = HTTPStatus(exc.status_code).phrase
    detail = exc.detail if isinstance(exc.detail, str) else title
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"There is nothing at {request.url.path}."
    return _respond(request, exc.status_code, title, detail)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def domain_error(request: Request, exc: DomainError) -> Response:
        if isinstance(exc, NotAuthenticated) and not request.url.path.startswith(API_PREFIX):
            return _respond(request, 401, exc.title, exc.message)
        return _respond(request, exc.status_code, exc.title, exc.message, exc.errors)

    app.add_exception_handler(StarletteHTTPException, http_error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = {
            ".".join(str(p) for p in e["loc"] if p not in ("body", "query", "path", "form")): e["msg"]
            for e in exc.errors()
        }
        detail = "; ".join(f"{k}: {v}" for k, v in errors.items())
        return _respond(request, 422, "Invalid input", detail, errors)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        response = _respond(
            request, 500, "Server error",
            "Something went wrong on our side. The error was logged with this request's id.",
        )
        # Starlette sends this answer from outside every middleware, SecurityHeadersMiddleware included.
        response.headers.update(SECURITY_HEADERS)
        return response
