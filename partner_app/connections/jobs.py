"""Background jobs about connections. Each takes ids, is idempotent, and commits once."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from flask import current_app

from partner_app.connections.credentials import CredentialError
from partner_app.connections.models import Operator, OperatorStatus
from partner_app.connections.tokens import OperatorTokens, limiter_key
from partner_app.db import db
from partner_app.logging import bind_operator
from partner_app.queueing import get_redis
from partner_app.stora.client import StoraClient, shared_session, storefront_host
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


class JobTokens:
    """``TokenSource`` for the calls of one job: asks ``OperatorTokens`` once and reuses
    the token for up to ``REUSE_SECONDS`` instead of reading and decrypting the
    credential before every call.

    ``get_access_token`` only hands out a token with more than ``ON_DEMAND_MARGIN`` left
    (120 s, or a quarter of a shorter token's lifetime), so a token reused for at most
    15 s never reaches its expiry for any lifetime of a minute or more. A 401
    still goes to ``OperatorTokens.replace_rejected`` (a sibling's rotation, or a
    single-flight refresh) and its answer is reused in turn. The token lives in this
    object, which lives as long as the job's client: never logged, never stored.
    """

    REUSE_SECONDS = 15.0

    def __init__(self, source: OperatorTokens, *, clock=time.monotonic):
        self._source = source
        self._clock = clock
        self._token: str | None = None
        self._until = 0.0

    def access_token(self) -> str:
        if self._token is None or self._clock() >= self._until:
            self._keep(self._source.access_token())
        return self._token

    def replace_rejected(self, rejected: str) -> str | None:
        self._token = None
        replacement = self._source.replace_rejected(rejected)
        if replacement is not None:
            self._keep(replacement)
        return replacement

    def _keep(self, token: str) -> None:
        self._token = token
        self._until = self._clock() + self.REUSE_SECONDS


def client_for(operator_id: int) -> StoraClient:
    """A StoraClient for one operator (meant for one job), wired to the app's vault,
    OAuth client and limiter, the process's keep-alive session, and a token read once
    per job (``JobTokens``)."""
    bind_operator(operator_id)
    settings = current_app.extensions["settings"]
    shared_limiter = limiter()
    tokens = OperatorTokens(operator_id, vault=current_app.extensions["vault"],
                            oauth=current_app.extensions["stora_oauth"],
                            redis=get_redis(), limiter=shared_limiter)
    return StoraClient(api_base=settings.stora_api_base, tokens=JobTokens(tokens),
                       timeout=(settings.http_connect_timeout, settings.http_read_timeout),
                       session=shared_session(settings.stora_api_base),
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
