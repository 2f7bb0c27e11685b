"""Templates and the helpers every page route answers with: render (the one place that
chooses between a full page and an htmx fragment), render_form_errors (a refused form
again, with its errors), fragment_or_redirect (after a form post) and redirect."""

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2_fragments.fastapi import Jinja2Blocks
from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml
from markupsafe import Markup

from app.services.errors import DomainError

ROOT = Path(__file__).resolve().parents[1]
templates = Jinja2Blocks(directory=str(ROOT / "templates"))

# Sent with every response (app.main.SecurityHeadersMiddleware) unless the route set its own.
# Nothing remote and nothing inline: pages have no <script> blocks, no on*= handlers and
# no style="" attributes (bar sizes come from data-width/data-height, set by static/js/app.js),
# htmx never evals (allowEval off in base.html), and markdown renders no images.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; base-uri 'none'; object-src 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
# Secrets (a new API token) and bulk data (exports) stay out of browser and proxy caches.
NO_STORE = {"Cache-Control": "no-store"}


def download_headers(filename: str) -> dict[str, str]:
    """Headers of an export download: saved as `filename`, never cached."""
    return {"Content-Disposition": f'attachment; filename="{filename}"', **NO_STORE}


# Markdown with raw HTML disabled: everything a user or a model wrote is escaped.
_markdown = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")


def _image_as_link(self, tokens, idx, options, env) -> str:
    # An <img> would make every labeler's browser fetch a URL that a prompt or a model
    # chose (tracking, leaking who reads what); a link is only followed when clicked.
    token = tokens[idx]
    src = escapeHtml(str(token.attrGet("src") or ""))
    alt = escapeHtml(self.renderInlineAsText(token.children, options, env))
    inside_link = sum(t.nesting for t in tokens[:idx] if t.type in ("link_open", "link_close")) > 0
    if inside_link:  # [![alt](img)](url): the outer link stays, a link inside a link is not HTML
        return alt or src
    return f'<a href="{src}" class="image-link">{alt or src}</a>'


_markdown.add_render_rule("image", _image_as_link)


def render_markdown(text: str | None) -> Markup:
    """The text as HTML: raw HTML escaped, images as plain links."""
    return Markup(_markdown.render(text or ""))


templates.env.filters["markdown"] = render_markdown


def is_htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def csrf_token(request: Request) -> str:
    """The session's CSRF token, created on first use."""
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return token


def flash(request: Request, message: str, category: str = "info") -> None:
    # Assign, not append: Starlette's session only notices top-level changes, so an
    # appended second message (before the first was shown) would never be saved.
    request.session["flash"] = [*request.session.get("flash", []), {"message": message, "category": category}]


def pop_flashes(request: Request) -> list[dict[str, str]]:
    return request.session.pop("flash", [])


def render(
    request: Request,
    template: str,
    context: dict[str, Any] | None = None,
    *,
    block: str | None = None,
    fragment: str | None = None,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    """Render the page; when htmx asked (HX-Request), only `block` of it, or the
    `fragment` template instead of the page."""
    ctx = {
        "request": request,
        "current_user": getattr(request.state, "user", None),
        "csrf_token": csrf_token(request),
        **(context or {}),
    }
    if block is not None and is_htmx(request):
        response = templates.TemplateResponse(
            request, template, ctx, block_name=block, status_code=status_code, headers=headers
        )
    else:
        if fragment is not None and is_htmx(request):
            template = fragment
        ctx["flashes"] = pop_flashes(request)
        response = templates.TemplateResponse(
            request, template, ctx, status_code=status_code, headers=headers
        )
    response.headers["Vary"] = "HX-Request"
    return response


def render_form_errors(
    request: Request,
    exc: DomainError,
    template: str,
    context: dict[str, Any],
    *,
    prefix: str = "form_",
    block: str | None = None,
    fragment: str | None = None,
    status_code: int | None = None,
) -> HTMLResponse:
    """The form again after a service refused it: the refusal's message as `<prefix>error`,
    its per-field (or per-line) messages as `<prefix>errors`, next to what was entered
    (in `context`), with the refusal's status (422 invalid, 409 conflict) unless
    `status_code` says otherwise. Page or fragment as `render` chooses."""
    context = context | {f"{prefix}error": exc.message, f"{prefix}errors": exc.errors}
    return render(request, template, context, block=block, fragment=fragment,
                  status_code=exc.status_code if status_code is None else status_code)


def fragment_or_redirect(request: Request, url: str, fragment: Callable[[], Response], *,
                         message: str | None = None, category: str = "success") -> Response:
    """After a form post: htmx gets `fragment()` to swap in place (called only then); a
    plain post gets `message` flashed, if any, and goes to `url`."""
    if is_htmx(request):
        return fragment()
    if message:
        flash(request, message, category)
    return redirect(request, url)


def redirect(request: Request, url: str) -> Response:
    """After a successful POST: a 303 for forms, an HX-Redirect for htmx requests."""
    if is_htmx(request):
        return Response(status_code=200, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)
