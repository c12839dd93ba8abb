"""A real browser (Debian's Chromium driven by Playwright) walks the install flow and the
staff dashboard, the way an operator and a partner's staff member would."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
STAFF_EMAIL = "staff@partner.example"
STAFF_PASSWORD = "correct horse battery staple"

playwright_api = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture
def browser():
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            yield chromium
        finally:
            chromium.close()


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_operator_installs_in_a_browser_and_staff_sees_it_on_the_dashboard(stack, browser,
                                                                         sandbox):
    operator_name = sandbox.operators()[1]["name"]
    page = browser.new_page()
    page.goto(f"{stack['public']}/install")
    assert page.url.startswith(sandbox.base_url + "/oauth2/authorize")
    _shot(page, "install-1-consent")
    page.select_option("select[name=operator_id]", label=operator_name)
    page.click("button[name=decision][value=approve]")
    page.wait_for_url("**/install/result")
    _shot(page, "install-2-connected")
    assert page.locator("h1").inner_text() == f"Connected: {operator_name}"
    assert "code=" not in page.url and "state=" not in page.url

    subprocess.run([sys.executable, "-m", "partner_app.cli", "staff", "create", STAFF_EMAIL],
                   input=f"{STAFF_PASSWORD}\n{STAFF_PASSWORD}\n", text=True, env=stack["env"],
                   cwd=ROOT, check=True, capture_output=True)
    staff = browser.new_page()
    staff.goto(f"{stack['public']}/staff/")
    assert "/staff/login" in staff.url
    staff.fill("input[name=email]", STAFF_EMAIL)
    staff.fill("input[name=password]", STAFF_PASSWORD)
    staff.click("button[type=submit]")
    row = staff.locator("tr[data-operator]")
    deadline = time.monotonic() + 30
    while "—" in row.locator("td").nth(3).inner_text() and time.monotonic() < deadline:
        time.sleep(0.5)  # the worker's first API call lands shortly after connecting
        staff.reload()
    _shot(staff, "dashboard-operators")
    assert operator_name in row.inner_text()
    assert row.locator(".badge").inner_text() == "active"
    assert "—" not in row.locator("td").nth(3).inner_text()


def test_operator_who_declines_sees_why(stack, browser, sandbox):
    page = browser.new_page()
    page.goto(f"{stack['public']}/install")
    page.click("button[name=decision][value=deny]")
    page.wait_for_url("**/install/result")
    _shot(page, "install-declined")
    assert page.locator("[data-reason]").get_attribute("data-reason") == "access_denied"
    assert "declined" in page.inner_text("body")
