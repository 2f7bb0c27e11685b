"""JSON shapes of training runs, the model registry and demonstrations."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.db.enums import DemonstrationStatus, ModelKind
from app.schemas import Id, Text
from app.schemas_jobs import JobOut


class RewardRunIn(BaseModel):
    """A reward-model run. Omitted choices take the defaults (the default SFT model;
    every labeler); `config` holds the settings to change (see GET /api/v1/training/settings)."""

    model_config = ConfigDict(extra="forbid")

    prompt_set_ids: list[Id]
    base_model_id: Id | None = None
    labeler_ids: list[Id] | None = None
    name: Text | None = None
    config: dict[str, Any] = Field(default_factory=dict)


class PPORunIn(BaseModel):
    """A PPO run on the rl-split prompts of the sets. The reference defaults to the
    policy, the reward model to the default (else newest) one."""

    model_config = ConfigDict(extra="forbid")

    prompt_set_ids: list[Id]
    policy_model_id: Id | None = None
    reference_model_id: Id | None = None
    reward_model_id: Id | None = None
    sft_set_ids: list[Id] = Field(default_factory=list)
    name: Text | None = None
    config: dict[str, Any] = Field(default_factory=dict)


class SFTRunIn(BaseModel):
    """Supervised fine-tuning on the accepted demonstrations of the sets."""

    model_config = ConfigDict(extra="forbid")

    prompt_set_ids: list[Id]
    base_model_id: Id | None = None
    name: Text | None = None
    config: dict[str, Any] = Field(default_factory=dict)


class SettingOut(BaseModel):
    """One setting a run's `config` may hold (from trainer/configs.py), as the forms show it."""

    name: str
    label: str
    type: str
    default: Any
    low: float | None = None
    high: float | None = None
    choices: list[str] | None = None
    optional: bool = False
    help: str = ""


class TrainingSettingsOut(BaseModel):
    sft: list[SettingOut]
    reward: list[SettingOut]
    ppo: list[SettingOut]


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    kind: ModelKind
    path: str
    source: str
    sha256: str | None
    parent_id: int | None
    job_id: int | None
    is_default: bool
    metrics: dict[str, Any]
    config: dict[str, Any]
    created_at: datetime


class ModelDetailOut(ModelOut):
    lineage_ids: list[int]  # ancestors through parent_id, nearest first
    reward_model_id: int | None = None
    reference_model_id: int | None = None
    children_ids: list[int]
    generator_of: list[int]  # ranking sets it generates for


class SampleOut(BaseModel):
    response: str
    reward: float | None
    ended: bool


class SamplePairOut(BaseModel):
    position: int
    prompt_id: int | None
    messages: list[dict[str, Any]]
    before: SampleOut | None
    after: SampleOut | None


class PromoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_set_id: Id


class PromoteOut(BaseModel):
    prompt_set_id: int
    round: int
    generator_model_id: int
    job: JobOut | None


class DemonstrationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    prompt_id: int
    prompt_set_id: int
    messages: list[dict[str, Any]]
    instructions: str
    user_id: int
    text: Text
    status: DemonstrationStatus
    edit_mode: bool
    prompt_flags: list[str]
    time_spent_s: float
    expires_at: datetime | None
    reject_reason: str | None
    skip_reason: str | None
    reviewed_by_id: int | None
    reviewed_at: datetime | None
    updated_at: datetime


class NextDemonstrationOut(BaseModel):
    demonstration: DemonstrationOut | None


class DraftIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Text = ""
    prompt_flags: list[str] | None = None
    time_spent_s: float | None = None


class DraftOut(BaseModel):
    demonstration: DemonstrationOut
    saved: bool
    holds_lease: bool


class SubmitIn(DraftIn):
    pass


class SubmitOut(BaseModel):
    demonstration: DemonstrationOut
    already: bool


class SkipIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Text


class RejectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Text


class EditIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Text


class DemonstrationImportOut(BaseModel):
    added: int
    prompts_added: int
    duplicates_in_file: int
    duplicates_existing: int
