"""Three more job kinds: automatic evaluation figures, task scoring, AI labels

eval_figures computes the reward model's and the policies' figures on an
evaluation set's pairs; score_tasks scores a ranking set's tasks with a reward
model for the uncertainty order; ai_label has an AI labeler (a reward model or
a judge model) annotate a set's tasks.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-26 12:50:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_KINDS = ('generate', 'train_sft', 'train_reward', 'train_ppo', 'train_dpo', 'best_of_n')
NEW_KINDS = OLD_KINDS + ('eval_figures', 'score_tasks', 'ai_label')


def _kinds(kinds: tuple[str, ...]) -> str:
    return "kind IN (" + ", ".join(f"'{k}'" for k in kinds) + ")"


def upgrade() -> None:
    op.drop_constraint(op.f('ck_jobs_job_kind'), 'jobs', type_='check')
    op.create_check_constraint(op.f('ck_jobs_job_kind'), 'jobs', _kinds(NEW_KINDS))


def downgrade() -> None:
    op.execute("DELETE FROM jobs WHERE kind IN ('eval_figures', 'score_tasks', 'ai_label')")
    op.drop_constraint(op.f('ck_jobs_job_kind'), 'jobs', type_='check')
    op.create_check_constraint(op.f('ck_jobs_job_kind'), 'jobs', _kinds(OLD_KINDS))
