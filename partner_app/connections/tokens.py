"""Access tokens on demand: refresh exactly once per expiry, across every process.

The protocol (reliability.md §3):

1. Read the credential. A fresh token (and not one Stora just rejected) is returned.
2. Otherwise take the single-flight locks: an optional Redis lock that keeps waiters off
   the database, then the credential's row lock on PostgreSQL (``SELECT … FOR UPDATE``
   with ``lock_timeout``). Re-read: a sibling may have refreshed while we waited.
3. Spend the refresh token. Timeouts, 5xx and 429 are retried a bounded number of times
   with jitter (in Doorkeeper's revoke-on-use mode the old refresh token stays valid
   until the new access token is used, so a retry after a lost response recovers).
4. Store the new pair with the ``version`` compare-and-swap (the fence), and **commit
   before anyone uses the new access token**: its first use revokes the old refresh
   token at Stora. A fenced-out writer revokes its orphan pair and adopts the winner's.

Error classes: ``invalid_grant`` → re-read; adopt a sibling's rotation if there was
one, else the operator ``needs_reauth`` (never retried automatically). ``invalid_client``
→ one platform-wide incident; operators stay as they are. Transient failures → the
operator is ``degraded`` and the caller retries later. SQLite has no row locks; the
Redis lock gives single-flight and the fence keeps the stored pair right.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import redis as redis_lib
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from partner_app import audit, failpoints, incidents, metrics
from partner_app.connections.credentials import (
    CredentialError,
    NeedsReauth,
    NotConnected,
    StaleCredential,
    decrypt_column,
    read_credential,
    store_token_set,
)
from partner_app.connections.models import Credential, Operator, OperatorStatus
from partner_app.db import db
from partner_app.logging import bind_operator
from partner_app.security.vault import Vault
from partner_app.stora.client import RateLimiter
from partner_app.stora.errors import (
    InvalidClient,
    InvalidGrant,
    OAuthError,
    OAuthUnavailable,
)
from partner_app.stora.oauth import StoraOAuth, TokenSet

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Margin:
    """How long before expiry a stored access token stops being good enough.

    ``ahead`` is capped at ``share`` of the token's lifetime: with short-lived tokens (a
    two-minute token in a soak, or a provider that shortens them) a fixed margin would
    call every stored token expiring and make every API call refresh first.
    ``fresh_after`` (a forced refresh) rejects any pair stored before that instant.
    """

    ahead: timedelta
    share: float
    fresh_after: datetime | None = None

    def expiring(self, *, expires_at: datetime, refreshed_at: datetime,
                 now: datetime) -> bool:
        if self.fresh_after is not None and refreshed_at < self.fresh_after:
            return True
        return expires_at - now <= min(self.ahead, (expires_at - refreshed_at) * self.share)


# Refresh on demand when less than this remains, so a token never expires mid-call.
ON_DEMAND_MARGIN = Margin(ahead=timedelta(seconds=120), share=0.25)
# The proactive sweep refreshes ahead of this, leaving room for retries and outages.
PROACTIVE_MARGIN = Margin(ahead=timedelta(minutes=25), share=0.5)
# Waiting for a sibling's refresh: longer than one token round trip with retries.
LOCK_TIMEOUT_SECONDS = 15
# How often a waiter re-reads for the sibling's committed token (jittered).
POLL_INTERVAL = 0.02
QUICK_RETRIES = 2
MAX_QUICK_RETRY_WAIT = 2.0
REDIS_LOCK_TTL = 40  # > 2 x (HTTP timeouts + retries + commit), per reliability.md §3.2

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class RefreshBusy(CredentialError):
    """Another process holds the refresh lock longer than we wait: try again shortly."""

    retryable = True


class PlatformCredentialsRejected(CredentialError):
    """Stora rejected our client credentials (invalid_client): a platform incident."""


def _usable(credential: Credential, *, vault: Vault, now: datetime, margin: Margin,
            rejected: str | None) -> str | None:
    """The stored access token if it outlives ``margin`` and is not the rejected one."""
    if margin.expiring(expires_at=credential.access_expires_at,
                       refreshed_at=credential.refreshed_at, now=now):
        return None
    token = decrypt_column(credential, "access_token_ct", vault=vault)
    if rejected is not None and secrets.compare_digest(token, rejected):
        return None
    return token


class _Flight:
    """One in-process refresh that other threads wait on."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.token: str | None = None


_flights: dict[tuple[int, Margin], _Flight] = {}
_flights_lock = threading.Lock()


