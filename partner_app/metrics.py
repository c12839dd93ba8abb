"""Prometheus metrics: definitions, one small function per event, and ``/metrics``.

Other modules record events with one call (``metrics.webhook_delivery("accepted")``,
``metrics.stora_call(resp.status_code)``, …); a metric failure never fails their work.

Several processes per machine (gunicorn workers, RQ workers and the work-horses they
fork per job) count into one place when ``PROMETHEUS_MULTIPROC_DIR`` names a directory
they all share: prometheus-client's multiprocess mode, one memory-mapped file per
process, summed at scrape time. The directory should be empty when the machine's
processes start (a tmpfs under ``/run`` is ideal); gunicorn's ``child_exit`` marks dead
workers (``partner_app/gunicorn_conf.py``). Without the variable each process counts on
its own, which is only right for a single process.

A forked work-horse writes into one file per worker (``<worker pid>-horse``) instead of
one per horse: horses of one worker never overlap, and a file per job would make every
scrape read thousands of files.

Numbers that need the database (operators by status, the webhook inbox backlog and its
lag) are not counted by anyone: ``DatabaseCollector`` reads them when ``/metrics`` is
scraped, cached for ``DB_CACHE_SECONDS``.

``/metrics`` answers a scraper that sends ``Authorization: Bearer <METRICS_TOKEN>``;
without ``METRICS_TOKEN`` it answers only loopback clients that came through no proxy
(no ``X-Forwarded-For``), and 404 to everyone else.

This module imports no Flask at import time: ``partner_app/stora/`` calls it.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DB_CACHE_SECONDS = 15.0

_identity: str | None = None


def _process_identity() -> str:
    return _identity or str(os.getpid())


if os.environ.get(MULTIPROC_ENV):
    os.makedirs(os.environ[MULTIPROC_ENV], exist_ok=True)
    # Chosen before any metric below exists: every value is file-backed.
    values.ValueClass = values.MultiProcessValue(process_identifier=_process_identity)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


# -- definitions -------------------------------------------------------------------------
HTTP_REQUESTS = Counter("partner_http_requests_total", "HTTP requests served, by route "
                        "template (never the raw path) and status.",
                        ["route", "method", "status"])
HTTP_DURATION = Histogram("partner_http_request_duration_seconds",
                          "Time to produce a response, by route template.", ["route"],
                          buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
WEBHOOK_DELIVERIES = Counter("partner_webhook_deliveries_total",
                             "Webhook deliveries received: accepted, duplicate, rejected "
                             "(forged, stale, malformed, unknown route, too large) or "
                             "failed (not stored; Stora retries).", ["outcome"])
JOBS = Counter("partner_jobs_total", "RQ jobs that ended: finished, failed, retried, "
               "stopped.", ["queue", "outcome"])
TOKEN_REFRESHES = Counter("partner_token_refreshes_total",
                          "Access-token refreshes: refreshed, adopted (a sibling's rotation), "
                          "fenced_out, needs_reauth, invalid_client, failed.", ["outcome"])
STORA_CALLS = Counter("partner_stora_api_calls_total", "Stora API responses by HTTP status "
                      "(\"error\": timeout or connection failure).", ["status"])
STORA_RATE_LIMITED = Counter("partner_stora_rate_limited_total",
                             "429 answers from Stora, by endpoint (api, token).", ["endpoint"])


def _safely(record) -> None:
    try:
        record()
    except Exception:  # a metric must never fail the work it describes
        log.warning("metrics.record_failed", exc_info=True)


def http_request(route: str, method: str, status: int, seconds: float) -> None:
    def record():
        HTTP_REQUESTS.labels(route, method, str(status)).inc()
        HTTP_DURATION.labels(route).observe(seconds)
    _safely(record)


def webhook_delivery(outcome: str) -> None:
    """``accepted`` | ``duplicate`` | ``rejected`` | ``failed``."""
    _safely(lambda: WEBHOOK_DELIVERIES.labels(outcome).inc())


def job_done(queue: str, outcome: str) -> None:
    """``finished`` | ``failed`` | ``retried`` | ``stopped``."""
    _safely(lambda: JOBS.labels(queue, outcome).inc())


def token_refresh(outcome: str) -> None:
    """``refreshed`` | ``adopted`` | ``fenced_out`` | ``needs_reauth`` | ``invalid_client``
    | ``failed``."""
    _safely(lambda: TOKEN_REFRESHES.labels(outcome).inc())


def stora_call(status: int | str) -> None:
    """One response from Stora's API (``"error"`` when none came); a 429 also counts as
    rate limited."""
    def record():
        STORA_CALLS.labels(str(status)).inc()
        if str(status) == "429":
            STORA_RATE_LIMITED.labels("api").inc()
    _safely(record)


def rate_limited(endpoint: str) -> None:
    """A 429 from a Stora endpoint other than the API (``token``)."""
    _safely(lambda: STORA_RATE_LIMITED.labels(endpoint).inc())


# -- processes ---------------------------------------------------------------------------
def adopt_work_horse_identity() -> None:
    """Call first thing in a forked work-horse: count into the worker's horse file."""
    global _identity
    _identity = f"{os.getppid()}-horse"


