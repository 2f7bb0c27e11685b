"""JSON shapes of training runs and the settings each accepts."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import Id, Text


class RewardRunIn(BaseModel):
    """A reward-model run. Omitted choices take the defaults (the default SFT model;
    every labeler); `config` holds the settings to change (see GET /api/v1/training/settings)."""

    model_config = ConfigDict(extra="forbid")

    prompt_set_ids: list[Id]
    base_model_id: Id | None = None
    labeler_ids: list[Id] | None = None
    # Train on the sets' imported preference data (annotations of a source) too.
    include_imported: bool = True
    # Train on the sets' AI labelers' annotations too (app/services/ai_labelers).
    include_ai: bool = False
    name: Text | None = None
    # Training processes (GPUs; CPU processes on a worker without CUDA), up to what a running worker offers.
    processes: int = 1
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
    # Training processes (GPUs; CPU processes on a worker without CUDA), up to what a running worker offers.
    processes: int = 1
    config: dict[str, Any] = Field(default_factory=dict)


class DPORunIn(BaseModel):
    """A DPO run on the included rankings of the sets (as a reward model's: training split to
    train, validation split to validate). The policy defaults to the default SFT model, the
    reference to the policy."""

    model_config = ConfigDict(extra="forbid")

    prompt_set_ids: list[Id]
    policy_model_id: Id | None = None
    reference_model_id: Id | None = None
    labeler_ids: list[Id] | None = None
    # Train on the sets' imported preference data (annotations of a source) too.
    include_imported: bool = True
    # Train on AI labelers' rankings too (app/services/ai_labelers); left out by default.
    include_ai: bool = False
    name: Text | None = None
    # Training processes (GPUs; CPU processes on a worker without CUDA), up to what a running worker offers.
    processes: int = 1
    config: dict[str, Any] = Field(default_factory=dict)


class BestOfNRunIn(BaseModel):
    """Best-of-N on the prompts of a split of the sets: N samples from the policy per prompt, the
    best by the reward model kept. use "demonstrations" writes the kept responses to the
    (demonstration) sets as demonstrations to review; "report" only reports."""

    model_config = ConfigDict(extra="forbid")

    prompt_set_ids: list[Id]
    policy_model_id: Id | None = None
    reward_model_id: Id | None = None
    split: Literal["train", "validation", "rl"] = "train"
    use: Literal["demonstrations", "report"] = "demonstrations"
    config: dict[str, Any] = Field(default_factory=dict)


class SFTRunIn(BaseModel):
    """Supervised fine-tuning on the accepted demonstrations of the sets."""

    model_config = ConfigDict(extra="forbid")

    prompt_set_ids: list[Id]
    base_model_id: Id | None = None
    name: Text | None = None
    # Training processes (GPUs; CPU processes on a worker without CUDA), up to what a running worker offers.
    processes: int = 1
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
    dpo: list[SettingOut]
    best_of_n: list[SettingOut]


class EstimateIn(BaseModel):
    """A run to estimate: its kind, model (default: the default SFT model), reference (PPO, DPO; default:
    the model itself), ranking sets (reward model, DPO: their K sets the batch), processes (one per GPU; the
    config's strategy spreads the run over them) and settings."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["sft", "reward", "ppo", "dpo"]
    model_id: Id | None = None
    reference_model_id: Id | None = None
    prompt_set_ids: list[Id] | None = None
    processes: int = 1
    config: dict[str, Any] = Field(default_factory=dict)


class EstimateOut(BaseModel):
    """Expected peak memory per device (GiB) on the workers' devices, and whether the run fits; when it
    does not, `message` says why and `alternatives` lists settings that would fit."""

    per_device_gib: dict[str, float]  # weights, grads, optimizer, activations, runtime, total
    device: Literal["cuda", "cpu"]
    limit_gib: float
    parameters: int
    fits: bool
    message: str | None
    alternatives: list[str]
