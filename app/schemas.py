"""Pydantic schemas of the JSON API, kept apart from the table models."""

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from app.db.enums import Role


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    username: str
    role: Role
    is_active: bool
    created_at: datetime
    last_login_at: datetime | None


class UserCreate(BaseModel):
    username: str = Field(max_length=64)
    password: str = Field(min_length=8, max_length=1000)
    role: Role = Role.labeler


class UserUpdate(BaseModel):
    is_active: bool | None = None
    password: str | None = Field(default=None, min_length=8, max_length=1000)
