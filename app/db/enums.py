"""Enumerations stored as short strings with CHECK constraints in the database."""

from enum import StrEnum


class Role(StrEnum):
    labeler = "labeler"
    admin = "admin"
    engineer = "engineer"


class UserKind(StrEnum):
    human = "human"
    ai = "ai"  # an AI labeler: its annotations come from ai_label jobs; it never signs in


class PromptSetKind(StrEnum):
    ranking = "ranking"
    demonstration = "demonstration"
    # Blind A/B comparisons of two or more models' responses (app/services/evaluation.py).
    evaluation = "evaluation"


class TaskOrder(StrEnum):
    """The order a ranking set hands its tasks out in (app/services/assignment.py)."""

    created = "created"  # oldest first
    uncertainty = "uncertainty"  # smallest reward-model margin first (app/services/active_learning.py)


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
    eval_figures = "eval_figures"  # automatic figures on an evaluation set's pairs
    score_tasks = "score_tasks"  # reward-model scores of a set's tasks (uncertainty order)
    ai_label = "ai_label"  # an AI labeler annotates a set's tasks


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


class ReviewDecision(StrEnum):
    accepted = "accepted"  # the labelers' annotations stand as they are
    corrected = "corrected"  # a reviewer's ranking takes their place (see CorrectionUse)


class CorrectionUse(StrEnum):
    training = "training"  # the correction replaces the task's annotations in training data and exports
    gold = "gold"  # the task becomes a gold task with the correction as its expected answer


class VoteOutcome(StrEnum):
    """A labeler's verdict on a pair of responses shown as A and B."""

    a = "a"
    b = "b"
    tie = "tie"
    both_bad = "both_bad"


class VoteStrength(StrEnum):
    """How much better the winner is (optional)."""

    slightly = "slightly"
    clearly = "clearly"
    much = "much"


class DemonstrationSource(StrEnum):
    human = "human"  # written by a labeler
    best_of_n = "best_of_n"  # the best of N samples by reward (a best_of_n job), reviewed like the others
