"""Read-side queries for dashboard pages."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, func, or_, select, text
from sqlalchemy.orm import defer

from partner_app.audit import AuditEntry
from partner_app.connections.models import Credential, Operator, OperatorStatus
from partner_app.db import db
from partner_app.security.models import StaffUser
from partner_app.sync.models import RunStatus, SyncRun, SyncRunItem
from partner_app.timeline.models import EventStatus as TimelineStatus
from partner_app.timeline.models import TimelineEvent
from partner_app.webhooks.models import InboxStatus, WebhookEvent, WebhookSubscription


def operators_overview() -> list[Operator]:
    return list(db.session.scalars(select(Operator).order_by(Operator.created_at.desc())))


# -- operators and events
#
# Every page below costs a fixed number of statements whatever the number of operators:
# one for the page's rows (keyset pagination on the primary key, newest first, one row
# more than the page to know whether another follows), with per-row figures that live in
# other tables (the token's expiry, the last webhook) joined or correlated into that one
# statement. Token values never leave their table: only expiry times are selected.

PAGE_SIZE = 25
EVENTS_PAGE_SIZE = 50
TIMELINE_LIMIT = 60
RECENT_LIMIT = 15


@dataclass(frozen=True)
class Page:
    """One page of a keyset-paginated list, newest first.

    ``newer`` / ``older`` are the cursors of the neighbouring pages (a row id to pass as
    ``after`` / ``before``), or None where there is no such page.
    """

    rows: list[Any]
    newer: int | None
    older: int | None


def _keyset(stmt: Select, id_column, *, before: int | None, after: int | None,
            size: int, row_id: Callable[[Any], int]) -> Page:
    """Run ``stmt`` for one page: ``before`` = older than that id, ``after`` = newer."""
    if after is not None:
        rows = list(db.session.execute(
            stmt.where(id_column > after).order_by(id_column.asc()).limit(size + 1)))
        has_more_newer = len(rows) > size
        rows = list(reversed(rows[:size]))
        newer = row_id(rows[0]) if rows and has_more_newer else None
        older = row_id(rows[-1]) if rows else after + 1
        return Page(rows, newer, older)
    if before is not None:
        stmt = stmt.where(id_column < before)
    rows = list(db.session.execute(stmt.order_by(id_column.desc()).limit(size + 1)))
    has_more_older = len(rows) > size
    rows = rows[:size]
    older = row_id(rows[-1]) if rows and has_more_older else None
    newer = None
    if before is not None:  # we came from a newer page
        newer = row_id(rows[0]) if rows else before - 1
    return Page(rows, newer, older)


@dataclass(frozen=True)
class OperatorRow:
    id: int
    public_id: str
    name: str | None
    storefront_host: str | None
    status: str
    last_api_success_at: datetime | None
    last_error: str | None
    token_expires_at: datetime | None
    last_webhook_at: datetime | None


def _like(term: str) -> str:
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def operators_page(*, search: str = "", status: str | None = None,
                   before: int | None = None, after: int | None = None,
                   size: int = PAGE_SIZE) -> Page:
    """Operators matching ``search`` (name, public id, storefront host or Stora operator
    id, case-insensitive substring) and ``status``, newest first; rows are OperatorRow.

    One statement: operators left-joined to their credential's expiry, with their last
    webhook as a correlated column.
    """
    stmt = (select(Operator.id, Operator.public_id, Operator.name, Operator.storefront_host,
                   Operator.status, Operator.last_api_success_at, Operator.last_error,
                   Credential.access_expires_at, last_webhook_column())
            .outerjoin(Credential, Credential.operator_id == Operator.id))
    if status:
        stmt = stmt.where(Operator.status == status)
    term = search.strip()
    if term:
        pattern = _like(term.lower())
        stmt = stmt.where(or_(
            func.lower(Operator.name).like(pattern, escape="\\"),
            func.lower(Operator.public_id).like(pattern, escape="\\"),
            func.lower(Operator.storefront_host).like(pattern, escape="\\"),
            func.lower(Operator.stora_identity).like(pattern, escape="\\")))
    page = _keyset(stmt, Operator.id, before=before, after=after, size=size,
                   row_id=lambda row: row.id)
    rows = [OperatorRow(id=row.id, public_id=row.public_id, name=row.name,
                        storefront_host=row.storefront_host, status=row.status,
                        last_api_success_at=row.last_api_success_at,
                        last_error=row.last_error, token_expires_at=row.access_expires_at,
                        last_webhook_at=row.last_webhook_at)
            for row in page.rows]
    return Page(rows, page.newer, page.older)


def last_webhook_column():
    """A column with the time the row's operator last received a webhook: the
    ``received_at`` of its newest inbox row (a one-row backward scan of
    ``ix_webhook_events_operator_id_id``, evaluated only for the rows returned)."""
    return (select(WebhookEvent.received_at)
            .where(WebhookEvent.operator_id == Operator.id)
            .order_by(WebhookEvent.id.desc()).limit(1)
            .correlate(Operator).scalar_subquery().label("last_webhook_at"))


@dataclass(frozen=True)
class OperatorDetail:
    operator: Operator
    token_expires_at: datetime | None
    token_refreshed_at: datetime | None
    token_scope: str
    last_webhook_at: datetime | None


def operator_detail(public_id: str) -> OperatorDetail | None:
    """The operator and its credential's public facts (never a token), one statement."""
    row = db.session.execute(
        select(Operator, Credential.access_expires_at, Credential.refreshed_at,
               Credential.scope, last_webhook_column())
        .outerjoin(Credential, Credential.operator_id == Operator.id)
        .where(Operator.public_id == public_id)).first()
    if row is None:
        return None
    operator, expires_at, refreshed_at, scope, last_webhook = row
    return OperatorDetail(operator=operator, token_expires_at=expires_at,
                          token_refreshed_at=refreshed_at, token_scope=scope or "",
                          last_webhook_at=last_webhook)


