"""Safe output: security headers on every response, no caching of secrets and exports,
markdown that fetches nothing, templates a strict CSP does not break, the API docs
served from our own files."""

import base64
import hashlib
import re

from app.db.enums import PromptSetKind, Role
from app.web import ROOT, render_markdown, templates
from tests.conftest import login
from tests.factories import annotate, make_prompt_set, make_task, make_user


def _assert_security_headers(response, where: str) -> None:
    csp = response.headers.get("content-security-policy", "")
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, where
    assert not re.search(r"https?:|\*|'unsafe-", csp), f"{where}: CSP allows remote or unsafe sources: {csp}"
    assert response.headers.get("x-content-type-options") == "nosniff", where
    assert response.headers.get("referrer-policy"), where


def test_every_kind_of_response_carries_the_security_headers(app, client, client_as, session):
    def boom():
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)
    for path in ("/login", "/static/css/app.css", "/api/v1/openapi.json", "/api/v1/me", "/nowhere",
                 "/api/v1/nowhere", "/api/v1/docs"):
        _assert_security_headers(client.get(path), path)
    client_as("admin")
    for path in ("/", "/admin/prompt-sets", "/admin/users", "/jobs", "/models"):
        response = client.get(path)
        assert response.status_code == 200, path
        _assert_security_headers(response, path)
    from fastapi.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as plain:
        response = plain.get("/boom")
    assert response.status_code == 500
    _assert_security_headers(response, "a server error")


def test_api_token_page_and_every_export_are_never_cached(client, client_as, session):
    token = client_as("admin").headers["X-CSRF-Token"]
    assert client.get("/account/tokens").headers.get("cache-control") == "no-store"
    created = client.post("/account/tokens", data={"name": "ci", "csrf_token": token})
    assert created.status_code == 200 and created.headers.get("cache-control") == "no-store"

    labeled = make_prompt_set(session, k=2)
    task = make_task(session, labeled, texts=["one", "two"])
    annotate(session, task, sorted(i.response_id for i in task.items), make_user(session), [1, 2])
    demos = make_prompt_set(session, kind=PromptSetKind.demonstration)
    for path in (
        f"/admin/prompt-sets/{labeled.id}/export/download?format=plain",
        f"/admin/prompt-sets/{labeled.id}/export/download?format=csv",
        f"/admin/prompt-sets/{labeled.id}/export/meta?format=plain",
        f"/api/v1/prompt-sets/{labeled.id}/export?format=conversational",
        f"/api/v1/prompt-sets/{labeled.id}/export/meta?format=jsonl",
        f"/admin/demonstrations/export?prompt_set_id={demos.id}&format=messages",
        f"/api/v1/prompt-sets/{demos.id}/demonstrations.jsonl?format=prompt_completion",
    ):
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers.get("cache-control") == "no-store", path
        assert response.headers["content-disposition"].startswith("attachment"), path
        _assert_security_headers(response, path)


def test_markdown_renders_images_as_links_that_fetch_nothing():
    html = render_markdown('![a *cat*](https://tracker.example/pixel.png "t") and ![](https://x.example/y.png)\n\n'
                           "[![badge](https://img.example/b.svg)](https://site.example)\n\n"
                           "![ref][r]\n\n[r]: https://ref.example/z.gif")
    assert "<img" not in html
    assert '<a href="https://tracker.example/pixel.png" class="image-link">a cat</a>' in html
    assert '<a href="https://x.example/y.png" class="image-link">https://x.example/y.png</a>' in html
    assert '<a href="https://site.example">badge</a>' in html  # no link nested in a link
    assert '<a href="https://ref.example/z.gif" class="image-link">ref</a>' in html
    assert templates.env.filters["markdown"] is render_markdown


def test_labeling_page_shows_no_image_from_instructions_prompts_or_responses(client, session):
    labeler = make_user(session, role=Role.labeler)
    prompt_set = make_prompt_set(session, k=2, instructions="Read ![guide](https://i.example/guide.png) first.")
    make_task(session, prompt_set, messages=[{"role": "user", "content": "What is ![x](https://i.example/q.png)?"}],
              texts=["It is ![y](https://i.example/r1.png).", "No idea."])
    login(client, labeler)
    page = client.get("/label").text
    assert "https://i.example/r1.png" in page and "https://i.example/q.png" in page
    assert "https://i.example/guide.png" in page
    assert "<img" not in page


def test_templates_and_scripts_have_nothing_a_strict_csp_blocks():
    """No style="" attributes, inline handlers, hx-on, inline <script> or <style> blocks:
    the Content-Security-Policy (style-src and script-src 'self') would block them."""
    found = []
    for path in sorted((ROOT / "templates").rglob("*.html")):
        text = path.read_text()
        for pattern in (r"\sstyle=", r"\son[a-z]+=", r"\shx-on", r"<style", r"<script(?![^>]*\b(src|type=\"application/json\"))",
                        r"javascript:"):
            found += [f"{path.relative_to(ROOT)}: {m.group(0).strip()}" for m in re.finditer(pattern, text)]
    for path in sorted((ROOT / "static" / "js").glob("*.js")):
        text = path.read_text()
        for pattern in (r"setAttribute\(\s*[\"']style", r"\beval\(", r"new Function", r"style=", r"\son[a-z]+="):
            found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not found


def test_api_docs_come_from_our_static_files_with_their_inline_script_allowed_by_hash(client):
    response = client.get("/api/v1/docs")
    assert response.status_code == 200
    html = response.text
    assert not re.search(r"(src|href)=\"https?:", html), "the docs page loads something from elsewhere"
    urls = re.findall(r"(?:src|href)=\"(/static/[^\"]+)\"", html)
    assert {u.rsplit("/", 1)[-1] for u in urls} == {"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"}
    for url in urls:
        assert client.get(url).status_code == 200, f"{url} is missing: run scripts/setup.sh (npm ci)"
    inline = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    assert len(inline) == 1 and "SwaggerUIBundle(" in inline[0] and "/api/v1/openapi.json" in inline[0]
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    csp = response.headers["content-security-policy"]
    assert f"script-src 'self' 'sha256-{digest}'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe" not in csp and "http" not in csp
