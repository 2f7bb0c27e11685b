"""login attempts pruned: an index on the attempt's time, for deleting those older than the window

Sign-in deletes the attempts older than the throttling window (app/services/auth.py),
so the table no longer grows with every sign-in ever made.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 08:30:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index('ix_login_attempts_at', 'login_attempts', ['at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_login_attempts_at', table_name='login_attempts')
