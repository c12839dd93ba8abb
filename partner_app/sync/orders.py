"""Orders backfill for one operator: page through Stora by ``updated_at``, upsert each order.

The walk is keyset pagination on ``updated_at`` rather than page numbers over a fixed
filter: an order updated mid-walk moves to the end of Stora's list, and with a fixed
filter every later record would shift one place left and one would be skipped at a page
boundary. Each request asks for ``updated_after=<watermark>`` (inclusive), page 1;
only while a whole page shares the watermark's timestamp does the page number grow.
Records at the watermark are read again on the next request and upserted again, which
changes nothing.

After each page the upserts and the new cursor are handed to ``checkpoint`` (the job
commits there), so a killed job resumes from the last committed page.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Integer,
    String,
    Text,
    bindparam,
    cast,
    column,
    func,
    or_,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from partner_app.db import UTCDateTime, db, utcnow
from partner_app.stora.client import MAX_PAGE_SIZE, Page, StoraClient
from partner_app.stora.errors import ApiError, Unauthorized
from partner_app.sync.models import SyncCursor, SyncedOrder

NAME = "orders"


class MalformedRecord(ApiError):
    """Stora returned a record this sync cannot place (no id or no ``updated_at``)."""


@dataclass(frozen=True)
class Cursor:
    watermark: datetime | None
    last_id: str | None
    page: int


@dataclass(frozen=True)
class PageDone:
    """What one committed page changed: handed to the caller's checkpoint."""

    records: int
    new_by_site: dict[str, int]  # Stora site id ("" for none) -> orders first seen


@dataclass(frozen=True)
class BackfillResult:
    pages: int
    records: int
    new_records: int
    complete: bool  # False: stopped at max_pages/deadline, more may remain


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 time with an offset (``Z`` included), else None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value)  # Python 3.11+ reads "Z" itself
    except ValueError:
        return None
    return moment if moment.tzinfo else None


