"""partial indexes for the admin lists of live workers and leases

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 22:50:00

With only a plain ``created_at`` index, PostgreSQL answered "live rows, newest
first" by walking all of history backwards whenever fewer live rows than a page
existed. These indexes hold only live rows, so the lists cost what is live.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

# Frozen copies of the predicates in service.models at this revision.
LIVE_WORKERS = "state IN ('provisioning', 'ready', 'leased', 'destroying', 'failed')"
LIVE_LEASES = "state IN ('pending', 'active')"


def upgrade() -> None:
    op.create_index(
        'ix_workers_live_created', 'workers', ['created_at'],
        sqlite_where=sa.text(LIVE_WORKERS), postgresql_where=sa.text(LIVE_WORKERS),
    )
    op.create_index(
        'ix_leases_live_created', 'leases', ['created_at'],
        sqlite_where=sa.text(LIVE_LEASES), postgresql_where=sa.text(LIVE_LEASES),
    )


def downgrade() -> None:
    op.drop_index('ix_leases_live_created', table_name='leases')
    op.drop_index('ix_workers_live_created', table_name='workers')
