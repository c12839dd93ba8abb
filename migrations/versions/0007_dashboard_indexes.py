"""dashboard indexes

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 02:00:00

An operator's newest inbox rows by (operator_id, id): the dashboard's recent events,
the events page filtered by operator and each operator's last webhook.
"""
from alembic import op


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade():
    op.create_index('ix_webhook_events_operator_id_id', 'webhook_events',
                    ['operator_id', 'id'], unique=False)


def downgrade():
    op.drop_index('ix_webhook_events_operator_id_id', table_name='webhook_events')
