"""The tables. Rules the database can enforce (unique, check, foreign keys) live here."""

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    String,
    Text,
    UniqueConstraint,
    text as sql,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db.base import Base, str_enum, utcnow
from app.db.enums import (
    AssignmentStatus,
    CorrectionUse,
    DemonstrationSource,
    DemonstrationStatus,
    JobKind,
    JobStatus,
    ModelKind,
    PromptSetKind,
    PromptSetStatus,
    ReviewDecision,
    Role,
    Split,
    TaskOrder,
    UserKind,
    VoteOutcome,
    VoteStrength,
)


def created_at_column() -> Mapped[datetime]:
    return mapped_column(default=utcnow, server_default=sql("now()"))


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[Role] = mapped_column(str_enum(Role, "role"))
    # human, or ai: an AI labeler (app/services/ai_labelers), whose annotations an
    # ai_label job writes with its judge model; it never signs in.
    kind: Mapped[UserKind] = mapped_column(str_enum(UserKind, "user_kind"), default=UserKind.human,
                                           server_default=UserKind.human.value)
    # An AI labeler's judge: a reward model (ranks by score) or an SFT/policy model
    # (compares pairs under the set's principles).
    judge_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"))
    password_hash: Mapped[str] = mapped_column(String(255))
    is_active: Mapped[bool] = mapped_column(default=True, server_default=sql("true"))
    created_at: Mapped[datetime] = created_at_column()
    last_login_at: Mapped[datetime | None]

    api_tokens: Mapped[list["ApiToken"]] = relationship(back_populates="user")
    sessions: Mapped[list["UserSession"]] = relationship(back_populates="user", passive_deletes=True)
    judge_model: Mapped["Model | None"] = relationship()

    __table_args__ = (
        CheckConstraint("username ~ '^[A-Za-z0-9_.@-]{2,64}$'", name="username_format"),
        CheckConstraint("(kind = 'ai') = (judge_model_id IS NOT NULL)", name="ai_has_judge"),
    )

    @property
    def is_ai(self) -> bool:
        return self.kind == UserKind.ai

    def can(self, *roles: Role) -> bool:
        """Admins can do everything; others only what their role allows."""
        return self.is_active and (self.role == Role.admin or self.role in roles)


class ApiToken(Base):
    """A personal bearer token; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = created_at_column()
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    user: Mapped[User] = relationship(back_populates="api_tokens")


class UserSession(Base):
    """A signed-in browser. The cookie holds a random token and this table its
    SHA-256, so sign-out, password changes and deactivation end sessions on the
    server; a deleted row is a revoked session."""

    __tablename__ = "user_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = created_at_column()
    # Refreshed at most once a minute, for the idle timeout.
    last_seen_at: Mapped[datetime] = created_at_column()

    user: Mapped[User] = relationship(back_populates="sessions")


class LoginAttempt(Base):
    """Failed and successful logins, for rate limiting across web replicas."""

    __tablename__ = "login_attempts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    username: Mapped[str] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(64))
    succeeded: Mapped[bool]
    at: Mapped[datetime] = created_at_column()

    # Throttling counts an address's attempts (of one account, or of all) in a window;
    # attempts older than the window are pruned by time.
    __table_args__ = (Index("ix_login_attempts_address_at", "address", "at"), Index("ix_login_attempts_at", "at"))


class Model(Base):
    """A registered checkpoint: SFT, reward model or policy."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[ModelKind] = mapped_column(str_enum(ModelKind, "model_kind"))
    # A directory (absolute, or relative to the artifacts dir) or a hub id.
    path: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(100))
    sha256: Mapped[str | None] = mapped_column(String(64))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL", use_alter=True)
    )
    config: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default=sql("'{}'"))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default=sql("'{}'"))
    is_default: Mapped[bool] = mapped_column(default=False, server_default=sql("false"))
    created_at: Mapped[datetime] = created_at_column()

    parent: Mapped["Model | None"] = relationship(remote_side=[id], foreign_keys=[parent_id])

    __table_args__ = (
        # At most one default model per kind.
        Index("uq_models_default_kind", "kind", unique=True, postgresql_where=sql("is_default")),
    )


