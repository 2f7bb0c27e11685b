"""JSON shapes of user accounts."""

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from app.db.enums import Role, UserKind
from app.schemas.common import Id, Text


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    username: str
    role: Role
    kind: UserKind  # ai: an AI labeler (never signs in)
    judge_model_id: int | None  # an AI labeler's judge
    is_active: bool
    created_at: datetime
    last_login_at: datetime | None


class UserCreate(BaseModel):
    username: Text = Field(max_length=64)
    password: Text = Field(min_length=8, max_length=1000)
    role: Role = Role.labeler


class AILabelerCreate(BaseModel):
    username: Text = Field(max_length=64)
    # A reward model (ranks by score), or an SFT or policy model (compares pairs under the set's principles).
    judge_model_id: Id


class UserUpdate(BaseModel):
    is_active: bool | None = None
    password: Text | None = Field(default=None, min_length=8, max_length=1000)