def _reset_flights_after_fork() -> None:
    global _flights_lock
    _flights.clear()
    _flights_lock = threading.Lock()  # a lock held by another thread at fork never frees


os.register_at_fork(after_in_child=_reset_flights_after_fork)


class _Busy(Exception):
    """A sibling holds the refresh gate right now."""


@contextmanager
def _redis_gate(redis: redis_lib.Redis | None, operator_id: int) -> Iterator[None]:
    """Let one process per operator into the refresh; the rest wait outside (optional).

    Never the correctness mechanism: the row lock and the fence are. An expired lock
    (``LockError`` on release) only means our section was not exclusive.
    """
    if redis is None:
        yield
        return
    lock = redis.lock(_gate_key(operator_id), timeout=REDIS_LOCK_TTL)
    if not lock.acquire(blocking=False):
        raise _Busy
    try:
        yield
    finally:
        try:
            lock.release()
        except redis_lib.exceptions.LockError:
            log.warning("token.refresh_lock_expired", extra={"operator_id": operator_id})


def _gate_key(operator_id: int) -> str:
    return f"stora:refresh:{operator_id}"


def _wait_for_sibling(redis: redis_lib.Redis | None, operator_id: int,
                      deadline: float) -> None:
    """Sleep until the sibling holding the gate is likely done. Raises RefreshBusy.

    With Redis, waiters watch the gate key (a cheap EXISTS) and touch the database only
    once it is released, so a hundred waiters do not saturate it with re-reads.
    """
    while True:
        if time.monotonic() > deadline:
            raise RefreshBusy(f"operator {operator_id}: a sibling's refresh is taking too long")
        time.sleep(random.uniform(0.5, 1.0) * POLL_INTERVAL)
        if redis is None or not redis.exists(_gate_key(operator_id)):
            return


def _lock_row(operator_id: int) -> Credential:
    """Take the credential's row lock without queueing for it (PostgreSQL).

    A waiter that queued on the lock would then wake in turn, one after another, each
    holding it for a read: a convoy. Instead it backs off and polls plain reads until
    the holder's committed token appears.
    """
    try:
        return read_credential(operator_id, lock=True)
    except OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) != "55P03":  # lock_not_available
            raise
        db.session.rollback()
        raise _Busy from None


def limiter_key(operator_id: int) -> str:
    """The rate-limit key of one operator's calls (its token is the unit Stora limits)."""
    return f"operator:{operator_id}"


def _spend(oauth: StoraOAuth, refresh_token: str, *, operator_id: int,
           limiter: RateLimiter | None) -> TokenSet:
    """Call the token endpoint with bounded, jittered retries for transient failures.

    Token calls draw on the limiter's reserved share, so bulk API traffic cannot starve
    refreshes; a 429 here cools the operator's key down for every worker.
    """
    for attempt in range(QUICK_RETRIES + 1):
        if limiter is not None:
            limiter.acquire(limiter_key(operator_id), kind="token")
        failpoints.reach("before_token_post")
        try:
            return oauth.refresh(refresh_token)
        except OAuthUnavailable as exc:
            if exc.status == 429:
                metrics.rate_limited("token")
            if exc.status == 429 and limiter is not None:
                limiter.backoff(limiter_key(operator_id), exc.retry_after or 1.0)
            wait = exc.retry_after if exc.retry_after is not None else \
                random.uniform(0.1, 0.5) * (2 ** attempt)
            if attempt == QUICK_RETRIES or wait > MAX_QUICK_RETRY_WAIT:
                raise
            log.info("token.refresh_retry", extra={"attempt": attempt + 1,
                                                   "status": exc.status})
            time.sleep(wait)
    raise AssertionError("unreachable")


def _set_health(operator_id: int, **values) -> None:
    db.session.execute(update(Operator).where(Operator.id == operator_id).values(**values)
                       .execution_options(synchronize_session=False))


