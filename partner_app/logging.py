"""Logging for web, workers and CLI: one line per event, with context, secrets masked.

Every record carries the ``request_id`` (web) or ``job_id`` (worker) and the
``operator_id`` once the code handling it knows the operator. They live in context
variables: ``init_app`` sets the request id per request (a sane inbound ``X-Request-Id``
or a new one, echoed on the response), ``job_context`` sets the job id around each RQ
job, and services call ``bind_operator`` when they learn which operator they act for.

Lines are JSON (``LOG_FORMAT=json``, the production default) or ``time level logger
event key=value …`` (``text``, the demo and test default). JSON comes from
python-json-logger: it already handles extra fields, exceptions and odd values, so there
is no reason to keep a serializer of our own.

The redaction filter is a last line of defence, not the plan: code never passes a
secret to a logger. It sits on every handler and masks bearer/basic credentials,
``Authorization`` values, ``code=``/``state=`` query values and token-, secret-,
password- and verifier-named fields anywhere in a rendered message, an exception's
traceback or an extra field.
"""

from __future__ import annotations

import contextlib
import logging
import logging.config
import random
import re
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from partner_app.settings import Settings

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("job_id", default=None)
operator_id_var: ContextVar[int | str | None] = ContextVar("operator_id", default=None)

REQUEST_ID_HEADER = "X-Request-Id"
# An inbound id is kept only if it is short and plain: it is echoed and logged verbatim.
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")

# Names whose values are secret wherever they appear (query strings, JSON, reprs, headers).
_SECRET_NAME = r"(?:[A-Za-z0-9]+[_-])*(?:token|secret|password|passwd|verifier|api[_-]?key)"  # noqa: S105 (a pattern)
_ANY_SECRET_NAME = rf"(?:{_SECRET_NAME}|code|state|authorization|cookie)"
_PATTERNS = [
    # The whole value of an Authorization header, whatever its scheme.
    (re.compile(r"(?i)\b(authorization[\"']?\s*[:=]\s*[\"']?)[^\"'\r\n,}]+"), r"\1[redacted]"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 [redacted]"),
    # "name": "value" and 'name': 'value' (JSON bodies, dict reprs).
    (re.compile(rf"(?i)([\"'])({_ANY_SECRET_NAME})\1\s*:\s*([\"'])(?:(?!\3).)*\3"),
     r"\1\2\1: \3[redacted]\3"),
    # name=value (query strings, form bodies, key=value logs).
    (re.compile(rf"(?i)\b({_ANY_SECRET_NAME})=([^&\s\"',;]+)"), r"\1=[redacted]"),
    # name: value (library debug lines such as Authlib's "Using code_verifier: '…'").
    (re.compile(rf"(?i)\b({_SECRET_NAME})\s*:\s*[\"']?[^\s\"',}}]+[\"']?"), r"\1: [redacted]"),
]
# Extra fields named like a secret are masked whole. ``code`` and ``state`` are left out
# on purpose: as extra fields they carry Stora error codes and operator states.
_SECRET_FIELD = re.compile(rf"(?i)^(?:{_SECRET_NAME}|authorization|cookie)$")
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName"}
CONTEXT_FIELDS = ("request_id", "job_id", "operator_id")


def redact(text: str) -> str:
    """``text`` with every recognisable secret replaced by ``[redacted]``."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _scrub(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return redact(value)
    if depth > 4:
        return value
    if isinstance(value, dict):
        return {k: "[redacted]" if isinstance(k, str) and _SECRET_FIELD.match(k)
                else _scrub(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v, depth + 1) for v in value)
    return value


class RedactingFilter(logging.Filter):
    """Renders the message once, masks it, and drops the args so nothing re-renders.

    Tracebacks are rendered here too (into ``exc_text``, which every formatter prints
    instead of re-rendering once ``exc_info`` is cleared), so an exception message that
    echoes a secret is masked like any other text.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_redacted", False):  # several handlers share one record
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not hide the event
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in list(record.__dict__.items()):
            if key in _STANDARD or key.startswith("_"):
                continue
            if _SECRET_FIELD.match(key) and value is not None:
                setattr(record, key, "[redacted]")
            else:
                setattr(record, key, _scrub(value))
        record._redacted = True
        return True


class ContextFilter(logging.Filter):
    """Adds ``request_id``, ``job_id`` and ``operator_id`` from the context, where set.

    An explicit ``extra={"operator_id": …}`` wins over the context.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in (("request_id", request_id_var), ("job_id", job_id_var),
                          ("operator_id", operator_id_var)):
            value = var.get()
            if value is not None and getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


class KeyValueFormatter(logging.Formatter):
    """``time level logger event key=value …`` with the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = " ".join(f"{k}={v}" for k, v in record.__dict__.items()
                          if k not in _STANDARD and not k.startswith("_"))
        return f"{base} {extras}" if extras else base


class JsonLineFormatter(JsonFormatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message`` and extras."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("rename_fields", {"levelname": "level", "name": "logger"})
        kwargs.setdefault("timestamp", "time")
        kwargs.setdefault("reserved_attrs", [*_STANDARD, "_redacted"])
        super().__init__("{levelname}{name}{message}", *args, style="{", **kwargs)


def formatter_for(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonLineFormatter()
    return KeyValueFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")


def log_format_from_env(environ: dict[str, str]) -> str:
    """``LOG_FORMAT`` as ``Settings`` reads it, for processes that have no settings (the
    gunicorn master)."""
    chosen = environ.get("LOG_FORMAT", "").strip().lower()
    if chosen in ("json", "text"):
        return chosen
    return "json" if environ.get("APP_ENV", "production").strip().lower() == "production" \
        else "text"


def attach(handler: logging.Handler, log_format: str) -> None:
    """Give a handler someone else created (gunicorn's) our context, redaction and format."""
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactingFilter())
    handler.setFormatter(formatter_for(log_format))


def configure_logging(settings: Settings) -> None:
    loggers: dict[str, dict] = {
        # urllib3 logs full URLs at DEBUG.
        "urllib3": {"level": "INFO"},
        # Authlib logs the PKCE verifier at DEBUG. In demo and test it follows LOG_LEVEL,
        # and the redaction filter masks that line.
        "authlib": {"level": settings.log_level},
        # LOG_LEVELS overrides (the secret canary runs Authlib at DEBUG).
        **{name: {"level": level} for name, level in settings.log_levels},
    }
    if settings.is_production and loggers["authlib"]["level"] == "DEBUG":
        loggers["authlib"] = {"level": "INFO"}  # never below INFO in production
    handlers = {"stderr": {"class": "logging.StreamHandler", "formatter": "line",
                           "filters": ["context", "redact"]}}
    if settings.log_file:
        handlers["file"] = {"class": "logging.FileHandler", "filename": settings.log_file,
                            "formatter": "line", "filters": ["context", "redact"]}
    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": ContextFilter}, "redact": {"()": RedactingFilter}},
        "formatters": {"line": {"()": formatter_for, "log_format": settings.log_format}},
        "handlers": handlers,
        "root": {"level": settings.log_level, "handlers": list(handlers)},
        "loggers": loggers,
    })


