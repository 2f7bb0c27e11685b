"""A user's own account: personal API tokens (engineers and admins)."""

from typing import Annotated

from fastapi import APIRouter, Form, Request

from app.routes.deps import EngineerUser, SessionDep
from app.schemas import Id
from app.services import auth
from app.web import flash, redirect, render

router = APIRouter(prefix="/account", include_in_schema=False)


@router.get("/tokens")
def tokens_page(request: Request, session: SessionDep, user: EngineerUser):
    return render(request, "pages/account_tokens.html", {"tokens": auth.list_api_tokens(session, user=user)})


@router.post("/tokens")
def create_token(
    request: Request, session: SessionDep, user: EngineerUser, name: Annotated[str, Form(max_length=200)] = ""
):
    token, raw = auth.create_api_token(session, user=user, name=name)
    context = {"tokens": auth.list_api_tokens(session, user=user), "new_token": raw, "new_token_name": token.name}
    # Shown once: the raw value is never stored.
    return render(request, "pages/account_tokens.html", context)


@router.post("/tokens/{token_id}/revoke")
def revoke_token(request: Request, session: SessionDep, user: EngineerUser, token_id: Id):
    auth.revoke_api_token(session, user=user, token_id=token_id)
    flash(request, "Token revoked.", "success")
    return redirect(request, "/account/tokens")
