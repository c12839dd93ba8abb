"""The install flow against a real sandbox process: happy paths and the negative cases
of reliability.md T-7. Our app runs in the Flask test client (it keeps cookies like a
browser); every call to Stora is real HTTP to the sandbox."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import func, select, update

from partner_app.audit import AuditEntry
from partner_app.connections.install import create_install_link
from partner_app.connections.models import Credential, OAuthState, Operator
from partner_app.db import db
from partner_app.queueing import get_queue
from tests.consent import consent

LEEDS = "Leeds City Storage Ltd"
BRISTOL = "Bristol Box Rooms"


def _path(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def start(client, path: str = "/install"):
    resp = client.get(path)
    assert resp.status_code == 302, resp.data
    return resp.headers["Location"]


def finish(client, callback_url: str):
    """Follow the callback and the clean redirect; return (callback response, page)."""
    resp = client.get(_path(callback_url))
    assert resp.status_code == 303
    page = client.get(resp.headers["Location"])
    return resp, page


def install(client, operator_name: str = LEEDS, path: str = "/install",
            decision: str = "approve"):
    return finish(client, consent(start(client, path), operator_name=operator_name,
                                  decision=decision))


def reason_of(page) -> str:
    text = page.get_data(as_text=True)
    marker = 'data-reason="'
    assert marker in text, text
    return text.split(marker, 1)[1].split('"', 1)[0]


def test_authorize_redirect_uses_pkce_s256_state_and_exact_redirect_uri(client, settings):
    location = start(client)
    query = parse_qs(urlsplit(location).query)
    assert location.startswith(settings.stora_authorize_url + "?")
    assert query["response_type"] == ["code"]
    assert query["client_id"] == [settings.stora_client_id]
    assert query["redirect_uri"] == [settings.redirect_uri]
    assert query["code_challenge_method"] == ["S256"]
    assert len(query["code_challenge"][0]) == 43
    assert len(query["state"][0]) >= 32
    assert query["scope"][0].split() == list(settings.stora_scopes)
    cookie = client.get_cookie("stora_install", path="/oauth")
    assert cookie is not None and cookie.http_only and cookie.same_site == "Lax"


def test_connect_stores_encrypted_tokens_audits_and_queues_first_call(client, app_ctx, sandbox):
    callback, page = install(client)
    assert callback.headers["Referrer-Policy"] == "no-referrer"
    assert "no-store" in callback.headers["Cache-Control"]
    assert page.status_code == 200
    assert LEEDS in page.get_data(as_text=True)
    assert page.headers["Referrer-Policy"] == "no-referrer"

    operator = db.session.scalars(select(Operator)).one()
    assert operator.status == "active" and operator.name == LEEDS
    assert operator.stora_identity == f"name:{LEEDS}"
    credential = db.session.scalars(select(Credential)).one()
    issued = sandbox.issued_secrets()
    assert credential.access_token_ct.startswith("v1.dk")
    for value in issued:
        assert value not in credential.access_token_ct
        assert value not in (credential.refresh_token_ct or "")
    actions = db.session.scalars(select(AuditEntry.action)).all()
    assert "operator.connected" in actions
    job_ids = get_queue("default").job_ids
    assert job_ids == [f"first-api-call-{operator.id}-1"]
    state = db.session.scalars(select(OAuthState)).one()
    assert state.consumed_at is not None


def test_reinstall_of_a_known_operator_replaces_tokens_without_duplicate(client, app_ctx):
    install(client)
    first = db.session.scalars(select(Credential)).one().access_token_ct
    _, page = install(client)
    assert "Reconnected" in page.get_data(as_text=True)
    assert db.session.scalar(select(func.count()).select_from(Operator)) == 1
    db.session.expire_all()
    credential = db.session.scalars(select(Credential)).one()
    assert credential.version == 2 and credential.access_token_ct != first
    assert "operator.reconnected" in db.session.scalars(select(AuditEntry.action)).all()


def test_three_operators_become_three_tenants(client, app_ctx, sandbox):
    names = [op["name"] for op in sandbox.operators()][:3]
    for name in names:
        install(client, name)
    stored = db.session.scalars(select(Operator.name).order_by(Operator.name)).all()
    assert stored == sorted(names)


def test_denied_consent_is_access_denied_and_stores_nothing(client, app_ctx):
    _, page = install(client, decision="deny")
    assert page.status_code == 400 and reason_of(page) == "access_denied"
    assert db.session.scalar(select(func.count()).select_from(Operator)) == 0


@pytest.mark.parametrize("query", ["", "?code=abc", "?code=abc&state=", "?state=forged&code=x"])
def test_missing_or_unknown_state_is_state_invalid(client, query):
    start(client)
    _, page = finish(client, "/oauth/callback" + query)
    assert reason_of(page) == "state_invalid"


def test_replayed_callback_is_state_used(client, app_ctx):
    callback_url = consent(start(client), operator_name=LEEDS)
    finish(client, callback_url)
    _, page = finish(client, callback_url)
    assert reason_of(page) == "state_used"
    assert db.session.scalars(select(Credential)).one().version == 1


def test_expired_state_is_state_expired(client, app_ctx):
    callback_url = consent(start(client), operator_name=LEEDS)
    db.session.execute(update(OAuthState).values(
        expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    db.session.commit()
    _, page = finish(client, callback_url)
    assert reason_of(page) == "state_expired"
    assert db.session.scalar(select(func.count()).select_from(Credential)) == 0


def test_callback_in_another_browser_is_session_mismatch(client, clean_app, app_ctx):
    callback_url = consent(start(client), operator_name=LEEDS)
    other_browser = clean_app.test_client()
    _, page = finish(other_browser, callback_url)
    assert reason_of(page) == "session_mismatch"
    assert db.session.scalar(select(func.count()).select_from(Credential)) == 0


def test_code_replayed_under_a_fresh_state_is_exchange_failed(client, app_ctx):
    first = consent(start(client), operator_name=LEEDS)
    finish(client, first)
    code = parse_qs(urlsplit(first).query)["code"][0]
    fresh = consent(start(client), operator_name=LEEDS)
    state = parse_qs(urlsplit(fresh).query)["state"][0]
    _, page = finish(client, f"/oauth/callback?code={code}&state={state}")
    assert reason_of(page) == "exchange_failed"


def test_token_endpoint_outage_is_stora_unavailable_and_not_retried(client, app_ctx, sandbox):
    callback_url = consent(start(client), operator_name=LEEDS)
    sandbox.admin("POST", "faults", json={"endpoint": "token", "status": 503, "count": 5})
    since = sandbox.requests_log()[-1]["seq"]
    _, page = finish(client, callback_url)
    assert reason_of(page) == "stora_unavailable"
    token_calls = [r for r in sandbox.requests_log(since) if r["path"] == "/oauth2/token"]
    assert len(token_calls) == 1  # a code is never replayed
    assert db.session.scalar(select(func.count()).select_from(Operator)) == 0


def test_redirect_uri_not_registered_is_refused_by_stora_without_redirect(client, sandbox):
    location = start(client).replace("%2Foauth%2Fcallback", "%2Fevil")
    import requests

    resp = requests.get(location, allow_redirects=False, timeout=10)
    assert resp.status_code == 400 and "Location" not in resp.headers


@pytest.mark.parametrize("param", ["next", "return_to", "redirect", "redirect_uri"])
def test_no_open_redirect_from_install_or_callback(client, param):
    location = start(client, f"/install?{param}=https://evil.example/")
    assert "evil.example" not in location.split("redirect_uri=")[0]
    resp = client.get(f"/oauth/callback?{param}=https://evil.example/&state=x")
    assert resp.headers["Location"] == "/install/result"


def test_staff_link_is_single_use(client, app_ctx, settings):
    issued = create_install_link(settings=settings, created_by="test", now=datetime.now(UTC))
    db.session.commit()
    path = _path(issued.url)
    _, page = install(client, path=path)
    assert page.status_code == 200
    resp = client.get(path)
    assert resp.status_code == 410 and reason_of(resp) == "link_used"


def test_expired_and_unknown_links_are_refused(client, app_ctx, settings):
    issued = create_install_link(settings=settings, created_by="test",
                                 now=datetime.now(UTC) - timedelta(days=2),
                                 ttl=timedelta(hours=1))
    db.session.commit()
    resp = client.get(_path(issued.url))
    assert resp.status_code == 410 and reason_of(resp) == "link_expired"
    resp = client.get("/install/not-a-real-link")
    assert resp.status_code == 404 and reason_of(resp) == "link_unknown"


def test_reconnect_link_for_one_operator_refuses_another(client, app_ctx, settings):
    install(client, LEEDS)
    leeds = db.session.scalars(select(Operator)).one()
    before = db.session.scalars(select(Credential)).one().access_token_ct
    issued = create_install_link(settings=settings, created_by="test", now=datetime.now(UTC),
                                 operator=leeds)
    db.session.commit()
    _, page = install(client, BRISTOL, path=_path(issued.url))
    assert reason_of(page) == "operator_mismatch"
    db.session.expire_all()
    assert db.session.scalar(select(func.count()).select_from(Operator)) == 1
    assert db.session.scalars(select(Credential)).one().access_token_ct == before
    _, page = install(client, LEEDS, path=_path(issued.url))
    assert "Reconnected" in page.get_data(as_text=True)


def test_failed_attempts_are_audited_with_their_reason(client, app_ctx):
    install(client, decision="deny")
    entry = db.session.scalars(select(AuditEntry).where(
        AuditEntry.action == "install.failed")).one()
    assert entry.detail["reason"] == "access_denied"
