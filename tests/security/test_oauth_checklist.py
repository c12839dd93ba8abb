"""Rows of the OAuth checklist (docs/security.md, reliability.md §1) that no flow test
already proves, each against the real sandbox, database and Redis."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import sqlalchemy as sa

from partner_app import create_app
from partner_app.connections.models import OAuthState
from partner_app.db import db
from partner_app.security.vault import PURPOSE_INSTALL_STATE
from partner_app.settings import ConfigError, Settings
from partner_app.stora.client import StoraClient
from partner_app.stora.errors import Forbidden
from partner_app.stora.oauth import StoraOAuth
from tests.conftest import ROOT, make_settings
from tests.integration.test_install_flow import reason_of, start
from tests.integration.test_stora_client import StaticTokens, authorize

UNRESERVED = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")


def _state_row(location: str) -> tuple[str, OAuthState]:
    state = parse_qs(urlsplit(location).query)["state"][0]
    digest = hashlib.sha256(state.encode()).hexdigest()
    return state, db.session.execute(
        sa.select(OAuthState).filter_by(state_hash=digest)).scalar_one()


def test_oa1_only_the_code_and_refresh_grants_are_used(clean_app, sandbox):
    oauth = clean_app.extensions["stora_oauth"]
    tokens = authorize(oauth)
    oauth.refresh(tokens.refresh_token)
    grants = {r["grant_type"] for r in sandbox.requests_log() if r["path"] == "/oauth2/token"}
    assert grants == {"authorization_code", "refresh_token"}
    query = parse_qs(urlsplit(oauth.authorization_url(state="s" * 43,
                                                      code_verifier="v" * 64)).query)
    assert query["response_type"] == ["code"]


def test_oa3_the_verifier_is_unreserved_43_to_128_and_the_challenge_its_s256(client, app_ctx):
    location = start(client)
    _, row = _state_row(location)
    verifier = app_ctx.extensions["vault"].unseal(
        row.code_verifier_ct, purpose=PURPOSE_INSTALL_STATE,
        context=f"oauth_states:{row.state_hash}")
    assert UNRESERVED.match(verifier)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    query = parse_qs(urlsplit(location).query)
    assert query["code_challenge"] == [challenge.rstrip(b"=").decode()]
    assert query["code_challenge_method"] == ["S256"]
    second = start(client)
    assert parse_qs(urlsplit(second).query)["code_challenge"] != query["code_challenge"]


def test_oa5_state_is_a_random_handle_kept_server_side_only_as_a_hash(client, app_ctx):
    location = start(client)
    state, row = _state_row(location)
    nonce = client.get_cookie("stora_install", path="/oauth").value
    assert len(base64.urlsafe_b64decode(state + "==")) >= 16  # ≥ 128 random bits (OA-24)
    assert row.browser_hash == hashlib.sha256(nonce.encode()).hexdigest()
    stored = " ".join(str(value) for value in
                      db.session.execute(sa.select(OAuthState.__table__)).one())
    assert state not in stored and nonce not in stored
    assert row.install_link_id is None and row.consumed_at is None


def test_oa6_oa14_production_refuses_plain_http_to_stora_and_for_the_callback():
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({
            "APP_ENV": "production", "DATABASE_URL": "postgresql://db/x",
            "REDIS_URL": "redis://r/0", "SECRET_KEY": "k" * 32,
            "ENCRYPTION_KEYS": "k1:" + base64.b64encode(b"k" * 32).decode(),
            "STORA_CLIENT_ID": "id", "STORA_CLIENT_SECRET": "secret",
            "STORA_API_BASE": "http://public-api.stora.co",
            "PUBLIC_BASE_URL": "http://partner.example"})
    assert "STORA_API_BASE must use https:// in production" in str(refused.value)
    assert "PUBLIC_BASE_URL must use https:// in production" in str(refused.value)


def test_oa8_the_state_record_names_the_issuer_and_the_redirect_uri(client, app_ctx, settings):
    _, row = _state_row(start(client))
    assert row.issuer == settings.stora_api_base
    assert row.redirect_uri == settings.redirect_uri


def test_oa10_an_error_response_is_acted_on_only_after_the_state_checks_out(client):
    callback = client.get("/oauth/callback?error=access_denied&state=forged")
    assert callback.status_code == 303
    assert reason_of(client.get(callback.headers["Location"])) == "state_invalid"


def test_oa12_cookies_are_secure_httponly_and_lax_over_https(clean_app, backend_urls, sandbox):
    app = create_app(make_settings(backend_urls, sandbox_url=sandbox.base_url,
                                   public_base_url="https://partner.example"))
    browser = app.test_client()
    started = browser.get("/install", base_url="https://partner.example")
    binding = started.headers["Set-Cookie"]
    callback = browser.get("/oauth/callback?state=forged", base_url="https://partner.example")
    session_cookie = next(c for c in callback.headers.getlist("Set-Cookie")
                          if c.startswith("session="))
    for cookie in (binding, session_cookie):
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
        assert {"secure", "httponly"} <= attributes, cookie
        assert "SameSite=Lax" in cookie, cookie
    assert "Path=/oauth" in binding
    with app.app_context():
        db.session.remove()


def test_oa14_no_code_path_turns_tls_verification_off():
    sources = [p for d in ("partner_app", "workers") for p in (ROOT / d).rglob("*.py")]
    offenders = [str(p.relative_to(ROOT)) for p in sources
                 if re.search(r"verify\s*=\s*False|AUTHLIB_INSECURE_TRANSPORT|CERT_NONE",
                              Path(p).read_text())]
    assert offenders == []


def test_oa18_a_403_for_a_missing_scope_never_refreshes(clean_app, sandbox):
    settings = clean_app.extensions["settings"]
    narrow = StoraOAuth(client_id=settings.stora_client_id,
                        client_secret=settings.stora_client_secret,
                        authorize_url=settings.stora_authorize_url,
                        api_base=settings.stora_api_base, redirect_uri=settings.redirect_uri,
                        scopes=("public.site:read",))
    tokens = authorize(narrow)
    source = StaticTokens(tokens.access_token, replacement="never-used")
    api = StoraClient(api_base=sandbox.base_url, tokens=source, timeout=(2, 2))
    assert api.list_sites() is not None
    before = len(sandbox.requests_log())
    with pytest.raises(Forbidden):
        api.request("GET", "orders")
    assert source.replacements == 0
    after = [r["path"] for r in sandbox.requests_log()[before:]]
    assert "/oauth2/token" not in after
