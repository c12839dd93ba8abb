"""The staff dashboard's operator and event pages and their actions, over HTTP through
the app's test client, against the run's database, Redis and the sandbox process."""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, func, insert, select

from partner_app.audit import AuditEntry
from partner_app.connections.models import Credential, InstallLink, Operator
from partner_app.db import db
from partner_app.queueing import QUEUE_SYNC, QUEUE_WEBHOOKS, get_queue
from partner_app.security.staff import create_staff
from partner_app.sync.models import SyncRun
from partner_app.webhooks.models import WebhookEvent
from tests.integration.test_install_flow import BRISTOL, LEEDS, install

ADMIN = "admin@partner.example"
VIEWER = "viewer@partner.example"
PASSWORD = "correct horse battery staple"
CSRF_RE = re.compile(r'name="csrf_token" type="hidden" value="([^"]+)"'
                     r'|name="csrf_token" value="([^"]+)"')


# -- helpers ------------------------------------------------------------------------------
@pytest.fixture
def staff(app_ctx):
    admin = create_staff(ADMIN, PASSWORD, role="admin", actor="cli")
    viewer = create_staff(VIEWER, PASSWORD, role="viewer", actor="cli")
    db.session.commit()
    return {"admin": admin.id, "viewer": viewer.id}


def csrf_from(html: str) -> str:
    match = CSRF_RE.search(html)
    assert match, "no CSRF token on the page"
    return match.group(1) or match.group(2)


def sign_in(client, email: str) -> str:
    """Sign in; returns a CSRF token valid for the rest of the session."""
    token = csrf_from(client.get("/staff/login").get_data(as_text=True))
    resp = client.post("/staff/login", data={"email": email, "password": PASSWORD,
                                             "csrf_token": token})
    assert resp.status_code == 302, resp.get_data(as_text=True)
    return csrf_from(client.get("/staff/operators").get_data(as_text=True))


def add_operators(count: int, *, status: str = "active", with_events: int = 1,
                  prefix: str = "Store") -> list[int]:
    """Insert operators (with a credential-less row each) and inbox events in bulk."""
    now = datetime.now(UTC)
    start = db.session.scalar(select(func.count()).select_from(Operator)) or 0
    rows = [{"public_id": f"op_{start + i:016x}", "status": status,
             "name": f"{prefix} {start + i}", "storefront_host": f"s{start + i}.stora.test",
             "stora_identity": f"id:opr_{start + i}", "scopes": "", "refresh_failures": 0,
             "created_at": now, "updated_at": now, "last_api_success_at": now}
            for i in range(count)]
    ids = list(db.session.scalars(insert(Operator).returning(Operator.id), rows))
    events = [{"operator_id": op_id, "event_id": f"evt_{op_id}_{n}", "event_type": "order.created",
               "status": "processed", "signed_at": now, "received_at": now - timedelta(minutes=n),
               "body": "{}", "headers": {}, "deliveries": 1, "attempts": 1}
              for op_id in ids for n in range(with_events)]
    if events:
        db.session.execute(insert(WebhookEvent), events)
    db.session.commit()
    return ids


@contextmanager
def counting_statements(app):
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", count)


def audit_actions(operator_id: int | None = None) -> list[tuple[str, str, dict]]:
    db.session.rollback()
    stmt = select(AuditEntry).order_by(AuditEntry.id)
    if operator_id is not None:
        stmt = stmt.where(AuditEntry.operator_id == operator_id)
    return [(e.action, e.actor, e.detail) for e in db.session.scalars(stmt)]


def connected(client, name: str = LEEDS) -> Operator:
    install(client, name)
    db.session.rollback()
    return db.session.scalars(select(Operator).where(Operator.name == name)).one()


def failed_event(operator_id: int) -> WebhookEvent:
    now = datetime.now(UTC)
    body = json.dumps({"event": {"id": "evt_failed_1", "type": "order.created",
                                 "data": {"order": {"id": "ord_1",
                                                    "updated_at": "2026-01-01T00:00:00Z"}}}})
    row = WebhookEvent(operator_id=operator_id, event_id="evt_failed_1",
                       event_type="order.created", status="failed", signed_at=now,
                       received_at=now, body=body, attempts=1,
                       last_error="HandlerError: boom",
                       headers={"Content-Type": "application/json",
                                "X-Stora-Signature": "t=1700000000,v1=deadbeefcafe"})
    db.session.add(row)
    db.session.commit()
    return row


