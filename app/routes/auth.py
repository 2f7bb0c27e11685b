"""Sign in and sign out."""

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse

from app.routes.deps import OptionalUser, SessionDep, SettingsDep, sign_in, sign_out
from app.services import auth
from app.services.errors import Invalid, RateLimited
from app.web import flash, render, render_form_errors

router = APIRouter(tags=["auth"], include_in_schema=False)


def _safe_next(target: str | None) -> str:
    # Only local paths: never redirect to another site after sign-in.
    if target and target.startswith("/") and not target.startswith("//"):
        return target
    return "/"


@router.get("/login")
def login_page(request: Request, user: OptionalUser, next: str | None = None):
    if user is not None:
        return RedirectResponse(_safe_next(next), status_code=302)
    return render(request, "pages/login.html", {"next": _safe_next(next)})


@router.post("/login")
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    username: Annotated[str, Form(max_length=200)] = "",
    password: Annotated[str, Form(max_length=1000)] = "",
    next: Annotated[str, Form()] = "/",
):
    try:
        user = auth.authenticate(
            session,
            username=username,
            password=password,
            address=request.client.host if request.client else "unknown",
            max_failures=settings.login_max_failures,
            max_address_failures=settings.login_max_address_failures,
            window_s=settings.login_window_s,
        )
    except (Invalid, RateLimited) as exc:
        context = {"next": _safe_next(next), "username": username}
        return render_form_errors(request, exc, "pages/login.html", context, prefix="")
    sign_in(request, session, settings, user)
    return RedirectResponse(_safe_next(next), status_code=303)


@router.post("/logout")
def logout(request: Request, session: SessionDep):
    sign_out(request, session)
    flash(request, "You are signed out.")
    return RedirectResponse("/login", status_code=303)
