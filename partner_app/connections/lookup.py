"""Finding an operator from what a person types: its public id (``op_…``) or row id."""

from __future__ import annotations

from sqlalchemy import select

from partner_app.connections.models import Operator
from partner_app.db import db


def operator_by_ref(ref: str) -> Operator | None:
    row_id = int(ref) if ref.isdigit() else -1
    return db.session.scalars(select(Operator).where(
        (Operator.public_id == ref) | (Operator.id == row_id))).one_or_none()
