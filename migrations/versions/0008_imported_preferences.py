"""imported preferences: annotations of a named source (an imported dataset), not of a person

annotation_sources names where imported judgements come from; an annotation now has
exactly one author, a labeler (user_id) or a source (source_id).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26 10:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'annotation_sources',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=100), nullable=False),
        sa.Column('created_by_id', sa.Integer(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.CheckConstraint('length(btrim(name)) > 0', name=op.f('ck_annotation_sources_name_not_blank')),
        sa.ForeignKeyConstraint(['created_by_id'], ['users.id'],
                                name=op.f('fk_annotation_sources_created_by_id_users'), ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_annotation_sources')),
        sa.UniqueConstraint('name', name=op.f('uq_annotation_sources_name')),
    )
    op.add_column('annotations', sa.Column('source_id', sa.Integer(), nullable=True))
    op.create_foreign_key(op.f('fk_annotations_source_id_annotation_sources'), 'annotations',
                          'annotation_sources', ['source_id'], ['id'], ondelete='CASCADE')
    op.create_index(op.f('ix_annotations_source_id'), 'annotations', ['source_id'], unique=False)
    op.alter_column('annotations', 'user_id', existing_type=sa.Integer(), nullable=True)
    op.create_check_constraint(op.f('ck_annotations_one_author'), 'annotations',
                               '(user_id IS NULL) <> (source_id IS NULL)')


def downgrade() -> None:
    op.execute('DELETE FROM annotations WHERE source_id IS NOT NULL')
    op.drop_constraint(op.f('ck_annotations_one_author'), 'annotations', type_='check')
    op.alter_column('annotations', 'user_id', existing_type=sa.Integer(), nullable=False)
    op.drop_index(op.f('ix_annotations_source_id'), table_name='annotations')
    op.drop_constraint(op.f('fk_annotations_source_id_annotation_sources'), 'annotations', type_='foreignkey')
    op.drop_column('annotations', 'source_id')
    op.drop_table('annotation_sources')
