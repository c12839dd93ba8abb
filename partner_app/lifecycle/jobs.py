"""The retention job the cron runs (``partner-app cron``, every ``--retention-every``)."""

from __future__ import annotations

import logging
from typing import Any

from flask import current_app

from partner_app.db import db, utcnow
from partner_app.lifecycle.retention import RetentionBusy, run_retention
from partner_app.queueing import get_redis

log = logging.getLogger(__name__)


def enforce_retention() -> dict[str, Any]:
    """Carry out due purges and expire the inbox and the audit log; idempotent."""
    settings = current_app.extensions["settings"]
    try:
        report = run_retention(redis=get_redis(current_app), settings=settings.retention,
                               now=utcnow(), actor_type="system", actor="cron",
                               commit=db.session.commit)
    except RetentionBusy:
        log.info("retention.busy")
        return {"skipped": "another retention run is in progress"}
    return report.as_dict()
