"""demand half-life: how fast an adaptive pool's demand estimate forgets

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 18:00:00

The adaptive target's arrival rate was an exponentially weighted rate with fixed
half-lives (10 minutes, and 2 minutes beside it); a pool now sets the slow one
(``demand_half_life``, default 10 minutes) and the fast one is a fifth of it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('pools') as batch:
        batch.add_column(
            sa.Column('demand_half_life_s', sa.Integer(), nullable=False, server_default='600')
        )


def downgrade() -> None:
    with op.batch_alter_table('pools') as batch:
        batch.drop_column('demand_half_life_s')
