"""Read-side queries for dashboard pages."""

from __future__ import annotations

from sqlalchemy import select

from partner_app.connections.models import Operator
from partner_app.db import db


def operators_overview() -> list[Operator]:
    return list(db.session.scalars(select(Operator).order_by(Operator.created_at.desc())))
