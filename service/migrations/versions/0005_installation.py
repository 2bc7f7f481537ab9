"""installation: one random id per database, stamped on every resource it makes

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 12:30:00

Two services that share a deployment id by mistake, each with its own database,
used to take each other's workers for orphans and destroy them. Resources now
carry this id too; reconcile destroys only its own (and unlabelled ones made
before this revision).
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        'installation',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.bulk_insert(table, [{'id': f"i-{uuid.uuid4().hex[:20]}"}])


def downgrade() -> None:
    op.drop_table('installation')