@dataclass(frozen=True)
class ScopeCheck:
    scope: str
    granted: bool
    required: bool


def scope_check(granted: str, required: Sequence[str]) -> list[ScopeCheck]:
    """Every scope required or granted, required ones first, with both facts."""
    have = set(granted.split())
    rows = [ScopeCheck(scope, scope in have, True) for scope in required]
    rows += [ScopeCheck(scope, True, False) for scope in sorted(have - set(required))]
    return rows


def operator_subscriptions(operator_id: int) -> list[WebhookSubscription]:
    return list(db.session.scalars(
        select(WebhookSubscription).where(WebhookSubscription.operator_id == operator_id)
        .order_by(WebhookSubscription.id.desc()).limit(RECENT_LIMIT)))


def recent_events(operator_id: int, limit: int = RECENT_LIMIT) -> list[WebhookEvent]:
    return list(db.session.scalars(
        select(WebhookEvent).options(defer(WebhookEvent.body), defer(WebhookEvent.headers))
        .where(WebhookEvent.operator_id == operator_id)
        .order_by(WebhookEvent.id.desc()).limit(limit)))


@dataclass(frozen=True)
class SyncItemRow:
    run_id: int
    name: str
    requested_by: str
    status: str
    pages: int
    records: int
    new_records: int
    error: str | None
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


def recent_sync_items(operator_id: int, limit: int = RECENT_LIMIT) -> list[SyncItemRow]:
    """The operator's share of its latest sync runs, newest first (one statement)."""
    rows = db.session.execute(
        select(SyncRunItem.run_id, SyncRun.name, SyncRun.requested_by, SyncRunItem.status,
               SyncRunItem.pages, SyncRunItem.records, SyncRunItem.new_records,
               SyncRunItem.error, SyncRunItem.enqueued_at, SyncRunItem.started_at,
               SyncRunItem.finished_at, SyncRunItem.updated_at)
        .join(SyncRun, SyncRun.id == SyncRunItem.run_id)
        .where(SyncRunItem.operator_id == operator_id)
        .order_by(SyncRunItem.id.desc()).limit(limit))
    return [SyncItemRow(*row) for row in rows]


def recent_timeline_posts(operator_id: int, limit: int = RECENT_LIMIT) -> list[TimelineEvent]:
    """What the platform recorded (or owes) on the operator's Stora timeline."""
    return list(db.session.scalars(
        select(TimelineEvent).where(TimelineEvent.operator_id == operator_id)
        .order_by(TimelineEvent.id.desc()).limit(limit)))


@dataclass(frozen=True)
class TimelineEntry:
    """One thing that happened to an operator, from whichever table remembers it."""

    at: datetime
    kind: str  # audit | token | subscription | event | sync | timeline | error
    title: str
    detail: str = ""
    actor: str = ""
    tone: str = ""  # "" | ok | bad
    link: str | None = None  # an inbox event id for kind == "event"


def _describe(detail: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(detail.items())
                     if value not in (None, "", [], {}))