class ModelSample(Base):
    """A model's answer to a validation prompt, kept to read side by side: a
    trained model ("after") beside the model it started from ("before"), with
    the reward model's (normalised) score where one was used."""

    __tablename__ = "model_samples"

    id: Mapped[int] = mapped_column(primary_key=True)
    # The trained model these samples describe (for "before", its starting point answered).
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    prompt_id: Mapped[int | None] = mapped_column(ForeignKey("prompts.id", ondelete="SET NULL"))
    position: Mapped[int]  # order of the prompt in the fixed validation list
    stage: Mapped[str] = mapped_column(String(16))
    messages: Mapped[list[Any]]
    response: Mapped[str] = mapped_column(Text)
    reward: Mapped[float | None]
    ended: Mapped[bool] = mapped_column(default=True, server_default=sql("true"))
    created_at: Mapped[datetime] = created_at_column()

    __table_args__ = (
        UniqueConstraint("model_id", "stage", "position"),
        CheckConstraint("stage IN ('before', 'after')", name="stage_values"),
        CheckConstraint("position >= 0", name="position_nonneg"),
    )


def labeler_set_name(set_id: int, name: str, kind: "PromptSetKind") -> str:
    """The set's name as labelers see it: an evaluation's own name often names the models it
    compares ("SFT vs PPO v3"), which would unblind the votes."""
    return f"Comparison #{set_id}" if kind == PromptSetKind.evaluation else name


class PromptSet(Base):
    __tablename__ = "prompt_sets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[PromptSetKind] = mapped_column(
        str_enum(PromptSetKind, "prompt_set_kind"), default=PromptSetKind.ranking
    )
    instructions: Mapped[str] = mapped_column(Text, default="", server_default="")
    generator_model_id: Mapped[int | None] = mapped_column(
        ForeignKey("models.id", ondelete="RESTRICT")
    )
    k: Mapped[int] = mapped_column(default=4)
    temperature: Mapped[float] = mapped_column(default=1.0)
    top_p: Mapped[float] = mapped_column(default=0.95)
    max_new_tokens: Mapped[int] = mapped_column(default=128)
    seed: Mapped[int] = mapped_column(default=0)
    overlap: Mapped[int] = mapped_column(default=1)
    # Share of prompts in each split; a prompt's split is fixed by its text hash.
    train_ratio: Mapped[float] = mapped_column(default=0.8)
    validation_ratio: Mapped[float] = mapped_column(default=0.1)
    rl_ratio: Mapped[float] = mapped_column(default=0.1)
    # Generation round: bumped when a new generator is promoted.
    round: Mapped[int] = mapped_column(default=1)
    # Share of gold tasks mixed into a labeler's queue (0 = none).
    gold_rate: Mapped[float] = mapped_column(default=0.0)
    # Labeler trust rules that differ from the defaults (app/services/trust.TrustRules).
    trust_rules: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default=sql("'{}'"))
    # Labeled on the A/B page (one vote per pair) instead of ratings and ranks: every
    # evaluation set, and ranking sets with K = 2 that choose it.
    pairwise: Mapped[bool] = mapped_column(default=False, server_default=sql("false"))
    # Partial rankings: labelers rank only the best top_k responses, the rest are tied
    # last (app/services/annotations). None: every response is ranked.
    top_k: Mapped[int | None]
    # The written principles an AI labeler's judge model compares responses by
    # (Constitutional AI), after the set's instructions.
    principles: Mapped[str] = mapped_column(Text, default="", server_default="")
    # Pre-annotation: this AI labeler's ranking is pre-filled on the labeling page (on a
    # random half of the tasks, app/services/ai_labelers.prefill_arm). None: off.
    pre_annotator_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    # Active learning: the order tasks are handed out in, and the reward model whose
    # scores the uncertainty order reads (None: the newest reward model).
    task_order: Mapped[TaskOrder] = mapped_column(
        str_enum(TaskOrder, "task_order"), default=TaskOrder.created, server_default=TaskOrder.created.value
    )
    order_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    # Best-of-N rounds: N samples per prompt, the K with the highest reward from this reward
    # model become the task (trainer/generate.py); both None: the K samples themselves.
    best_of_n: Mapped[int | None]
    best_of_n_reward_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"))
    status: Mapped[PromptSetStatus] = mapped_column(
        str_enum(PromptSetStatus, "prompt_set_status"), default=PromptSetStatus.draft
    )
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = created_at_column()

    generator_model: Mapped[Model | None] = relationship(foreign_keys=[generator_model_id])
    order_model: Mapped[Model | None] = relationship(foreign_keys=[order_model_id])
    best_of_n_reward_model: Mapped[Model | None] = relationship(foreign_keys=[best_of_n_reward_model_id])
    prompts: Mapped[list["Prompt"]] = relationship(back_populates="prompt_set")
    pre_annotator: Mapped[User | None] = relationship(foreign_keys=[pre_annotator_id])

    @property
    def labeler_name(self) -> str:
        return labeler_set_name(self.id, self.name, self.kind)

    __table_args__ = (
        CheckConstraint("k BETWEEN 2 AND 9", name="k_range"),
        CheckConstraint("overlap >= 1", name="overlap_positive"),
        CheckConstraint("temperature > 0", name="temperature_positive"),
        CheckConstraint("top_p > 0 AND top_p <= 1", name="top_p_range"),
        CheckConstraint("max_new_tokens BETWEEN 1 AND 4096", name="max_new_tokens_range"),
        CheckConstraint(
            "train_ratio >= 0 AND validation_ratio >= 0 AND rl_ratio >= 0"
            " AND abs(train_ratio + validation_ratio + rl_ratio - 1) < 1e-6",
            name="split_ratios",
        ),
        CheckConstraint("gold_rate >= 0 AND gold_rate <= 1", name="gold_rate_range"),
        CheckConstraint("top_k IS NULL OR (top_k >= 1 AND top_k < k)", name="top_k_range"),
        CheckConstraint("NOT pairwise OR k = 2", name="pairwise_k"),
        CheckConstraint("kind <> 'evaluation' OR pairwise", name="evaluation_pairwise"),
        CheckConstraint("best_of_n IS NULL OR (best_of_n > k AND best_of_n <= 32)", name="best_of_n_range"),
        CheckConstraint("(best_of_n IS NULL) = (best_of_n_reward_model_id IS NULL)", name="best_of_n_reward_model"),
    )


