"""Logging for web, workers and CLI: one line per event, secrets masked.

The redaction filter is a last line of defence, not the plan: code never passes a
secret to a logger. It masks bearer tokens, ``code=``/``state=`` query values and
token-ish JSON fields anywhere in a rendered message or its extra fields.
"""

from __future__ import annotations

import logging
import logging.config
import re

from partner_app.settings import Settings

_PATTERNS = [
    (re.compile(r"(?i)(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 [redacted]"),
    (re.compile(r"(?i)\b(code|state|code_verifier|access_token|refresh_token|client_secret|"
                r"token|secret|password)=([^&\s\"']+)"), r"\1=[redacted]"),
    (re.compile(r"(?i)\"(code|state|code_verifier|access_token|refresh_token|client_secret|"
                r"token|secret|password)\"\s*:\s*\"[^\"]*\""), r'"\1": "[redacted]"'),
]
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Renders the message once, masks it, and drops the args so nothing re-renders."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not hide the event
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and isinstance(value, str):
                setattr(record, key, redact(value))
        return True


class KeyValueFormatter(logging.Formatter):
    """``time level logger event key=value …`` with the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = " ".join(f"{k}={v}" for k, v in record.__dict__.items()
                          if k not in _STANDARD and not k.startswith("_"))
        return f"{base} {extras}" if extras else base


def configure_logging(settings: Settings) -> None:
    handlers = {"stderr": {"class": "logging.StreamHandler", "formatter": "kv",
                           "filters": ["redact"]}}
    if settings.log_file:
        handlers["file"] = {"class": "logging.FileHandler", "filename": settings.log_file,
                            "formatter": "kv", "filters": ["redact"]}
    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": RedactingFilter}},
        "formatters": {"kv": {"()": KeyValueFormatter,
                              "format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
        "handlers": handlers,
        "root": {"level": settings.log_level, "handlers": list(handlers)},
        "loggers": {
            # Authlib logs the PKCE verifier at DEBUG; urllib3 logs full URLs at DEBUG.
            "authlib": {"level": "INFO"},
            "urllib3": {"level": "INFO"},
            # LOG_LEVELS overrides (the secret canary runs Authlib at DEBUG).
            **{name: {"level": level} for name, level in settings.log_levels},
        },
    })
