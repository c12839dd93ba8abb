"""A staff admin in a real browser (Debian's Chromium through Playwright): signs in with
the keyboard, turns on two-step sign-in, signs in again with a code, walks the overview,
jobs, audit log and staff pages, and adds a viewer who then sees the pages without the
admin's controls. Screenshots of every page go to ``test-artifacts/``."""

from __future__ import annotations

import subprocess
import sys
import time

import pyotp
import pytest

from partner_app.queueing import get_redis
from tests.browser import require_chromium, screenshot
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
ADMIN = "ops-admin@partner.example"
ADMIN_PASSWORD = "correct horse battery staple"
VIEWER = "ops-viewer@partner.example"
VIEWER_PASSWORD = "another long passphrase"

playwright_api = require_chromium()


def _shot(page, name: str) -> None:
    screenshot(page, f"staff-{name}")


def _watch_console(page) -> list[str]:
    """Script errors, console errors (a CSP violation is one) and failed sub-resources."""
    problems: list[str] = []

    def on_console(msg) -> None:
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            problems.append(msg.text)  # failed loads are judged below, by URL

    def on_response(response) -> None:
        if response.status >= 400 and not response.url.endswith("/favicon.ico"):
            problems.append(f"{response.status} {response.url}")

    page.on("console", on_console)
    page.on("response", on_response)
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    return problems


def _sign_in_with_keyboard(page, public: str, email: str, password: str) -> None:
    page.goto(f"{public}/staff/")
    assert "/staff/login" in page.url
    # The e-mail field has focus on arrival (autofocus; applied once the page settles).
    page.wait_for_function("document.activeElement && document.activeElement.name === 'email'")
    page.keyboard.type(email)
    page.keyboard.press("Tab")
    page.keyboard.type(password)
    with page.expect_navigation():
        page.keyboard.press("Enter")


def test_an_admin_secures_their_account_and_adds_a_viewer(stack, browser, app):
    with app.app_context():
        redis = get_redis(app)
        for key in redis.scan_iter("staff:login:*"):  # other tests' failed sign-ins
            redis.delete(key)
    subprocess.run([sys.executable, "-m", "partner_app.cli", "staff", "create", ADMIN,
                    "--password-stdin", "--role", "admin"], input=f"{ADMIN_PASSWORD}\n",
                   text=True, env=stack["env"], cwd=ROOT, check=True, capture_output=True)
    public = stack["public"]
    context = browser.new_context()
    page = context.new_page()
    problems = _watch_console(page)

    page.goto(f"{public}/staff/")
    _shot(page, "1-sign-in")
    _sign_in_with_keyboard(page, public, ADMIN, ADMIN_PASSWORD)
    assert page.url == f"{public}/staff/"
    assert page.locator("h1").inner_text() == "Overview"
    assert page.locator("svg.chart rect.bar").count() == 24
    _shot(page, "2-overview")

    # Two-step sign-in: the key is shown as text; the code proves the app has it.
    page.click("text=" + ADMIN)
    page.click("button:has-text('Set up two-step sign-in')")
    key = page.locator("[data-testid=totp-key]").inner_text()
    assert page.locator("[data-testid=totp-uri]").input_value().startswith("otpauth://totp/")
    _shot(page, "3-two-step-enrol")
    totp = pyotp.TOTP(key)
    page.fill("input[name=code]", totp.now())
    page.click("button:has-text('Turn on')")
    assert page.locator("[data-totp=on]").is_visible()
    _shot(page, "4-two-step-on")

    page.click("button:has-text('Sign out')")
    _sign_in_with_keyboard(page, public, ADMIN, ADMIN_PASSWORD)
    assert "/staff/login/code" in page.url
    _shot(page, "5-code")
    # The enrolment used this step's code; the next step's is within the window.
    page.keyboard.type(totp.at(time.time() + 30))
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.url == f"{public}/staff/"

    for endpoint, heading, name in [("jobs", "Jobs", "6-jobs"),
                                    ("audit", "Audit log", "7-audit-log"),
                                    ("accounts", "Staff", "8-staff")]:
        page.click(f"header nav >> text={heading}")
        assert page.url == f"{public}/staff/{endpoint}"
        assert page.locator("h1").inner_text() == heading
        _shot(page, name)
    page.goto(f"{public}/staff/audit?action=staff.login")
    assert page.locator("tr[data-audit]").count() == 2  # both sign-ins, newest first
    assert "True" in page.locator("tr[data-audit]").first.inner_text()  # second factor

    page.goto(f"{public}/staff/accounts")
    page.fill("input[name=email]", VIEWER)
    page.select_option("select[name=role]", "viewer")
    page.fill("input[name=password]", VIEWER_PASSWORD)
    page.click("button:has-text('Add')")
    row = page.locator(f"tr[data-staff='{VIEWER}']")
    assert "viewer" in row.inner_text()
    assert page.locator(".flash.info").is_visible()
    _shot(page, "9-viewer-added")

    viewer_page = browser.new_context().new_page()
    viewer_problems = _watch_console(viewer_page)
    _sign_in_with_keyboard(viewer_page, public, VIEWER, VIEWER_PASSWORD)
    assert viewer_page.url == f"{public}/staff/"
    viewer_page.goto(f"{public}/staff/accounts")
    assert viewer_page.locator("text=Add a staff member").count() == 0
    assert viewer_page.locator("button:has-text('Deactivate')").count() == 0
    _shot(viewer_page, "10-viewer-staff")
    assert problems == [] and viewer_problems == []
