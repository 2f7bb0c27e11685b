"""In Chromium: an admin creates a labeler, who then signs in; a user changes their password."""

import pytest

from app.db.enums import Role
from app.db.session import session_scope
from tests.conftest import screenshot, sign_in_page
from tests.factories import TEST_PASSWORD, make_user

pytestmark = pytest.mark.browser


def test_admin_creates_labeler_who_then_signs_in(live_server, page):
    with session_scope() as s:
        admin = make_user(s, role=Role.admin, username="boss")
        admin_name = admin.username

    page.goto(f"{live_server}/")
    assert page.url.startswith(f"{live_server}/login")
    screenshot(page, "login")
    page.fill("input[name=username]", admin_name)
    page.fill("input[name=password]", TEST_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server}/")

    page.click("nav >> text=Users")
    page.wait_for_url(f"{live_server}/admin/users")
    # A bad password is refused next to the field, without a page reload.
    page.fill("#create-user input[name=username]", "ann")
    page.fill("#create-user input[name=password]", "short")
    page.evaluate("document.querySelector('#create-user input[name=password]').removeAttribute('minlength')")
    page.click("#create-user button[type=submit]")
    page.wait_for_selector("#create-user .field-error")
    assert "at least 8 characters" in page.inner_text("#create-user")
    screenshot(page, "admin_users_error")

    page.fill("#create-user input[name=username]", "ann")
    page.fill("#create-user input[name=password]", "ann-password-1")
    page.select_option("#create-user select[name=role]", "labeler")
    page.click("#create-user button[type=submit]")
    page.wait_for_selector("tr[data-username=ann]")
    assert "Created labeler 'ann'" in page.inner_text("#flashes")
    screenshot(page, "admin_users")

    page.click("text=Sign out")
    page.wait_for_url(f"{live_server}/login")
    page.fill("input[name=username]", "ann")
    page.fill("input[name=password]", "ann-password-1")
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server}/")
    assert "ann · labeler" in page.inner_text("header")
    assert page.locator("nav >> text=Users").count() == 0
    screenshot(page, "labeler_home")


def test_labeler_changes_password_and_the_old_one_stops_working(live_server, page):
    with session_scope() as s:
        labeler = make_user(s, role=Role.labeler, username="lea")
        name = labeler.username

    sign_in_page(page, live_server, name)

    page.click("header >> text=lea · labeler")
    page.wait_for_url(f"{live_server}/account/password")
    page.fill("input[name=current_password]", TEST_PASSWORD)
    page.fill("input[name=new_password]", "lea-new-password-1")
    page.click("button:has-text('Change password')")
    page.wait_for_selector("#flashes >> text=Password changed")
    screenshot(page, "account_password")

    page.click("button:has-text('Sign out everywhere')")
    page.wait_for_url(f"{live_server}/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", TEST_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("text=Wrong username or password")
    page.fill("input[name=password]", "lea-new-password-1")
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server}/")
