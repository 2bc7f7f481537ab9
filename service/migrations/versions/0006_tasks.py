"""tasks: steps tenants run on leased workers, their logs, and the worker credential

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 14:30:00

The agent polls the service for its worker's tasks (docs/tasks.md) with a credential
of its own; only its hash is stored (workers.worker_token_hash). Pools bound how many
tasks run at once on one worker (pools.max_concurrent_tasks).
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

from service.crypto import EncryptedText
from service.models import UTCDateTime

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('workers') as batch:
        batch.add_column(sa.Column('worker_token_hash', sa.String(length=64), nullable=True))
    with op.batch_alter_table('pools') as batch:
        batch.add_column(
            sa.Column('max_concurrent_tasks', sa.Integer(), nullable=False, server_default='4')
        )
    op.create_table(
        'tasks',
        sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column('lease_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column('seq', sa.Integer(), nullable=False),
        sa.Column('tenant_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column('pool', sqlmodel.sql.sqltypes.AutoString(length=63), nullable=False),
        sa.Column('worker_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column('shell', sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column('timeout_s', sa.Integer(), nullable=False),
        sa.Column('container_image', sqlmodel.sql.sqltypes.AutoString(length=300), nullable=True),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.Column('started_at', UTCDateTime(), nullable=True),
        sa.Column('finished_at', UTCDateTime(), nullable=True),
        sa.Column('exit_code', sa.Integer(), nullable=True),
        sa.Column('error', sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=True),
        sa.Column('cancel_requested_at', UTCDateTime(), nullable=True),
        sa.Column('payload', EncryptedText(), nullable=True),
        sa.Column('script_sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('received_bytes', sa.Integer(), nullable=False),
        sa.Column('log_bytes', sa.Integer(), nullable=False),
        sa.Column('log_capped', sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(['lease_id'], ['leases.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('uq_tasks_lease_seq', 'tasks', ['lease_id', 'seq'], unique=True)
    op.create_index('ix_tasks_worker_state', 'tasks', ['worker_id', 'state', 'created_at'])
    op.create_index('ix_tasks_state_started', 'tasks', ['state', 'started_at'])
    op.create_index('ix_tasks_finished', 'tasks', ['finished_at'])
    op.create_table(
        'task_log_chunks',
        sa.Column('task_id', sa.String(length=40), nullable=False),
        sa.Column('offset', sa.Integer(), nullable=False),
        sa.Column('data', sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('task_id', 'offset'),
    )


def downgrade() -> None:
    op.drop_table('task_log_chunks')
    op.drop_index('ix_tasks_finished', table_name='tasks')
    op.drop_index('ix_tasks_state_started', table_name='tasks')
    op.drop_index('ix_tasks_worker_state', table_name='tasks')
    op.drop_index('uq_tasks_lease_seq', table_name='tasks')
    op.drop_table('tasks')
    with op.batch_alter_table('pools') as batch:
        batch.drop_column('max_concurrent_tasks')
    with op.batch_alter_table('workers') as batch:
        batch.drop_column('worker_token_hash')
