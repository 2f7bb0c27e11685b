"""JSON shapes of the model registry: models, their lineage, samples, promotion."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.db.enums import ModelKind
from app.db.models import Model, ModelSample, PromptSet
from app.schemas.common import Id
from app.schemas.jobs import JobOut
from app.schemas.prompt_sets import BEST_OF_N_HELP, BEST_OF_N_REWARD_HELP
from app.schemas.leaderboard import EvaluationEvidenceOut, evidence_out
from app.services.leaderboard import Evidence
from app.services.models import SidePair


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
    evaluation: EvaluationEvidenceOut | None = None  # human evaluation: its rating, its record against its parent


def model_detail_out(model: Model, *, lineage: list[Model], related: dict[str, Model | None],
                     children: list[Model], generator_of: list[PromptSet],
                     evidence: Evidence | None = None) -> ModelDetailOut:
    """The model with its lineage, the reward and reference models its run used, the models
    trained from it and the ranking sets it generates for."""
    reward, reference = related.get("reward"), related.get("reference")
    return ModelDetailOut(
        **ModelOut.model_validate(model).model_dump(),
        lineage_ids=[m.id for m in lineage],
        reward_model_id=reward.id if reward else None,
        reference_model_id=reference.id if reference else None,
        children_ids=[m.id for m in children],
        generator_of=[s.id for s in generator_of],
        evaluation=evidence_out(evidence) if evidence else None,
    )


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


def sample_out(sample: ModelSample | None) -> SampleOut | None:
    return None if sample is None else SampleOut(response=sample.response, reward=sample.reward, ended=sample.ended)


def sample_pair_out(pair: SidePair) -> SamplePairOut:
    """One validation prompt answered before and after training."""
    return SamplePairOut(position=pair.position, prompt_id=pair.prompt_id, messages=pair.messages,
                         before=sample_out(pair.before), after=sample_out(pair.after))


class PromoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_set_id: Id
    best_of_n: int | None = Field(default=None, description=BEST_OF_N_HELP)
    best_of_n_reward_model_id: Id | None = Field(default=None, description=BEST_OF_N_REWARD_HELP)


class PromoteOut(BaseModel):
    prompt_set_id: int
    round: int
    generator_model_id: int
    best_of_n: int | None
    best_of_n_reward_model_id: int | None
    job: JobOut | None