OPERATOR_ACTIONS = ("refresh", "sync", "reconcile", "reconnect-link", "disconnect")


# -- authorisation -------------------------------------------------------------------------
def test_anonymous_staff_pages_redirect_to_sign_in(client, app_ctx, staff):
    [op_id] = add_operators(1)
    public_id = db.session.get(Operator, op_id).public_id
    ev = failed_event(op_id)
    for path in ("/staff/operators", f"/staff/operators/{public_id}",
                 f"/staff/operators/{public_id}/disconnect", "/staff/events",
                 f"/staff/events/{ev.id}"):
        resp = client.get(path)
        assert resp.status_code == 302, path
        assert "/staff/login" in resp.headers["Location"], path
    # A POST with a valid CSRF token (from the sign-in page) still needs a staff member.
    token = csrf_from(client.get("/staff/login").get_data(as_text=True))
    for action in OPERATOR_ACTIONS:
        resp = client.post(f"/staff/operators/{public_id}/{action}", data={"csrf_token": token})
        assert resp.status_code == 302 and "/staff/login" in resp.headers["Location"], action
    resp = client.post(f"/staff/events/{ev.id}/replay", data={"csrf_token": token})
    assert resp.status_code == 302 and "/staff/login" in resp.headers["Location"]
    assert audit_actions(op_id) == []


def test_a_viewer_sees_every_page_but_gets_403_on_every_action(client, app_ctx, staff):
    [op_id] = add_operators(1)
    public_id = db.session.get(Operator, op_id).public_id
    ev = failed_event(op_id)
    token = sign_in(client, VIEWER)
    for path in ("/staff/operators", f"/staff/operators/{public_id}", "/staff/events",
                 f"/staff/events/{ev.id}"):
        page = client.get(path)
        assert page.status_code == 200, path
        html = page.get_data(as_text=True)
        assert "Replay</button>" not in html and "Refresh tokens now" not in html
    for action in OPERATOR_ACTIONS:
        resp = client.post(f"/staff/operators/{public_id}/{action}",
                           data={"csrf_token": token, "confirm": public_id})
        assert resp.status_code == 403, action
    assert client.get(f"/staff/operators/{public_id}/disconnect").status_code == 403
    assert client.post(f"/staff/events/{ev.id}/replay",
                       data={"csrf_token": token}).status_code == 403
    assert client.post("/staff/install-links", data={"csrf_token": token}).status_code == 403
    assert audit_actions(op_id) == []
    assert db.session.get(Operator, op_id).status == "active"


def test_actions_without_a_csrf_token_are_rejected(client, app_ctx, staff):
    [op_id] = add_operators(1)
    public_id = db.session.get(Operator, op_id).public_id
    ev = failed_event(op_id)
    sign_in(client, ADMIN)
    for action in OPERATOR_ACTIONS:
        for data in ({}, {"csrf_token": "forged"}):
            resp = client.post(f"/staff/operators/{public_id}/{action}",
                               data={**data, "confirm": public_id})
            assert resp.status_code == 400, (action, data)
    assert client.post(f"/staff/events/{ev.id}/replay").status_code == 400
    assert client.post("/staff/install-links").status_code == 400
    assert audit_actions(op_id) == []
    assert db.session.get(Operator, op_id).status == "active"
    assert get_queue(QUEUE_WEBHOOKS).count == 0


def test_unknown_operator_and_event_are_404(client, app_ctx, staff):
    token = sign_in(client, ADMIN)
    assert client.get("/staff/operators/op_nope").status_code == 404
    assert client.get("/staff/events/999999").status_code == 404
    assert client.post("/staff/operators/op_nope/sync",
                       data={"csrf_token": token}).status_code == 404
    assert client.post("/staff/events/999999/replay",
                       data={"csrf_token": token}).status_code == 404


