"""Admin pages for demonstrations: the review queue (accept / reject with a reason /
edit), acceptance per labeler, progress of each set, import and export."""

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import StreamingResponse

from app.db.base import utcnow
from app.db.models import User
from app.routes.deps import AdminUser, SessionDep
from app.routes.uploads import ImportPayload, read_import_payload
from app.schemas.common import Id
from app.services import demonstrations as demos
from app.services.errors import Conflict, Invalid
from app.services.prompt_import import LIMITS
from app.services.progress import demonstration_progress
from app.services.prompt_sets import get_prompt_set
from app.services.validation import as_id
from app.web import download_headers, flash, fragment_or_redirect, redirect, render, render_form_errors

router = APIRouter(prefix="/admin/demonstrations", include_in_schema=False)


def _context(session, prompt_set_id: int | None, **extra: Any) -> dict[str, Any]:
    sets = demos.demonstration_sets(session)
    return {
        "sets": sets, "selected": prompt_set_id,
        "progress": {s.id: demonstration_progress(session, s) for s in sets},
        "queue": demos.review_queue(session, prompt_set_id=prompt_set_id),
        "waiting": demos.count_waiting(session, prompt_set_id=prompt_set_id),
        "rates": demos.acceptance_rates(session, prompt_set_id=prompt_set_id),
        "export_formats": demos.EXPORT_FORMATS, "limits": LIMITS,
        "import_set_id": prompt_set_id, "import_status": "accepted", "paste": "",
    } | extra


@router.get("")
def review_page(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: str | None = None):
    return render(request, "pages/demonstrations_review.html", _context(session, as_id(prompt_set_id)))


REVIEW_ITEM = "partials/_demonstration_review_item.html"


def _item_context(session, demonstration_id: int, **extra: Any) -> dict[str, Any]:
    """One review card, as it is now (reviewed ones show the outcome)."""
    demo = demos.load_demonstration(session, demonstration_id)
    reviewer = session.get(User, demo.reviewed_by_id) if demo.reviewed_by_id else None
    return {"demo": demo, "reviewer": reviewer} | extra


def _review(request: Request, session, demonstration_id: int, review: Callable[[], Any], done: str, **echo: Any):
    """Apply the review; htmx gets the card again (with the errors next to what was
    entered, if refused), a plain form post goes back to the queue."""
    try:
        review()
    except Invalid as exc:
        return render_form_errors(request, exc, REVIEW_ITEM, _item_context(session, demonstration_id, **echo),
                                  prefix="")
    return fragment_or_redirect(
        request, "/admin/demonstrations",
        lambda: render(request, REVIEW_ITEM, _item_context(session, demonstration_id)),
        message=f"{done} demonstration {demonstration_id}.")


@router.post("/{demonstration_id}/accept")
def accept(request: Request, session: SessionDep, admin: AdminUser, demonstration_id: Id):
    return _review(request, session, demonstration_id, lambda: demos.accept_demonstration(
        session, reviewer=admin, demonstration_id=demonstration_id, now=utcnow()), "Accepted")


@router.post("/{demonstration_id}/reject")
def reject(request: Request, session: SessionDep, admin: AdminUser, demonstration_id: Id,
           reason: Annotated[str, Form()] = ""):
    return _review(request, session, demonstration_id, lambda: demos.reject_demonstration(
        session, reviewer=admin, demonstration_id=demonstration_id, reason=reason, now=utcnow()), "Rejected")


@router.post("/{demonstration_id}/edit")
def edit(request: Request, session: SessionDep, admin: AdminUser, demonstration_id: Id,
         text: Annotated[str, Form()] = ""):
    return _review(request, session, demonstration_id, lambda: demos.edit_demonstration(
        session, reviewer=admin, demonstration_id=demonstration_id, text=text, now=utcnow()),
        "Edited and accepted", edit_text=text)


async def read_demo_import(request: Request) -> tuple[ImportPayload, dict[str, str]]:
    payload = await read_import_payload(request)
    form = await request.form()  # parsed once above; Starlette keeps it
    return payload, {k: str(form.get(k) or "") for k in ("prompt_set_id", "status")}


@router.post("/import")
def import_file(request: Request, session: SessionDep, admin: AdminUser,
                upload: Annotated[tuple[ImportPayload, dict[str, str]], Depends(read_demo_import)]):
    payload, fields = upload
    set_id = as_id(fields["prompt_set_id"])
    try:
        if set_id is None:
            raise Invalid("Choose the demonstration set to import into.", errors={"prompt_set_id": "required"})
        prompt_set = get_prompt_set(session, set_id)
        result = demos.import_demonstrations(session, prompt_set=prompt_set, data=payload.data(), user=admin,
                                             now=utcnow(), status=fields["status"] or "accepted")
    except (Invalid, Conflict) as exc:
        context = _context(session, set_id, import_status=fields["status"] or "accepted", paste=payload.echo)
        return render_form_errors(request, exc, "pages/demonstrations_review.html", context, prefix="import_",
                                  block="import_form", status_code=422)
    flash(request, result.describe(), "success")
    return redirect(request, f"/admin/demonstrations?prompt_set_id={set_id}")


@router.get("/export")
def export(session: SessionDep, admin: AdminUser, prompt_set_id: Id, format: str = "messages"):
    """Accepted demonstrations of the set as JSONL, in a format TRL's SFTTrainer reads."""
    prompt_set = get_prompt_set(session, prompt_set_id)
    lines = demos.iter_export(session, prompt_set_ids=[prompt_set.id], fmt=format)
    return StreamingResponse(lines, media_type="application/jsonl",
                             headers=download_headers(f"demonstrations-{prompt_set.id}-{format}.jsonl"))
