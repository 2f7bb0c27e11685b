"""Enumerations stored as short strings with CHECK constraints in the database."""

from enum import StrEnum


class Role(StrEnum):
    labeler = "labeler"
    admin = "admin"
    engineer = "engineer"


class PromptSetKind(StrEnum):
    ranking = "ranking"
    demonstration = "demonstration"


class PromptSetStatus(StrEnum):
    draft = "draft"
    active = "active"
    paused = "paused"
    archived = "archived"


class Split(StrEnum):
    train = "train"
    validation = "validation"
    rl = "rl"


class ModelKind(StrEnum):
    sft = "sft"
    reward = "reward"
    policy = "policy"


class JobKind(StrEnum):
    generate = "generate"
    train_sft = "train_sft"
    train_reward = "train_reward"
    train_ppo = "train_ppo"
    train_dpo = "train_dpo"
    best_of_n = "best_of_n"


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class AssignmentStatus(StrEnum):
    active = "active"
    submitted = "submitted"
    expired = "expired"
    released = "released"
    skipped = "skipped"


class DemonstrationStatus(StrEnum):
    draft = "draft"
    submitted = "submitted"
    accepted = "accepted"
    rejected = "rejected"
    skipped = "skipped"


class DemonstrationSource(StrEnum):
    human = "human"  # written by a labeler
    best_of_n = "best_of_n"  # the best of N samples by reward (a best_of_n job), reviewed like the others
