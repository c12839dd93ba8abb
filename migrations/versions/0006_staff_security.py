"""staff security: TOTP second factor; audit log indexes for the dashboard

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 02:00:00

"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('staff_users') as batch_op:
        batch_op.add_column(sa.Column('totp_secret_ct', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('totp_enabled_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('totp_last_step', sa.Integer(), nullable=True))
    op.create_index('ix_audit_log_action_created_at', 'audit_log', ['action', 'created_at'])
    op.create_index('ix_audit_log_actor_id', 'audit_log', ['actor', 'id'])


def downgrade():
    op.drop_index('ix_audit_log_actor_id', table_name='audit_log')
    op.drop_index('ix_audit_log_action_created_at', table_name='audit_log')
    with op.batch_alter_table('staff_users') as batch_op:
        batch_op.drop_column('totp_last_step')
        batch_op.drop_column('totp_enabled_at')
        batch_op.drop_column('totp_secret_ct')
