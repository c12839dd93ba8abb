"""Structured log lines: context fields, JSON or text, secrets masked on every handler."""

from __future__ import annotations

import contextvars
import io
import json
import logging

import pytest

from partner_app.access_log import RedactingLogger
from partner_app.logging import (
    ContextFilter,
    RedactingFilter,
    bind_operator,
    configure_logging,
    formatter_for,
    inbound_request_id,
    job_context,
    log_format_from_env,
    redact,
)
from partner_app.settings import Settings

BASE_ENV = {"APP_ENV": "test", "LOG_LEVEL": "DEBUG"}


@pytest.fixture
def capture():
    """Every line the root logger writes after ``configure_logging``, as text."""
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("authlib").level)

    def configure(**env: str) -> io.StringIO:
        configure_logging(Settings.from_env({**BASE_ENV, **env}))
        for handler in root.handlers:
            handler.setStream(stream)
        return stream

    yield configure
    root.handlers[:], root.level = saved[0], saved[1]
    logging.getLogger("authlib").setLevel(saved[2])


def _json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_carry_job_and_operator_from_the_context(capture):
    stream = capture(LOG_FORMAT="json")
    log = logging.getLogger("partner_app.example")

    def run() -> None:  # in a fresh context: earlier tests bound operators in this thread
        with job_context("sync-42-7"):
            log.info("before.operator")
            bind_operator(7)
            log.info("sync.page", extra={"page": 3})
        log.info("outside")

    contextvars.Context().run(run)
    before, during, outside = _json_lines(stream)
    assert before["job_id"] == "sync-42-7" and "operator_id" not in before
    assert during == {**during, "message": "sync.page", "level": "INFO", "page": 3,
                      "job_id": "sync-42-7", "operator_id": 7,
                      "logger": "partner_app.example"}
    assert "time" in during
    assert "job_id" not in outside and "operator_id" not in outside


def test_an_explicit_operator_field_wins_over_the_context(capture):
    stream = capture(LOG_FORMAT="json")

    def run() -> None:
        with job_context("j1"):
            bind_operator(1)
            logging.getLogger("x").info("e", extra={"operator_id": 2})

    contextvars.Context().run(run)
    assert _json_lines(stream)[0]["operator_id"] == 2


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_secrets_in_messages_extras_and_tracebacks_are_masked(capture, log_format):
    stream = capture(LOG_FORMAT=log_format)
    log = logging.getLogger("partner_app.example")
    log.info("calling with headers %s", {"Authorization": "Bearer at_CANARY_1"})
    log.info("callback /oauth/callback?code=code_CANARY_2&state=state_CANARY_3")
    log.warning("token response", extra={"refresh_token": "rt_CANARY_4",
                                         "body": '{"access_token": "at_CANARY_5"}'})
    log.info("Authorization: Basic Y2xpZW50X0NBTkFSWV82")
    try:
        raise RuntimeError("exchange failed client_secret=cs_CANARY_7")
    except RuntimeError:
        log.exception("oauth.failed")
    text = stream.getvalue()
    assert "CANARY" not in text
    assert "Y2xpZW50X0NBTkFSWV82" not in text
    assert text.count("[redacted]") >= 7
    assert "oauth.failed" in text and "RuntimeError" in text


def test_authlib_verifier_debug_line_is_masked_where_debug_is_allowed(capture):
    stream = capture(LOG_FORMAT="json")  # test mode: authlib follows LOG_LEVEL=DEBUG
    verifier = "v" * 20 + "CANARYverifier"
    # The exact line authlib/integrations/base_client/sync_app.py writes.
    logging.getLogger("authlib.integrations.base_client.sync_app").debug(
        f"Using code_verifier: {verifier!r}")
    assert "CANARYverifier" not in stream.getvalue()
    assert "Using code_verifier: [redacted]" in stream.getvalue()


