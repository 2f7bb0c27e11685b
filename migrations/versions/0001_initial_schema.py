"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-24 09:40:12.296287

Also installs the job queue's (procrastinate) own schema, taken from the
pinned procrastinate package, so `rlhf db upgrade` is the only setup step.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from procrastinate.schema import SchemaManager
from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(SchemaManager.get_schema())
    op.create_table('login_attempts',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('address', sa.String(length=64), nullable=False),
    sa.Column('succeeded', sa.Boolean(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_login_attempts'))
    )
    op.create_index('ix_login_attempts_address_at', 'login_attempts', ['address', 'at'], unique=False)
    op.create_index('ix_login_attempts_username_at', 'login_attempts', ['username', 'at'], unique=False)
    op.create_table('models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.Enum('sft', 'reward', 'policy', name='model_kind', native_enum=False, create_constraint=True, length=14), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('source', sa.String(length=100), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('config', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'"), nullable=False),
    sa.Column('metrics', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'"), nullable=False),
    sa.Column('is_default', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['parent_id'], ['models.id'], name=op.f('fk_models_parent_id_models'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_models')),
    sa.UniqueConstraint('name', name=op.f('uq_models_name'))
    )
    op.create_index('uq_models_default_kind', 'models', ['kind'], unique=True, postgresql_where=sa.text('is_default'))
    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('role', sa.Enum('labeler', 'admin', 'engineer', name='role', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('is_active', sa.Boolean(), server_default=sa.text('true'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_login_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("username ~ '^[A-Za-z0-9_.@-]{2,64}$'", name=op.f('ck_users_username_format')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('username', name=op.f('uq_users_username'))
    )
    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_api_tokens_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_tokens')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_api_tokens_token_hash'))
    )
    op.create_index(op.f('ix_api_tokens_user_id'), 'api_tokens', ['user_id'], unique=False)
    op.create_table('prompt_sets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.Enum('ranking', 'demonstration', name='prompt_set_kind', native_enum=False, create_constraint=True, length=21), nullable=False),
    sa.Column('instructions', sa.Text(), server_default='', nullable=False),
    sa.Column('generator_model_id', sa.Integer(), nullable=True),
    sa.Column('k', sa.Integer(), nullable=False),
    sa.Column('temperature', sa.Double(), nullable=False),
    sa.Column('top_p', sa.Double(), nullable=False),
    sa.Column('max_new_tokens', sa.Integer(), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('overlap', sa.Integer(), nullable=False),
    sa.Column('train_ratio', sa.Double(), nullable=False),
    sa.Column('validation_ratio', sa.Double(), nullable=False),
    sa.Column('rl_ratio', sa.Double(), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('gold_rate', sa.Double(), nullable=False),
    sa.Column('status', sa.Enum('draft', 'active', 'paused', 'archived', name='prompt_set_status', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('created_by_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('gold_rate >= 0 AND gold_rate <= 1', name=op.f('ck_prompt_sets_gold_rate_range')),
    sa.CheckConstraint('k BETWEEN 2 AND 9', name=op.f('ck_prompt_sets_k_range')),
    sa.CheckConstraint('max_new_tokens BETWEEN 1 AND 4096', name=op.f('ck_prompt_sets_max_new_tokens_range')),
    sa.CheckConstraint('overlap >= 1', name=op.f('ck_prompt_sets_overlap_positive')),
    sa.CheckConstraint('temperature > 0', name=op.f('ck_prompt_sets_temperature_positive')),
    sa.CheckConstraint('top_p > 0 AND top_p <= 1', name=op.f('ck_prompt_sets_top_p_range')),
    sa.CheckConstraint('train_ratio >= 0 AND validation_ratio >= 0 AND rl_ratio >= 0 AND abs(train_ratio + validation_ratio + rl_ratio - 1) < 1e-6', name=op.f('ck_prompt_sets_split_ratios')),
    sa.ForeignKeyConstraint(['created_by_id'], ['users.id'], name=op.f('fk_prompt_sets_created_by_id_users'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['generator_model_id'], ['models.id'], name=op.f('fk_prompt_sets_generator_model_id_models'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_prompt_sets')),
    sa.UniqueConstraint('name', name=op.f('uq_prompt_sets_name'))
    )
    op.create_table('jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.Enum('generate', 'train_sft', 'train_reward', 'train_ppo', name='job_kind', native_enum=False, create_constraint=True, length=20), nullable=False),
    sa.Column('status', sa.Enum('queued', 'running', 'succeeded', 'failed', 'cancelled', name='job_status', native_enum=False, create_constraint=True, length=17), nullable=False),
    sa.Column('params', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'"), nullable=False),
    sa.Column('queue', sa.String(length=50), nullable=False),
    sa.Column('queue_job_id', sa.BigInteger(), nullable=True),
    sa.Column('created_by_id', sa.Integer(), nullable=True),
    sa.Column('prompt_set_id', sa.Integer(), nullable=True),
    sa.Column('model_id', sa.Integer(), nullable=True),
    sa.Column('progress_done', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('progress_total', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('cancel_requested', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('worker', sa.String(length=200), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('traceback', sa.Text(), nullable=True),
    sa.Column('result', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'"), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint('progress_done >= 0 AND progress_total >= 0', name=op.f('ck_jobs_progress_nonneg')),
    sa.ForeignKeyConstraint(['created_by_id'], ['users.id'], name=op.f('fk_jobs_created_by_id_users'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_jobs_model_id_models'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['prompt_set_id'], ['prompt_sets.id'], name=op.f('fk_jobs_prompt_set_id_prompt_sets'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    op.create_index(op.f('ix_jobs_prompt_set_id'), 'jobs', ['prompt_set_id'], unique=False)
    op.create_index(op.f('ix_jobs_queue_job_id'), 'jobs', ['queue_job_id'], unique=False)
    op.create_index('ix_jobs_status_created_at', 'jobs', ['status', 'created_at'], unique=False)
    op.create_table('prompt_set_labelers',
    sa.Column('prompt_set_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['prompt_set_id'], ['prompt_sets.id'], name=op.f('fk_prompt_set_labelers_prompt_set_id_prompt_sets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_prompt_set_labelers_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('prompt_set_id', 'user_id', name=op.f('pk_prompt_set_labelers'))
    )
    op.create_table('prompts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('prompt_set_id', sa.Integer(), nullable=False),
    sa.Column('external_id', sa.String(length=200), nullable=True),
    sa.Column('messages', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('text_hash', sa.String(length=64), nullable=False),
    sa.Column('split', sa.Enum('train', 'validation', 'rl', name='split', native_enum=False, create_constraint=True, length=18), nullable=False),
    sa.Column('metadata', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'"), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['prompt_set_id'], ['prompt_sets.id'], name=op.f('fk_prompts_prompt_set_id_prompt_sets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_prompts')),
    sa.UniqueConstraint('prompt_set_id', 'text_hash', name=op.f('uq_prompts_prompt_set_id_text_hash'))
    )
    op.create_index('ix_prompts_prompt_set_id_split', 'prompts', ['prompt_set_id', 'split'], unique=False)
    op.create_table('demonstrations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('prompt_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('text', sa.Text(), server_default='', nullable=False),
    sa.Column('status', sa.Enum('draft', 'submitted', 'accepted', 'rejected', 'skipped', name='demonstration_status', native_enum=False, create_constraint=True, length=17), nullable=False),
    sa.Column('edit_mode', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('reject_reason', sa.Text(), nullable=True),
    sa.Column('time_spent_s', sa.Double(), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('skip_reason', sa.Text(), nullable=True),
    sa.Column('prompt_flags', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'"), nullable=False),
    sa.Column('reviewed_by_id', sa.Integer(), nullable=True),
    sa.Column('reviewed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['prompt_id'], ['prompts.id'], name=op.f('fk_demonstrations_prompt_id_prompts'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['reviewed_by_id'], ['users.id'], name=op.f('fk_demonstrations_reviewed_by_id_users'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_demonstrations_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_demonstrations')),
    sa.UniqueConstraint('prompt_id', 'user_id', name=op.f('uq_demonstrations_prompt_id_user_id'))
    )
    op.create_index('ix_demonstrations_status', 'demonstrations', ['status'], unique=False)
    op.create_table('job_metrics',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('value', sa.Double(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_metrics_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_metrics')),
    sa.UniqueConstraint('job_id', 'name', 'step', name=op.f('uq_job_metrics_job_id_name_step'))
    )
    op.create_table('responses',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('prompt_id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=True),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('sample_index', sa.Integer(), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('num_tokens', sa.Integer(), nullable=False),
    sa.Column('finish_reason', sa.String(length=16), nullable=False),
    sa.Column('seed', sa.BigInteger(), nullable=True),
    sa.Column('sampling', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'"), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('sample_index >= 0', name=op.f('ck_responses_sample_index_nonneg')),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_responses_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_responses_model_id_models'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['prompt_id'], ['prompts.id'], name=op.f('fk_responses_prompt_id_prompts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_responses')),
    sa.UniqueConstraint('prompt_id', 'round', 'sample_index', name=op.f('uq_responses_prompt_id_round_sample_index'))
    )
    op.create_table('tasks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('prompt_set_id', sa.Integer(), nullable=False),
    sa.Column('prompt_id', sa.Integer(), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('k', sa.Integer(), nullable=False),
    sa.Column('num_labels', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('is_gold', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('gold_ranking', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('k BETWEEN 2 AND 9', name=op.f('ck_tasks_k_range')),
    sa.CheckConstraint('num_labels >= 0', name=op.f('ck_tasks_num_labels_nonneg')),
    sa.ForeignKeyConstraint(['prompt_id'], ['prompts.id'], name=op.f('fk_tasks_prompt_id_prompts'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['prompt_set_id'], ['prompt_sets.id'], name=op.f('fk_tasks_prompt_set_id_prompt_sets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tasks')),
    sa.UniqueConstraint('prompt_id', 'round', name=op.f('uq_tasks_prompt_id_round'))
    )
    op.create_index('ix_tasks_prompt_set_id_num_labels', 'tasks', ['prompt_set_id', 'num_labels'], unique=False)
    op.create_table('annotations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('time_spent_s', sa.Double(), nullable=False),
    sa.Column('prompt_flags', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'"), nullable=False),
    sa.Column('comment', sa.Text(), server_default='', nullable=False),
    sa.Column('idempotency_key', sa.String(length=64), nullable=True),
    sa.Column('excluded', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('time_spent_s >= 0', name=op.f('ck_annotations_time_spent_nonneg')),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_annotations_task_id_tasks'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_annotations_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_annotations')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_annotations_idempotency_key')),
    sa.UniqueConstraint('task_id', 'user_id', name=op.f('uq_annotations_task_id_user_id'))
    )
    op.create_index('ix_annotations_user_id_created_at', 'annotations', ['user_id', 'created_at'], unique=False)
    op.create_table('assignments',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.Enum('active', 'submitted', 'expired', 'released', 'skipped', name='assignment_status', native_enum=False, create_constraint=True, length=17), nullable=False),
    sa.Column('leased_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('skip_reason', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_assignments_task_id_tasks'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_assignments_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_assignments')),
    sa.UniqueConstraint('task_id', 'user_id', name=op.f('uq_assignments_task_id_user_id'))
    )
    op.create_index('ix_assignments_task_id_status', 'assignments', ['task_id', 'status'], unique=False)
    op.create_index('ix_assignments_user_id_status', 'assignments', ['user_id', 'status'], unique=False)
    op.create_table('task_responses',
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.Column('response_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.CheckConstraint('position BETWEEN 0 AND 8', name=op.f('ck_task_responses_position_range')),
    sa.ForeignKeyConstraint(['response_id'], ['responses.id'], name=op.f('fk_task_responses_response_id_responses'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_task_responses_task_id_tasks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('task_id', 'response_id', name=op.f('pk_task_responses')),
    sa.UniqueConstraint('task_id', 'position', name=op.f('uq_task_responses_task_id_position'))
    )
    op.create_table('comparisons',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('annotation_id', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.Column('chosen_response_id', sa.Integer(), nullable=False),
    sa.Column('rejected_response_id', sa.Integer(), nullable=False),
    sa.Column('rank_margin', sa.Integer(), nullable=False),
    sa.Column('rating_margin', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('chosen_response_id <> rejected_response_id', name=op.f('ck_comparisons_distinct_pair')),
    sa.CheckConstraint('rank_margin > 0', name=op.f('ck_comparisons_rank_margin_positive')),
    sa.ForeignKeyConstraint(['annotation_id'], ['annotations.id'], name=op.f('fk_comparisons_annotation_id_annotations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['chosen_response_id'], ['responses.id'], name=op.f('fk_comparisons_chosen_response_id_responses'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['rejected_response_id'], ['responses.id'], name=op.f('fk_comparisons_rejected_response_id_responses'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_comparisons_task_id_tasks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_comparisons')),
    sa.UniqueConstraint('annotation_id', 'chosen_response_id', 'rejected_response_id', name=op.f('uq_comparisons_annotation_id_chosen_response_id_rejected_response_id'))
    )
    op.create_index(op.f('ix_comparisons_task_id'), 'comparisons', ['task_id'], unique=False)
    op.create_table('ratings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('annotation_id', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.Column('response_id', sa.Integer(), nullable=False),
    sa.Column('likert', sa.Integer(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('flags', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'"), nullable=False),
    sa.CheckConstraint('likert BETWEEN 1 AND 7', name=op.f('ck_ratings_likert_range')),
    sa.CheckConstraint('rank BETWEEN 1 AND 9', name=op.f('ck_ratings_rank_range')),
    sa.ForeignKeyConstraint(['annotation_id'], ['annotations.id'], name=op.f('fk_ratings_annotation_id_annotations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['task_id', 'response_id'], ['task_responses.task_id', 'task_responses.response_id'], name=op.f('fk_ratings_task_id_task_responses'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ratings')),
    sa.UniqueConstraint('annotation_id', 'response_id', name=op.f('uq_ratings_annotation_id_response_id'))
    )
    op.create_foreign_key(
        op.f('fk_models_job_id_jobs'), 'models', 'jobs', ['job_id'], ['id'], ondelete='SET NULL'
    )


def downgrade() -> None:
    op.drop_constraint(op.f('fk_models_job_id_jobs'), 'models', type_='foreignkey')
    op.drop_table('ratings')
    op.drop_index(op.f('ix_comparisons_task_id'), table_name='comparisons')
    op.drop_table('comparisons')
    op.drop_table('task_responses')
    op.drop_index('ix_assignments_user_id_status', table_name='assignments')
    op.drop_index('ix_assignments_task_id_status', table_name='assignments')
    op.drop_table('assignments')
    op.drop_index('ix_annotations_user_id_created_at', table_name='annotations')
    op.drop_table('annotations')
    op.drop_index('ix_tasks_prompt_set_id_num_labels', table_name='tasks')
    op.drop_table('tasks')
    op.drop_table('responses')
    op.drop_table('job_metrics')
    op.drop_index('ix_demonstrations_status', table_name='demonstrations')
    op.drop_table('demonstrations')
    op.drop_index('ix_prompts_prompt_set_id_split', table_name='prompts')
    op.drop_table('prompts')
    op.drop_table('prompt_set_labelers')
    op.drop_index('ix_jobs_status_created_at', table_name='jobs')
    op.drop_index(op.f('ix_jobs_queue_job_id'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_prompt_set_id'), table_name='jobs')
    op.drop_table('jobs')
    op.drop_table('prompt_sets')
    op.drop_index(op.f('ix_api_tokens_user_id'), table_name='api_tokens')
    op.drop_table('api_tokens')
    op.drop_table('users')
    op.drop_index('uq_models_default_kind', table_name='models', postgresql_where=sa.text('is_default'))
    op.drop_table('models')
    op.drop_index('ix_login_attempts_username_at', table_name='login_attempts')
    op.drop_index('ix_login_attempts_address_at', table_name='login_attempts')
    op.drop_table('login_attempts')
    _drop_queue_schema()


def _drop_queue_schema() -> None:
    op.execute(
        """
        DO $$
        DECLARE r record;
        BEGIN
            FOR r IN SELECT tablename FROM pg_tables
                     WHERE schemaname = current_schema() AND tablename LIKE 'procrastinate%' LOOP
                EXECUTE format('DROP TABLE IF EXISTS %I CASCADE', r.tablename);
            END LOOP;
            FOR r IN SELECT p.oid::regprocedure AS sig FROM pg_proc p
                     JOIN pg_namespace n ON n.oid = p.pronamespace
                     WHERE n.nspname = current_schema() AND p.proname LIKE 'procrastinate%' LOOP
                EXECUTE format('DROP FUNCTION IF EXISTS %s CASCADE', r.sig);
            END LOOP;
            FOR r IN SELECT t.typname FROM pg_type t
                     JOIN pg_namespace n ON n.oid = t.typnamespace
                     WHERE n.nspname = current_schema() AND t.typname LIKE 'procrastinate%'
                       AND t.typtype IN ('e', 'c') LOOP
                EXECUTE format('DROP TYPE IF EXISTS %I CASCADE', r.typname);
            END LOOP;
        END $$;
        """
    )
