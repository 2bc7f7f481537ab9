"""pools.warning: what the pool's provisioner says an operator must know

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 12:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('pools') as batch:
        batch.add_column(sa.Column('warning', sqlmodel.sql.sqltypes.AutoString(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('pools') as batch:
        batch.drop_column('warning')
