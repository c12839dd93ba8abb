"""Every page and every answer of the web app carries the security headers; HSTS only
when served over HTTPS; our own templates hold no inline script or style."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from partner_app import create_app, security_headers
from partner_app.db import db
from partner_app.security import staff
from tests.conftest import ROOT, make_settings

EXPECTED = {
    "Content-Security-Policy": security_headers.CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def test_the_policy_allows_no_inline_code_and_no_framing():
    directives = dict(d.split(" ", 1) for d in security_headers.CONTENT_SECURITY_POLICY.split("; "))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert directives["base-uri"] == "'none'"
    assert "unsafe" not in security_headers.CONTENT_SECURITY_POLICY


def _get_paths(app) -> list[str]:
    """One concrete path per registered GET route (arguments filled with a placeholder)."""
    paths = []
    for rule in app.url_map.iter_rules():
        if "GET" not in rule.methods:
            continue
        values = {name: ("app.css" if rule.endpoint == "static" else "1")
                  for name in rule.arguments}
        paths.append(rule.build(values, append_unknown=False)[1])
    return sorted(set(paths))


def _assert_headers(response, path: str) -> None:
    for name, value in EXPECTED.items():
        assert response.headers.get(name) == value, (path, name, response.headers.get(name))
    assert "Strict-Transport-Security" not in response.headers, path  # plain HTTP here


def test_every_get_route_carries_the_headers_signed_out_and_signed_in(client, app_ctx):
    paths = _get_paths(client.application)
    assert {"/install", "/install/1", "/oauth/callback", "/healthz", "/staff/"} <= set(paths)
    for path in paths:
        response = client.get(path)
        assert response.status_code < 500, (path, response.status_code)
        _assert_headers(response, path)

    user = staff.create_staff("headers@partner.example", "a long enough password 1",
                              role="admin", actor="test")
    db.session.commit()
    login_page = client.get("/staff/login").get_data(as_text=True)
    csrf_token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', login_page).group(1)
    client.post("/staff/login", data={"csrf_token": csrf_token, "email": user.email,
                                      "password": "a long enough password 1"})
    signed_in = client.get("/staff/")
    assert signed_in.status_code == 200, signed_in.status_code
    for path in paths:
        response = client.get(path)
        assert response.status_code < 500, (path, response.status_code)
        _assert_headers(response, path)


def test_errors_and_the_webhook_receiver_carry_them_too(client):
    for response, what in (
        (client.get("/no/such/page"), "404"),
        (client.post("/install"), "405"),
        (client.post("/webhooks/stora/unknown", data=b"{}"), "webhook 404"),
        (client.post("/webhooks/stora/unknown", data=b"x" * 10), "webhook bad"),
    ):
        _assert_headers(response, what)


def test_the_callback_keeps_its_own_stricter_cache_header(client):
    response = client.get("/oauth/callback?state=x&code=y")
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Referrer-Policy"] == "no-referrer"


@pytest.mark.parametrize("public_base_url, hsts", [
    ("https://partner.example", True), ("http://127.0.0.1:5999", False)])
def test_hsts_only_when_served_over_https(backend_urls, public_base_url, hsts):
    app = create_app(make_settings(backend_urls, public_base_url=public_base_url))
    response = app.test_client().get("/no/such/page")
    assert ("Strict-Transport-Security" in response.headers) is hsts
    if hsts:
        assert response.headers["Strict-Transport-Security"].startswith("max-age=31536000")


INLINE = re.compile(r"<script(?![^>]*\bsrc=)|<style|\sstyle=|\son[a-z]+=|javascript:", re.I)


@pytest.mark.parametrize("template", [
    *sorted(str(p.relative_to(ROOT)) for p in
            (ROOT / "partner_app/templates/connections").glob("*.html")),
    "partner_app/templates/error.html", "partner_app/templates/base.html"])
def test_our_templates_hold_no_inline_script_or_style(template):
    text = Path(ROOT / template).read_text()
    assert not INLINE.search(text), INLINE.search(text)