# -- the operators list --------------------------------------------------------------------
def test_list_searches_filters_and_pages_without_showing_tokens(client, app_ctx, staff):
    ids = add_operators(30)
    add_operators(3, status="needs_reauth", prefix="Broken")
    sign_in(client, ADMIN)
    html = client.get("/staff/operators").get_data(as_text=True)
    assert html.count("data-operator=") == 25
    assert 'rel="next"' in html and "Store 29" in html  # newest first
    older = re.search(r'href="([^"]*before=\d+[^"]*)"', html).group(1).replace("&amp;", "&")
    html2 = client.get(older).get_data(as_text=True)
    assert html2.count("data-operator=") == 8 and "Store 0<" in html2
    newer = re.search(r'href="([^"]*after=\d+[^"]*)"', html2).group(1).replace("&amp;", "&")
    assert client.get(newer).get_data(as_text=True).count("data-operator=") == 25

    broken = client.get("/staff/operators?status=needs_reauth").get_data(as_text=True)
    assert broken.count("data-operator=") == 3 and "Store" not in broken.split("<tbody>")[1]
    for term, expected in (("store 17", 1), ("s5.stora.test", 1), ("opr_12", 1),
                           (db.session.get(Operator, ids[3]).public_id, 1), ("zzz", 0),
                           ("%", 0), ("s_.stora", 0)):
        found = client.get("/staff/operators", query_string={"q": term}).get_data(as_text=True)
        assert found.count("data-operator=") == expected, term
    assert "No operator matches." in client.get("/staff/operators?q=zzz").get_data(as_text=True)
    # a bad filter value is ignored, not an error
    assert client.get("/staff/operators?status=bogus&before=x").status_code == 200


def test_list_rows_show_health_last_api_success_last_webhook_and_token_expiry(
        client, app_ctx, staff, sandbox):
    op = connected(client)
    now = datetime.now(UTC)
    db.session.add(WebhookEvent(operator_id=op.id, event_id="evt_a", event_type="order.created",
                                status="processed", signed_at=now, received_at=now,
                                body="{}", headers={}))
    db.session.commit()
    expires = db.session.scalars(select(Credential.access_expires_at)).one()
    sign_in(client, ADMIN)
    html = client.get("/staff/operators").get_data(as_text=True)
    row = html.split(f'data-operator="{op.public_id}"', 1)[1].split("</tr>", 1)[0]
    assert 'class="badge active"' in row
    assert expires.strftime("%Y-%m-%d %H:%M:%S") in row
    assert now.strftime("%Y-%m-%d %H:%M") in row  # last webhook
    credential = db.session.scalars(select(Credential)).one()
    for secret in (credential.access_token_ct, credential.refresh_token_ct,
                   *sandbox.issued_secrets()):
        assert secret not in html


def test_statement_count_per_page_does_not_grow_with_operators(client, app_ctx, staff):
    sign_in(client, VIEWER)

    def statements(path: str) -> int:
        with counting_statements(client.application) as seen:
            assert client.get(path).status_code == 200
        return len(seen)

    add_operators(10, with_events=2)
    public_id = db.session.scalars(select(Operator.public_id).limit(1)).one()
    event_id = db.session.scalars(select(WebhookEvent.id).limit(1)).one()
    pages = ["/staff/operators", "/staff/operators?status=active", "/staff/operators?q=store",
             f"/staff/operators/{public_id}", "/staff/events",
             "/staff/events?status=processed", f"/staff/events/{event_id}"]
    few = {path: statements(path) for path in pages}
    add_operators(190, with_events=2)
    many = {path: statements(path) for path in pages}
    assert few == many
    assert max(many.values()) <= 12, many


# -- the operator page ---------------------------------------------------------------------
def test_operator_page_shows_timeline_scopes_subscriptions_events_and_jobs(
        client, app_ctx, staff, settings):
    op = connected(client)
    failed = failed_event(op.id)
    token = sign_in(client, ADMIN)
    client.post(f"/staff/operators/{op.public_id}/sync", data={"csrf_token": token})
    html = client.get(f"/staff/operators/{op.public_id}").get_data(as_text=True)
    for scope in settings.stora_scopes:
        assert f'data-scope="{scope}"' in html
    assert "missing" not in html.split("<h2>Scopes</h2>")[1].split("</table>")[0]
    assert f'data-event="{failed.id}"' in html and "HandlerError: boom" in html
    assert "Replay</button>" in html
    assert "data-sync-run=" in html
    timeline = html.split('<ol class="timeline">')[1].split("</ol>")[0]
    kinds = re.findall(r'data-kind="(\w+)"', timeline)
    assert {"audit", "token", "event", "sync"} <= set(kinds)
    assert "operator.connected" in timeline and "operator.sync_started" in timeline
    stamps = re.findall(r'<time datetime="([^"]+)"', timeline)
    assert stamps == sorted(stamps, reverse=True)  # newest first


