"""model samples: answers to fixed validation prompts, before and after a training run

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 14:05:09.977285
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('model_samples',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('prompt_id', sa.Integer(), nullable=True),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('stage', sa.String(length=16), nullable=False),
    sa.Column('messages', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('response', sa.Text(), nullable=False),
    sa.Column('reward', sa.Double(), nullable=True),
    sa.Column('ended', sa.Boolean(), server_default=sa.text('true'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("stage IN ('before', 'after')", name=op.f('ck_model_samples_stage_values')),
    sa.CheckConstraint('position >= 0', name=op.f('ck_model_samples_position_nonneg')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_model_samples_model_id_models'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['prompt_id'], ['prompts.id'], name=op.f('fk_model_samples_prompt_id_prompts'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_samples')),
    sa.UniqueConstraint('model_id', 'stage', 'position', name=op.f('uq_model_samples_model_id_stage_position'))
    )


def downgrade() -> None:
    op.drop_table('model_samples')
