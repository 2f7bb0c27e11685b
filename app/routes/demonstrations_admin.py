"""Admin pages for demonstrations: the review queue (accept / reject with a reason /
edit), acceptance per labeler, progress of each set, import and export."""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import StreamingResponse

from app.db.base import utcnow
from app.db.models import User
from app.routes.deps import AdminUser, SessionDep
from app.routes.uploads import ImportPayload, read_import_payload
from app.schemas import Id
from app.services import demonstrations as demos
from app.services.errors import Conflict, Invalid
from app.services.prompt_import import LIMITS
from app.services.progress import demonstration_progress
from app.services.prompt_sets import get_prompt_set
from app.services.validation import as_id
from app.web import download_headers, flash, redirect, render

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


def _item(request: Request, session, demonstration_id: int, status_code: int = 200, **extra: Any):
    """One review card, as it is now (reviewed ones show the outcome)."""
    demo = demos.load_demonstration(session, demonstration_id)
    reviewer = session.get(User, demo.reviewed_by_id) if demo.reviewed_by_id else None
    return render(request, "partials/_demonstration_review_item.html",
                  {"demo": demo, "reviewer": reviewer} | extra, status_code=status_code)


def _done(request: Request, session, demonstration_id: int, message: str):
    if request.headers.get("HX-Request") == "true":
        return _item(request, session, demonstration_id)
    flash(request, message, "success")
    return redirect(request, "/admin/demonstrations")


@router.post("/{demonstration_id}/accept")
def accept(request: Request, session: SessionDep, admin: AdminUser, demonstration_id: Id):
    demos.accept_demonstration(session, reviewer=admin, demonstration_id=demonstration_id, now=utcnow())
    return _done(request, session, demonstration_id, f"Accepted demonstration {demonstration_id}.")


@router.post("/{demonstration_id}/reject")
def reject(request: Request, session: SessionDep, admin: AdminUser, demonstration_id: Id,
           reason: Annotated[str, Form()] = ""):
    try:
        demos.reject_demonstration(session, reviewer=admin, demonstration_id=demonstration_id, reason=reason,
                                   now=utcnow())
    except Invalid as exc:
        return _item(request, session, demonstration_id, error=exc.message, errors=exc.errors, status_code=422)
    return _done(request, session, demonstration_id, f"Rejected demonstration {demonstration_id}.")


@router.post("/{demonstration_id}/edit")
def edit(request: Request, session: SessionDep, admin: AdminUser, demonstration_id: Id,
         text: Annotated[str, Form()] = ""):
    try:
        demos.edit_demonstration(session, reviewer=admin, demonstration_id=demonstration_id, text=text,
                                 now=utcnow())
    except Invalid as exc:
        return _item(request, session, demonstration_id, error=exc.message, errors=exc.errors,
                     edit_text=text, status_code=422)
    return _done(request, session, demonstration_id, f"Edited and accepted demonstration {demonstration_id}.")


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
        context = _context(session, set_id, import_error=exc.message, import_errors=exc.errors,
                           import_status=fields["status"] or "accepted", paste=payload.echo)
        return render(request, "pages/demonstrations_review.html", context, block="import_form", status_code=422)
    flash(request, result.describe(), "success")
    return redirect(request, f"/admin/demonstrations?prompt_set_id={set_id}")


@router.get("/export")
def export(session: SessionDep, admin: AdminUser, prompt_set_id: Id, format: str = "messages"):
    """Accepted demonstrations of the set as JSONL, in a format TRL's SFTTrainer reads."""
    prompt_set = get_prompt_set(session, prompt_set_id)
    lines = demos.iter_export(session, prompt_set_ids=[prompt_set.id], fmt=format)
    return StreamingResponse(lines, media_type="application/jsonl",
                             headers=download_headers(f"demonstrations-{prompt_set.id}-{format}.jsonl"))