def test_operator_page_with_missing_scopes_says_so(client, app_ctx, staff):
    [op_id] = add_operators(1)
    db.session.get(Operator, op_id).scopes = "public.order:read"
    db.session.commit()
    sign_in(client, VIEWER)
    html = client.get(f"/staff/operators/{db.session.get(Operator, op_id).public_id}"
                      ).get_data(as_text=True)
    assert "missing" in html.split("<h2>Scopes</h2>")[1].split("</table>")[0]


# -- actions -------------------------------------------------------------------------------
def test_refresh_now_refreshes_through_stora_and_is_audited(client, app_ctx, staff, sandbox):
    op = connected(client)
    version = db.session.scalars(select(Credential.version)).one()
    token = sign_in(client, ADMIN)
    since = sandbox.requests_log()[-1]["seq"]
    resp = client.post(f"/staff/operators/{op.public_id}/refresh", data={"csrf_token": token})
    assert resp.status_code == 302
    assert [r["grant_type"] for r in sandbox.requests_log(since)
            if r["path"] == "/oauth2/token"] == ["refresh_token"]
    db.session.rollback()
    assert db.session.scalars(select(Credential.version)).one() == version + 1
    [(action, actor, detail)] = [a for a in audit_actions(op.id)
                                 if a[0].startswith("operator.t")]
    assert (action, actor, detail["staff_id"]) == ("operator.tokens_refreshed", ADMIN,
                                                   staff["admin"])
    assert "Tokens refreshed." in client.get(resp.headers["Location"]).get_data(as_text=True)


def test_refresh_now_of_a_revoked_grant_says_why(client, app_ctx, staff, sandbox):
    op = connected(client)
    sandbox_id = next(o["id"] for o in sandbox.operators() if o["name"] == LEEDS)
    sandbox.admin("POST", f"operators/{sandbox_id}/revoke_tokens")
    token = sign_in(client, ADMIN)
    resp = client.post(f"/staff/operators/{op.public_id}/refresh", data={"csrf_token": token},
                       follow_redirects=True)
    assert "Tokens not refreshed: NeedsReauth." in resp.get_data(as_text=True)
    assert ("operator.refresh_failed", ADMIN) in [a[:2] for a in audit_actions(op.id)]
    assert db.session.get(Operator, op.id).status == "needs_reauth"


def test_run_sync_starts_a_single_operator_run(client, app_ctx, staff):
    op = connected(client)
    get_queue(QUEUE_SYNC).empty()
    token = sign_in(client, ADMIN)
    resp = client.post(f"/staff/operators/{op.public_id}/sync", data={"csrf_token": token})
    assert resp.status_code == 302
    db.session.rollback()
    run = db.session.scalars(select(SyncRun)).one()
    assert (run.operator_id, run.requested_by, run.total) == (op.id, ADMIN, 1)
    assert get_queue(QUEUE_SYNC).job_ids == [f"sync-{run.id}-fanout"]
    [(_, actor, detail)] = [a for a in audit_actions(op.id) if a[0] == "operator.sync_started"]
    assert (actor, detail["run_id"], detail["staff_id"]) == (ADMIN, run.id, staff["admin"])


def test_reconcile_queues_the_reconcile_job(client, app_ctx, staff):
    op = connected(client)
    get_queue(QUEUE_WEBHOOKS).empty()
    token = sign_in(client, ADMIN)
    client.post(f"/staff/operators/{op.public_id}/reconcile", data={"csrf_token": token})
    [job] = get_queue(QUEUE_WEBHOOKS).get_jobs()
    assert job.func_name == "partner_app.webhooks.reconcile_jobs.reconcile_webhooks"
    assert job.args == [op.id] or job.args == (op.id,)
    assert ":" not in job.id
    [(_, actor, detail)] = [a for a in audit_actions(op.id)
                            if a[0] == "operator.webhooks_reconcile_queued"]
    assert (actor, detail["job_id"], detail["staff_id"]) == (ADMIN, job.id, staff["admin"])