class PromptSetModel(Base):
    """The models an evaluation set compares, in the order chosen (position 0, 1, ...).
    A model's response to a prompt is stored with sample_index = its position."""

    __tablename__ = "prompt_set_models"

    prompt_set_id: Mapped[int] = mapped_column(
        ForeignKey("prompt_sets.id", ondelete="CASCADE"), primary_key=True
    )
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"), primary_key=True)
    position: Mapped[int]

    model: Mapped[Model] = relationship()

    __table_args__ = (
        UniqueConstraint("prompt_set_id", "position"),
        CheckConstraint("position BETWEEN 0 AND 8", name="position_range"),
    )


class PromptSetLabeler(Base):
    """Labelers allowed on a prompt set. A set with no rows is open to every labeler."""

    __tablename__ = "prompt_set_labelers"

    prompt_set_id: Mapped[int] = mapped_column(
        ForeignKey("prompt_sets.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )


class Prompt(Base):
    __tablename__ = "prompts"

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_set_id: Mapped[int] = mapped_column(ForeignKey("prompt_sets.id", ondelete="CASCADE"))
    external_id: Mapped[str | None] = mapped_column(String(200))
    # The conversation so far: [{"role": "user", "content": "..."}, ...].
    messages: Mapped[list[Any]]
    # The last user turn, for lists and search.
    text: Mapped[str] = mapped_column(Text)
    # SHA-256 of the canonical messages: duplicates and the split derive from it.
    text_hash: Mapped[str] = mapped_column(String(64))
    split: Mapped[Split] = mapped_column(str_enum(Split, "split"))
    meta: Mapped[dict[str, Any]] = mapped_column(
        "metadata", default=dict, server_default=sql("'{}'")
    )
    created_at: Mapped[datetime] = created_at_column()

    prompt_set: Mapped[PromptSet] = relationship(back_populates="prompts")
    responses: Mapped[list["Response"]] = relationship(back_populates="prompt")

    __table_args__ = (
        UniqueConstraint("prompt_set_id", "text_hash"),
        Index("ix_prompts_prompt_set_id_split", "prompt_set_id", "split"),
    )


class Response(Base):
    __tablename__ = "responses"

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"))
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    round: Mapped[int] = mapped_column(default=1)
    sample_index: Mapped[int]
    text: Mapped[str] = mapped_column(Text)
    num_tokens: Mapped[int] = mapped_column(default=0)
    # "eos" when the model ended the response, "length" when max_new_tokens cut it.
    finish_reason: Mapped[str] = mapped_column(String(16), default="eos")
    seed: Mapped[int | None] = mapped_column(BigInteger)
    sampling: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default=sql("'{}'"))
    created_at: Mapped[datetime] = created_at_column()

    prompt: Mapped[Prompt] = relationship(back_populates="responses")

    __table_args__ = (
        UniqueConstraint("prompt_id", "round", "sample_index"),
        CheckConstraint("sample_index >= 0", name="sample_index_nonneg"),
    )


class Task(Base):
    """One prompt with its K responses, shown to labelers in a fixed shuffled order."""

    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_set_id: Mapped[int] = mapped_column(ForeignKey("prompt_sets.id", ondelete="CASCADE"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"))
    round: Mapped[int] = mapped_column(default=1)
    k: Mapped[int]
    # Submitted annotations so far; compared with the set's overlap.
    num_labels: Mapped[int] = mapped_column(default=0, server_default=sql("0"))
    is_gold: Mapped[bool] = mapped_column(default=False, server_default=sql("false"))
    # For gold tasks: {response_id: expected rank}.
    gold_ranking: Mapped[dict[str, Any] | None]
    # How the responses were chosen; None: the first K samples. Best-of-N rounds:
    # {"mode": "best_of_n", "n", "reward_model_id", "candidates": [{"response_id", "reward"}, ...]
    # best first, all N}. For admins and engineers only: labelers never see it.
    selection: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = created_at_column()

    prompt: Mapped[Prompt] = relationship()
    prompt_set: Mapped[PromptSet] = relationship()
    items: Mapped[list["TaskResponse"]] = relationship(
        back_populates="task", order_by="TaskResponse.position"
    )

    __table_args__ = (
        UniqueConstraint("prompt_id", "round"),
        CheckConstraint("k BETWEEN 2 AND 9", name="k_range"),
        CheckConstraint("num_labels >= 0", name="num_labels_nonneg"),
        Index("ix_tasks_prompt_set_id_num_labels", "prompt_set_id", "num_labels"),
    )


class TaskScore(Base):
    """A reward model's scores of a task's responses (app/services/active_learning.py):
    the uncertainty order hands out the tasks of smallest margin first. Admins and
    engineers see them; labelers never do."""

    __tablename__ = "task_scores"

    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    # Mean |reward gap| over the task's pairs of responses: small = the model is unsure.
    margin: Mapped[float]
    # {response_id: normalised reward}
    rewards: Mapped[dict[str, Any]]
    scored_at: Mapped[datetime] = created_at_column()

    model: Mapped[Model] = relationship()

    __table_args__ = (
        CheckConstraint("margin >= 0", name="margin_nonneg"),
        Index("ix_task_scores_model_id", "model_id"),
    )


class TaskResponse(Base):
    """A response's place (A, B, C...) in a task's shuffled order."""

    __tablename__ = "task_responses"

    task_id: Mapped[int] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
    )
    response_id: Mapped[int] = mapped_column(
        ForeignKey("responses.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int]

    task: Mapped[Task] = relationship(back_populates="items")
    response: Mapped[Response] = relationship()

    __table_args__ = (
        UniqueConstraint("task_id", "position"),
        CheckConstraint("position BETWEEN 0 AND 8", name="position_range"),
    )


class Assignment(Base):
    """A labeler's lease on a task. One row per (task, labeler): never labeled twice."""

    __tablename__ = "assignments"

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    status: Mapped[AssignmentStatus] = mapped_column(
        str_enum(AssignmentStatus, "assignment_status"), default=AssignmentStatus.active
    )
    leased_at: Mapped[datetime] = created_at_column()
    expires_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    skip_reason: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("task_id", "user_id"),
        Index("ix_assignments_user_id_status", "user_id", "status"),
        Index("ix_assignments_task_id_status", "task_id", "status"),
    )


class AnnotationSource(Base):
    """A named origin of judgements that is not a person: an imported dataset
    (HH-RLHF, UltraFeedback, an earlier export). Its annotations train the reward
    model when asked to, and are kept out of human agreement and task overlap."""

    __tablename__ = "annotation_sources"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = created_at_column()

    __table_args__ = (CheckConstraint("length(btrim(name)) > 0", name="name_not_blank"),)


class Annotation(Base):
    """One labeler's submission for one task."""

    __tablename__ = "annotations"

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    # Exactly one author: a labeler (user_id) or an imported source (source_id).
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    source_id: Mapped[int | None] = mapped_column(
        ForeignKey("annotation_sources.id", ondelete="CASCADE"), index=True
    )
    time_spent_s: Mapped[float] = mapped_column(default=0.0)
    prompt_flags: Mapped[list[Any]] = mapped_column(default=list, server_default=sql("'[]'"))
    comment: Mapped[str] = mapped_column(Text, default="", server_default="")
    # The form's one-time key: a retried submit finds the stored annotation.
    idempotency_key: Mapped[str | None] = mapped_column(String(64), unique=True)
    # Excluded annotations stay stored but leave exports and training data.
    excluded: Mapped[bool] = mapped_column(default=False, server_default=sql("false"))
    # Excluded because its labeler was quarantined on the set when it was submitted
    # (app/services/trust); lifting the quarantine includes it again.
    quarantined: Mapped[bool] = mapped_column(default=False, server_default=sql("false"))
    # A partial ranking: only the best top_k responses were ranked (ranks 1..top_k), the
    # others are stored with rank top_k + 1, tied last. None: a full ranking (or all bad).
    top_k: Mapped[int | None]
    # "All responses are unacceptable": no ranking (ratings' ranks are null), no
    # comparisons; the reason is required.
    all_bad: Mapped[bool] = mapped_column(default=False, server_default=sql("false"))
    all_bad_reason: Mapped[str | None] = mapped_column(String(500))
    # Pre-annotation study (app/services/ai_labelers): on a set with a pre-annotator,
    # whether its ranking was pre-filled for this labeler (None: the set had none, or
    # the AI had not labeled the task) and, when shown, whether the labeler changed it;
    # prefill_user_id: that pre-annotator (the study compares the current one's only).
    prefill_shown: Mapped[bool | None]
    prefill_changed: Mapped[bool | None]
    prefill_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = created_at_column()

    ratings: Mapped[list["Rating"]] = relationship(
        back_populates="annotation", cascade="all, delete-orphan"
    )
    comparisons: Mapped[list["Comparison"]] = relationship(
        back_populates="annotation", cascade="all, delete-orphan"
    )
    vote: Mapped["Vote | None"] = relationship(back_populates="annotation", cascade="all, delete-orphan")

    __table_args__ = (
        UniqueConstraint("task_id", "user_id"),
        Index("ix_annotations_user_id_created_at", "user_id", "created_at"),
        CheckConstraint("(user_id IS NULL) <> (source_id IS NULL)", name="one_author"),
        CheckConstraint("time_spent_s >= 0", name="time_spent_nonneg"),
        CheckConstraint("excluded OR NOT quarantined", name="quarantined_is_excluded"),
        CheckConstraint("top_k IS NULL OR top_k >= 1", name="top_k_positive"),
        CheckConstraint("all_bad = (all_bad_reason IS NOT NULL)", name="all_bad_has_reason"),
        CheckConstraint("NOT (all_bad AND top_k IS NOT NULL)", name="all_bad_not_ranked"),
        CheckConstraint("prefill_changed IS NULL OR prefill_shown", name="prefill_changed_if_shown"),
        CheckConstraint("prefill_user_id IS NULL OR prefill_shown IS NOT NULL", name="prefill_user_if_studied"),
    )


class Rating(Base):
    """Likert score, rank and flags of one response in one annotation. An "all bad"
    annotation has no rank and may leave the rating out (both null)."""

    __tablename__ = "ratings"

    id: Mapped[int] = mapped_column(primary_key=True)
    annotation_id: Mapped[int] = mapped_column(ForeignKey("annotations.id", ondelete="CASCADE"))
    task_id: Mapped[int]
    response_id: Mapped[int]
    # None for a pairwise vote (app/services/votes.py), which ranks but does not rate, and
    # for "all bad" annotations, which need no rating and rank nothing.
    likert: Mapped[int | None]
    rank: Mapped[int | None]
    flags: Mapped[list[Any]] = mapped_column(default=list, server_default=sql("'[]'"))

    annotation: Mapped[Annotation] = relationship(back_populates="ratings")

    __table_args__ = (
        UniqueConstraint("annotation_id", "response_id"),
        # The response must belong to the task.
        ForeignKeyConstraint(
            ["task_id", "response_id"],
            ["task_responses.task_id", "task_responses.response_id"],
            ondelete="CASCADE",
        ),
        CheckConstraint("likert BETWEEN 1 AND 7", name="likert_range"),
        CheckConstraint("rank BETWEEN 1 AND 9", name="rank_range"),
    )


class Comparison(Base):
    """One (chosen, rejected) pair expanded from a ranking; what the reward model trains on."""

    __tablename__ = "comparisons"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    annotation_id: Mapped[int] = mapped_column(ForeignKey("annotations.id", ondelete="CASCADE"))
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    chosen_response_id: Mapped[int] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"))
    rejected_response_id: Mapped[int] = mapped_column(
        ForeignKey("responses.id", ondelete="CASCADE")
    )
    rank_margin: Mapped[int]
    rating_margin: Mapped[int]
    created_at: Mapped[datetime] = created_at_column()

    annotation: Mapped[Annotation] = relationship(back_populates="comparisons")

    __table_args__ = (
        UniqueConstraint("annotation_id", "chosen_response_id", "rejected_response_id"),
        CheckConstraint("chosen_response_id <> rejected_response_id", name="distinct_pair"),
        CheckConstraint("rank_margin > 0", name="rank_margin_positive"),
    )


class TaskReview(Base):
    """A reviewer's verdict on a labeled task, kept beside the labelers' annotations
    (never instead of them). A task's latest review is its current state; earlier
    ones stay as its history. A correction is a ranking of the task's responses
    ({response_id (str): rank}, 1 = best, ties allowed) used as training data in
    place of the task's annotations, or as the task's gold answer."""

    __tablename__ = "task_reviews"

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    decision: Mapped[ReviewDecision] = mapped_column(str_enum(ReviewDecision, "review_decision"))
    ranking: Mapped[dict[str, Any] | None]
    use: Mapped[CorrectionUse | None] = mapped_column(str_enum(CorrectionUse, "correction_use"))
    note: Mapped[str] = mapped_column(Text, default="", server_default="")
    created_at: Mapped[datetime] = created_at_column()

    reviewer: Mapped[User] = relationship()

    __table_args__ = (
        Index("ix_task_reviews_task_id_id", "task_id", "id"),
        CheckConstraint(
            "(decision = 'accepted' AND ranking IS NULL AND use IS NULL)"
            " OR (decision = 'corrected' AND ranking IS NOT NULL AND use IS NOT NULL)",
            name="correction_has_ranking",
        ),
    )


class LabelerTrust(Base):
    """A labeler's standing on a prompt set: submissions counted (the trust rules are
    checked every few of them) and the quarantine, if any. While quarantined, the
    labeler's new annotations on the set are stored excluded and marked quarantined."""

    __tablename__ = "labeler_trust"

    prompt_set_id: Mapped[int] = mapped_column(
        ForeignKey("prompt_sets.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    submitted: Mapped[int] = mapped_column(default=0, server_default=sql("0"))
    quarantined: Mapped[bool] = mapped_column(default=False, server_default=sql("false"))
    quarantined_at: Mapped[datetime | None]
    # None while quarantined: the rules did it (quarantine_reasons says which).
    quarantined_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    quarantine_reasons: Mapped[list[Any]] = mapped_column(default=list, server_default=sql("'[]'"))
    # Set when an admin lifts a quarantine: the rules do not quarantine this labeler on this set again.
    released_at: Mapped[datetime | None]
    released_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))

    __table_args__ = (
        CheckConstraint("submitted >= 0", name="submitted_nonneg"),
        CheckConstraint("NOT quarantined OR quarantined_at IS NOT NULL", name="quarantine_has_time"),
    )


class Vote(Base):
    """A pairwise annotation's verdict as the labeler gave it: A better, B better, tie or
    both bad, with an optional strength. A and B are the task's positions 0 and 1.
    Its ratings rows carry the ranks (1/2, or 1/1 for tie and both bad) that agreement,
    gold and reward training read, and its comparison row the winner and loser."""

    __tablename__ = "votes"

    annotation_id: Mapped[int] = mapped_column(ForeignKey("annotations.id", ondelete="CASCADE"), primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    response_a_id: Mapped[int] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"))
    response_b_id: Mapped[int] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"))
    outcome: Mapped[VoteOutcome] = mapped_column(str_enum(VoteOutcome, "vote_outcome"))
    strength: Mapped[VoteStrength | None] = mapped_column(str_enum(VoteStrength, "vote_strength"))

    annotation: Mapped[Annotation] = relationship(back_populates="vote")

    __table_args__ = (
        CheckConstraint("response_a_id <> response_b_id", name="distinct_pair"),
        CheckConstraint("strength IS NULL OR outcome IN ('a', 'b')", name="strength_needs_winner"),
    )


class Demonstration(Base):
    """A labeler's own response to a prompt; accepted ones are SFT data."""

    __tablename__ = "demonstrations"

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    text: Mapped[str] = mapped_column(Text, default="", server_default="")
    status: Mapped[DemonstrationStatus] = mapped_column(
        str_enum(DemonstrationStatus, "demonstration_status"), default=DemonstrationStatus.draft
    )
    # human, or best_of_n: kept by a best_of_n job (rejection sampling), by the engineer who ran it
    source: Mapped[DemonstrationSource] = mapped_column(
        str_enum(DemonstrationSource, "demonstration_source"), default=DemonstrationSource.human,
        server_default=DemonstrationSource.human.value)
    # True when the labeler started from the model's answer.
    edit_mode: Mapped[bool] = mapped_column(default=False, server_default=sql("false"))
    reject_reason: Mapped[str | None] = mapped_column(Text)
    time_spent_s: Mapped[float] = mapped_column(default=0.0)
    # A draft is the labeler's lease on the prompt until then (see app/services/demonstrations/leases).
    expires_at: Mapped[datetime | None]
    skip_reason: Mapped[str | None] = mapped_column(Text)
    prompt_flags: Mapped[list[Any]] = mapped_column(default=list, server_default=sql("'[]'"))
    reviewed_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    reviewed_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = created_at_column()

    prompt: Mapped[Prompt] = relationship()
    user: Mapped[User] = relationship(foreign_keys=[user_id])

    __table_args__ = (
        UniqueConstraint("prompt_id", "user_id"),
        Index("ix_demonstrations_status", "status"),
    )


class Job(Base):
    """The product's record of a run; the queue's own row is linked by queue_job_id."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[JobKind] = mapped_column(str_enum(JobKind, "job_kind"))
    status: Mapped[JobStatus] = mapped_column(
        str_enum(JobStatus, "job_status"), default=JobStatus.queued
    )
    params: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default=sql("'{}'"))
    queue: Mapped[str] = mapped_column(String(50), default="default")
    queue_job_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    prompt_set_id: Mapped[int | None] = mapped_column(
        ForeignKey("prompt_sets.id", ondelete="SET NULL"), index=True
    )
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    progress_done: Mapped[int] = mapped_column(default=0, server_default=sql("0"))
    progress_total: Mapped[int] = mapped_column(default=0, server_default=sql("0"))
    attempts: Mapped[int] = mapped_column(default=0, server_default=sql("0"))
    cancel_requested: Mapped[bool] = mapped_column(default=False, server_default=sql("false"))
    worker: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default=sql("'{}'"))
    created_at: Mapped[datetime] = created_at_column()
    started_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    metrics: Mapped[list["JobMetric"]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (
        Index("ix_jobs_status_created_at", "status", "created_at"),
        CheckConstraint("progress_done >= 0 AND progress_total >= 0", name="progress_nonneg"),
    )


class JobMetric(Base):
    """One scalar of a job at one step, for live curves."""

    __tablename__ = "job_metrics"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int]
    name: Mapped[str] = mapped_column(String(100))
    value: Mapped[float]
    created_at: Mapped[datetime] = created_at_column()

    job: Mapped[Job] = relationship(back_populates="metrics")

    __table_args__ = (
        UniqueConstraint("job_id", "name", "step"),
    )


class WorkerDevices(Base):
    """What a running worker can run: its queues and devices, written when it starts and
    touched at every heartbeat (seen_at), removed when it stops. The training forms read
    it to offer multi-process runs; a row not seen for a while is a dead worker's."""

    __tablename__ = "worker_devices"

    worker: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid, as jobs.worker
    queues: Mapped[list[Any]] = mapped_column(default=list, server_default=sql("'[]'"))
    # One {"name", "memory_bytes"} per CUDA device (none on a CPU-only machine).
    cuda_devices: Mapped[list[Any]] = mapped_column(default=list, server_default=sql("'[]'"))
    cpu_count: Mapped[int]
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    # The most processes one job may start here: the GPUs, or the CPUs without CUDA.
    max_processes: Mapped[int]
    started_at: Mapped[datetime] = created_at_column()
    seen_at: Mapped[datetime] = created_at_column()

    __table_args__ = (Index("ix_worker_devices_seen_at", "seen_at"),)
