"""Platform-wide incidents: problems that are the partner's, not one operator's.

``invalid_client`` from Stora's token endpoint means our client credentials are wrong
or revoked; every operator would fail the same way, so it is recorded once as an open
incident (counted, timestamped) and no operator is marked broken because of it.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Integer, String, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from partner_app.db import db, utcnow

log = logging.getLogger(__name__)

INVALID_CLIENT = "stora_invalid_client"


class PlatformIncident(db.Model):
    __tablename__ = "platform_incidents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(60), index=True)
    # Equals ``kind`` while open, NULL once resolved: a unique index allows one open
    # incident per kind on every database (NULLs never collide).
    open_key: Mapped[str | None] = mapped_column(String(60), unique=True)
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[datetime | None]
    occurrences: Mapped[int] = mapped_column(Integer, default=1)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


def report(kind: str, **detail: Any) -> None:
    """Open the incident of this kind, or count one more occurrence of the open one.

    Runs in its own short transaction on a separate session so it survives whatever
    the caller rolls back, and so concurrent reporters agree on a single open row.
    """
    now = utcnow()
    engine = db.engine
    with engine.begin() as conn:
        bumped = conn.execute(
            update(PlatformIncident)
            .where(PlatformIncident.open_key == kind)
            .values(occurrences=PlatformIncident.occurrences + 1, last_seen_at=now))
        if bumped.rowcount:
            return
    try:
        with engine.begin() as conn:
            conn.execute(PlatformIncident.__table__.insert().values(
                kind=kind, open_key=kind, opened_at=now, last_seen_at=now, occurrences=1,
                detail=detail))
        log.error("incident.opened", extra={"kind": kind})
    except IntegrityError:  # a concurrent reporter opened it first
        with engine.begin() as conn:
            conn.execute(update(PlatformIncident).where(PlatformIncident.open_key == kind)
                         .values(occurrences=PlatformIncident.occurrences + 1,
                                 last_seen_at=now))


def resolve(kind: str) -> bool:
    """Close the open incident of this kind (flush only). True if one was open."""
    incident = db.session.scalars(
        select(PlatformIncident).where(PlatformIncident.open_key == kind)).one_or_none()
    if incident is None:
        return False
    incident.open_key = None
    incident.resolved_at = utcnow()
    return True


def is_open(kind: str) -> bool:
    return db.session.scalar(
        select(PlatformIncident.id).where(PlatformIncident.open_key == kind)) is not None
