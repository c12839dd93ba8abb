"""``/healthz``, ``/readyz`` against real (and really unreachable) backends; ``/metrics``
access and what one process counts; request ids in responses and log lines."""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from flask_migrate import upgrade
from prometheus_client.parser import text_string_to_metric_families

from partner_app import create_app
from partner_app.connections.models import Operator, OperatorStatus
from partner_app.db import db
from partner_app.logging import bind_operator
from partner_app.webhooks.models import InboxStatus, WebhookEvent
from tests.conftest import BACKEND, PG_BASE, free_port, make_settings
from tests.integration.test_install_flow import LEEDS, install
from tests.integration.test_webhook_receiver import envelope, make_hook, signed_headers

pytestmark = pytest.mark.skipif(bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR")),
                                reason="in-process counts assume single-process metrics")


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` from exposition text."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(client, **kwargs) -> dict[tuple[str, tuple], float]:
    resp = client.get("/metrics", **kwargs)
    assert resp.status_code == 200, resp.status_code
    assert resp.headers["Content-Type"].startswith("text/plain")
    return samples(resp.get_data(as_text=True))


def app_for(urls: dict, **env: str):
    return create_app(make_settings(urls, **env))


# -- /healthz and /readyz ------------------------------------------------------------------
def test_healthz_answers_without_touching_backends(backend_urls):
    closed = free_port()
    broken = app_for({**backend_urls, "database_url": f"postgresql://127.0.0.1:{closed}/x",
                      "redis_url": f"redis://127.0.0.1:{closed}/0"})
    resp = broken.test_client().get("/healthz")
    assert resp.status_code == 200 and resp.get_json() == {"ok": True}


def test_readyz_is_200_when_everything_answers(client):
    resp = client.get("/readyz")
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json() == {"ok": True, "checks": {"database": "ok", "migrations": "ok",
                                                      "redis": "ok"}}
    assert resp.headers["Cache-Control"] == "no-store"


def test_readyz_is_503_naming_the_database_when_it_is_unreachable(app, backend_urls):
    closed = free_port()
    url = f"postgresql://partner:pw_CANARY@127.0.0.1:{closed}/partner"
    broken = app_for({**backend_urls, "database_url": url})
    started = time.monotonic()
    resp = broken.test_client().get("/readyz")
    assert time.monotonic() - started < 3
    assert resp.status_code == 503
    assert resp.get_json() == {"ok": False, "checks": {"database": "unreachable",
                                                       "migrations": "not_checked",
                                                       "redis": "ok"}}
    assert b"CANARY" not in resp.data and str(closed).encode() not in resp.data


def test_readyz_is_503_naming_redis_when_it_is_unreachable(app, backend_urls):
    broken = app_for({**backend_urls, "redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    resp = broken.test_client().get("/readyz")
    assert resp.status_code == 503
    assert resp.get_json()["checks"] == {"database": "ok", "migrations": "ok",
                                         "redis": "unreachable"}


@pytest.fixture
def other_database(backend_urls, tmp_path):
    """URLs of an empty database of the run's kind, dropped afterwards."""
    if BACKEND != "services":
        yield {**backend_urls, "database_url": f"sqlite:///{tmp_path / 'other.db'}"}
        return
    schema = f"pt_ready_{secrets.token_hex(4)}"
    admin = sa.create_engine(PG_BASE)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    yield {**backend_urls, "database_url": f"{PG_BASE}?options=-csearch_path%3D{schema}"}
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def test_readyz_is_503_until_migrations_reach_head(other_database):
    other = app_for(other_database)
    client = other.test_client()
    assert client.get("/readyz").get_json()["checks"]["migrations"] == "not_migrated"
    with other.app_context():
        upgrade(revision="0004")
        db.engine.dispose()
    resp = client.get("/readyz")
    assert resp.status_code == 503
    assert resp.get_json()["checks"] == {"database": "ok", "migrations": "behind",
                                         "redis": "ok"}
    with other.app_context():
        upgrade()
    assert client.get("/readyz").status_code == 200
    with other.app_context():
        with db.engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
        db.engine.dispose()
    assert client.get("/readyz").get_json()["checks"]["migrations"] == "unknown_revision"


# -- request ids -------------------------------------------------------------------------
def test_a_sane_request_id_is_echoed_and_an_insane_one_replaced(client):
    assert client.get("/healthz", headers={"X-Request-Id": "lb-0123456789"}) \
        .headers["X-Request-Id"] == "lb-0123456789"
    replaced = client.get("/healthz", headers={"X-Request-Id": "no good"}).headers["X-Request-Id"]
    assert replaced != "no good" and len(replaced) == 32
    first, second = (client.get("/healthz").headers["X-Request-Id"] for _ in range(2))
    assert first != second


def test_web_log_lines_carry_the_request_id_and_the_operator_once_known(backend_urls,
                                                                          sandbox):
    probe = app_for(backend_urls, LOG_FORMAT="json", STORA_API_BASE=sandbox.base_url)

    @probe.get("/_probe/<int:operator_id>")
    def _probe(operator_id: int):
        log = logging.getLogger("partner_app.probe")
        log.info("probe.start")
        bind_operator(operator_id)
        log.info("probe.operator_known")
        return "ok"

    stream = io.StringIO()
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler):  # LOG_FILE keeps its file
            handler.setStream(stream)
    client = probe.test_client()
    client.get("/_probe/41", headers={"X-Request-Id": "req-probe-0001"})
    client.get("/_probe/42")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()
             if "probe." in line]
    start1, known1, start2, known2 = lines
    assert start1["request_id"] == known1["request_id"] == "req-probe-0001"
    assert "operator_id" not in start1 and known1["operator_id"] == 41
    # Nothing leaks from one request into the next.
    assert start2["request_id"] not in ("req-probe-0001", None)
    assert "operator_id" not in start2 and known2["operator_id"] == 42


# -- /metrics ----------------------------------------------------------------------------
def test_metrics_are_served_to_loopback_only_without_a_token(client):
    assert client.get("/metrics").status_code == 200
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "10.1.2.3"}).status_code == 404
    # A proxy on the same host makes every client look local.
    assert client.get("/metrics", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 404


def test_metrics_need_the_bearer_token_when_one_is_set(backend_urls):
    token = "metrics-" + secrets.token_hex(12)
    guarded = app_for(backend_urls, METRICS_TOKEN=token).test_client()
    assert guarded.get("/metrics").status_code == 401
    assert guarded.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    remote = {"REMOTE_ADDR": "10.1.2.3"}
    assert guarded.get("/metrics", headers={"Authorization": f"Bearer {token}"},
                       environ_base=remote).status_code == 200


def test_requests_and_webhook_deliveries_are_counted_by_route_template(client, app_ctx):
    hook = make_hook(app_ctx)
    before = scrape(client)
    body = json.dumps(envelope()).encode()
    for _ in range(2):  # stored, then a duplicate
        assert client.post(hook.path, data=body,
                           headers=signed_headers(body, hook.secret)).status_code == 200
    forged = client.post(hook.path, data=body, headers=signed_headers(body, "0" * 64))
    assert forged.status_code in (400, 401)
    resp = client.get("/metrics")
    after = samples(resp.get_data(as_text=True))

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    for outcome, expected in (("accepted", 1), ("duplicate", 1), ("rejected", 1)):
        assert delta("partner_webhook_deliveries_total", outcome=outcome) == expected
    route = "/webhooks/stora/<route_key>"
    assert delta("partner_http_requests_total", route=route, method="POST", status="200") == 2
    assert delta("partner_http_request_duration_seconds_count", route=route) == 3
    assert hook.route_key not in resp.get_data(as_text=True)


def test_operator_and_inbox_gauges_come_from_the_database(backend_urls, app_ctx):
    hook = make_hook(app_ctx)
    with app_ctx.app_context():
        db.session.add(Operator(name="Needs Reauth Ltd", status=OperatorStatus.NEEDS_REAUTH,
                                stora_identity="name:Needs Reauth Ltd"))
        db.session.add(WebhookEvent(operator_id=hook.operator_id, event_id="evt_lag",
                                    event_type="order.created", status=InboxStatus.PENDING,
                                    received_at=datetime.now(UTC) - timedelta(seconds=90),
                                    signed_at=datetime.now(UTC) - timedelta(seconds=91),
                                    body="{}", headers={}))
        db.session.commit()
    values = scrape(app_for(backend_urls).test_client())
    assert values[("partner_metrics_database_up", ())] == 1
    assert values[("partner_operators", (("status", "active"),))] == 1
    assert values[("partner_operators", (("status", "needs_reauth"),))] == 1
    assert values[("partner_operators", (("status", "disconnected"),))] == 0
    assert values[("partner_webhook_inbox_pending", ())] == 1
    assert 90 <= values[("partner_webhook_inbox_lag_seconds", ())] < 150


def test_a_database_outage_reports_down_instead_of_failing_the_scrape(app, backend_urls):
    broken = app_for({**backend_urls,
                      "database_url": f"postgresql://127.0.0.1:{free_port()}/x"})
    values = scrape(broken.test_client())
    assert values[("partner_metrics_database_up", ())] == 0
    assert not any(name == "partner_operators" for name, _ in values)


# -- token refreshes and Stora calls, counted where they happen ---------------------------
def _counter(client, name: str, **labels: str) -> float:
    return scrape(client).get((name, tuple(sorted(labels.items()))), 0)


def test_token_refresh_outcomes_and_token_429s_are_counted(client, app_ctx, sandbox):
    from partner_app.connections.credentials import NeedsReauth
    from tests.integration.test_token_lifecycle import expire_locally, token_for

    install(client, LEEDS)
    operator_id = db.session.scalars(sa.select(Operator.id)).one()
    refreshed = _counter(client, "partner_token_refreshes_total", outcome="refreshed")
    limited = _counter(client, "partner_stora_rate_limited_total", endpoint="token")
    needs_reauth = _counter(client, "partner_token_refreshes_total", outcome="needs_reauth")

    # One 429 at the token endpoint, retried, then a refresh.
    sandbox.admin("POST", "faults", json={"endpoint": "token", "grant_type": "refresh_token",
                                          "status": 429, "headers": {"Retry-After": "0"}})
    expire_locally(operator_id)
    token_for(app_ctx, operator_id)
    assert _counter(client, "partner_stora_rate_limited_total", endpoint="token") == limited + 1
    assert _counter(client, "partner_token_refreshes_total", outcome="refreshed") \
        == refreshed + 1

    # The grant revoked at Stora: the next refresh ends in needs_reauth.
    sandbox_id = next(op["id"] for op in sandbox.operators() if op["name"] == LEEDS)
    sandbox.admin("POST", f"operators/{sandbox_id}/revoke_tokens")
    expire_locally(operator_id)
    with pytest.raises(NeedsReauth):
        token_for(app_ctx, operator_id)
    assert _counter(client, "partner_token_refreshes_total", outcome="needs_reauth") \
        == needs_reauth + 1


def test_stora_api_calls_are_counted_by_status(client, app_ctx, sandbox):
    from partner_app.connections.jobs import client_for
    from partner_app.stora.errors import ApiError

    install(client, LEEDS)
    operator_id = db.session.scalars(sa.select(Operator.id)).one()
    ok = _counter(client, "partner_stora_api_calls_total", status="200")
    missing = _counter(client, "partner_stora_api_calls_total", status="404")
    stora = client_for(operator_id)
    stora.list_sites()
    with pytest.raises(ApiError):
        stora.request("GET", "orders/ord_does_not_exist")
    assert _counter(client, "partner_stora_api_calls_total", status="200") == ok + 1
    assert _counter(client, "partner_stora_api_calls_total", status="404") == missing + 1