def test_reconnect_link_is_shown_once_bound_to_the_operator_and_audited(
        client, app_ctx, staff):
    op = connected(client)
    token = sign_in(client, ADMIN)
    resp = client.post(f"/staff/operators/{op.public_id}/reconnect-link",
                       data={"csrf_token": token})
    assert resp.status_code == 200
    html = resp.get_data(as_text=True)
    url = re.search(r'readonly value="([^"]+/install/[^"]+)" data-testid="reconnect-link"',
                    html).group(1)
    db.session.rollback()
    link = db.session.scalars(select(InstallLink)).one()
    assert (link.operator_id, link.created_by) == (op.id, ADMIN)
    assert url.rsplit("/", 1)[1] not in json.dumps([a[2] for a in audit_actions()])
    assert url not in client.get(f"/staff/operators/{op.public_id}").get_data(as_text=True)
    assert ("install_link.created", ADMIN) in [a[:2] for a in audit_actions(op.id)]


def test_new_install_link_lives_on_the_operators_page(client, app_ctx, staff):
    token = sign_in(client, ADMIN)
    resp = client.post("/staff/install-links", data={"csrf_token": token})
    assert resp.status_code == 200
    assert 'data-testid="install-link"' in resp.get_data(as_text=True)
    db.session.rollback()
    assert db.session.scalars(select(InstallLink.operator_id)).one() is None


def test_disconnect_needs_the_typed_public_id_then_revokes_and_is_audited(
        client, app_ctx, staff, sandbox):
    op = connected(client)
    token = sign_in(client, ADMIN)
    page = client.get(f"/staff/operators/{op.public_id}/disconnect")
    assert page.status_code == 200 and "Type the operator" in page.get_data(as_text=True)
    wrong = client.post(f"/staff/operators/{op.public_id}/disconnect",
                        data={"csrf_token": token, "confirm": "op_wrong"})
    assert wrong.status_code == 422
    assert "not this operator" in wrong.get_data(as_text=True)
    db.session.rollback()
    assert db.session.get(Operator, op.id).status == "active"
    since = sandbox.requests_log()[-1]["seq"]
    resp = client.post(f"/staff/operators/{op.public_id}/disconnect",
                       data={"csrf_token": token, "confirm": op.public_id})
    assert resp.status_code == 302
    db.session.rollback()
    assert db.session.get(Operator, op.id).status == "disconnected"
    assert [r["status"] for r in sandbox.requests_log(since)
            if r["path"] == "/oauth2/revoke"] == [200]
    assert ("operator.disconnected", ADMIN) in [a[:2] for a in audit_actions(op.id)]
    html = client.get(resp.headers["Location"]).get_data(as_text=True)
    assert "disconnected; revoked at Stora: yes" in html
    assert "Refresh tokens now" not in html and "Disconnect…" not in html


def test_disconnect_while_stora_is_down_changes_nothing_and_says_so(
        client, app_ctx, staff, sandbox):
    op = connected(client)
    token = sign_in(client, ADMIN)
    sandbox.admin("POST", "faults", json={"endpoint": "revoke", "status": 503, "count": -1})
    resp = client.post(f"/staff/operators/{op.public_id}/disconnect",
                       data={"csrf_token": token, "confirm": op.public_id})
    assert resp.status_code == 409
    assert "Not disconnected: stora_unavailable" in resp.get_data(as_text=True)
    db.session.rollback()
    assert db.session.get(Operator, op.id).status == "active"
    assert "operator.disconnected" not in [a[0] for a in audit_actions(op.id)]
    resp = client.post(f"/staff/operators/{op.public_id}/disconnect",
                       data={"csrf_token": token, "confirm": op.public_id, "local_only": "y"})
    assert resp.status_code == 302
    db.session.rollback()
    assert db.session.get(Operator, op.id).status == "disconnected"


# -- events --------------------------------------------------------------------------------
def test_events_filter_by_operator_type_and_status(client, app_ctx, staff):
    a, b = add_operators(2, with_events=3)
    failed = failed_event(b)
    sign_in(client, VIEWER)

    def rows(**query) -> int:
        return client.get("/staff/events", query_string=query).get_data(
            as_text=True).count("data-event=")

    assert rows() == 7
    assert rows(operator=db.session.get(Operator, a).public_id) == 3
    assert rows(status="failed") == 1
    assert rows(type="order.created", status="processed") == 6
    assert rows(type="contact.updated") == 0
    assert rows(status="bogus") == 7
    html = client.get("/staff/events?status=failed").get_data(as_text=True)
    assert f'data-event="{failed.id}"' in html


