"""A user's own account: password and sessions (everyone), personal API tokens
(engineers and admins)."""

from typing import Annotated

from fastapi import APIRouter, Form, Request

from app.routes.deps import CurrentUser, EngineerUser, SessionDep, SettingsDep, sign_in, sign_out
from app.schemas.common import Id
from app.services import auth, sessions, users
from app.services.errors import Invalid
from app.web import NO_STORE, flash, redirect, render, render_form_errors

router = APIRouter(prefix="/account", include_in_schema=False)


@router.get("/password")
def password_page(request: Request, user: CurrentUser):
    return render(request, "pages/account_password.html")


@router.post("/password")
def change_password(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    user: CurrentUser,
    current_password: Annotated[str, Form(max_length=1000)] = "",
    new_password: Annotated[str, Form(max_length=1000)] = "",
):
    try:
        users.change_password(session, user=user, current_password=current_password, new_password=new_password)
    except Invalid as exc:
        return render_form_errors(request, exc, "pages/account_password.html", {})
    # Every session ended, this one too; this browser gets a fresh one.
    sign_in(request, session, settings, user)
    flash(request, "Password changed; you are signed out everywhere else.", "success")
    return redirect(request, "/account/password")


@router.post("/sign-out-everywhere")
def sign_out_everywhere(request: Request, session: SessionDep, user: CurrentUser):
    sessions.end_all_sessions(session, user=user)
    sign_out(request, session)
    flash(request, "You are signed out on every device.")
    return redirect(request, "/login")


@router.get("/tokens")
def tokens_page(request: Request, session: SessionDep, user: EngineerUser):
    return render(request, "pages/account_tokens.html", {"tokens": auth.list_api_tokens(session, user=user)},
                  headers=NO_STORE)


@router.post("/tokens")
def create_token(
    request: Request, session: SessionDep, user: EngineerUser, name: Annotated[str, Form(max_length=200)] = ""
):
    token, raw = auth.create_api_token(session, user=user, name=name)
    context = {"tokens": auth.list_api_tokens(session, user=user), "new_token": raw, "new_token_name": token.name}
    # Shown once: the raw value is never stored.
    return render(request, "pages/account_tokens.html", context, headers=NO_STORE)


@router.post("/tokens/{token_id}/revoke")
def revoke_token(request: Request, session: SessionDep, user: EngineerUser, token_id: Id):
    auth.revoke_api_token(session, user=user, token_id=token_id)
    flash(request, "Token revoked.", "success")
    return redirect(request, "/account/tokens")
