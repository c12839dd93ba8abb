"""Token-response validation (RFC 6749 §5.1) and Stora-specific leniencies."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from partner_app.stora.errors import MalformedTokenResponse
from partner_app.stora.oauth import DEFAULT_EXPIRES_IN, parse_token_response

NOW = 1_760_432_400.0


def test_complete_response():
    tokens = parse_token_response({"access_token": "a", "token_type": "Bearer",
                                   "expires_in": 7200, "refresh_token": "r",
                                   "scope": "x:read y:read", "created_at": int(NOW)},
                                  sent_at=NOW)
    assert tokens.access_token == "a" and tokens.refresh_token == "r"
    assert tokens.expires_at == datetime.fromtimestamp(NOW + 7200, UTC)
    assert tokens.scope == "x:read y:read"


def test_expiry_counts_from_the_earlier_of_send_time_and_created_at():
    late_server = parse_token_response({"access_token": "a", "expires_in": 100,
                                        "created_at": int(NOW) + 600}, sent_at=NOW)
    early_server = parse_token_response({"access_token": "a", "expires_in": 100,
                                         "created_at": int(NOW) - 600}, sent_at=NOW)
    assert late_server.expires_at == datetime.fromtimestamp(NOW + 100, UTC)
    assert early_server.expires_at == datetime.fromtimestamp(NOW - 500, UTC)


@pytest.mark.parametrize("expires_in", [None, "soon", 0, -5, True])
def test_missing_or_bad_expires_in_assumes_the_documented_lifetime(expires_in):
    payload = {"access_token": "a"}
    if expires_in is not None:
        payload["expires_in"] = expires_in
    tokens = parse_token_response(payload, sent_at=NOW)
    assert tokens.expires_at == datetime.fromtimestamp(NOW + DEFAULT_EXPIRES_IN, UTC)


def test_refresh_response_without_refresh_token_keeps_the_old_one():
    tokens = parse_token_response({"access_token": "a2"}, sent_at=NOW,
                                  previous_refresh_token="r1")
    assert tokens.refresh_token == "r1"


@pytest.mark.parametrize("payload", [{}, {"access_token": ""}, {"access_token": 5},
                                     {"access_token": "a", "token_type": "mac"}])
def test_malformed_responses_are_rejected(payload):
    with pytest.raises(MalformedTokenResponse):
        parse_token_response(payload, sent_at=NOW)


def test_scope_as_a_list_is_joined():
    tokens = parse_token_response({"access_token": "a", "scope": ["a:read", "b:read"]},
                                  sent_at=NOW)
    assert tokens.scope == "a:read b:read"


def test_token_set_repr_hides_tokens():
    tokens = parse_token_response({"access_token": "SECRET-A", "refresh_token": "SECRET-R"},
                                  sent_at=NOW)
    assert "SECRET" not in repr(tokens)
