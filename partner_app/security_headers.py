"""Security headers on every response the web app sends.

The policy allows our own origin only and no inline code: pages load ``static/app.css``
and no script at all, so ``script-src 'self'`` costs nothing and turns any injected
``<script>`` into a blocked, reported violation. ``frame-ancestors 'none'`` forbids
framing (clickjacking on the consent hand-off and the dashboard's forms). The install
redirect to Stora is a plain 302 on a GET, not a form submission, so ``form-action``
needs no Stora origin.

HSTS is sent only when the platform is served over HTTPS (``secure_cookies``, which
production enforces): over the demo's plain HTTP it would be ignored, and on a shared
loopback host it would pin every other local service to HTTPS.

A view may set its own stricter value (the OAuth callback's ``Referrer-Policy`` and
``Cache-Control``); headers a view has set are never overwritten.
"""

from __future__ import annotations

from flask import Flask, Response

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'self'",
    "img-src 'self' data:",
    "style-src 'self'",
    "script-src 'self'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
    "form-action 'self'",
))
HSTS = "max-age=31536000; includeSubDomains"


def headers_for(*, https: bool) -> dict[str, str]:
    """The headers every response carries, HSTS included when served over HTTPS."""
    headers = {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",  # frame-ancestors for browsers without CSP level 2
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
    }
    if https:
        headers["Strict-Transport-Security"] = HSTS
    return headers


def init_app(app: Flask) -> None:
    """Register the ``after_request`` hook that adds :func:`headers_for` to responses."""
    headers = headers_for(https=app.extensions["settings"].secure_cookies)

    @app.after_request
    def add_security_headers(response: Response) -> Response:
        for name, value in headers.items():
            response.headers.setdefault(name, value)
        return response