def format_time(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


# -- cursor ------------------------------------------------------------------------------
def read_cursor(operator_id: int, name: str = NAME) -> Cursor:
    row = db.session.execute(
        select(SyncCursor.watermark, SyncCursor.last_id, SyncCursor.page)
        .where(SyncCursor.operator_id == operator_id, SyncCursor.name == name)).first()
    if row is None:
        return Cursor(watermark=None, last_id=None, page=1)
    return Cursor(watermark=row.watermark, last_id=row.last_id, page=row.page or 1)


def write_cursor(operator_id: int, cursor: Cursor, *, now: datetime, finished: bool,
                 name: str = NAME) -> None:
    """Upsert the cursor row (flush only)."""
    dialect = db.session.get_bind().dialect.name
    params = {"operator_id": operator_id, "name": name, "watermark": cursor.watermark,
              "last_id": cursor.last_id, "page": cursor.page, "updated_at": now}
    if finished:
        params["last_success_at"] = now
    db.session.execute(_cursor_upsert(dialect, finished), params)


@functools.cache
def _cursor_upsert(dialect: str, finished: bool):
    """The cursor's ``INSERT … ON CONFLICT`` with bound parameters, built once per
    dialect and shape (it runs once per page; building it cost more than running it)."""
    table = SyncCursor.__table__
    names = ["watermark", "last_id", "page", "updated_at"] + \
        (["last_success_at"] if finished else [])
    insert = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    stmt = insert.values(operator_id=bindparam("operator_id"), name=bindparam("name"),
                         **{c: bindparam(c, type_=table.c[c].type) for c in names})
    return stmt.on_conflict_do_update(index_elements=[table.c.operator_id, table.c.name],
                                      set_={c: stmt.excluded[c] for c in names})


def next_cursor(cursor: Cursor, items: list[dict[str, Any]], *, more: bool) -> Cursor:
    """The cursor after a page of ``items`` read at ``cursor``; ``more``: Stora has
    further pages for the same request.

    The watermark becomes the newest ``updated_at`` on the page. If that is newer than
    the current one, the next request starts on page 1 at the new watermark (page 2
    if this whole page sat at it: then this page *was* page 1 there). If the whole page
    sat at the current watermark (equal timestamps filling a page) and more follow, the
    next request asks for the next page at the same watermark. At the end of the list
    the page is kept, so the next run re-reads the last page (harmless) rather than
    skip records that arrive behind a run of equal timestamps.
    """
    newest: datetime | None = None
    oldest: datetime | None = None
    newest_id: str | None = None
    for item in items:
        moment = parse_time(item.get("updated_at"))
        if moment is None or not item.get("id"):
            raise MalformedRecord(f"order without id or updated_at on page {cursor.page}")
        if newest is None or moment >= newest:
            newest, newest_id = moment, str(item["id"])
        if oldest is None or moment < oldest:
            oldest = moment
    if newest is None:
        # Nothing at this position (any more): start over at the watermark.
        return Cursor(watermark=cursor.watermark, last_id=cursor.last_id, page=1)
    if cursor.watermark is None or newest > cursor.watermark:
        # A page entirely at the new watermark is page 1 at that watermark: skip it.
        return Cursor(watermark=newest, last_id=newest_id,
                      page=2 if more and oldest == newest else 1)
    return Cursor(watermark=cursor.watermark, last_id=newest_id,
                  page=cursor.page + 1 if more else cursor.page)


# -- upsert ------------------------------------------------------------------------------
def _money(order: dict[str, Any]) -> tuple[int | None, str | None]:
    total = order.get("total")
    if not isinstance(total, dict):
        return None, None
    amount = total.get("amount")
    currency = total.get("currency")
    return (amount if isinstance(amount, int) and not isinstance(amount, bool) else None,
            currency[:3] if isinstance(currency, str) else None)


def _ref(order: dict[str, Any], key: str) -> str | None:
    value = order.get(key)
    return str(value["id"])[:64] if isinstance(value, dict) and value.get("id") else None


def order_row(operator_id: int, order: dict[str, Any], *, now: datetime) -> dict[str, Any]:
    amount, currency = _money(order)
    status = order.get("status")
    return {
        "operator_id": operator_id,
        "stora_id": str(order["id"])[:64],
        "status": status[:40] if isinstance(status, str) else None,
        "contact_id": _ref(order, "contact"),
        "site_id": _ref(order, "site"),
        "total_amount": amount,
        "currency": currency,
        "stora_created_at": parse_time(order.get("created_at")),
        "stora_updated_at": parse_time(order.get("updated_at")),
        "payload": order,
        "first_synced_at": now,
        "last_synced_at": now,
    }


def upsert_orders(operator_id: int, orders: Iterable[dict[str, Any]], *,
                  now: datetime) -> dict[str, int]:
    """Insert or update orders by (operator, Stora id); returns the new ones counted by
    Stora site id ("" for an order without a site).

    An update applies only if the incoming ``updated_at`` is not older than the stored
    one, so a late, stale copy (a slow page, a replayed webhook) never overwrites newer
    data. Flushes; the caller commits.
    """
    latest: dict[str, dict[str, Any]] = {}
    for order in orders:
        row = order_row(operator_id, order, now=now)
        seen = latest.get(row["stora_id"])
        # One statement must not touch a row twice (PostgreSQL refuses it).
        if seen is None or (row["stora_updated_at"] or now) >= (seen["stora_updated_at"] or now):
            latest[row["stora_id"]] = row
    if not latest:
        return {}
    if db.session.get_bind().dialect.name == "postgresql":
        result = db.session.execute(_pg_upsert(), {
            "operator_id": operator_id, "now": now,
            "rows": _json([_record(row) for row in latest.values()])})
    else:
        result = db.session.connection().execute(_values_upsert(), list(latest.values()))
    # A row inserted now carries this call's timestamp; an updated row keeps its own.
    new: dict[str, int] = {}
    for first, site_id in result:
        if first == now:
            new[site_id or ""] = new.get(site_id or "", 0) + 1
    return new


_UPDATED = ("status", "contact_id", "site_id", "total_amount", "currency",
            "stora_created_at", "stora_updated_at", "payload", "last_synced_at")
_RECORD = (("stora_id", String), ("status", String), ("contact_id", String),
           ("site_id", String), ("total_amount", BigInteger), ("currency", String),
           ("stora_created_at", DateTime), ("stora_updated_at", DateTime), ("payload", JSON))


def _on_conflict(stmt):
    table = SyncedOrder.__table__
    excluded = stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=[table.c.operator_id, table.c.stora_id],
        set_={name: excluded[name] for name in _UPDATED},
        where=or_(table.c.stora_updated_at.is_(None), excluded.stora_updated_at.is_(None),
                  table.c.stora_updated_at <= excluded.stora_updated_at),
    ).returning(table.c.first_synced_at, table.c.site_id)


@functools.cache
def _values_upsert():
    """SQLite: a multi-row ``INSERT … VALUES`` (SQLAlchemy's "insertmanyvalues")."""
    return _on_conflict(sqlite.insert(SyncedOrder.__table__))


@functools.cache
def _pg_upsert():
    """PostgreSQL: the whole page travels as one JSON parameter, expanded by
    ``json_to_recordset``. The statement stays small and constant, so neither
    SQLAlchemy nor psycopg rebuilds or re-parses a statement with hundreds of
    placeholders for every page (that parsing was half of a sync job's CPU). The
    parameter is text we encode ourselves (``_json``), cast to ``json`` in SQL.

    ``json``, not ``jsonb``: ``json_to_recordset`` reads the page in one pass and gives
    each order's ``payload`` as its own slice of that text, where ``jsonb`` would build
    the whole page as a tree and then print every payload back to text. With Stora's
    orders (~2.7 KB each) that took a page's upsert from about 10 ms to 7 ms."""
    table = SyncedOrder.__table__
    page = cast(bindparam("rows", type_=Text), postgresql.JSON)
    records = (func.json_to_recordset(page)
               .table_valued(*(column(name, type_) for name, type_ in _RECORD))
               .render_derived(name="r", with_types=True))
    now = bindparam("now", type_=UTCDateTime())
    rows = select(bindparam("operator_id", type_=Integer),
                  *(records.c[name] for name, _ in _RECORD), now, now).select_from(records)
    names = ["operator_id", *(name for name, _ in _RECORD), "first_synced_at",
             "last_synced_at"]
    return _on_conflict(postgresql.insert(table).from_select(names, rows))


