"""Gunicorn's access log without secrets in paths.

Two of our paths carry bearer-like secrets: staff install links (``/install/<secret>``)
and webhook routes (``/webhooks/stora/<route key>``). The access log keeps the route,
masks the secret; query strings are never logged at all (``%(U)s``).
"""

from __future__ import annotations

import re

from gunicorn.glogging import Logger

_SECRET_SEGMENT = re.compile(r"^(/install/|/webhooks/stora/)(?!result\b)[^/?]+")


def redact_path(path: str) -> str:
    return _SECRET_SEGMENT.sub(r"\1[redacted]", path)


class RedactingLogger(Logger):
    """``--logger-class partner_app.access_log.RedactingLogger``."""

    def atoms(self, resp, req, environ, request_time):
        atoms = super().atoms(resp, req, environ, request_time)
        atoms["U"] = redact_path(atoms["U"])
        # The request line holds the query string too: never log it.
        atoms["r"] = f"{atoms.get('m', '-')} {atoms['U']}"
        return atoms
