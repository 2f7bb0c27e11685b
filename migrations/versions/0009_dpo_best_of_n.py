"""DPO and best-of-N: two job kinds, and where a demonstration came from

train_dpo and best_of_n join the job kinds; a demonstration records its source
(human, or best_of_n: the best of N samples by reward, reviewed like the others).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-26 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_KINDS = ('generate', 'train_sft', 'train_reward', 'train_ppo')
NEW_KINDS = OLD_KINDS + ('train_dpo', 'best_of_n')


def _kinds(kinds: tuple[str, ...]) -> str:
    return "kind IN (" + ", ".join(f"'{k}'" for k in kinds) + ")"


def upgrade() -> None:
    op.drop_constraint(op.f('ck_jobs_job_kind'), 'jobs', type_='check')
    op.create_check_constraint(op.f('ck_jobs_job_kind'), 'jobs', _kinds(NEW_KINDS))
    op.add_column('demonstrations', sa.Column(
        'source', sa.Enum('human', 'best_of_n', name='demonstration_source', native_enum=False,
                          create_constraint=True, length=17),
        server_default='human', nullable=False))


def downgrade() -> None:
    op.drop_column('demonstrations', 'source')
    op.execute("DELETE FROM jobs WHERE kind IN ('train_dpo', 'best_of_n')")
    op.drop_constraint(op.f('ck_jobs_job_kind'), 'jobs', type_='check')
    op.create_check_constraint(op.f('ck_jobs_job_kind'), 'jobs', _kinds(OLD_KINDS))
