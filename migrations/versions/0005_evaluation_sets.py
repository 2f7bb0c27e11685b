"""evaluation sets: the models a set compares, pairwise (A/B) labeling and its votes

A prompt set of kind 'evaluation' compares two or more registered models
(prompt_set_models); it and ranking sets with K = 2 that choose it are labeled on
the A/B page (prompt_sets.pairwise). Each pairwise annotation keeps its verdict in
votes; its ratings rows carry ranks only, so ratings.likert may be empty.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_KINDS = "kind IN ('ranking', 'demonstration')"
NEW_KINDS = "kind IN ('ranking', 'demonstration', 'evaluation')"


def upgrade() -> None:
    op.drop_constraint(op.f('ck_prompt_sets_prompt_set_kind'), 'prompt_sets', type_='check')
    op.create_check_constraint(op.f('ck_prompt_sets_prompt_set_kind'), 'prompt_sets', NEW_KINDS)
    op.add_column('prompt_sets', sa.Column('pairwise', sa.Boolean(), server_default=sa.text('false'), nullable=False))
    op.create_check_constraint(op.f('ck_prompt_sets_pairwise_k'), 'prompt_sets', 'NOT pairwise OR k = 2')
    op.create_check_constraint(op.f('ck_prompt_sets_evaluation_pairwise'), 'prompt_sets', "kind <> 'evaluation' OR pairwise")
    op.alter_column('ratings', 'likert', existing_type=sa.Integer(), nullable=True)

    op.create_table('prompt_set_models',
    sa.Column('prompt_set_id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.CheckConstraint('position BETWEEN 0 AND 8', name=op.f('ck_prompt_set_models_position_range')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_prompt_set_models_model_id_models'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['prompt_set_id'], ['prompt_sets.id'], name=op.f('fk_prompt_set_models_prompt_set_id_prompt_sets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('prompt_set_id', 'model_id', name=op.f('pk_prompt_set_models')),
    sa.UniqueConstraint('prompt_set_id', 'position', name=op.f('uq_prompt_set_models_prompt_set_id_position'))
    )
    op.create_table('votes',
    sa.Column('annotation_id', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.Column('response_a_id', sa.Integer(), nullable=False),
    sa.Column('response_b_id', sa.Integer(), nullable=False),
    sa.Column('outcome', sa.Enum('a', 'b', 'tie', 'both_bad', name='vote_outcome', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('strength', sa.Enum('slightly', 'clearly', 'much', name='vote_strength', native_enum=False, create_constraint=True, length=16), nullable=True),
    sa.CheckConstraint('response_a_id <> response_b_id', name=op.f('ck_votes_distinct_pair')),
    sa.CheckConstraint("strength IS NULL OR outcome IN ('a', 'b')", name=op.f('ck_votes_strength_needs_winner')),
    sa.ForeignKeyConstraint(['annotation_id'], ['annotations.id'], name=op.f('fk_votes_annotation_id_annotations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['response_a_id'], ['responses.id'], name=op.f('fk_votes_response_a_id_responses'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['response_b_id'], ['responses.id'], name=op.f('fk_votes_response_b_id_responses'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_votes_task_id_tasks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('annotation_id', name=op.f('pk_votes'))
    )
    op.create_index(op.f('ix_votes_task_id'), 'votes', ['task_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_votes_task_id'), table_name='votes')
    op.drop_table('votes')
    op.drop_table('prompt_set_models')
    # Pairwise annotations have no Likert rating: they go before the column is required again.
    op.execute("DELETE FROM annotations WHERE id IN (SELECT annotation_id FROM ratings WHERE likert IS NULL)")
    op.alter_column('ratings', 'likert', existing_type=sa.Integer(), nullable=False)
    op.drop_constraint(op.f('ck_prompt_sets_evaluation_pairwise'), 'prompt_sets', type_='check')
    op.drop_constraint(op.f('ck_prompt_sets_pairwise_k'), 'prompt_sets', type_='check')
    op.drop_column('prompt_sets', 'pairwise')
    op.execute("DELETE FROM prompt_sets WHERE kind = 'evaluation'")
    op.drop_constraint(op.f('ck_prompt_sets_prompt_set_kind'), 'prompt_sets', type_='check')
    op.create_check_constraint(op.f('ck_prompt_sets_prompt_set_kind'), 'prompt_sets', OLD_KINDS)