def _record(row: dict[str, Any]) -> dict[str, Any]:
    """A row as a ``json_to_recordset`` record (timestamps as naive UTC: the record's
    columns are ``timestamp``, which would ignore an offset rather than apply it)."""
    record = {name: row[name] for name, _ in _RECORD}
    for name in ("stora_created_at", "stora_updated_at"):
        moment = record[name]
        record[name] = moment.astimezone(UTC).replace(tzinfo=None) if moment else None
    return record


# The page's JSON, encoded by msgspec: the standard library's encoder took more CPU
# than anything else in a page's upsert (a page of orders is ~130 KB of JSON).
_json_encoder = msgspec.json.Encoder()


def _json(value: Any) -> str:
    return _json_encoder.encode(value).decode()


# -- the walk ----------------------------------------------------------------------------
def _request(cursor: Cursor, page_size: int) -> dict[str, Any]:
    params: dict[str, Any] = {"page": cursor.page, "limit": page_size,
                              "sort_by": "updated_at", "sort_direction": "ASC"}
    if cursor.watermark is not None:
        params["updated_after"] = format_time(cursor.watermark)
    return params


def _fetch(client: StoraClient, cursor: Cursor, page_size: int) -> Page:
    params = _request(cursor, page_size)
    return client.get_page("orders", page=params.pop("page"), limit=params.pop("limit"),
                           **params)


def backfill_orders(client: StoraClient, operator_id: int, *,
                    checkpoint: Callable[[PageDone], None],
                    page_size: int = MAX_PAGE_SIZE, max_pages: int | None = None,
                    deadline: float | None = None,
                    now: Callable[[], datetime] = utcnow) -> BackfillResult:
    """Sync one operator's orders from its cursor to the end of Stora's list.

    Per page: one API call, then the upserts and the new cursor are flushed and
    ``checkpoint`` is called to record progress and commit. Stops early, with
    ``complete=False``, after ``max_pages`` pages or past ``deadline``
    (``time.monotonic()``). Stora errors propagate to the caller, after the pages
    before them were checkpointed.

    The next page's request depends only on this page's records, so it is sent
    (on a second thread, through ``client.pinned()``) while this page is written:
    the database work hides behind Stora's latency instead of adding to it. Calls
    stay one at a time, in order, and nothing of ours is pending in the session while
    the token source may run (it commits or rolls back): the first call, and any
    call repeated after a 401, go through ``client`` on this thread between pages.
    """
    cursor = read_cursor(operator_id)
    db.session.commit()  # hold no transaction across the HTTP call
    pages = records = new_records = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="orders-ahead") as ahead:
        pending: Future[Page] | None = None
        while True:
            page = _next_page(client, cursor, page_size, pending)
            moment = now()
            finished = page.next_page is None or not page.items
            following = next_cursor(cursor, page.items, more=not finished)
            pages += 1
            stop = finished or (max_pages is not None and pages >= max_pages) or \
                (deadline is not None and time.monotonic() >= deadline)
            pending = None if stop else _request_ahead(ahead, client, following, page_size)
            added = upsert_orders(operator_id, page.items, now=moment)
            write_cursor(operator_id, following, now=moment, finished=finished)
            checkpoint(PageDone(records=len(page.items), new_by_site=added))
            cursor = following
            records += len(page.items)
            new_records += sum(added.values())
            if stop:
                return BackfillResult(pages, records, new_records, complete=finished)


def _request_ahead(pool: ThreadPoolExecutor, client: StoraClient, cursor: Cursor,
                   page_size: int) -> Future[Page] | None:
    try:
        pinned = client.pinned()
    except Exception:
        # The token source failed (a refresh that must wait, a revoked grant): the call
        # is made on this thread after this page is checkpointed, and fails there.
        return None
    return pool.submit(_fetch, pinned, cursor, page_size)


def _next_page(client: StoraClient, cursor: Cursor, page_size: int,
               pending: Future[Page] | None) -> Page:
    """The page at ``cursor``: the one already requested, else a call now. A 401 on
    the early request is repeated here, where the token source may refresh."""
    if pending is not None:
        try:
            return pending.result()
        except Unauthorized:
            pass
    return _fetch(client, cursor, page_size)
