"""The logging filter masks secrets that slip into messages or extra fields."""

from __future__ import annotations

import logging

import pytest

from partner_app.logging import RedactingFilter, redact


@pytest.mark.parametrize(("text", "secret"), [
    ("GET /oauth/callback?code=abc123&state=xyz789", "abc123"),
    ("GET /oauth/callback?code=abc123&state=xyz789", "xyz789"),
    ("Authorization: Bearer eyJhbGciOi.payload.sig", "eyJhbGciOi"),
    ("Authorization: Basic Y2xpZW50OnNlY3JldA==", "Y2xpZW50OnNlY3JldA"),
    ('{"access_token": "at_123", "x": 1}', "at_123"),
    ('{"refresh_token":"rt_456"}', "rt_456"),
    ("client_secret=s3cr3t&grant_type=refresh_token", "s3cr3t"),
    ("code_verifier=vvv111", "vvv111"),
])
def test_redact_masks(text, secret):
    assert secret not in redact(text)


def test_filter_masks_args_and_extra_fields():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "token=%s", ("tok_999",), None)
    record.url = "https://h/cb?code=c_777"
    assert RedactingFilter().filter(record)
    assert "tok_999" not in record.getMessage()
    assert "c_777" not in record.url


def test_ordinary_text_is_untouched():
    text = "operator op_1234 connected with 3 sites"
    assert redact(text) == text


@pytest.mark.parametrize(("path", "kept"), [
    ("/install/6bQ2xyzSECRET", "/install/[redacted]"),
    ("/webhooks/stora/routeKEY123", "/webhooks/stora/[redacted]"),
    ("/install/result", "/install/result"),
    ("/install", "/install"),
    ("/oauth/callback", "/oauth/callback"),
])
def test_access_log_masks_secrets_in_paths(path, kept):
    from partner_app.access_log import redact_path

    assert redact_path(path) == kept
