"""active learning: prompt_sets.task_order and order_model_id; task_scores

A ranking set hands its tasks out in creation order or, with task_order
'uncertainty', those a reward model (order_model_id, or the newest one) separates
least confidently first; task_scores holds each task's reward-model scores.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-26 13:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0013'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('prompt_sets', sa.Column('task_order', sa.Enum('created', 'uncertainty', name='task_order',
                                                                 native_enum=False, create_constraint=True,
                                                                 length=19),
                                           server_default='created', nullable=False))
    op.add_column('prompt_sets', sa.Column('order_model_id', sa.Integer(), nullable=True))
    op.create_foreign_key(op.f('fk_prompt_sets_order_model_id_models'), 'prompt_sets', 'models',
                          ['order_model_id'], ['id'], ondelete='SET NULL')
    op.create_table(
        'task_scores',
        sa.Column('task_id', sa.Integer(), nullable=False),
        sa.Column('model_id', sa.Integer(), nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=True),
        sa.Column('margin', sa.Float(), nullable=False),
        sa.Column('rewards', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column('scored_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.CheckConstraint('margin >= 0', name=op.f('ck_task_scores_margin_nonneg')),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_task_scores_job_id_jobs'),
                                ondelete='SET NULL'),
        sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_task_scores_model_id_models'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_task_scores_task_id_tasks'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('task_id', name=op.f('pk_task_scores')),
    )
    op.create_index('ix_task_scores_model_id', 'task_scores', ['model_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_task_scores_model_id', table_name='task_scores')
    op.drop_table('task_scores')
    op.drop_constraint(op.f('fk_prompt_sets_order_model_id_models'), 'prompt_sets', type_='foreignkey')
    op.drop_column('prompt_sets', 'order_model_id')
    op.drop_column('prompt_sets', 'task_order')
