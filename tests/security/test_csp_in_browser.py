"""Chromium loads our pages under their real Content-Security-Policy and reports no
violation: every script, style and image the pages use comes from our own origin.

Violations are collected two ways: the ``securitypolicyviolation`` DOM event (recorded by
an init script, which the policy does not govern) and Chromium's console messages."""

from __future__ import annotations

import subprocess
import sys

import pytest

from partner_app.security_headers import CONTENT_SECURITY_POLICY
from tests.browser import require_chromium
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
STAFF_EMAIL = "csp@partner.example"
STAFF_PASSWORD = "a long enough password 2"
RECORD_VIOLATIONS = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__csp.push(`${e.violatedDirective} ${e.blockedURI} ${e.sourceFile}:${e.lineNumber}`);
});
"""

playwright_api = require_chromium()


class Watched:
    """A page whose CSP violations on our origin are collected."""

    def __init__(self, browser, origin: str):
        self.origin = origin
        self.page = browser.new_context().new_page()
        self.page.add_init_script(RECORD_VIOLATIONS)
        self.console: list[str] = []
        self.page.on("console", self._on_console)
        self.loaded: list[str] = []

    def _on_console(self, message) -> None:
        if self.page.url.startswith(self.origin) and "Content Security Policy" in message.text:
            self.console.append(f"{self.page.url}: {message.text}")

    def visit(self, path: str) -> list[str]:
        response = self.page.goto(self.origin + path)
        assert response is not None and response.status < 500, path
        self.page.wait_for_load_state("networkidle")
        return self.check()

    def check(self) -> list[str]:
        if self.page.url.startswith(self.origin):
            self.loaded.append(self.page.url)
            assert self.page.evaluate("document.styleSheets.length") >= 1  # app.css applied
            return [f"{self.page.url}: {v}" for v in self.page.evaluate("window.__csp")]
        return []


def test_our_pages_load_without_a_policy_violation(stack, browser, sandbox):
    subprocess.run([sys.executable, "-m", "partner_app.cli", "staff", "create", STAFF_EMAIL,
                    "--password-stdin"], input=f"{STAFF_PASSWORD}\n", text=True,
                   env=stack["env"], cwd=ROOT, check=True, capture_output=True)
    tab = Watched(browser, stack["public"])
    violations: list[str] = []

    # The install flow end to end, then its failure pages.
    tab.page.goto(f"{stack['public']}/install")
    tab.page.select_option("select[name=operator_id]", label=sandbox.operators()[0]["name"])
    tab.page.click("button[name=decision][value=approve]")
    tab.page.wait_for_url("**/install/result")
    violations += tab.check()
    for path in ("/install/no-such-link", "/install/result", "/no/such/page"):
        violations += tab.visit(path)

    # The staff dashboard, signed in, and every page its navigation links to.
    violations += tab.visit("/staff/login")
    tab.page.fill("input[name=email]", STAFF_EMAIL)
    tab.page.fill("input[name=password]", STAFF_PASSWORD)
    tab.page.click("button[type=submit]")
    tab.page.wait_for_load_state("networkidle")
    violations += tab.check()
    nav = tab.page.eval_on_selector_all(
        "a[href^='/staff']", "links => links.map(a => a.getAttribute('href'))")
    for path in dict.fromkeys(nav):
        violations += tab.visit(path)

    assert len(tab.loaded) >= 6, tab.loaded
    assert violations == [] and tab.console == [], violations + tab.console


def test_the_watch_sees_a_violation_when_a_page_has_inline_code(browser):
    """The same watch over a page served with an inline style and script under our
    policy: both are blocked and reported, so the test above can fail."""
    origin = "http://probe.test"
    tab = Watched(browser, origin)
    tab.page.route(f"{origin}/static/app.css", lambda route: route.fulfill(
        status=200, content_type="text/css", body="p { margin: 0 }"))
    tab.page.route(f"{origin}/inline-probe", lambda route: route.fulfill(
        status=200, content_type="text/html",
        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY},
        body='<link rel="stylesheet" href="/static/app.css"><p style="color:red">x</p>'
             "<script>document.title = 'ran'</script>"))
    violations = tab.visit("/inline-probe")
    assert tab.page.title() != "ran"
    assert any("script-src" in v for v in violations), violations
    assert any("style-src" in v for v in violations), violations
    assert any("Content Security Policy" in line for line in tab.console), tab.console
