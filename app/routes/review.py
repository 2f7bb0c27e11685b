"""Admin: review a set's labeled tasks, most disagreed first; accept a task or write a
corrected ranking (app/services/review)."""

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Form, Query, Request

from app.routes.deps import AdminUser, SessionDep
from app.schemas.common import Id, Text
from app.services import review
from app.services.errors import Invalid
from app.services.prompt_sets import get_prompt_set
from app.web import flash, redirect, render, render_form_errors

router = APIRouter(prefix="/admin/prompt-sets/{prompt_set_id}/review", include_in_schema=False)

TASK_PAGE = "pages/review_task.html"
Show = Annotated[Literal["open", "reviewed", "all"], Query(description="which tasks the queue lists")]
Note = Annotated[Text, Form(max_length=review.MAX_NOTE)]


@router.get("")
def review_queue(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id, show: Show = "open"):
    prompt_set = get_prompt_set(session, prompt_set_id)
    return render(request, "pages/review_queue.html", {
        "prompt_set": prompt_set, "show": show,
        "items": review.review_queue(session, prompt_set_id=prompt_set_id, show=show),
        "counts": review.review_counts(session, prompt_set_id=prompt_set_id),
    })


def _task_context(session, prompt_set_id: int, task_id: int, **extra):
    return {"prompt_set": get_prompt_set(session, prompt_set_id),
            "view": review.task_for_review(session, prompt_set_id=prompt_set_id, task_id=task_id)} | extra


@router.get("/{task_id}")
def review_task(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id, task_id: Id):
    return render(request, TASK_PAGE, _task_context(session, prompt_set_id, task_id))


def _next_url(session, prompt_set_id: int) -> str:
    """After a review: the next open task of the queue, or the queue when none is left."""
    items = review.review_queue(session, prompt_set_id=prompt_set_id, show="open", limit=1)
    base = f"/admin/prompt-sets/{prompt_set_id}/review"
    return f"{base}/{items[0].task_id}" if items else base


@router.post("/{task_id}/accept")
def accept(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id, task_id: Id,
           note: Note = ""):
    review.accept_task(session, prompt_set_id=prompt_set_id, task_id=task_id, reviewer=admin, note=note)
    flash(request, f"Task #{task_id} accepted.", "success")
    return redirect(request, _next_url(session, prompt_set_id))


async def _form_fields(request: Request) -> dict[str, str]:
    return {key: value for key, value in (await request.form()).items() if isinstance(value, str)}


@router.post("/{task_id}/correct")
def correct(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id, task_id: Id,
            form: Annotated[dict[str, str], Depends(_form_fields)]):
    """Fields rank_<response id> (1 = best, ties allowed), use (training | gold) and note."""
    ranks = {key.removeprefix("rank_"): value for key, value in form.items() if key.startswith("rank_")}
    try:
        review.correct_task(session, prompt_set_id=prompt_set_id, task_id=task_id, reviewer=admin,
                            ranking=ranks, use=form.get("use", ""), note=form.get("note", ""))
    except Invalid as exc:
        session.rollback()
        return render_form_errors(request, exc, TASK_PAGE, _task_context(session, prompt_set_id, task_id,
                                                                         values=form))
    flash(request, f"Task #{task_id} corrected.", "success")
    return redirect(request, _next_url(session, prompt_set_id))
