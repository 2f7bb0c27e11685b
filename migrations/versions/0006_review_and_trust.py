"""review and trust: task reviews (accept or correct a labeled task), labeler trust
rules per set, and the quarantine of a labeler's new annotations

- task_reviews: a reviewer's verdict on a task, kept beside the annotations;
- labeler_trust: per (set, labeler) the submissions counted and the quarantine;
- annotations.quarantined: excluded because of a quarantine (lifting it includes them again);
- prompt_sets.trust_rules: the set's trust rules that differ from the defaults.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 09:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('prompt_sets', sa.Column('trust_rules', postgresql.JSONB(astext_type=sa.Text()),
                                           server_default=sa.text("'{}'"), nullable=False))
    op.add_column('annotations', sa.Column('quarantined', sa.Boolean(), server_default=sa.text('false'),
                                           nullable=False))
    op.create_check_constraint(op.f('ck_annotations_quarantined_is_excluded'), 'annotations', 'excluded OR NOT quarantined')
    op.create_table(
        'task_reviews',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('task_id', sa.Integer(), nullable=False),
        sa.Column('reviewer_id', sa.Integer(), nullable=False),
        sa.Column('decision', sa.Enum('accepted', 'corrected', name='review_decision', native_enum=False,
                                      create_constraint=True, length=17), nullable=False),
        sa.Column('ranking', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column('use', sa.Enum('training', 'gold', name='correction_use', native_enum=False,
                                 create_constraint=True, length=16), nullable=True),
        sa.Column('note', sa.Text(), server_default='', nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.CheckConstraint(
            "(decision = 'accepted' AND ranking IS NULL AND use IS NULL)"
            " OR (decision = 'corrected' AND ranking IS NOT NULL AND use IS NOT NULL)",
            name=op.f('ck_task_reviews_correction_has_ranking')),
        sa.ForeignKeyConstraint(['reviewer_id'], ['users.id'], name=op.f('fk_task_reviews_reviewer_id_users'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_task_reviews_task_id_tasks'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_task_reviews')),
    )
    op.create_index('ix_task_reviews_task_id_id', 'task_reviews', ['task_id', 'id'], unique=False)
    op.create_table(
        'labeler_trust',
        sa.Column('prompt_set_id', sa.Integer(), nullable=False),
        sa.Column('user_id', sa.Integer(), nullable=False),
        sa.Column('submitted', sa.Integer(), server_default=sa.text('0'), nullable=False),
        sa.Column('quarantined', sa.Boolean(), server_default=sa.text('false'), nullable=False),
        sa.Column('quarantined_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('quarantined_by_id', sa.Integer(), nullable=True),
        sa.Column('quarantine_reasons', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'"),
                  nullable=False),
        sa.Column('released_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('released_by_id', sa.Integer(), nullable=True),
        sa.CheckConstraint('submitted >= 0', name=op.f('ck_labeler_trust_submitted_nonneg')),
        sa.CheckConstraint('NOT quarantined OR quarantined_at IS NOT NULL',
                           name=op.f('ck_labeler_trust_quarantine_has_time')),
        sa.ForeignKeyConstraint(['prompt_set_id'], ['prompt_sets.id'],
                                name=op.f('fk_labeler_trust_prompt_set_id_prompt_sets'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_labeler_trust_user_id_users'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['quarantined_by_id'], ['users.id'],
                                name=op.f('fk_labeler_trust_quarantined_by_id_users'), ondelete='SET NULL'),
        sa.ForeignKeyConstraint(['released_by_id'], ['users.id'],
                                name=op.f('fk_labeler_trust_released_by_id_users'), ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('prompt_set_id', 'user_id', name=op.f('pk_labeler_trust')),
    )
    # The submissions already made count: the rules' checking cadence starts from them.
    op.execute("""
        INSERT INTO labeler_trust (prompt_set_id, user_id, submitted)
        SELECT t.prompt_set_id, a.user_id, count(*) FROM annotations a JOIN tasks t ON t.id = a.task_id
        GROUP BY t.prompt_set_id, a.user_id
    """)


def downgrade() -> None:
    op.drop_table('labeler_trust')
    op.drop_index('ix_task_reviews_task_id_id', table_name='task_reviews')
    op.drop_table('task_reviews')
    op.drop_constraint(op.f('ck_annotations_quarantined_is_excluded'), 'annotations', type_='check')
    op.drop_column('annotations', 'quarantined')
    op.drop_column('prompt_sets', 'trust_rules')