def get_access_token(operator_id: int, *, vault: Vault, oauth: StoraOAuth,
                     redis: redis_lib.Redis | None = None,
                     limiter: RateLimiter | None = None, now: Clock = _utcnow,
                     rejected: str | None = None,
                     margin: Margin = ON_DEMAND_MARGIN, force: bool = False) -> str:
    """A valid access token for the operator, refreshing it single-flight if needed.

    ``force`` refreshes whatever the token's remaining lifetime, unless a sibling stored
    a new pair after this call began (then that pair is returned).

    ``rejected`` is a token Stora answered 401 to: it is never returned, so the caller
    gets either a sibling's newer token or a fresh refresh. Commits its own transactions
    (the new pair must be durable before its first use): call it outside any unit of
    work you still want to roll back. Raises NotConnected, NeedsReauth, RefreshBusy,
    PlatformCredentialsRejected, or a retryable OAuthError.
    """
    bind_operator(operator_id)
    operator = db.session.get(Operator, operator_id, populate_existing=True)
    if operator is None or operator.status in (OperatorStatus.DISCONNECTED,
                                               OperatorStatus.PENDING):
        raise NotConnected(f"operator {operator_id} is not connected")
    if operator.status == OperatorStatus.NEEDS_REAUTH:
        raise NeedsReauth(f"operator {operator_id} needs to reconnect")
    if force:
        margin = replace(margin, fresh_after=now())
    token = _usable(read_credential(operator_id), vault=vault, now=now(), margin=margin,
                    rejected=rejected)
    if token is not None:
        return token
    db.session.commit()  # end the read; the locked read below starts a fresh transaction

    # Threads of one process share one flight: followers sleep on an event instead of
    # each polling Redis and the database (a hundred pollers starve the one refresher).
    key = (operator_id, margin)
    with _flights_lock:
        flight = _flights.get(key)
        leader = flight is None
        if leader:
            flight = _flights[key] = _Flight()
    if not leader:
        flight.done.wait(LOCK_TIMEOUT_SECONDS + 30)
        if flight.token is not None and (rejected is None or
                                         not secrets.compare_digest(flight.token, rejected)):
            return flight.token
        return _across_processes(operator_id, vault=vault, oauth=oauth, redis=redis,
                                 limiter=limiter, now=now, rejected=rejected, margin=margin)
    try:
        flight.token = _across_processes(operator_id, vault=vault, oauth=oauth, redis=redis,
                                         limiter=limiter, now=now, rejected=rejected,
                                         margin=margin)
        return flight.token
    finally:
        with _flights_lock:
            _flights.pop(key, None)
        flight.done.set()


def _across_processes(operator_id: int, *, vault: Vault, oauth: StoraOAuth,
                      redis: redis_lib.Redis | None, limiter: RateLimiter | None, now: Clock,
                      rejected: str | None, margin: Margin) -> str:
    """Single flight across processes: one refresher, the others wait for its commit."""
    deadline = time.monotonic() + LOCK_TIMEOUT_SECONDS
    while True:
        try:
            with _redis_gate(redis, operator_id):
                return _refresh_locked(operator_id, vault=vault, oauth=oauth, limiter=limiter,
                                       now=now, rejected=rejected, margin=margin)
        except _Busy:
            pass
        _wait_for_sibling(redis, operator_id, deadline)
        token = _usable(read_credential(operator_id), vault=vault, now=now(), margin=margin,
                        rejected=rejected)
        db.session.commit()
        if token is not None:  # the sibling's pair is committed: use it
            return token


def _refresh_locked(operator_id: int, *, vault: Vault, oauth: StoraOAuth,
                    limiter: RateLimiter | None, now: Clock, rejected: str | None,
                    margin: Margin) -> str:
    locked = _lock_row(operator_id)
    token = _usable(locked, vault=vault, now=now(), margin=margin, rejected=rejected)
    if token is not None:  # a sibling refreshed while we waited
        db.session.commit()
        return token
    if locked.refresh_token_ct is None:
        db.session.rollback()
        _needs_reauth(operator_id, reason="no refresh token stored")
        raise NeedsReauth(f"operator {operator_id} has no refresh token")
    spent = decrypt_column(locked, "refresh_token_ct", vault=vault)
    read_version = locked.version
    try:
        tokens = _spend(oauth, spent, operator_id=operator_id, limiter=limiter)
    except InvalidGrant:
        db.session.rollback()
        return _after_invalid_grant(operator_id, spent, vault=vault)
    except InvalidClient:
        db.session.rollback()
        incidents.report(incidents.INVALID_CLIENT, endpoint="token")
        log.error("token.invalid_client", extra={"operator_id": operator_id})
        metrics.token_refresh("invalid_client")
        raise PlatformCredentialsRejected("Stora rejected the partner's client "
                                          "credentials") from None
    except OAuthError as exc:
        db.session.rollback()
        _degraded(operator_id, f"token refresh failed: {exc}")
        raise

    failpoints.reach("after_token_response_before_commit")
    operator = db.session.get(Operator, operator_id)
    try:
        credential = store_token_set(operator, tokens, vault=vault, now=now(),
                                     expected_version=read_version)
    except StaleCredential:
        db.session.rollback()
        return _fenced_out(operator_id, tokens, oauth=oauth, vault=vault, now=now,
                           margin=margin, rejected=rejected)
    _set_health(operator_id, status=OperatorStatus.ACTIVE, refresh_failures=0,
                last_refresh_at=now(), last_error=None)
    audit.record("token.refreshed", actor_type="system", actor="token-refresh",
                 operator_id=operator_id, version=credential.version)
    incidents.resolve(incidents.INVALID_CLIENT)  # our credentials demonstrably work
    db.session.commit()
    log.info("token.refreshed", extra={"operator": operator.public_id,
                                       "version": credential.version})
    metrics.token_refresh("refreshed")
    failpoints.reach("after_commit_before_first_use")
    return tokens.access_token


