"""The API's documentation page: FastAPI's Swagger UI, its files served by the app
itself (static/node_modules/swagger-ui-dist), never from a CDN."""

import base64
import hashlib
import re

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

from app.web import CONTENT_SECURITY_POLICY

router = APIRouter(include_in_schema=False)

SWAGGER_UI = "/static/node_modules/swagger-ui-dist"
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def _script_hashes(html: str) -> str:
    return " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in _INLINE_SCRIPT.findall(html)
    )


@router.get("/docs")
def api_docs(request: Request) -> HTMLResponse:
    """Swagger UI. Its page starts the UI with an inline script, which its own policy
    allows by hash; Swagger UI's CSS draws its icons from data: URLs."""
    page = get_swagger_ui_html(
        openapi_url=request.app.openapi_url, title=f"{request.app.title} API",
        swagger_js_url=f"{SWAGGER_UI}/swagger-ui-bundle.js", swagger_css_url=f"{SWAGGER_UI}/swagger-ui.css",
        swagger_favicon_url=f"{SWAGGER_UI}/favicon-32x32.png",
        # No badge image fetched from validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None},
    )
    html = page.body.decode()
    page.headers["Content-Security-Policy"] = (
        f"{CONTENT_SECURITY_POLICY}; script-src 'self' {_script_hashes(html)}; img-src 'self' data:"
    )
    return page
