"""partial rankings and "all bad": prompt_sets.top_k; annotations.top_k, all_bad, all_bad_reason;
ratings.likert and ratings.rank nullable

A set may let labelers rank only the best top_k responses (the rest tied last); an
annotation records the top_k it was made under. A labeler may mark every response
unacceptable with a reason: such an annotation has no ranks (null) and its ratings
are optional (null when not given).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('prompt_sets', sa.Column('top_k', sa.Integer(), nullable=True))
    op.create_check_constraint(op.f('ck_prompt_sets_top_k_range'), 'prompt_sets',
                               'top_k IS NULL OR (top_k >= 1 AND top_k < k)')
    op.add_column('annotations', sa.Column('top_k', sa.Integer(), nullable=True))
    op.add_column('annotations', sa.Column('all_bad', sa.Boolean(), server_default=sa.text('false'),
                                           nullable=False))
    op.add_column('annotations', sa.Column('all_bad_reason', sa.String(length=500), nullable=True))
    op.create_check_constraint(op.f('ck_annotations_top_k_positive'), 'annotations',
                               'top_k IS NULL OR top_k >= 1')
    op.create_check_constraint(op.f('ck_annotations_all_bad_has_reason'), 'annotations',
                               'all_bad = (all_bad_reason IS NOT NULL)')
    op.create_check_constraint(op.f('ck_annotations_all_bad_not_ranked'), 'annotations',
                               'NOT (all_bad AND top_k IS NOT NULL)')
    op.alter_column('ratings', 'likert', existing_type=sa.Integer(), nullable=True)
    op.alter_column('ratings', 'rank', existing_type=sa.Integer(), nullable=True)


def downgrade() -> None:
    # "All bad" annotations have no ranks; they cannot exist without these columns.
    op.execute("DELETE FROM annotations WHERE all_bad")
    op.execute("DELETE FROM ratings WHERE likert IS NULL OR rank IS NULL")
    op.alter_column('ratings', 'rank', existing_type=sa.Integer(), nullable=False)
    op.alter_column('ratings', 'likert', existing_type=sa.Integer(), nullable=False)
    op.drop_constraint(op.f('ck_annotations_all_bad_not_ranked'), 'annotations', type_='check')
    op.drop_constraint(op.f('ck_annotations_all_bad_has_reason'), 'annotations', type_='check')
    op.drop_constraint(op.f('ck_annotations_top_k_positive'), 'annotations', type_='check')
    op.drop_column('annotations', 'all_bad_reason')
    op.drop_column('annotations', 'all_bad')
    op.drop_column('annotations', 'top_k')
    op.drop_constraint(op.f('ck_prompt_sets_top_k_range'), 'prompt_sets', type_='check')
    op.drop_column('prompt_sets', 'top_k')
