"""Database errors carry the statement, never its parameters.

A failed statement's error is logged (a failed job, a delivery the receiver could not
store), and SQLAlchemy would otherwise format every bound value into it: an order's
customer details, a webhook body. Both engines, the app's and the webhook receiver's,
are made with ``hide_parameters``.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from partner_app.db import db
from partner_app.webhooks import receipt_db

MARKER = "customer-jane-doe@example.com"
FAILING = text("SELECT :value FROM no_such_table")


def test_the_app_engine_keeps_parameters_out_of_errors(app_ctx):
    with pytest.raises(DBAPIError) as caught:
        db.session.execute(FAILING, {"value": MARKER})
    db.session.rollback()
    assert "no_such_table" in str(caught.value)
    assert MARKER not in str(caught.value)
    assert MARKER not in repr(caught.value)


def test_the_receipt_engine_keeps_parameters_out_of_errors(app_ctx):
    engine = receipt_db.engine_for(app_ctx, db.engine)
    with pytest.raises(DBAPIError) as caught:
        receipt_db.run(engine, lambda conn: conn.execute(FAILING, {"value": MARKER}))
    assert "no_such_table" in str(caught.value)
    assert MARKER not in str(caught.value)
