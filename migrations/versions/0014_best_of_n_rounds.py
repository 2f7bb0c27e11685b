"""Best-of-N rounds: a ranking set may generate a round as the top K of N samples by a reward model

prompt_sets.best_of_n (N) and best_of_n_reward_model_id choose the mode for the
rounds generated from now on (both null: the K samples themselves); a task records
how its responses were chosen in tasks.selection (null: the first K samples).

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-26 13:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0014'
down_revision: str | None = '0013'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('prompt_sets', sa.Column('best_of_n', sa.Integer(), nullable=True))
    op.add_column('prompt_sets', sa.Column('best_of_n_reward_model_id', sa.Integer(), nullable=True))
    op.create_foreign_key(op.f('fk_prompt_sets_best_of_n_reward_model_id_models'), 'prompt_sets', 'models',
                          ['best_of_n_reward_model_id'], ['id'], ondelete='RESTRICT')
    op.create_check_constraint(op.f('ck_prompt_sets_best_of_n_range'), 'prompt_sets',
                               'best_of_n IS NULL OR (best_of_n > k AND best_of_n <= 32)')
    op.create_check_constraint(op.f('ck_prompt_sets_best_of_n_reward_model'), 'prompt_sets',
                               '(best_of_n IS NULL) = (best_of_n_reward_model_id IS NULL)')
    op.add_column('tasks', sa.Column('selection', postgresql.JSONB(astext_type=sa.Text()), nullable=True))


def downgrade() -> None:
    op.drop_column('tasks', 'selection')
    op.drop_constraint(op.f('ck_prompt_sets_best_of_n_reward_model'), 'prompt_sets', type_='check')
    op.drop_constraint(op.f('ck_prompt_sets_best_of_n_range'), 'prompt_sets', type_='check')
    op.drop_constraint(op.f('fk_prompt_sets_best_of_n_reward_model_id_models'), 'prompt_sets', type_='foreignkey')
    op.drop_column('prompt_sets', 'best_of_n_reward_model_id')
    op.drop_column('prompt_sets', 'best_of_n')
