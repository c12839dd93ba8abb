"""Background jobs about connections. Each takes ids, is idempotent, and commits once."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from flask import current_app

from partner_app.connections.credentials import CredentialError
from partner_app.connections.models import Operator, OperatorStatus
from partner_app.connections.tokens import OperatorTokens, limiter_key
from partner_app.db import db
from partner_app.logging import bind_operator
from partner_app.queueing import get_redis
from partner_app.stora.client import StoraClient, storefront_host
from partner_app.stora.errors import StoraError
from partner_app.stora.ratelimit import RedisRateLimiter, limiter_from_settings

log = logging.getLogger(__name__)


def limiter() -> RedisRateLimiter:
    """The app's shared Stora rate limiter (one per process, state in Redis)."""
    existing = current_app.extensions.get("stora_limiter")
    if existing is None:
        existing = limiter_from_settings(current_app.extensions["settings"], get_redis())
        current_app.extensions["stora_limiter"] = existing
    return existing


def client_for(operator_id: int) -> StoraClient:
    """A StoraClient for one operator, wired to the app's vault, OAuth client and limiter."""
    bind_operator(operator_id)
    settings = current_app.extensions["settings"]
    shared_limiter = limiter()
    tokens = OperatorTokens(operator_id, vault=current_app.extensions["vault"],
                            oauth=current_app.extensions["stora_oauth"],
                            redis=get_redis(), limiter=shared_limiter)
    return StoraClient(api_base=settings.stora_api_base, tokens=tokens,
                       timeout=(settings.http_connect_timeout, settings.http_read_timeout),
                       limiter=shared_limiter, limiter_key=limiter_key(operator_id))


def first_api_call(operator_id: int) -> dict:
    """Prove the chain token → vault → worker → API: list the operator's sites.

    Records ``last_api_success_at`` and the storefront host. Retryable Stora failures
    re-raise (RQ's Retry takes over); permanent ones are recorded on the operator.
    """
    operator = db.session.get(Operator, operator_id)
    if operator is None or operator.status != OperatorStatus.ACTIVE:
        log.info("first_api_call.skipped", extra={"operator_id": operator_id})
        return {"skipped": True}
    client = client_for(operator_id)
    try:
        pages = list(client.iter_pages("sites"))
    except CredentialError as exc:
        if getattr(exc, "retryable", False):
            raise
        log.warning("first_api_call.no_token", extra={"operator_id": operator_id,
                                                      "error": type(exc).__name__})
        return {"error": type(exc).__name__}
    except StoraError as exc:
        if exc.retryable:
            raise
        db.session.rollback()
        operator = db.session.get(Operator, operator_id)
        operator.last_error = f"first API call failed: {exc}"[:500]
        db.session.commit()
        return {"error": exc.code or type(exc).__name__}
    sites = [site for page in pages for site in page.items]
    operator = db.session.get(Operator, operator_id)
    operator.last_api_success_at = datetime.now(UTC)
    operator.storefront_host = storefront_host(pages[0].meta) or operator.storefront_host
    operator.last_error = None
    db.session.commit()
    log.info("first_api_call.ok", extra={"operator": operator.public_id, "sites": len(sites)})
    return {"sites": len(sites)}




def refresh_expiring_tokens() -> dict:
    """Cron: queue a refresh for every operator whose token expires within the margin.

    Job ids are deterministic per operator and expiry (``refresh-<op>-<epoch>``) and
    unique, so overlapping sweeps or many cron processes queue each refresh once.
    """
    from rq.exceptions import DuplicateJobError
    from sqlalchemy import select

    from partner_app.connections.models import Credential
    from partner_app.connections.tokens import PROACTIVE_MARGIN
    from partner_app.queueing import STORA_RETRY, get_queue

    now = datetime.now(UTC)
    candidates = db.session.execute(
        select(Credential.operator_id, Credential.access_expires_at, Credential.refreshed_at)
        .join(Operator, Operator.id == Credential.operator_id)
        .where(Operator.status.in_([OperatorStatus.ACTIVE, OperatorStatus.DEGRADED]),
               Credential.access_expires_at <= now + PROACTIVE_MARGIN.ahead)).all()
    # The margin also depends on each token's lifetime, which SQL on both engines
    # cannot compare portably: the horizon above bounds the candidates.
    due = [(operator_id, expires_at) for operator_id, expires_at, refreshed_at in candidates
           if PROACTIVE_MARGIN.expiring(expires_at=expires_at, refreshed_at=refreshed_at,
                                        now=now)]
    queue = get_queue()
    queued = 0
    for operator_id, expires_at in due:
        try:
            queue.enqueue("partner_app.connections.jobs.refresh_operator_token", operator_id,
                          job_id=f"refresh-{operator_id}-{int(expires_at.timestamp())}",
                          unique=True, retry=STORA_RETRY, result_ttl=600)
            queued += 1
        except DuplicateJobError:
            pass
    log.info("tokens.sweep", extra={"due": len(due), "queued": queued})
    return {"due": len(due), "queued": queued}


def refresh_operator_token(operator_id: int) -> dict:
    """Refresh one operator's token ahead of expiry (no-op if a sibling already did)."""
    from partner_app.connections.tokens import (
        PROACTIVE_MARGIN,
        PlatformCredentialsRejected,
        get_access_token,
    )

    try:
        get_access_token(operator_id, vault=current_app.extensions["vault"],
                         oauth=current_app.extensions["stora_oauth"], redis=get_redis(),
                         limiter=limiter(), margin=PROACTIVE_MARGIN)
    except (CredentialError, PlatformCredentialsRejected) as exc:
        if getattr(exc, "retryable", False):
            raise
        return {"refreshed": False, "reason": type(exc).__name__}
    return {"refreshed": True}
