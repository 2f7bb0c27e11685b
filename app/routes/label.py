"""The labeling pages: the task card (leased, submitted and skipped through htmx),
history, and editing a recent submission."""

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from app.db.base import utcnow
from app.db.models import Annotation, Assignment, Task, User
from app.routes.deps import LabelerUser, SessionDep, SettingsDep
from app.schemas.common import Id
from app.schemas.label import LabelForm, new_form_key
from app.services import annotations, assignment
from app.services.errors import Conflict, Invalid
from app.services.validation import MAX_ID
from app.web import flash, fragment_or_redirect, redirect, render, render_form_errors

router = APIRouter(prefix="/label", include_in_schema=False)

HISTORY_PAGE_SIZE = 50


async def read_label_form(request: Request) -> LabelForm:
    return LabelForm(await request.form())


LabelFormDep = Annotated[LabelForm, Depends(read_label_form)]


def _context(session, user: User, now: datetime, *, task: Task | None, lease: Assignment | None = None,
             form: LabelForm | None = None, values: dict[str, Any] | None = None, refused: bool = False,
             prefilled: bool = False,
             editing: Annotation | None = None, notice: str | None = None,
             notice_warnings: list[str] | None = None,
             counts: annotations.LabelerCounts | None = None) -> dict[str, Any]:
    """The task card's context. `refused`: the form comes back after a refusal, keeping
    its idempotency key and start time. `prefilled`: `values` hold an AI labeler's ranking
    (pre-annotation, app/services/annotations.prefill_values)."""
    values = values or (form.values() if form else {})
    context: dict[str, Any] = {
        "task": task, "lease": lease, "editing": editing,
        "counts": counts or annotations.labeler_counts(session, user=user, now=now),
        "values": {"ratings": {}, "ranks": {}, "flags": {}, "prompt_flags": [], "comment": "",
                   "all_bad": False, "all_bad_reason": "", "skip_reason": "", "skip_reason_other": "",
                   "vote": "", "strength": ""} | values,
        "errors": {}, "error": None,
        "notice": notice, "notice_warnings": notice_warnings or [], "prefilled": prefilled,
        "response_flags": annotations.RESPONSE_FLAGS, "prompt_flag_choices": annotations.PROMPT_FLAGS,
        "likert_labels": annotations.LIKERT_LABELS, "skip_reasons": assignment.SKIP_REASONS,
        "vote_choices": annotations.VOTE_CHOICES, "strengths": annotations.STRENGTHS,
        "max_all_bad_reason": annotations.MAX_ALL_BAD_REASON,
        "idempotency_key": form.idempotency_key if form and refused else new_form_key(),
        "started_at": form.started_at if form and refused else f"{now.timestamp():.3f}",
    }
    if task is not None:
        context["form_action"] = (f"/label/annotations/{editing.id}" if editing else f"/label/{task.id}/submit")
        context["letters"] = {item.response_id: annotations.letter(item.position) for item in task.items}
        if editing is not None:
            context["edit_until"] = annotations.edit_deadline(editing)
    return context


PAGE = "pages/label.html"
TASK_CARD = "partials/_label_task.html"  # what htmx requests get instead of the page


def _task_response(request: Request, context: dict[str, Any]):
    return render(request, PAGE, context, fragment=TASK_CARD)


def _refused(request: Request, exc: Invalid, context: dict[str, Any]):
    return render_form_errors(request, exc, PAGE, context, prefix="", fragment=TASK_CARD)


def _next_task(request: Request, session, user: User, settings, **extra: Any):
    now = utcnow()
    # Counted first, in the transaction the lease commits: no second one just to count.
    counts = annotations.labeler_counts(session, user=user, now=now)
    lease = assignment.lease_next_task(session, user=user, lease_s=settings.lease_s)
    prefill = annotations.prefill_values(session, lease.task) if lease else None
    context = _context(session, user, now, task=lease.task if lease else None,
                       lease=lease.assignment if lease else None, counts=counts, values=prefill,
                       prefilled=prefill is not None, **extra)
    return _task_response(request, context)


@router.get("")
def label_page(request: Request, session: SessionDep, user: LabelerUser, settings: SettingsDep):
    return _next_task(request, session, user, settings)


