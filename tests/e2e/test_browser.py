"""A real browser (Debian's Chromium driven by Playwright) walks the install flow and the
staff dashboard, the way an operator and a partner's staff member would."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.browser import require_chromium, screenshot
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
STAFF_EMAIL = "staff@partner.example"
STAFF_PASSWORD = "correct horse battery staple"

playwright_api = require_chromium()


def test_operator_installs_in_a_browser_and_staff_sees_it_on_the_dashboard(stack, browser,
                                                                         sandbox):
    operator_name = sandbox.operators()[1]["name"]
    page = browser.new_page()
    page.goto(f"{stack['public']}/install")
    assert page.url.startswith(sandbox.base_url + "/oauth2/authorize")
    screenshot(page, "install-1-consent")
    page.select_option("select[name=operator_id]", label=operator_name)
    page.click("button[name=decision][value=approve]")
    page.wait_for_url("**/install/result")
    screenshot(page, "install-2-connected")
    assert page.locator("h1").inner_text() == f"Connected: {operator_name}"
    assert "code=" not in page.url and "state=" not in page.url

    subprocess.run([sys.executable, "-m", "partner_app.cli", "staff", "create", STAFF_EMAIL,
                    "--password-stdin"], input=f"{STAFF_PASSWORD}\n", text=True,
                   env=stack["env"], cwd=ROOT, check=True, capture_output=True)
    staff = browser.new_page()
    staff.goto(f"{stack['public']}/staff/")
    assert "/staff/login" in staff.url
    staff.fill("input[name=email]", STAFF_EMAIL)
    staff.fill("input[name=password]", STAFF_PASSWORD)
    staff.click("button[type=submit]")
    staff.wait_for_url(f"{stack['public']}/staff/")
    staff.goto(f"{stack['public']}/staff/operators")
    row = staff.locator("tr[data-operator]")
    last_api_success = row.locator("td").nth(2)
    deadline = time.monotonic() + 30
    while "—" in last_api_success.inner_text() and time.monotonic() < deadline:
        time.sleep(0.5)  # the worker's first API call lands shortly after connecting
        staff.reload()
    screenshot(staff, "dashboard-operators")
    assert operator_name in row.inner_text()
    assert row.locator(".badge").inner_text() == "active"
    assert "—" not in last_api_success.inner_text()


def test_operator_who_declines_sees_why(stack, browser, sandbox):
    page = browser.new_page()
    page.goto(f"{stack['public']}/install")
    page.click("button[name=decision][value=deny]")
    page.wait_for_url("**/install/result")
    screenshot(page, "install-declined")
    assert page.locator("[data-reason]").get_attribute("data-reason") == "access_denied"
    assert "declined" in page.inner_text("body")


def _sign_in(browser, stack):
    subprocess.run([sys.executable, "-m", "partner_app.cli", "staff", "create", STAFF_EMAIL,
                    "--password-stdin"], input=f"{STAFF_PASSWORD}\n", text=True,
                   env=stack["env"], cwd=ROOT, check=True, capture_output=True)
    staff = browser.new_page()
    staff.goto(f"{stack['public']}/staff/operators")
    assert "/staff/login" in staff.url
    staff.fill("input[name=email]", STAFF_EMAIL)
    staff.fill("input[name=password]", STAFF_PASSWORD)
    staff.click("button[type=submit]")
    staff.wait_for_url("**/staff/**")
    return staff


def _reload_until(page, check, *, timeout: float = 45, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.5)
        page.reload()


def test_staff_find_an_operator_see_its_webhooks_replay_a_failure_and_disconnect_it(
        stack, browser, sandbox):
    stora_operator = sandbox.operators()[0]
    name = stora_operator["name"]
    staff = _sign_in(browser, stack)

    # Staff issue an install link; the operator opens it and approves at Stora.
    staff.goto(f"{stack['public']}/staff/operators")
    staff.click("text=New install link")
    link = staff.locator("[data-testid=install-link]").input_value()
    assert "/install/" in link
    screenshot(staff, "staff-1-install-link")
    operator_page = browser.new_page()
    operator_page.goto(link)
    operator_page.select_option("select[name=operator_id]", label=name)
    screenshot(operator_page, "staff-2-consent")
    operator_page.click("button[name=decision][value=approve]")
    operator_page.wait_for_url("**/install/result")
    assert operator_page.locator("h1").inner_text() == f"Connected: {name}"

    # Staff find it by searching for part of its name.
    staff.goto(f"{stack['public']}/staff/operators")
    staff.fill("input[name=q]", name.split()[0].lower())
    staff.click("form.filters button[type=submit]")
    rows = staff.locator("tr[data-operator]")
    assert rows.count() == 1 and name in rows.first.inner_text()
    screenshot(staff, "staff-3-operators-search")
    rows.first.locator("a").first.click()
    staff.wait_for_url("**/staff/operators/op_*")
    public_id = staff.url.rsplit("/", 1)[1]
    # The connect's reconcile job gives the operator its Stora webhook endpoint.
    _reload_until(staff, lambda: staff.locator(".badge.sub-active").count() == 1,
                  what="an active webhook subscription")

    # An order created at Stora arrives as the operator's first webhook.
    created = sandbox.admin("POST", f"operators/{stora_operator['id']}/orders",
                            json={"count": 1})["orders"][0]
    _reload_until(staff, lambda: staff.locator("tr[data-event] .badge.ev-processed").count() == 1,
                  what="the first webhook, processed")
    assert "order.created" in staff.locator("tr[data-event]").first.inner_text()
    screenshot(staff, "staff-4-operator-first-webhook")
    staff.locator("tr[data-event] a").first.click()
    assert created["id"] in staff.locator("pre.payload").inner_text()
    assert "signature values hidden" in staff.inner_text("body")
    screenshot(staff, "staff-5-event-payload")

    # A delivery the handler cannot apply (an order without an id) is kept as failed...
    sandbox.admin("POST", f"operators/{stora_operator['id']}/events",
                  json={"type": "order.created", "data": {"order": {"status": "reserved"}}})
    staff.goto(f"{stack['public']}/staff/events?status=failed")
    _reload_until(staff, lambda: staff.locator("tr[data-event]").count() == 1,
                  what="the failed event in the inbox")
    screenshot(staff, "staff-6-events-failed")
    staff.locator("tr[data-event] a").nth(1).click()
    assert staff.locator("[data-testid=event-status]").inner_text() == "failed"
    assert "without data.order.id" in staff.locator("[data-testid=event-error]").inner_text()
    attempts = int(staff.locator(".facts div:has(dt:text('Attempts')) dd").inner_text())
    # ... and replayed from its page: the handler runs again (and fails again, visibly).
    staff.click("button:text('Replay')")
    assert "Replay of event" in staff.locator(".flash").inner_text()
    _reload_until(staff, lambda: int(staff.locator(
        ".facts div:has(dt:text('Attempts')) dd").inner_text()) > attempts
        and staff.locator("[data-testid=event-status]").inner_text() == "failed",
        what="the replay to run")
    screenshot(staff, "staff-7-event-replayed")
    staff.goto(f"{stack['public']}/staff/operators/{public_id}")
    assert "webhook_event.replayed" in staff.locator("ol.timeline").inner_text()

    # Disconnect: a confirmation page that wants the public id typed back.
    staff.click("text=Disconnect…")
    screenshot(staff, "staff-8-disconnect-confirm")
    staff.fill("input[name=confirm]", public_id)
    staff.click("button.danger:text('Disconnect')")
    staff.wait_for_url(f"**/staff/operators/{public_id}")
    assert staff.locator("[data-testid=operator-status]").inner_text() == "disconnected"
    assert "revoked at Stora: yes" in staff.locator(".flash").inner_text()
    screenshot(staff, "staff-9-disconnected")
