"""Safe output: security headers on every response, no caching of secrets and exports,
markdown that fetches nothing, templates a strict CSP does not break, the API docs
served from our own files."""

from app.db.enums import Role
from app.web import render_markdown, templates
from tests.conftest import login, make_user
from tests.factories import make_prompt_set, make_task


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
