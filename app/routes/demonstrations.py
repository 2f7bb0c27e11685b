"""The labeler's writing page: lease a prompt, write a demonstration in an editor
that autosaves, preview its markdown, submit or skip; the next prompt is swapped in."""

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse

from app.db.base import utcnow
from app.db.models import Demonstration, User
from app.routes.deps import LabelerUser, SessionDep, SettingsDep
from app.schemas.common import Id
from app.services import demonstrations as demos
from app.services.annotations import PROMPT_FLAGS
from app.services.errors import Conflict, Invalid
from app.web import fragment_or_redirect, render, render_form_errors, render_markdown

router = APIRouter(prefix="/demonstrate", include_in_schema=False)


def _time_spent(started_at: str, time_base: str, now: datetime) -> float | None:
    """Seconds on the prompt: what was stored when the editor was shown, plus the time since."""
    try:
        return float(time_base or 0) + max(0.0, now.timestamp() - float(started_at))
    except ValueError:
        return None


def _context(session, user: User, now: datetime, demo: Demonstration | None, *, notice: str | None = None,
             text: str | None = None, flags: list[str] | None = None, skip_reason: str = "") -> dict[str, Any]:
    context: dict[str, Any] = {
        "demo": demo, "counts": demos.writer_counts(session, user=user), "notice": notice,
        "rejections": demos.recent_rejections(session, user=user),
        "error": None, "errors": {}, "prompt_flag_choices": PROMPT_FLAGS,
        "skip_reasons": demos.SKIP_REASONS, "skip_reason": skip_reason, "max_chars": demos.MAX_TEXT_CHARS,
    }
    if demo is not None:
        context |= {
            "prompt": demo.prompt, "prompt_set": demo.prompt.prompt_set,
            "model_answer": demos.model_answer(session, demo.prompt_id),
            "text": demo.text if text is None else text,
            "flags": demo.prompt_flags if flags is None else flags,
            "started_at": f"{now.timestamp():.3f}", "time_base": f"{demo.time_spent_s or 0:.3f}",
        }
    return context


PAGE = "pages/demonstrate.html"
EDITOR = "partials/_demonstration_editor.html"  # what htmx requests get instead of the page


def _editor(request: Request, context: dict[str, Any]):
    return render(request, PAGE, context, fragment=EDITOR)


def _next(request: Request, session, user: User, settings, **extra: Any):
    now = utcnow()
    demo = demos.lease_next_demonstration(session, user=user, lease_s=settings.lease_s)
    return _editor(request, _context(session, user, now, demo, **extra))


@router.get("")
def write_page(request: Request, session: SessionDep, user: LabelerUser, settings: SettingsDep):
    return _next(request, session, user, settings)


@router.post("/preview")
def preview(user: LabelerUser, text: Annotated[str, Form()] = ""):
    """The markdown of the text as it will be read (raw HTML escaped)."""
    return HTMLResponse(render_markdown(text[: demos.MAX_TEXT_CHARS]))


@router.post("/{demonstration_id}/draft")
def save_draft(request: Request, session: SessionDep, user: LabelerUser, settings: SettingsDep,
               demonstration_id: Id, text: Annotated[str, Form()] = "",
               prompt_flags: Annotated[list[str], Form()] = [], started_at: Annotated[str, Form()] = "",
               time_base: Annotated[str, Form()] = "0"):
    """Autosave: called every few seconds by the editor (and when the tab is hidden)."""
    now = utcnow()
    result = demos.save_draft(session, user=user, demonstration_id=demonstration_id, text=text,
                              lease_s=settings.lease_s, time_spent_s=_time_spent(started_at, time_base, now),
                              prompt_flags=prompt_flags)
    return render(request, "partials/_demonstration_saved.html", {"result": result, "now": now})


@router.post("/{demonstration_id}/from-model")
def start_from_model(request: Request, session: SessionDep, user: LabelerUser, settings: SettingsDep,
                     demonstration_id: Id):
    """Edit mode: the model's answer becomes the draft, to be corrected."""
    now = utcnow()
    demo = demos.start_from_model_answer(session, user=user, demonstration_id=demonstration_id,
                                         lease_s=settings.lease_s)
    return _editor(request, _context(session, user, now, demo, notice="Started from the model's answer: edit it"
                                                                     " into the response you want."))


@router.post("/{demonstration_id}/submit")
def submit(request: Request, session: SessionDep, user: LabelerUser, settings: SettingsDep, demonstration_id: Id,
           text: Annotated[str, Form()] = "", prompt_flags: Annotated[list[str], Form()] = [],
           started_at: Annotated[str, Form()] = "", time_base: Annotated[str, Form()] = "0"):
    now = utcnow()
    try:
        result = demos.submit_demonstration(
            session, user=user, demonstration_id=demonstration_id, text=text, lease_s=settings.lease_s,
            time_spent_s=_time_spent(started_at, time_base, now), prompt_flags=prompt_flags)
    except (Invalid, Conflict) as exc:
        demo = demos.labeler_demonstration(session, user=user, demonstration_id=demonstration_id)
        context = _context(session, user, now, demo, text=text, flags=prompt_flags)
        return render_form_errors(request, exc, PAGE, context, prefix="", fragment=EDITOR)
    notice = ("This demonstration was already submitted." if result.already
              else "Submitted. Thank you! An admin will review it.")
    return fragment_or_redirect(request, "/demonstrate", lambda: _next(request, session, user, settings, notice=notice),
                                message=notice)


@router.post("/{demonstration_id}/skip")
def skip(request: Request, session: SessionDep, user: LabelerUser, settings: SettingsDep, demonstration_id: Id,
         skip_reason: Annotated[str, Form()] = "", skip_reason_other: Annotated[str, Form()] = "",
         text: Annotated[str, Form()] = "", prompt_flags: Annotated[list[str], Form()] = []):
    now = utcnow()
    reason = skip_reason_other.strip() if skip_reason == "Other" or not skip_reason else skip_reason
    try:
        demos.skip_demonstration(session, user=user, demonstration_id=demonstration_id, reason=reason)
    except Invalid as exc:
        demo = demos.labeler_demonstration(session, user=user, demonstration_id=demonstration_id)
        context = _context(session, user, now, demo, text=text, flags=prompt_flags, skip_reason=skip_reason)
        return render_form_errors(request, exc, PAGE, context, prefix="", fragment=EDITOR)
    return fragment_or_redirect(
        request, "/demonstrate",
        lambda: _next(request, session, user, settings, notice="Skipped; here is the next prompt."),
        message="Skipped.", category="info")
