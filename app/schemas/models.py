"""JSON shapes of the model registry: models, their lineage, samples, promotion."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from app.db.enums import ModelKind
from app.schemas.common import Id
from app.schemas.jobs import JobOut


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
