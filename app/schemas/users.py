"""JSON shapes of user accounts."""

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from app.db.enums import Role
from app.schemas.common import Text


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    username: str
    role: Role
    is_active: bool
    created_at: datetime
    last_login_at: datetime | None


class UserCreate(BaseModel):
    username: Text = Field(max_length=64)
    password: Text = Field(min_length=8, max_length=1000)
    role: Role = Role.labeler


class UserUpdate(BaseModel):
    is_active: bool | None = None
    password: Text | None = Field(default=None, min_length=8, max_length=1000)