def mark_process_dead(pid: int | None = None) -> None:
    """Drop a dead process's live gauges (gunicorn ``child_exit``; a worker at exit)."""
    if multiprocess_dir():
        _safely(lambda: multiprocess.mark_process_dead(pid or os.getpid()))


def fresh_multiproc_dir(path: Path) -> str:
    """An empty directory for a new set of processes (the demo): the counts of a
    previous run would otherwise be summed into this one's."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    return str(path)


# -- database-derived gauges -------------------------------------------------------------
class DatabaseCollector(Collector):
    """Operators by status and the webhook inbox backlog, read at scrape time.

    One query pair per ``ttl`` seconds per web process, whoever scrapes; a database that
    does not answer yields ``partner_metrics_database_up 0`` and no stale numbers.
    """

    def __init__(self, app, ttl: float = DB_CACHE_SECONDS):
        self.app = app
        self.ttl = ttl
        self._lock = threading.Lock()
        self._cached: tuple[float, list] | None = None

    def describe(self) -> Iterator:
        return iter(())  # names are not known without a query; registration must not query

    def collect(self) -> Iterator:
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > self.ttl:
                self._cached = (time.monotonic(), self._read())
            families = self._cached[1]
        yield from families

    def _read(self) -> list:
        import sqlalchemy as sa

        from partner_app.connections.models import Operator, OperatorStatus
        from partner_app.db import db
        from partner_app.webhooks.models import InboxStatus, WebhookEvent

        up = GaugeMetricFamily("partner_metrics_database_up",
                               "1 if the database answered the last metrics query.")
        try:
            with self.app.app_context(), db.engine.connect() as conn:
                by_status = dict(conn.execute(
                    sa.select(Operator.status, sa.func.count()).group_by(Operator.status)).all())
                backlog, oldest = conn.execute(
                    sa.select(sa.func.count(), sa.func.min(WebhookEvent.received_at)).where(
                        WebhookEvent.status.in_([InboxStatus.PENDING,
                                                 InboxStatus.PROCESSING]))).one()
        except Exception as exc:
            log.warning("metrics.database_unavailable", extra={"error": type(exc).__name__})
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        operators = GaugeMetricFamily("partner_operators", "Operators by health status.",
                                      labels=["status"])
        for status in OperatorStatus:
            operators.add_metric([status.value], by_status.get(status.value, 0))
        pending = GaugeMetricFamily("partner_webhook_inbox_pending",
                                    "Inbox events stored but not yet processed.")
        pending.add_metric([], backlog)
        lag = GaugeMetricFamily("partner_webhook_inbox_lag_seconds",
                                "Age of the oldest unprocessed inbox event (0 when none).")
        lag.add_metric([], _age_seconds(oldest))
        return [up, operators, pending, lag]


def _age_seconds(moment: datetime | None) -> float:
    if moment is None:
        return 0.0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (datetime.now(UTC) - moment).total_seconds())


def render(database_registry: CollectorRegistry) -> bytes:
    """The exposition text: every process's counters plus the database gauges."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry) + generate_latest(database_registry)


# -- the web side ------------------------------------------------------------------------
def _loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def scrape_allowed(*, token: str | None, authorization: str | None,
                   remote_addr: str | None, forwarded_for: str | None) -> bool:
    """The ``/metrics`` access rule (see the module docstring)."""
    if token:
        return hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode())
    return _loopback(remote_addr) and not forwarded_for


def init_app(app) -> None:
    """Count every request by route template and status; serve ``/metrics``."""
    from flask import Response, abort, g, request

    database_registry = CollectorRegistry()
    database_registry.register(DatabaseCollector(app))

    @app.before_request
    def _start_clock() -> None:
        g._metrics_started = time.perf_counter()

    @app.after_request
    def _count(response):
        started = g.pop("_metrics_started", None)
        if started is not None:
            rule = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
            http_request(rule, request.method, response.status_code,
                         time.perf_counter() - started)
        return response

    def metrics_view() -> Any:
        settings = app.extensions["settings"]
        if not scrape_allowed(token=settings.metrics_token,
                              authorization=request.headers.get("Authorization"),
                              remote_addr=request.remote_addr,
                              forwarded_for=request.headers.get("X-Forwarded-For")):
            if settings.metrics_token:
                return Response("", 401, {"WWW-Authenticate": "Bearer"})
            abort(404)
        return Response(render(database_registry), 200, {
            "Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"})

    app.add_url_rule("/metrics", "metrics", metrics_view, methods=["GET"])