@router.post("/{task_id}/submit")
def submit(request: Request, session: SessionDep, user: LabelerUser, settings: SettingsDep, task_id: Id,
           form: LabelFormDep):
    now = utcnow()
    try:
        result = annotations.submit_annotation(
            session, user=user, task_id=task_id, ratings=form.ratings, ranks=form.ranks, flags=form.flags,
            prompt_flags=form.prompt_flags, comment=form.comment, time_spent_s=form.time_spent_s(now),
            idempotency_key=form.idempotency_key, vote=form.vote, strength=form.strength,
            all_bad=form.all_bad, all_bad_reason=form.all_bad_reason, prefill_offered=True,
        )
    except Invalid as exc:
        task = assignment.labeler_task(session, user=user, task_id=task_id)
        return _refused(request, exc, _context(session, user, now, task=task, form=form, refused=True))
    notice = f"Saved task {task_id}." if result.created else f"Task {task_id} was already saved."
    return fragment_or_redirect(
        request, "/label", lambda: _next_task(request, session, user, settings, notice=notice,
                                              notice_warnings=result.warnings),
        message=" ".join([notice, *result.warnings]))


@router.post("/{task_id}/skip")
def skip(request: Request, session: SessionDep, user: LabelerUser, settings: SettingsDep, task_id: Id,
         form: LabelFormDep):
    now = utcnow()
    try:
        assignment.skip_task(session, user=user, task_id=task_id, reason=form.skip_text())
    except Invalid as exc:
        task = assignment.labeler_task(session, user=user, task_id=task_id)
        return _refused(request, exc, _context(session, user, now, task=task, form=form, refused=True))
    notice = f"Skipped task {task_id}."
    return fragment_or_redirect(request, "/label", lambda: _next_task(request, session, user, settings, notice=notice),
                                message=notice, category="info")


@router.get("/history")
def history_page(request: Request, session: SessionDep, user: LabelerUser,
                 page: Annotated[int, Query(ge=1, le=MAX_ID // HISTORY_PAGE_SIZE)] = 1):
    now = utcnow()
    page = max(page, 1)
    items = annotations.history(session, user=user, now=now, limit=HISTORY_PAGE_SIZE + 1,
                                offset=(page - 1) * HISTORY_PAGE_SIZE)
    context = {
        "items": items[:HISTORY_PAGE_SIZE], "page": page, "has_more": len(items) > HISTORY_PAGE_SIZE,
        "counts": annotations.labeler_counts(session, user=user, now=now),
        "edit_hours": int(annotations.EDIT_WINDOW.total_seconds() // 3600),
    }
    return render(request, "pages/label_history.html", context)


@router.get("/annotations/{annotation_id}/edit")
def edit_page(request: Request, session: SessionDep, user: LabelerUser, annotation_id: Id):
    now = utcnow()
    annotation = annotations.get_own_annotation(session, user=user, annotation_id=annotation_id)
    if not annotations.can_edit(annotation, now):
        raise Conflict("This submission can no longer be changed: the edit window has closed.")
    task = assignment.labeler_task(session, user=user, task_id=annotation.task_id)
    context = _context(session, user, now, task=task, editing=annotation,
                       values=annotations.submission_values(annotation))
    return _task_response(request, context)


@router.post("/annotations/{annotation_id}")
def edit(request: Request, session: SessionDep, user: LabelerUser, annotation_id: Id, form: LabelFormDep):
    now = utcnow()
    try:
        result = annotations.edit_annotation(
            session, user=user, annotation_id=annotation_id, ratings=form.ratings, ranks=form.ranks,
            flags=form.flags, prompt_flags=form.prompt_flags, comment=form.comment, now=now,
            vote=form.vote, strength=form.strength, all_bad=form.all_bad, all_bad_reason=form.all_bad_reason,
        )
    except Invalid as exc:
        annotation = annotations.get_own_annotation(session, user=user, annotation_id=annotation_id)
        task = assignment.labeler_task(session, user=user, task_id=annotation.task_id)
        return _refused(request, exc, _context(session, user, now, task=task, form=form, refused=True,
                                               editing=annotation))
    flash(request, " ".join([f"Saved your changes to task {result.annotation.task_id}.", *result.warnings]),
          "success")
    return redirect(request, "/label/history")