def test_event_page_shows_pretty_payload_and_hides_the_signature(client, app_ctx, staff):
    [op_id] = add_operators(1, with_events=0)
    ev = failed_event(op_id)
    sign_in(client, VIEWER)
    html = client.get(f"/staff/events/{ev.id}").get_data(as_text=True)
    assert "deadbeefcafe" not in html
    assert "t=1700000000, signature values hidden" in html
    assert '  &#34;event&#34;: {' in html or '  "event": {' in html
    assert "HandlerError: boom" in html


def test_replay_queues_the_event_and_is_audited_and_processed(client, app_ctx, staff):
    op = connected(client)
    ev = failed_event(op.id)
    get_queue(QUEUE_WEBHOOKS).empty()
    token = sign_in(client, ADMIN)
    resp = client.post(f"/staff/events/{ev.id}/replay", data={"csrf_token": token})
    assert resp.status_code == 302
    assert get_queue(QUEUE_WEBHOOKS).count == 1
    [(_, actor, detail)] = [a for a in audit_actions(op.id) if a[0] == "webhook_event.replayed"]
    assert (actor, detail["event_row_id"], detail["was"], detail["staff_id"]) == \
        (ADMIN, ev.id, "failed", staff["admin"])
    from tests.integration.test_sync import work

    work(client.application, QUEUE_WEBHOOKS)
    db.session.rollback()
    assert db.session.get(WebhookEvent, ev.id).status == "processed"
    html = client.get(f"/staff/events/{ev.id}").get_data(as_text=True)
    assert 'data-testid="event-status">processed' in html


def test_pages_carry_no_inline_script_or_style(client, app_ctx, staff):
    op = connected(client, BRISTOL)
    ev = failed_event(op.id)
    sign_in(client, ADMIN)
    for path in ("/staff/operators", f"/staff/operators/{op.public_id}",
                 f"/staff/operators/{op.public_id}/disconnect", "/staff/events",
                 f"/staff/events/{ev.id}"):
        html = client.get(path).get_data(as_text=True)
        assert "style=" not in html, path
        assert re.search(r"<script(?![^>]*\bsrc=)", html) is None, path


def test_events_pages_go_back_and_forth(client, app_ctx, staff):
    add_operators(12, with_events=10)  # 120 events: pages of 50, 50, 20
    sign_in(client, VIEWER)
    seen: list[str] = []
    path = "/staff/events"
    for _ in range(3):
        html = client.get(path).get_data(as_text=True)
        seen += re.findall(r'<tr data-event="(\d+)"', html)
        nxt = re.search(r'href="([^"]*before=\d+[^"]*)" rel="next"', html)
        path = nxt.group(1).replace("&amp;", "&") if nxt else None
    assert path is None and len(seen) == 120 == len(set(seen))
    assert [int(i) for i in seen] == sorted((int(i) for i in seen), reverse=True)
    back = re.search(r'href="([^"]*after=\d+[^"]*)" rel="prev"', html).group(1)
    html = client.get(back.replace("&amp;", "&")).get_data(as_text=True)
    assert re.findall(r'<tr data-event="(\d+)"', html) == seen[50:100]


def test_a_disconnected_operator_offers_only_a_reconnect_link(client, app_ctx, staff):
    [op_id] = add_operators(1, status="disconnected")
    public_id = db.session.get(Operator, op_id).public_id
    token = sign_in(client, ADMIN)
    html = client.get(f"/staff/operators/{public_id}").get_data(as_text=True)
    assert "Issue reconnect link" in html
    assert "Refresh tokens now" not in html and "Disconnect…" not in html
    resp = client.post(f"/staff/operators/{public_id}/disconnect",
                       data={"csrf_token": token, "confirm": public_id})
    assert resp.status_code == 302
    assert "already disconnected" in client.get(resp.headers["Location"]).get_data(as_text=True)


def test_viewers_are_not_offered_actions(client, app_ctx, staff):
    sign_in(client, VIEWER)
    assert "New install link" not in client.get("/staff/operators").get_data(as_text=True)
