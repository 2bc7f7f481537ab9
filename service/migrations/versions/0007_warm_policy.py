"""warm policy: how many ready workers a pool keeps, and the history it is computed from

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 15:00:00

Pools get their warm policy (fixed or adaptive), hit target, scale-down delay and
schedules (docs/capacity.md). The adaptive target reads a pool's recent lease
requests and provisioning times: two indexes keep those reads to the pool's
recent rows, however long the history.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('pools') as batch:
        batch.add_column(
            sa.Column('warm_policy', sa.String(length=20), nullable=False, server_default='fixed')
        )
        batch.add_column(
            sa.Column('warm_hit_target', sa.Float(), nullable=False, server_default='0.95')
        )
        batch.add_column(
            sa.Column('scale_down_delay_s', sa.Integer(), nullable=False, server_default='600')
        )
        batch.add_column(sa.Column('schedules', sa.JSON(), nullable=False, server_default='[]'))
    op.create_index('ix_leases_pool_created', 'leases', ['pool', 'created_at'])
    op.create_index('ix_workers_pool_ready', 'workers', ['pool', 'ready_at'])


def downgrade() -> None:
    op.drop_index('ix_workers_pool_ready', table_name='workers')
    op.drop_index('ix_leases_pool_created', table_name='leases')
    with op.batch_alter_table('pools') as batch:
        batch.drop_column('schedules')
        batch.drop_column('scale_down_delay_s')
        batch.drop_column('warm_hit_target')
        batch.drop_column('warm_policy')
