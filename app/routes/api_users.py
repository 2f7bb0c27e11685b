"""JSON API of accounts: who am I, and the users (admins)."""

from fastapi import APIRouter, status

from app.routes.deps import AdminUser, CurrentUser, SessionDep
from app.schemas.common import Id
from app.schemas.users import AILabelerCreate, UserCreate, UserOut, UserUpdate
from app.services import ai_labelers, users

router = APIRouter(tags=["api"])


@router.get("/me", response_model=UserOut)
def me(user: CurrentUser):
    return user


@router.get("/users", response_model=list[UserOut])
def list_users(session: SessionDep, admin: AdminUser):
    return users.list_users(session)


@router.post("/users", response_model=UserOut, status_code=status.HTTP_201_CREATED)
def create_user(body: UserCreate, session: SessionDep, admin: AdminUser):
    return users.create_user(session, username=body.username, password=body.password, role=body.role)


@router.post("/users/ai", response_model=UserOut, status_code=status.HTTP_201_CREATED)
def create_ai_labeler(body: AILabelerCreate, session: SessionDep, admin: AdminUser):
    """An AI labeler: an account of kind ai judging with a registered model; it never signs in."""
    return ai_labelers.create_ai_labeler(session, username=body.username, judge_model_id=body.judge_model_id)


@router.patch("/users/{user_id}", response_model=UserOut)
def update_user(user_id: Id, body: UserUpdate, session: SessionDep, admin: AdminUser):
    user = users.get_user(session, user_id)
    # Both changes are checked before either is stored: nothing half-written.
    if body.password is not None:
        users.check_new_password(user, body.password)
    if body.is_active is not None:
        users.set_active(session, user=user, active=body.is_active, by=admin)
    if body.password is not None:
        users.set_password(session, user=user, password=body.password)
    return user
