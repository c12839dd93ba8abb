"""webhook claims fenced by the job that holds them; pending events found in id order

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27 02:00:00

``claimed_by`` / ``claim_delivery`` name the RQ job and its delivery number holding a
``processing`` claim, so a re-delivery of that job after a worker death takes the claim
over at once instead of waiting out the lease. ``(status, id)`` replaces the index on
``status`` alone: the drain claims the oldest pending events without sorting them.
"""
import sqlalchemy as sa
from alembic import op


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('webhook_events') as batch_op:
        batch_op.add_column(sa.Column('claimed_by', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('claim_delivery', sa.Integer(), nullable=True))
        batch_op.drop_index('ix_webhook_events_status')
        batch_op.create_index('ix_webhook_events_status_id', ['status', 'id'], unique=False)


def downgrade():
    with op.batch_alter_table('webhook_events') as batch_op:
        batch_op.drop_index('ix_webhook_events_status_id')
        batch_op.create_index('ix_webhook_events_status', ['status'], unique=False)
        batch_op.drop_column('claim_delivery')
        batch_op.drop_column('claimed_by')
