"""Read-side queries for dashboard pages."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, text

from partner_app.audit import AuditEntry
from partner_app.connections.models import Operator, OperatorStatus
from partner_app.db import db
from partner_app.security.models import StaffUser
from partner_app.sync.models import RunStatus, SyncRun
from partner_app.webhooks.models import InboxStatus, WebhookEvent


def operators_overview() -> list[Operator]:
    return list(db.session.scalars(select(Operator).order_by(Operator.created_at.desc())))


# -- overview, jobs, audit log, staff
def operators_by_status() -> dict[str, int]:
    """Operators per health state, every state present (zero where none)."""
    counts = dict(db.session.execute(
        select(Operator.status, func.count()).group_by(Operator.status)).all())
    return {state.value: counts.get(state.value, 0) for state in OperatorStatus}


REFRESHED_ACTIONS = ("token.refreshed",)
REFRESH_FAILED_ACTIONS = ("token.refresh_failed", "operator.needs_reauth")


def token_refreshes_since(since: datetime) -> dict[str, int]:
    """Token refreshes that succeeded and that failed since ``since`` (from the audit log)."""
    rows = dict(db.session.execute(
        select(AuditEntry.action, func.count())
        .where(AuditEntry.action.in_(REFRESHED_ACTIONS + REFRESH_FAILED_ACTIONS),
               AuditEntry.created_at >= since)
        .group_by(AuditEntry.action)).all())
    return {"refreshed": sum(rows.get(a, 0) for a in REFRESHED_ACTIONS),
            "failed": sum(rows.get(a, 0) for a in REFRESH_FAILED_ACTIONS)}


def _hour_of(column):
    """The hour a (naive UTC) timestamp column falls in, in SQL, per dialect."""
    if db.session.get_bind().dialect.name == "postgresql":
        return func.date_trunc("hour", column)  # a timestamp: cheaper than formatting it
    return func.strftime("%Y-%m-%d %H", column)


def webhook_deliveries_per_hour(now: datetime, hours: int = 24) -> list[tuple[datetime, int]]:
    """Webhook deliveries received per hour for the ``hours`` hours up to ``now`` (UTC),
    oldest first, every hour present. One grouped query over the indexed ``received_at``."""
    end = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    starts = [end - timedelta(hours=h) for h in range(hours - 1, -1, -1)]
    hour = _hour_of(WebhookEvent.received_at)
    counts: dict[str, int] = {}
    for value, count in db.session.execute(
            select(hour, func.count()).where(WebhookEvent.received_at >= starts[0])
            .group_by(hour)).all():
        key = value.strftime("%Y-%m-%d %H") if isinstance(value, datetime) else value
        counts[key] = count
    return [(start, counts.get(start.strftime("%Y-%m-%d %H"), 0)) for start in starts]


def failed_event_count() -> int:
    """Inbox rows whose handler failed (replayable): a count on the indexed status."""
    return db.session.scalar(select(func.count()).select_from(WebhookEvent)
                             .where(WebhookEvent.status == InboxStatus.FAILED)) or 0


def sync_runs(*, running_only: bool = False, limit: int = 20) -> list[SyncRun]:
    """Sync runs, newest first; their counters are their progress."""
    query = select(SyncRun).order_by(SyncRun.id.desc()).limit(limit)
    if running_only:
        query = query.where(SyncRun.status == RunStatus.RUNNING)
    return list(db.session.scalars(query))


def operator_public_ids(ids: Iterable[int]) -> dict[int, str]:
    """``{id: public id}`` for the given operators, in one query."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    return dict(db.session.execute(
        select(Operator.id, Operator.public_id).where(Operator.id.in_(wanted))).all())


@dataclass(frozen=True)
class AuditFilters:
    actor: str | None = None
    action: str | None = None
    operator_id: int | None = None
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive


@dataclass(frozen=True)
class AuditPage:
    rows: list[tuple[AuditEntry, str | None]]  # (entry, operator public id)
    next_before: int | None  # pass as ``before`` for the next (older) page


def audit_page(filters: AuditFilters, *, before: int | None = None,
               limit: int = 50) -> AuditPage:
    """One page of the audit log, newest first, keyset-paginated on ``id``.

    One query whatever the page or the filters: the operator's public id comes from an
    outer join, and one extra row tells whether an older page exists.
    """
    query = (select(AuditEntry, Operator.public_id)
             .outerjoin(Operator, Operator.id == AuditEntry.operator_id)
             .order_by(AuditEntry.id.desc()).limit(limit + 1))
    if before is not None:
        query = query.where(AuditEntry.id < before)
    if filters.actor:
        query = query.where(AuditEntry.actor == filters.actor)
    if filters.action:
        query = query.where(AuditEntry.action == filters.action)
    if filters.operator_id is not None:
        query = query.where(AuditEntry.operator_id == filters.operator_id)
    if filters.since is not None:
        query = query.where(AuditEntry.created_at >= filters.since)
    if filters.until is not None:
        query = query.where(AuditEntry.created_at < filters.until)
    rows = [(entry, public_id) for entry, public_id in db.session.execute(query).all()]
    next_before = rows[limit - 1][0].id if len(rows) > limit else None
    return AuditPage(rows=rows[:limit], next_before=next_before)


# A skip scan: one index seek per distinct action instead of reading every row, which
# SELECT DISTINCT does on PostgreSQL (no skip scan before version 18) and SQLite alike.
_DISTINCT_ACTIONS = text("""
    WITH RECURSIVE actions(action) AS (
        SELECT MIN(action) FROM audit_log
        UNION ALL
        SELECT (SELECT MIN(a.action) FROM audit_log a WHERE a.action > actions.action)
        FROM actions WHERE actions.action IS NOT NULL
    )
    SELECT action FROM actions WHERE action IS NOT NULL
""")


def audit_actions() -> list[str]:
    """Every action the log holds, in order, for the filter's suggestions."""
    return list(db.session.scalars(_DISTINCT_ACTIONS))


def operator_id_for(public_id: str) -> int | None:
    return db.session.scalar(select(Operator.id).where(Operator.public_id == public_id))


def staff_members(*, limit: int = 500) -> list[StaffUser]:
    """Staff accounts, active ones first, then by e-mail."""
    return list(db.session.scalars(
        select(StaffUser).order_by(StaffUser.active.desc(), StaffUser.email).limit(limit)))


def staff_member(staff_id: int) -> StaffUser | None:
    return db.session.get(StaffUser, staff_id)