# -- context ---------------------------------------------------------------------------------
def bind_operator(operator_id: int | str | None) -> None:
    """Log lines from here to the end of the current request or job name this operator."""
    operator_id_var.set(operator_id)


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Around one RQ job: its id on every line, no operator until the job names one."""
    job_token = job_id_var.set(job_id)
    operator_token = operator_id_var.set(None)
    try:
        yield
    finally:
        operator_id_var.reset(operator_token)
        job_id_var.reset(job_token)


def inbound_request_id(value: str | None) -> str:
    """The caller's ``X-Request-Id`` if it is sane, else a new random one."""
    if value and _SANE_REQUEST_ID.match(value):
        return value
    # A correlation id, not a secret: the process's own generator (reseeded from the OS
    # in every forked child) instead of a system call per request.
    return f"{random.getrandbits(128):032x}"


def init_app(app) -> None:
    """Per-request context: a request id (echoed as ``X-Request-Id``), no operator yet."""
    from flask import g, request

    @app.before_request
    def _bind_request() -> None:
        request_id = inbound_request_id(request.headers.get(REQUEST_ID_HEADER))
        g._log_tokens = (request_id_var.set(request_id), operator_id_var.set(None))

    @app.after_request
    def _echo_request_id(response):
        request_id = request_id_var.get()
        if request_id:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response

    @app.teardown_request
    def _unbind_request(exc: BaseException | None) -> None:
        tokens = g.pop("_log_tokens", None)
        if tokens:
            # gthread workers reuse threads: nothing may leak into the next request.
            request_id_var.reset(tokens[0])
            operator_id_var.reset(tokens[1])
