"""What staff can do to an operator from the dashboard, on top of the platform's services.

Each action calls the same service the jobs and the CLI use and records one audit entry
with the staff member as actor (``actor`` is their e-mail, ``staff_id`` their row id).
Functions flush; the view commits. Nothing here reads the request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from partner_app import audit
from partner_app.connections import install
from partner_app.connections.credentials import CredentialError
from partner_app.connections.disconnect import DisconnectResult, disconnect_operator
from partner_app.connections.jobs import limiter
from partner_app.connections.models import Operator
from partner_app.connections.tokens import PlatformCredentialsRejected, get_access_token
from partner_app.db import db
from partner_app.queueing import get_redis
from partner_app.security.models import StaffUser
from partner_app.security.vault import Vault
from partner_app.settings import Settings
from partner_app.stora.errors import StoraError
from partner_app.stora.oauth import StoraOAuth
from partner_app.sync.models import SyncRun
from partner_app.sync.services import start_sync
from partner_app.webhooks import jobs as webhook_jobs
from partner_app.webhooks.models import WebhookEvent
from partner_app.webhooks.reconcile_jobs import enqueue_reconcile_after_commit

log = logging.getLogger(__name__)


def _record(action: str, staff: StaffUser, operator_id: int | None, **detail) -> None:
    audit.record(action, actor_type="staff", actor=staff.email, operator_id=operator_id,
                 staff_id=staff.id, **detail)


@dataclass(frozen=True)
class RefreshOutcome:
    refreshed: bool
    reason: str | None  # the error's class name when not refreshed


def refresh_tokens_now(operator: Operator, *, staff: StaffUser, vault: Vault,
                       oauth: StoraOAuth) -> RefreshOutcome:
    """Refresh the operator's token pair now, whatever its remaining lifetime.

    Goes through the single-flight refresh every worker uses (``get_access_token``), so
    it cannot race a worker's refresh. That call commits its own transactions (call this
    before changing anything else), so the audit entry is added afterwards, with the
    outcome.
    """
    operator_id = operator.id
    try:
        get_access_token(operator_id, vault=vault, oauth=oauth, redis=get_redis(),
                         limiter=limiter(), force=True)
        outcome = RefreshOutcome(True, None)
    except (CredentialError, PlatformCredentialsRejected, StoraError) as exc:
        db.session.rollback()
        outcome = RefreshOutcome(False, type(exc).__name__)
    _record("operator.tokens_refreshed" if outcome.refreshed else "operator.refresh_failed",
            staff, operator_id, reason=outcome.reason)
    db.session.flush()
    return outcome


def run_sync(operator: Operator, *, staff: StaffUser, name: str = "orders") -> SyncRun:
    """Start a single-operator sync run (its fan-out job is queued after the commit)."""
    run = start_sync(name, requested_by=staff.email, operator_id=operator.id)
    _record("operator.sync_started", staff, operator.id, run_id=run.id, sync=name)
    db.session.flush()
    return run


def reconcile_webhooks(operator: Operator, *, staff: StaffUser, now: datetime) -> str:
    """Queue a webhook reconcile for the operator after the commit; returns the job id."""
    job_id = f"webhooks-staff-{operator.id}-{int(now.timestamp() * 1000)}"
    enqueue_reconcile_after_commit(operator.id, job_id=job_id)
    _record("operator.webhooks_reconcile_queued", staff, operator.id, job_id=job_id)
    db.session.flush()
    return job_id


def record_replay(event: WebhookEvent, *, staff: StaffUser) -> None:
    """Audit a replay; :func:`send_replay` queues it once this is committed."""
    _record("webhook_event.replayed", staff, event.operator_id, event_row_id=event.id,
            event_id=event.event_id, event_type=event.event_type, was=event.status)
    db.session.flush()


def send_replay(event_row_id: int) -> None:
    """Queue the replay job (the webhooks package's own ``replay_event``)."""
    webhook_jobs.replay_event(event_row_id)


def reconnect_link(operator: Operator, *, staff: StaffUser, settings: Settings,
                   now: datetime) -> install.IssuedLink:
    """Issue a single-use install link bound to this operator (audited by the service)."""
    return install.create_install_link(settings=settings, created_by=staff.email, now=now,
                                       operator=operator,
                                       note=f"reconnect, issued by staff {staff.id}")


def new_install_link(*, staff: StaffUser, settings: Settings,
                     now: datetime) -> install.IssuedLink:
    """Issue a single-use install link for a new operator (audited by the service)."""
    return install.create_install_link(settings=settings, created_by=staff.email, now=now)


def disconnect(operator: Operator, *, staff: StaffUser, vault: Vault, oauth: StoraOAuth,
               now: datetime, revoke: bool = True) -> DisconnectResult:
    """Disconnect the operator (audited by the service with the staff member as actor).

    Raises DisconnectFailed when Stora cannot be told and ``revoke`` is True; nothing
    changes then.
    """
    return disconnect_operator(operator, vault=vault, oauth=oauth, now=now,
                               actor_type="staff", actor=staff.email, revoke=revoke)
