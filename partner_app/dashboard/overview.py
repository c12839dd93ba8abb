"""The overview page: the platform at a glance."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from flask import render_template
from redis.exceptions import RedisError

from partner_app import queue_admin
from partner_app.dashboard import queries
from partner_app.dashboard.blueprint import bp
from partner_app.dashboard.charts import Bar, bar_chart
from partner_app.queueing import get_redis

log = logging.getLogger(__name__)


def _deliveries_chart(now: datetime):
    per_hour = queries.webhook_deliveries_per_hour(now, hours=24)
    bars = [Bar(label=start.strftime("%H") if i % 3 == 0 else "", value=count,
                title=f"{start:%Y-%m-%d %H}:00 to {start + timedelta(hours=1):%H}:00 UTC: "
                      f"{count} deliver{'y' if count == 1 else 'ies'}")
            for i, (start, count) in enumerate(per_hour)]
    return bar_chart(bars, caption="Webhook deliveries per hour, last 24 hours"), \
        sum(count for _, count in per_hour)


def _queue_counts():
    """Per-queue counts, or None when Redis cannot be reached (the page still renders)."""
    try:
        return queue_admin.queue_counts(get_redis())
    except RedisError:
        log.warning("dashboard.redis_unavailable", exc_info=True)
        return None


def _overview_context() -> dict:
    now = datetime.now(UTC)
    chart, deliveries = _deliveries_chart(now)
    queues = _queue_counts()
    return {
        "health": queries.operators_by_status(),
        "refreshes": queries.token_refreshes_since(now - timedelta(hours=24)),
        "chart": chart,
        "deliveries": deliveries,
        "failed_events": queries.failed_event_count(),
        "queues": queues,
        "job_totals": None if queues is None else {
            "queued": sum(q.queued for q in queues), "running": sum(q.running for q in queues),
            "failed": sum(q.failed for q in queues)},
        "syncs": queries.sync_runs(running_only=True, limit=10),
    }


@bp.get("/")
def index():
    return render_template("dashboard/index.html", **_overview_context(), new_link=None)

