"""Migrations: one head, and the models match what the migrations build."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from flask_migrate import Migrate

from partner_app import MIGRATIONS_DIR
from partner_app.db import db


def test_single_head(app):
    with app.app_context():
        config = app.extensions["migrate"].migrate.get_config(MIGRATIONS_DIR)
    assert len(ScriptDirectory.from_config(config).get_heads()) == 1


def test_no_drift_between_models_and_migrations(app):
    assert isinstance(app.extensions["migrate"].migrate, Migrate)
    with app.app_context(), db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, db.metadata)
    assert diff == [], diff


def test_large_payloads_are_compressed_with_lz4_on_postgresql(app):
    """Orders and webhook bodies pass PostgreSQL's TOAST threshold: lz4 compresses them
    for less CPU than the default pglz (migration 0010)."""
    with app.app_context(), db.engine.connect() as conn:
        if conn.dialect.name != "postgresql":
            pytest.skip("a PostgreSQL column setting")
        if not conn.exec_driver_sql(
                "SELECT 'lz4' = ANY(enumvals) FROM pg_settings "
                "WHERE name = 'default_toast_compression'").scalar():
            pytest.skip("this PostgreSQL was built without lz4")
        methods = dict(conn.exec_driver_sql(
            "SELECT attrelid::regclass::text || '.' || attname, attcompression "
            "FROM pg_attribute WHERE (attrelid, attname) IN "
            "(('synced_orders'::regclass, 'payload'), ('webhook_events'::regclass, 'body'))"
        ).all())
    assert methods == {"synced_orders.payload": "l", "webhook_events.body": "l"}
