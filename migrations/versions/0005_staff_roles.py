"""staff roles

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 01:50:00

Accounts created before roles existed keep full rights (``admin``).
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('staff_users') as batch_op:
        batch_op.add_column(sa.Column('role', sa.String(length=16), server_default='admin',
                                      nullable=False))


def downgrade():
    with op.batch_alter_table('staff_users') as batch_op:
        batch_op.drop_column('role')