def test_authlib_is_clamped_to_info_in_production(capture):
    capture(APP_ENV="production", LOG_LEVEL="DEBUG", DATABASE_URL="sqlite:///x.db",
            REDIS_URL="redis://127.0.0.1:1/0", SECRET_KEY="s" * 32,
            ENCRYPTION_KEYS="k1:" + "A" * 43 + "=", STORA_CLIENT_ID="id",
            STORA_CLIENT_SECRET="secret", PUBLIC_BASE_URL="https://partner.example")
    assert logging.getLogger().level == logging.DEBUG
    assert logging.getLogger("authlib").getEffectiveLevel() == logging.INFO


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "json"), ({"APP_ENV": "demo"}, "text"), ({"APP_ENV": "test"}, "text"),
    ({"APP_ENV": "demo", "LOG_FORMAT": "json"}, "json"), ({"LOG_FORMAT": "TEXT"}, "text"),
])
def test_log_format_defaults(env, expected):
    assert log_format_from_env(env) == expected
    if env.get("APP_ENV") in ("demo", "test"):
        assert Settings.from_env(env).log_format == expected


def test_a_bad_log_format_is_a_clear_configuration_error():
    from partner_app.settings import ConfigError

    with pytest.raises(ConfigError, match="LOG_FORMAT must be json or text"):
        Settings.from_env({"APP_ENV": "test", "LOG_FORMAT": "xml"})


@pytest.mark.parametrize(("inbound", "kept"), [
    ("req-0123456789abcdef", True),
    ("8d2f6a1c-3b0e-4f43-9d2e-0c8b2f1d9e77", True),
    ("short", False),
    ("has spaces in it", False),
    ("x" * 129, False),
    ("evil\r\nSet-Cookie: a=b", False),
    (None, False),
])
def test_inbound_request_ids_are_kept_only_when_sane(inbound, kept):
    chosen = inbound_request_id(inbound)
    assert (chosen == inbound) is kept
    if not kept:
        assert len(chosen) == 32 and int(chosen, 16) >= 0


def test_ordinary_words_near_secret_names_are_left_alone():
    text = "stora.api_error status_code=429 code: rate_limited token_type=Bearer; tokens: 3"
    assert redact(text) == text


# -- gunicorn's logger ------------------------------------------------------------------
class _Cfg:
    """The attributes of gunicorn's config that ``Logger`` reads."""

    def __init__(self, **overrides):
        from gunicorn.config import Config

        self._cfg = Config()
        self._cfg.set("accesslog", "-")
        self._cfg.set("access_log_format", '%(h)s "%(r)s" %(s)s q=%(q)s %({authorization}i)s')
        for key, value in overrides.items():
            self._cfg.set(key, value)

    def __getattr__(self, name):
        return getattr(self._cfg, name)


class _Resp:
    status = "200 OK"
    sent = 12
    headers = [("Content-Type", "text/html"), ("X-Request-Id", "rid-0000000001")]
    response_length = 12


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_the_access_log_never_prints_the_callback_query_or_credentials(monkeypatch,
                                                                       log_format):
    from datetime import timedelta

    monkeypatch.setenv("LOG_FORMAT", log_format)
    logger = RedactingLogger(_Cfg())
    stream = io.StringIO()
    for handler in logger.access_log.handlers:
        handler.setStream(stream)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/oauth/callback",
               "QUERY_STRING": "code=code_CANARY_1&state=state_CANARY_2",
               "RAW_URI": "/oauth/callback?code=code_CANARY_1&state=state_CANARY_2",
               "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
               "HTTP_AUTHORIZATION": "Bearer at_CANARY_3",
               "HTTP_REFERER": "https://stora.example/oauth2/authorize?state=state_CANARY_2"}

    class _Req:
        headers = [("AUTHORIZATION", "Bearer at_CANARY_3")]

    logger.access(_Resp(), _Req(), environ, timedelta(milliseconds=5))
    line = stream.getvalue()
    assert "/oauth/callback" in line
    assert "CANARY" not in line
    if log_format == "json":
        record = json.loads(line)
        assert record["message"] == "http.access"
        assert record["path"] == "/oauth/callback" and record["status"] == "200"
        assert record["request_id"] == "rid-0000000001"


def test_filters_are_idempotent_across_handlers():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "code=%s", ("abc",), None)
    for _ in range(2):
        assert ContextFilter().filter(record) and RedactingFilter().filter(record)
    assert " x code=[redacted]" in formatter_for("text").format(record)