def _after_invalid_grant(operator_id: int, spent: str, *, vault: Vault) -> str:
    """Re-read before declaring the grant dead: a sibling may have rotated it."""
    current = read_credential(operator_id)
    if current.refresh_token_ct is not None and not secrets.compare_digest(
            decrypt_column(current, "refresh_token_ct", vault=vault), spent):
        token = decrypt_column(current, "access_token_ct", vault=vault)
        db.session.commit()
        log.info("token.adopted_sibling_rotation", extra={"operator_id": operator_id})
        metrics.token_refresh("adopted")
        return token
    db.session.rollback()
    _needs_reauth(operator_id, reason="refresh token rejected (invalid_grant)")
    raise NeedsReauth(f"operator {operator_id}: refresh token rejected")


def _fenced_out(operator_id: int, orphan: TokenSet, *, oauth: StoraOAuth, vault: Vault,
                now: Clock, margin: Margin, rejected: str | None) -> str:
    """Someone stored a newer pair first: discard ours (revoking it) and use theirs."""
    if orphan.refresh_token:
        try:
            oauth.revoke(orphan.refresh_token)
        except OAuthError:
            log.warning("token.orphan_revoke_failed", extra={"operator_id": operator_id})
    token = _usable(read_credential(operator_id), vault=vault, now=now(), margin=margin,
                    rejected=rejected)
    db.session.commit()
    if token is None:
        raise RefreshBusy(f"operator {operator_id}: fenced out and the winner's token "
                          "is not usable yet")
    log.info("token.fenced_out", extra={"operator_id": operator_id})
    metrics.token_refresh("fenced_out")
    return token


def _degraded(operator_id: int, reason: str) -> None:
    _set_health(operator_id, status=OperatorStatus.DEGRADED,
                refresh_failures=Operator.refresh_failures + 1, last_error=reason[:500])
    audit.record("token.refresh_failed", actor_type="system", actor="token-refresh",
                 operator_id=operator_id, reason=reason[:200])
    db.session.commit()
    log.warning("token.refresh_failed", extra={"operator_id": operator_id})
    metrics.token_refresh("failed")


def _needs_reauth(operator_id: int, *, reason: str) -> None:
    _set_health(operator_id, status=OperatorStatus.NEEDS_REAUTH, last_error=reason)
    audit.record("operator.needs_reauth", actor_type="system", actor="token-refresh",
                 operator_id=operator_id, reason=reason)
    db.session.commit()
    log.warning("token.needs_reauth", extra={"operator_id": operator_id, "reason": reason})
    metrics.token_refresh("needs_reauth")


class OperatorTokens:
    """``TokenSource`` for ``StoraClient``: tokens from the vault, refreshed on demand."""

    def __init__(self, operator_id: int, *, vault: Vault, oauth: StoraOAuth,
                 redis: redis_lib.Redis | None = None, limiter: RateLimiter | None = None):
        self.operator_id = operator_id
        self._vault = vault
        self._oauth = oauth
        self._redis = redis
        self._limiter = limiter

    def access_token(self) -> str:
        return get_access_token(self.operator_id, vault=self._vault, oauth=self._oauth,
                                redis=self._redis, limiter=self._limiter)

    def replace_rejected(self, rejected: str) -> str | None:
        # A sibling may have rotated (and so revoked our token): get_access_token returns
        # the stored token if it is a different, fresh one, and refreshes otherwise.
        db.session.rollback()
        try:
            return get_access_token(self.operator_id, vault=self._vault, oauth=self._oauth,
                                    redis=self._redis, limiter=self._limiter,
                                    rejected=rejected)
        except NeedsReauth:
            return None

