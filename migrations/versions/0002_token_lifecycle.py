"""token lifecycle

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 22:35:42.110731

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('platform_incidents',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=60), nullable=False),
    sa.Column('open_key', sa.String(length=60), nullable=True),
    sa.Column('opened_at', sa.DateTime(), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(), nullable=False),
    sa.Column('resolved_at', sa.DateTime(), nullable=True),
    sa.Column('occurrences', sa.Integer(), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_platform_incidents')),
    sa.UniqueConstraint('open_key', name=op.f('uq_platform_incidents_open_key'))
    )
    with op.batch_alter_table('platform_incidents', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_platform_incidents_kind'), ['kind'], unique=False)

    with op.batch_alter_table('operators', schema=None) as batch_op:
        batch_op.add_column(sa.Column('refresh_failures', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('last_refresh_at', sa.DateTime(), nullable=True))



def downgrade():
    with op.batch_alter_table('operators', schema=None) as batch_op:
        batch_op.drop_column('last_refresh_at')
        batch_op.drop_column('refresh_failures')

    with op.batch_alter_table('platform_incidents', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_platform_incidents_kind'))

    op.drop_table('platform_incidents')
