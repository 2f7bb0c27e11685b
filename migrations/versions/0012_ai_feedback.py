"""AI feedback: AI labeler accounts, per-set principles and pre-annotation

users.kind (human | ai) with the AI labeler's judge model; prompt_sets.principles
(what a judge model compares responses by) and pre_annotator_id (the AI labeler whose
ranking is pre-filled); annotations.prefill_shown / prefill_changed record the
pre-annotation study.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-26 13:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('users', sa.Column('kind', sa.Enum('human', 'ai', name='user_kind', native_enum=False,
                                                     create_constraint=True, length=13),
                                     server_default='human', nullable=False))
    op.add_column('users', sa.Column('judge_model_id', sa.Integer(), nullable=True))
    op.create_foreign_key(op.f('fk_users_judge_model_id_models'), 'users', 'models', ['judge_model_id'], ['id'],
                          ondelete='RESTRICT')
    op.create_check_constraint(op.f('ck_users_ai_has_judge'), 'users',
                               "(kind = 'ai') = (judge_model_id IS NOT NULL)")
    op.add_column('prompt_sets', sa.Column('principles', sa.Text(), server_default='', nullable=False))
    op.add_column('prompt_sets', sa.Column('pre_annotator_id', sa.Integer(), nullable=True))
    op.create_foreign_key(op.f('fk_prompt_sets_pre_annotator_id_users'), 'prompt_sets', 'users',
                          ['pre_annotator_id'], ['id'], ondelete='SET NULL')
    op.add_column('annotations', sa.Column('prefill_shown', sa.Boolean(), nullable=True))
    op.add_column('annotations', sa.Column('prefill_changed', sa.Boolean(), nullable=True))
    op.create_check_constraint(op.f('ck_annotations_prefill_changed_if_shown'), 'annotations',
                               'prefill_changed IS NULL OR prefill_shown')


def downgrade() -> None:
    op.drop_constraint(op.f('ck_annotations_prefill_changed_if_shown'), 'annotations', type_='check')
    op.drop_column('annotations', 'prefill_changed')
    op.drop_column('annotations', 'prefill_shown')
    op.drop_constraint(op.f('fk_prompt_sets_pre_annotator_id_users'), 'prompt_sets', type_='foreignkey')
    op.drop_column('prompt_sets', 'pre_annotator_id')
    op.drop_column('prompt_sets', 'principles')
    op.execute("DELETE FROM users WHERE kind = 'ai'")
    op.drop_constraint(op.f('ck_users_ai_has_judge'), 'users', type_='check')
    op.drop_constraint(op.f('fk_users_judge_model_id_models'), 'users', type_='foreignkey')
    op.drop_column('users', 'judge_model_id')
    op.drop_column('users', 'kind')
