"""Gunicorn's logs without secrets, in the platform's format.

Query strings are never logged: the callback's carries the authorization ``code`` and
``state``. The path is logged (``%(U)s``), with the secret segment of two routes
masked: staff install links (``/install/<secret>``) and webhook routes
(``/webhooks/stora/<route key>``). The query-string atom is blanked, so no access-log
format can print it, and so are request headers that carry credentials.

Gunicorn's own handlers get the platform's context and redaction filters and its
formatter (``LOG_FORMAT``); with JSON, each request is one ``http.access`` event with
its fields, including the ``request_id`` the app echoed in ``X-Request-Id``.
"""

from __future__ import annotations

import os
import re
import traceback

from gunicorn.glogging import Logger

from partner_app.logging import REQUEST_ID_HEADER, attach, log_format_from_env

_SECRET_SEGMENT = re.compile(r"^(/install/|/webhooks/stora/)(?!result\b)[^/?]+")
_SECRET_HEADER_ATOM = re.compile(r"(?i)^\{(authorization|cookie|proxy-authorization|"
                                 r"x-stora-signature)\}i$")


def redact_path(path: str) -> str:
    return _SECRET_SEGMENT.sub(r"\1[redacted]", path)


class RedactingLogger(Logger):
    """``--logger-class partner_app.access_log.RedactingLogger``."""

    log_format = "text"

    def setup(self, cfg) -> None:
        super().setup(cfg)
        self.log_format = log_format_from_env(dict(os.environ))
        for handler in [*self.error_log.handlers, *self.access_log.handlers]:
            attach(handler, self.log_format)

    def atoms(self, resp, req, environ, request_time):
        atoms = super().atoms(resp, req, environ, request_time)
        atoms["U"] = redact_path(atoms["U"])
        # The request line holds the query string too: never log it.
        atoms["r"] = f"{atoms.get('m', '-')} {atoms['U']}"
        atoms["q"] = "-"
        atoms["f"] = "-"  # a Referer can carry someone else's query string
        for key in atoms:
            if _SECRET_HEADER_ATOM.match(key):
                atoms[key] = "[redacted]"
        return atoms

    def access(self, resp, req, environ, request_time):
        if self.log_format != "json":
            return super().access(resp, req, environ, request_time)
        if not self.access_log_enabled:
            return
        atoms = self.atoms(resp, req, environ, request_time)
        request_id = next((value for name, value in getattr(resp, "headers", ())
                           if name.lower() == REQUEST_ID_HEADER.lower()), None)
        try:
            self.access_log.info("http.access", extra={
                "method": atoms["m"], "path": atoms["U"], "status": atoms["s"],
                "bytes": atoms["B"], "duration_ms": atoms["M"], "remote": atoms["h"],
                "user_agent": atoms["a"], "request_id": request_id})
        except Exception:
            self.error(traceback.format_exc())
