"""Multi-process jobs: the devices each running worker advertises

A worker records its queues, CUDA devices (name and memory each), CPU count,
RAM and the most processes one job may start on it; the training forms check a
run's `processes` against the live workers' figures.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-26 13:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('worker_devices',
    sa.Column('worker', sa.String(length=200), nullable=False),
    sa.Column('queues', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'"), nullable=False),
    sa.Column('cuda_devices', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'"),
              nullable=False),
    sa.Column('cpu_count', sa.Integer(), nullable=False),
    sa.Column('memory_bytes', sa.BigInteger(), nullable=False),
    sa.Column('max_processes', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('seen_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('worker', name=op.f('pk_worker_devices'))
    )
    op.create_index('ix_worker_devices_seen_at', 'worker_devices', ['seen_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_worker_devices_seen_at', table_name='worker_devices')
    op.drop_table('worker_devices')
