"""Purging an operator: disconnect now, delete its mirror data later, record both.

``purge_operator`` is the disconnect the platform already knows (webhook endpoints
disabled at Stora, the grant revoked, the data key destroyed, credentials removed)
plus a ``deletion_records`` row that schedules the deletion of everything we mirrored
for the operator after the retention grace (``RETENTION_PURGE_DAYS``). The retention
run carries the deletion out (``retention.py``). Until then staff can still see what
the operator had; after it, only the deletion record and the audit trail remain.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from partner_app import audit
from partner_app.connections.disconnect import disconnect_operator
from partner_app.connections.models import Operator
from partner_app.db import db
from partner_app.lifecycle.models import DeletionRecord, DeletionScope, DeletionStatus
from partner_app.lifecycle.settings import RetentionSettings
from partner_app.security.vault import Vault
from partner_app.stora.oauth import StoraOAuth


@dataclass(frozen=True)
class PurgeResult:
    record: DeletionRecord
    already_scheduled: bool
    revoked_at_stora: bool
    destroyed_keys: int


def current_purge(operator: Operator) -> DeletionRecord | None:
    """The purge of the operator's current disconnection (scheduled or carried out),
    if any. A purge from before a reconnect does not count: new data came since."""
    return db.session.scalars(
        select(DeletionRecord)
        .where(DeletionRecord.operator_id == operator.id,
               DeletionRecord.scope == DeletionScope.OPERATOR_PURGE,
               DeletionRecord.status.in_([DeletionStatus.SCHEDULED, DeletionStatus.COMPLETED]),
               DeletionRecord.requested_at >= operator.disconnected_at)
        .order_by(DeletionRecord.id.desc())).first()


def purge_operator(operator: Operator, *, vault: Vault, oauth: StoraOAuth,
                   retention: RetentionSettings, now: datetime, actor_type: str, actor: str,
                   revoke: bool = True) -> PurgeResult:
    """Disconnect ``operator`` and schedule the deletion of its mirror data.

    Flushes only; the caller commits. Raises ``DisconnectFailed`` (nothing
    changed) when Stora cannot be told and ``revoke`` is True.

    Safe to call again: the purge of this disconnection, scheduled or carried out, is
    returned as it is (its date does not move).
    """
    disconnected = disconnect_operator(operator, vault=vault, oauth=oauth, now=now,
                                       actor_type=actor_type, actor=actor, revoke=revoke)
    existing = current_purge(operator)
    if existing is not None:
        return PurgeResult(existing, True, disconnected.revoked_at_stora,
                           disconnected.destroyed_keys)
    record = DeletionRecord(
        scope=DeletionScope.OPERATOR_PURGE, status=DeletionStatus.SCHEDULED,
        operator_ref=operator.public_id, operator_id=operator.id,
        requested_by_type=actor_type, requested_by=actor, requested_at=now,
        delete_after=now + retention.purge_grace, counts={},
        detail={"revoked_at_stora": disconnected.revoked_at_stora,
                "revoke_requested": revoke,
                "data_keys_destroyed": disconnected.destroyed_keys,
                "was_already_disconnected": disconnected.already_disconnected})
    db.session.add(record)
    db.session.flush()
    audit.record("operator.purge_scheduled", actor_type=actor_type, actor=actor,
                 operator_id=operator.id, deletion_record_id=record.id,
                 delete_after=record.delete_after.isoformat())
    return PurgeResult(record, False, disconnected.revoked_at_stora,
                       disconnected.destroyed_keys)
