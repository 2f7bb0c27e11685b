"""In Chromium: an admin opens the quality page of a set labeled by two consistent
labelers and one who ranks at random; the random one is the highlighted row."""

import pytest

from app.db.enums import Role
from app.db.session import session_scope
from tests.conftest import screenshot, sign_in_page
from tests.factories import bulk_seed, make_prompt_set, make_task, make_user

pytestmark = pytest.mark.browser


def test_admin_finds_the_random_labeler_on_the_quality_page(live_server, page):
    with session_scope() as s:
        admin = make_user(s, role=Role.admin, username="chief")
        ann, bob, rex = (make_user(s, username=n) for n in ("ann", "bob", "rex"))
        ps = make_prompt_set(s, k=4, overlap=3, name="Helpfulness round 1")
        s.flush()
        bulk_seed(s.connection().connection.driver_connection, prompt_set_id=ps.id, tasks=40, k=4, overlap=3,
                  labelers={ann.id: "consistent", bob.id: "consistent", rex.id: "random"}, seed=3, span_h=30)
        for _ in range(12):  # not labeled yet
            make_task(s, ps)
        set_id, admin_name, rex_id = ps.id, admin.username, rex.id

    sign_in_page(page, live_server, admin_name)

    page.goto(f"{live_server}/admin/prompt-sets/{set_id}/quality")
    highlighted = page.locator("#labelers tr.below-threshold")
    assert highlighted.count() == 1
    assert highlighted.get_attribute("data-username") == "rex"
    assert "below 60%" in highlighted.inner_text()
    assert "72.6%" in page.inner_text("#set-figures")
    # Predicates are functions, not strings: the page's CSP forbids the eval a string needs.
    page.wait_for_function("() => document.querySelector('#labels-per-hour').width > 0")  # Chart.js drew
    screenshot(page, "quality_page")

    # Worst agreement first; a click on the column sorts highest first, another lowest first.
    def order():
        return page.locator("#labelers tbody tr").evaluate_all("rows => rows.map(r => r.dataset.username)")

    assert order()[0] == "rex" and sorted(order()) == ["ann", "bob", "rex"]
    page.click("#labelers th:has-text('Agreement')")
    assert order()[-1] == "rex"
    page.click("#labelers th:has-text('Agreement')")
    assert order()[0] == "rex"

    # Excluding rex swaps his row and the set's figures reload without him.
    before = page.inner_text("#pairwise-agreement")
    page.click(f"#labeler-{rex_id} button:text-is('Exclude')")
    page.wait_for_selector(f"#labeler-{rex_id}.excluded")
    page.wait_for_function("(before) => document.querySelector('#pairwise-agreement').textContent.trim() !== before",
                           arg=before)
    after = page.inner_text("#pairwise-agreement")
    assert float(after.rstrip("%")) > float(before.rstrip("%"))
    # ... and so do the others' rows: with two labelers left, each agrees with the other as often as the set.
    page.wait_for_function(
        "(after) => document.querySelector('tr[data-username=ann] td:nth-child(2)').textContent.includes(after)",
        arg=after)
    assert after in page.inner_text("tr[data-username=bob] td:nth-child(2)")
    screenshot(page, "quality_page_excluded")

    # Gold: pick a labeled task, say its best response; it is listed and the labelers get a gold accuracy.
    page.click("#gold .quick-pick >> nth=0")
    page.wait_for_selector("#gold-form form")
    page.check("#gold-form input[name=best_response_id] >> nth=1")
    page.click("#gold-form button:has-text('Mark gold with this best response')")
    page.wait_for_selector("#gold-tasks tr[data-task]")
    assert "B > " in page.inner_text("#gold-tasks .expected")
    page.wait_for_function("() => document.querySelector('tr[data-username=ann] td:nth-child(3)').textContent.includes('%')")
    screenshot(page, "quality_gold")

    page.click("text=Export data")
    page.wait_for_url(f"{live_server}/admin/prompt-sets/{set_id}/export")
    assert page.locator("input[name=labelers]").count() == 3
    screenshot(page, "quality_export")
