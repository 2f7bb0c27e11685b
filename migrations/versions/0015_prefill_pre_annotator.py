"""The pre-annotation study records whose ranking each annotation was studied against

annotations.prefill_user_id: the AI labeler that was the set's pre-annotator when the
labeler submitted (null where prefill_shown is null). The study compares only the
annotations made under the set's current pre-annotator, so choosing another one
starts a fresh study instead of mixing the two. Rows studied before this column
existed are given the set's pre-annotator of the time of the upgrade.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-26 17:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0015'
down_revision: str | None = '0014'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('annotations', sa.Column('prefill_user_id', sa.Integer(), nullable=True))
    op.create_foreign_key(op.f('fk_annotations_prefill_user_id_users'), 'annotations', 'users',
                          ['prefill_user_id'], ['id'], ondelete='SET NULL')
    op.execute("""
        UPDATE annotations a SET prefill_user_id = ps.pre_annotator_id
        FROM tasks t JOIN prompt_sets ps ON ps.id = t.prompt_set_id
        WHERE t.id = a.task_id AND a.prefill_shown IS NOT NULL
    """)
    op.create_check_constraint(op.f('ck_annotations_prefill_user_if_studied'), 'annotations',
                               'prefill_user_id IS NULL OR prefill_shown IS NOT NULL')


def downgrade() -> None:
    op.drop_constraint(op.f('ck_annotations_prefill_user_if_studied'), 'annotations', type_='check')
    op.drop_constraint(op.f('fk_annotations_prefill_user_id_users'), 'annotations', type_='foreignkey')
    op.drop_column('annotations', 'prefill_user_id')
