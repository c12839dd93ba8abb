"""``POST /webhooks/stora/<route key>``: verify, store durably, acknowledge, then process.

The store runs on the receiver's own autocommit pool (``receipt_db``): one statement,
committed when it returns, and only then the 2xx.

Answers: 200 stored (or already stored); 400/401 not authentic or malformed (nothing
stored; Stora's retry is harmless); 404 unknown route (no detail); 413 too large;
503 the database could not store it (Stora retries). A Redis outage does not fail a
delivery: the row is committed, and the sweeper queues what the drain request missed.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from flask import Blueprint, current_app, jsonify, request
from sqlalchemy.exc import SQLAlchemyError

from partner_app import metrics
from partner_app.db import db
from partner_app.extensions import csrf
from partner_app.logging import bind_operator
from partner_app.webhooks import inbox, receipt_db
from partner_app.webhooks.jobs import DRAIN, request_drain

log = logging.getLogger(__name__)

bp = Blueprint("webhooks", __name__)


@bp.post("/webhooks/stora/<route_key>")
@csrf.exempt
def receive(route_key: str):
    settings = current_app.extensions["settings"]
    if (request.content_length or 0) > settings.webhook_max_body:
        metrics.webhook_delivery("rejected")
        return jsonify(error="too_large"), 413
    # The raw bytes the signature covers, read with a cap: a chunked body has no
    # Content-Length to refuse up front.
    body = request.stream.read(settings.webhook_max_body + 1)
    if len(body) > settings.webhook_max_body:
        metrics.webhook_delivery("rejected")
        return jsonify(error="too_large"), 413

    def store(conn) -> inbox.Received:
        return inbox.receive(conn, route_key, body, request.headers,
                             vault=current_app.extensions["vault"], now=datetime.now(UTC),
                             tolerance=settings.webhook_tolerance)

    try:
        received, retried = receipt_db.run(receipt_db.engine_for(current_app, db.engine),
                                           store)
        bind_operator(received.operator_id)
    except inbox.Rejected as rejected:
        metrics.webhook_delivery("rejected")
        log.info("webhook.rejected", extra={"reason": rejected.reason,
                                            "status": rejected.status})
        if rejected.status == 404:
            return "", 404
        return jsonify(error=rejected.reason), rejected.status
    except SQLAlchemyError:
        log.exception("webhook.store_failed")
        metrics.webhook_delivery("failed")
        return jsonify(error="unavailable"), 503
    metrics.webhook_delivery("duplicate" if received.duplicate else "accepted")
    if not received.duplicate or retried:
        # After the commit: a drain that starts now finds the row. (A retried store
        # may have committed on its lost first attempt, so "duplicate" proves nothing.)
        try:
            if request_drain():
                log.info("job.enqueued", extra={"job_func": DRAIN, "queue": "webhooks"})
        except Exception:
            log.exception("job.enqueue_failed", extra={"job_func": DRAIN})
    return jsonify(received=True, duplicate=received.duplicate), 200
