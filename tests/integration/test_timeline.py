"""Timeline events against the sandbox: one entry per action whatever the retries, a
lost response replayed by Stora under the same Idempotency-Key, an answered error
retried under a new one, and the sync announcing new orders once per site."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from partner_app.db import db
from partner_app.queueing import get_redis
from partner_app.stora.errors import ApiUnavailable
from partner_app.sync import jobs as sync_jobs
from partner_app.sync.services import start_sync
from partner_app.timeline import services as timeline
from partner_app.timeline.models import TimelineEvent
from tests.integration.test_sync import (
    connect_seeded,
    last_seq,
    our_operator,
    sandbox_operator,
    work,
)

EVENTS_PATH = "/2025-09/timeline/events"


def _setup(client, sandbox):
    name = connect_seeded(client, sandbox)[0]
    operator = our_operator(name)
    api = sync_jobs.client_for(operator.id)
    site = api.list_sites()[0]
    db.session.commit()
    return operator, api, site, sandbox_operator(sandbox, name)["id"]


def _stora_events(sandbox, sandbox_operator_id: str) -> list[dict]:
    return sandbox.admin("GET", f"operators/{sandbox_operator_id}/timeline_events")[
        "timeline_events"]


def _posts(sandbox, since: int) -> list[dict]:
    return [r for r in sandbox.requests_log(since) if r["path"] == EVENTS_PATH]


def _record(operator, api, site, key: str, **overrides):
    kwargs = {"template": "Synced orders", "variables": {"order_count": 3},
              "related": {"site": site["id"]}, "client": api, "commit": db.session.commit,
              "cache": get_redis(), **overrides}
    return timeline.record_action(operator.id, key, **kwargs)


def test_an_action_is_recorded_once(client, app_ctx, sandbox):
    operator, api, site, stora_operator = _setup(client, sandbox)
    since = last_seq(sandbox)
    event = _record(operator, api, site, "test:one")
    assert event.status == "recorded" and event.stora_event_id.startswith("aevt_")
    stored = _stora_events(sandbox, stora_operator)
    assert [e["id"] for e in stored] == [event.stora_event_id]
    assert stored[0]["sandbox"]["message"] == f"synced 3 orders for {site['name']}."

    again = _record(operator, api, site, "test:one")
    assert again.id == event.id and again.attempts == 1
    paths = [r["path"] for r in sandbox.requests_log(since)]
    assert paths.count(EVENTS_PATH) == 1
    # Source and template ids were looked up once and cached (ids only).
    assert paths.count("/2025-09/timeline/sources") == 1
    assert len(_stora_events(sandbox, stora_operator)) == 1


def test_a_lost_response_is_replayed_not_duplicated(client, app_ctx, sandbox):
    operator, api, site, stora_operator = _setup(client, sandbox)
    timeline.resolve_targets(api, operator.id, source_name=timeline.DEFAULT_SOURCE_NAME,
                             cache=get_redis())
    sandbox.admin("POST", "faults", json={"endpoint": "api", "mode": "drop_after_commit"})
    since = last_seq(sandbox)
    with pytest.raises(ApiUnavailable):
        _record(operator, api, site, "test:lost")
    row = db.session.scalars(select(TimelineEvent)).one()
    assert (row.status, row.key_generation) == ("pending", 0)

    event = timeline.deliver(row.id, api, source_name=timeline.DEFAULT_SOURCE_NAME,
                             commit=db.session.commit, cache=get_redis())
    posts = _posts(sandbox, since)
    assert [p["idempotent_replay"] for p in posts] == [False, True]
    assert posts[0]["idempotency_key"] == posts[1]["idempotency_key"]
    stored = _stora_events(sandbox, stora_operator)
    assert [e["id"] for e in stored] == [event.stora_event_id]
    assert (event.status, event.attempts) == ("recorded", 2)


def test_an_answered_error_is_retried_under_a_new_key(client, app_ctx, sandbox):
    operator, api, site, stora_operator = _setup(client, sandbox)
    timeline.resolve_targets(api, operator.id, source_name=timeline.DEFAULT_SOURCE_NAME,
                             cache=get_redis())
    sandbox.admin("POST", "faults", json={"endpoint": "api", "status": 500, "stored": True})
    since = last_seq(sandbox)
    with pytest.raises(ApiUnavailable):
        _record(operator, api, site, "test:answered")
    row = db.session.scalars(select(TimelineEvent)).one()
    assert (row.status, row.key_generation) == ("pending", 1)
    assert row.last_error.startswith("ApiUnavailable 500")

    event = timeline.deliver(row.id, api, source_name=timeline.DEFAULT_SOURCE_NAME,
                             commit=db.session.commit, cache=get_redis())
    posts = _posts(sandbox, since)
    assert [p["status"] for p in posts] == [500, 201]
    assert posts[0]["idempotency_key"] != posts[1]["idempotency_key"]
    assert event.status == "recorded"
    assert len(_stora_events(sandbox, stora_operator)) == 1


def test_a_refused_event_is_failed_not_retried(client, app_ctx, sandbox):
    operator, api, site, stora_operator = _setup(client, sandbox)
    since = last_seq(sandbox)
    missing = _record(operator, api, site, "test:no-template", template="No such template")
    assert missing.status == "failed" and "TimelineNotSetUp" in missing.last_error
    # The template needs its predefined ``site``: Stora answers 422 and stores it.
    invalid = _record(operator, api, site, "test:no-site", related={})
    assert invalid.status == "failed"
    assert invalid.last_error.startswith("RequestRejected 422 invalid_content")
    assert [p["status"] for p in _posts(sandbox, since)] == [422]
    assert _stora_events(sandbox, stora_operator) == []


def test_a_sync_announces_new_orders_once_per_site(client, app_ctx, sandbox):
    operator, _, site, stora_operator = _setup(client, sandbox)
    expected = sandbox_operator(sandbox, operator.name)["orders"]

    def run() -> int:
        run_ = start_sync("orders", requested_by="test", operator_id=operator.id)
        db.session.commit()
        work(app_ctx)
        return run_.id

    first = run()
    events = db.session.scalars(select(TimelineEvent).order_by(TimelineEvent.id)).all()
    assert events and all(e.status == "recorded" for e in events)
    assert all(e.action_key.startswith(f"sync:{first}:orders:site_") for e in events)
    assert sum(e.request["variables"]["order_count"] for e in events) == expected
    stored = _stora_events(sandbox, stora_operator)
    assert sorted(e["id"] for e in stored) == sorted(e.stora_event_id for e in events)

    run()  # nothing new: nothing announced
    assert len(_stora_events(sandbox, stora_operator)) == len(events)

    sandbox.admin("POST", f"operators/{stora_operator}/orders",
                  json={"count": 2, "fields": {"site": {"id": site["id"]}}})
    third = run()
    db.session.expire_all()
    latest = db.session.scalars(select(TimelineEvent).where(
        TimelineEvent.action_key.startswith(f"sync:{third}:"))).all()
    assert [(e.request["variables"]["order_count"], e.request["related"]["site"])
            for e in latest] == [(2, site["id"])]
    assert _stora_events(sandbox, stora_operator)[-1]["sandbox"]["message"] == \
        f"synced 2 orders for {site['name']}."