def operator_timeline(detail: OperatorDetail, *, subscriptions: Sequence[WebhookSubscription],
                      events: Sequence[WebhookEvent], sync_items: Sequence[SyncItemRow],
                      timeline_posts: Sequence[TimelineEvent],
                      limit: int = TIMELINE_LIMIT) -> list[TimelineEntry]:
    """Everything that happened to the operator, newest first, at most ``limit`` entries.

    Merged from the audit log (installs, connects, staff actions, disconnects, health
    changes; read here, one statement) and the rows the page already loaded: token
    refreshes, subscription changes, inbox events, sync items, timeline posts, and the
    last recorded error. Each source is itself bounded, so the merge is too.
    """
    operator = detail.operator
    entries: list[TimelineEntry] = []
    for entry in db.session.scalars(
            select(AuditEntry).where(AuditEntry.operator_id == operator.id)
            .order_by(AuditEntry.id.desc()).limit(limit)):
        bad = entry.action.endswith(("failed", "needs_reauth", "disconnected"))
        entries.append(TimelineEntry(
            at=entry.created_at, kind="audit", title=entry.action,
            detail=_describe(entry.detail or {}), actor=f"{entry.actor_type}: {entry.actor}",
            tone="bad" if bad else ""))
    if detail.token_refreshed_at:
        entries.append(TimelineEntry(
            at=detail.token_refreshed_at, kind="token", title="token pair stored",
            detail=f"access token expires {detail.token_expires_at:%Y-%m-%d %H:%M UTC}"
            if detail.token_expires_at else ""))
    if operator.last_refresh_at and operator.last_refresh_at != detail.token_refreshed_at:
        entries.append(TimelineEntry(at=operator.last_refresh_at, kind="token",
                                     title="token refresh attempted",
                                     detail=f"consecutive failures: {operator.refresh_failures}",
                                     tone="bad" if operator.refresh_failures else ""))
    for sub in subscriptions:
        entries.append(TimelineEntry(at=sub.created_at, kind="subscription",
                                     title=f"webhook subscription {sub.id} created"))
        if sub.updated_at and sub.updated_at > sub.created_at:
            entries.append(TimelineEntry(
                at=sub.updated_at, kind="subscription",
                title=f"webhook subscription {sub.id} is {sub.status}",
                detail=sub.last_error or "", tone="bad" if sub.last_error else ""))
    for event in events:
        entries.append(TimelineEntry(
            at=event.received_at, kind="event", title=f"{event.event_type} received",
            detail=f"{event.event_id}: {event.status}"
                   + (f" ({event.last_error})" if event.last_error else ""),
            tone="bad" if event.status == InboxStatus.FAILED else "", link=str(event.id)))
    for item in sync_items:
        entries.append(TimelineEntry(
            at=item.finished_at or item.started_at or item.enqueued_at or item.updated_at,
            kind="sync", title=f"{item.name} sync run {item.run_id}: {item.status}",
            detail=item.error or f"{item.records} records, {item.new_records} new",
            actor=item.requested_by, tone="bad" if item.error else ""))
    for post in timeline_posts:
        entries.append(TimelineEntry(
            at=post.recorded_at or post.created_at, kind="timeline",
            title=f"Stora timeline: {post.action_key}", detail=post.last_error or post.status,
            tone="bad" if post.status == TimelineStatus.FAILED else ""))
    if operator.last_error:
        entries.append(TimelineEntry(at=operator.updated_at, kind="error",
                                     title="last error", detail=operator.last_error,
                                     tone="bad"))
    entries.sort(key=lambda entry: entry.at, reverse=True)
    return entries[:limit]


@dataclass(frozen=True)
class EventRow:
    id: int
    operator_public_id: str
    operator_name: str | None
    event_id: str
    event_type: str
    status: str
    received_at: datetime
    attempts: int
    deliveries: int
    last_error: str | None


def events_page(*, operator_public_id: str | None = None, event_type: str | None = None,
                status: str | None = None, before: int | None = None,
                after: int | None = None, size: int = EVENTS_PAGE_SIZE) -> Page:
    """The webhook inbox, newest first, filtered; rows are EventRow (no bodies). One
    statement."""
    stmt = (select(WebhookEvent.id, Operator.public_id, Operator.name, WebhookEvent.event_id,
                   WebhookEvent.event_type, WebhookEvent.status, WebhookEvent.received_at,
                   WebhookEvent.attempts, WebhookEvent.deliveries, WebhookEvent.last_error)
            .join(Operator, Operator.id == WebhookEvent.operator_id))
    if operator_public_id:
        stmt = stmt.where(Operator.public_id == operator_public_id)
    if event_type:
        stmt = stmt.where(WebhookEvent.event_type == event_type)
    if status:
        stmt = stmt.where(WebhookEvent.status == status)
    page = _keyset(stmt, WebhookEvent.id, before=before, after=after, size=size,
                   row_id=lambda row: row.id)
    return Page([EventRow(*row) for row in page.rows], page.newer, page.older)


def event_detail(event_row_id: int) -> tuple[WebhookEvent, Operator] | None:
    """One inbox event with its operator (one statement)."""
    row = db.session.execute(
        select(WebhookEvent, Operator).join(Operator, Operator.id == WebhookEvent.operator_id)
        .where(WebhookEvent.id == event_row_id)).first()
    return (row[0], row[1]) if row else None

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
