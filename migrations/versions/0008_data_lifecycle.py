"""data lifecycle: deletion records

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27 02:10:00

What the platform deleted (operator purges, inbox and audit retention), for the
partner's compliance. Counts only; the operator is named by its public id.
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        'deletion_records',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('scope', sa.String(length=30), nullable=False),
        sa.Column('status', sa.String(length=20), nullable=False),
        sa.Column('operator_ref', sa.String(length=32), nullable=True),
        sa.Column('operator_id', sa.Integer(), nullable=True),
        sa.Column('requested_by_type', sa.String(length=20), nullable=False),
        sa.Column('requested_by', sa.String(length=200), nullable=False),
        sa.Column('requested_at', sa.DateTime(), nullable=False),
        sa.Column('delete_after', sa.DateTime(), nullable=True),
        sa.Column('completed_at', sa.DateTime(), nullable=True),
        sa.Column('counts', sa.JSON(), nullable=False),
        sa.Column('detail', sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(['operator_id'], ['operators.id'],
                                name=op.f('fk_deletion_records_operator_id_operators'),
                                ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_deletion_records')),
    )
    with op.batch_alter_table('deletion_records') as batch_op:
        batch_op.create_index(batch_op.f('ix_deletion_records_scope'), ['scope'])
        batch_op.create_index(batch_op.f('ix_deletion_records_status'), ['status'])
        batch_op.create_index(batch_op.f('ix_deletion_records_operator_ref'), ['operator_ref'])


def downgrade():
    op.drop_table('deletion_records')
