"""Admin: labeler and staff accounts."""

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request

from app.db.enums import Role
from app.routes.deps import AdminUser, SessionDep
from app.schemas.common import Id
from app.services import ai_labelers, models, users
from app.services.errors import Conflict, Invalid
from app.web import flash, redirect, render, render_form_errors

router = APIRouter(prefix="/admin/users", include_in_schema=False)


def _context(session, **extra: Any) -> dict[str, Any]:
    return {"users": users.list_users(session), "roles": list(Role),
            "judges": models.models_of(session, ai_labelers.JUDGE_KINDS), "ai_form": {}} | extra


@router.get("")
def users_page(request: Request, session: SessionDep, admin: AdminUser):
    return render(request, "pages/admin_users.html", _context(session))


@router.post("")
def create_user(
    request: Request,
    session: SessionDep,
    admin: AdminUser,
    username: Annotated[str, Form(max_length=200)] = "",
    password: Annotated[str, Form(max_length=1000)] = "",
    role: Annotated[str, Form()] = Role.labeler.value,
):
    try:
        user = users.create_user(session, username=username, password=password, role=role)
    except Invalid as exc:
        context = _context(session, form={"username": username, "role": role})
        return render_form_errors(request, exc, "pages/admin_users.html", context, block="create_form")
    flash(request, f"Created {user.role.value} '{user.username}'.", "success")
    return redirect(request, "/admin/users")


@router.post("/ai")
def create_ai_labeler(
    request: Request,
    session: SessionDep,
    admin: AdminUser,
    username: Annotated[str, Form(max_length=200)] = "",
    judge_model_id: Annotated[str, Form(max_length=40)] = "",
):
    try:
        user = ai_labelers.create_ai_labeler(session, username=username, judge_model_id=judge_model_id)
    except (Invalid, Conflict) as exc:
        context = _context(session, ai_form={"username": username, "judge_model_id": judge_model_id})
        return render_form_errors(request, exc, "pages/admin_users.html", context, prefix="ai_", block="ai_form",
                                  status_code=422)
    flash(request, f"Created the AI labeler '{user.username}'. Run it on a ranking set from the set's page.",
          "success")
    return redirect(request, "/admin/users")


@router.post("/{user_id}/active")
def set_active(
    request: Request,
    session: SessionDep,
    admin: AdminUser,
    user_id: Id,
    active: Annotated[bool, Form()],
):
    user = users.get_user(session, user_id)
    users.set_active(session, user=user, active=active, by=admin)
    context = {"user": user, "roles": list(Role)}
    return render(request, "partials/_user_row.html", context)


@router.post("/{user_id}/password")
def reset_password(
    request: Request,
    session: SessionDep,
    admin: AdminUser,
    user_id: Id,
    password: Annotated[str, Form(max_length=1000)],
):
    user = users.get_user(session, user_id)
    users.set_password(session, user=user, password=password)
    flash(request, f"Password of '{user.username}' reset.", "success")
    return redirect(request, "/admin/users")
