"""Admin pages: prompt sets, their prompts, settings and life cycle."""

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request

from app.db.enums import ModelKind, PromptSetKind
from app.db.models import PromptSet
from app.routes.deps import AdminUser, SessionDep
from app.routes.uploads import ImportPayload, PreferencePayload, read_import_payload, read_preference_payload
from app.schemas.common import Id
from app.schemas.prompt_sets import PromptSetForm
from app.services import active_learning, ai_labelers, models, preference_import, prompt_import, prompt_sets
from app.services.errors import Conflict, Invalid
from app.web import flash, redirect, render, render_form_errors

router = APIRouter(prefix="/admin/prompt-sets", include_in_schema=False)


def _form_context(session, *, form: dict[str, Any], prompt_set: PromptSet | None = None) -> dict[str, Any]:
    return {
        "form": form, "form_errors": {}, "form_error": None, "prompt_set": prompt_set,
        "models": prompt_sets.list_generator_models(session),
        "reward_models": models.models_of(session, (ModelKind.reward,)), "kinds": [k for k in PromptSetKind if k != PromptSetKind.evaluation],  # those: /evaluations/new
        "limits": prompt_import.LIMITS,
    }


def _detail_context(session, prompt_set: PromptSet, **extra: Any) -> dict[str, Any]:
    settings_form = {n: str(getattr(prompt_set, n)) for n in PromptSetForm.model_fields if n != "kind"}
    settings_form["generator_model_id"] = str(prompt_set.generator_model_id or "")
    for name in ("top_k", "best_of_n", "best_of_n_reward_model_id"):
        settings_form[name] = str(getattr(prompt_set, name) or "")
    context = _form_context(session, form=settings_form, prompt_set=prompt_set)
    context |= {
        "counts": prompt_sets.counts(session, prompt_set),
        "job": prompt_sets.latest_generation_job(session, prompt_set),
        "best_of_n": prompt_sets.best_of_n_figures(session, prompt_set),
        "import_format": "auto", "paste": "",
        "sources": preference_import.list_sources(session, prompt_set.id),
        "preference_formats": preference_import.FORMATS,
        "preference_form": {"source": "", "format": "auto", "content": ""},
        "ai_labelers": ai_labelers.list_ai_labelers(session, active_only=True), "ai_scopes": ai_labelers.SCOPES,
        "ai_form": {"principles": prompt_set.principles, "pre_annotator_id": str(prompt_set.pre_annotator_id or "")},
        "order": active_learning.order_summary(session, prompt_set),
        "order_form": {"task_order": prompt_set.task_order.value,
                       "order_model_id": str(prompt_set.order_model_id or "")},
    }
    return context | extra


@router.get("")
def list_page(request: Request, session: SessionDep, admin: AdminUser):
    return render(request, "pages/prompt_sets_list.html", {"summaries": prompt_sets.list_prompt_sets(session)})


@router.get("/new")
def new_page(request: Request, session: SessionDep, admin: AdminUser):
    form = PromptSetForm().model_dump()
    default = prompt_sets.default_generator_model(session)
    form["generator_model_id"] = str(default.id) if default else ""
    return render(request, "pages/prompt_sets_new.html", _form_context(session, form=form))


@router.post("")
def create(request: Request, session: SessionDep, admin: AdminUser, data: Annotated[PromptSetForm, Form()]):
    try:
        prompt_set = prompt_sets.create_prompt_set(session, **data.model_dump(), created_by_id=admin.id)
    except (Invalid, Conflict) as exc:
        context = _form_context(session, form=data.model_dump())
        return render_form_errors(request, exc, "pages/prompt_sets_new.html", context, block="form", status_code=422)
    flash(request, f"Created the prompt set '{prompt_set.name}'. Import prompts, then start it.", "success")
    return redirect(request, f"/admin/prompt-sets/{prompt_set.id}")


@router.get("/{prompt_set_id}")
def detail_page(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id):
    prompt_set = prompt_sets.get_prompt_set(session, prompt_set_id)
    return render(request, "pages/prompt_sets_detail.html", _detail_context(session, prompt_set))


@router.get("/{prompt_set_id}/status")
def status_fragment(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id):
    """Counts and generation progress; the page polls it while a job is queued or running."""
    prompt_set = prompt_sets.get_prompt_set(session, prompt_set_id)
    context = {
        "prompt_set": prompt_set, "counts": prompt_sets.counts(session, prompt_set),
        "job": prompt_sets.latest_generation_job(session, prompt_set),
    }
    return render(request, "partials/_prompt_set_status.html", context)


@router.post("/{prompt_set_id}/settings")
def update_settings(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id,
                    data: Annotated[PromptSetForm, Form()]):
    prompt_set = prompt_sets.get_prompt_set(session, prompt_set_id)
    try:
        prompt_sets.update_prompt_set(session, prompt_set=prompt_set, **data.model_dump(exclude={"kind"}))
    except (Invalid, Conflict) as exc:
        return render_form_errors(request, exc, "pages/prompt_sets_detail.html",
                                  _detail_context(session, prompt_set, form=data.model_dump()),
                                  block="settings_form", status_code=422)
    flash(request, "Settings saved.", "success")
    return redirect(request, f"/admin/prompt-sets/{prompt_set.id}")


@router.post("/{prompt_set_id}/task-order")
def update_task_order(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id,
                      task_order: Annotated[str, Form()] = "", order_model_id: Annotated[str, Form()] = ""):
    prompt_set = prompt_sets.get_prompt_set(session, prompt_set_id)
    try:
        job = active_learning.update_order(session, prompt_set=prompt_set, order=task_order,
                                           order_model_id=order_model_id, user_id=admin.id)
    except (Invalid, Conflict) as exc:
        form = {"task_order": task_order, "order_model_id": order_model_id}
        return render_form_errors(request, exc, "pages/prompt_sets_detail.html",
                                  _detail_context(session, prompt_set, order_form=form), prefix="order_",
                                  block="order_form")
    flash(request, f"Task order saved.{' Scoring the tasks is queued.' if job else ''}", "success")
    return redirect(request, f"/admin/prompt-sets/{prompt_set.id}")


@router.post("/{prompt_set_id}/score-tasks")
def score_tasks(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id):
    prompt_set = prompt_sets.get_prompt_set(session, prompt_set_id)
    job = active_learning.queue_scoring(session, prompt_set=prompt_set, created_by_id=admin.id)
    flash(request, f"Scoring the open tasks is queued (job #{job.id}).", "success")
    return redirect(request, f"/admin/prompt-sets/{prompt_set.id}")


@router.post("/{prompt_set_id}/prompts")
def import_prompts(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id,
                   payload: Annotated[ImportPayload, Depends(read_import_payload)]):
    prompt_set = prompt_sets.get_prompt_set(session, prompt_set_id)
    try:
        result = prompt_import.import_prompts(
            session, prompt_set=prompt_set, data=payload.data(), format=payload.format,
            filename=payload.filename, user_id=admin.id,
        )
    except Invalid as exc:
        context = _detail_context(session, prompt_set, import_format=payload.format, paste=payload.echo)
        return render_form_errors(request, exc, "pages/prompt_sets_detail.html", context, prefix="import_",
                                  block="import_form")
    flash(request, result.describe(), "success")
    return redirect(request, f"/admin/prompt-sets/{prompt_set.id}")


@router.post("/{prompt_set_id}/preferences")
def import_preferences(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id,
                       payload: Annotated[PreferencePayload, Depends(read_preference_payload)]):
    prompt_set = prompt_sets.get_prompt_set(session, prompt_set_id)
    try:
        result = preference_import.import_preferences(
            session, prompt_set=prompt_set, source=payload.data(), source_name=payload.source_name,
            format=payload.format, user_id=admin.id)
    except (Invalid, Conflict) as exc:
        form = {"source": payload.source_name, "format": payload.format, "content": payload.echo}
        context = _detail_context(session, prompt_set, preference_form=form)
        return render_form_errors(request, exc, "pages/prompt_sets_detail.html", context, prefix="preferences_",
                                  block="preferences_form", status_code=422 if isinstance(exc, Invalid) else 409)
    flash(request, result.describe(), "success")
    return redirect(request, f"/admin/prompt-sets/{prompt_set.id}")


@router.post("/{prompt_set_id}/ai-settings")
def update_ai_settings(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id,
                       principles: Annotated[str, Form(max_length=20_000)] = "",
                       pre_annotator_id: Annotated[str, Form(max_length=40)] = ""):
    prompt_set = prompt_sets.get_prompt_set(session, prompt_set_id)
    try:
        ai_labelers.update_ai_settings(session, prompt_set_id=prompt_set.id, principles=principles,
                                       pre_annotator_id=pre_annotator_id)
    except (Invalid, Conflict) as exc:
        form = {"principles": principles, "pre_annotator_id": pre_annotator_id}
        return render_form_errors(request, exc, "pages/prompt_sets_detail.html",
                                  _detail_context(session, prompt_set, ai_form=form), prefix="ai_", block="ai_form")
    flash(request, "AI settings saved.", "success")
    return redirect(request, f"/admin/prompt-sets/{prompt_set.id}")


@router.post("/{prompt_set_id}/ai-label")
def start_ai_label(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id,
                   ai_user_id: Annotated[str, Form(max_length=40)] = "",
                   scope: Annotated[str, Form(max_length=20)] = "missing"):
    prompt_set = prompt_sets.get_prompt_set(session, prompt_set_id)
    try:
        job = ai_labelers.start_ai_label_job(session, prompt_set_id=prompt_set.id, ai_user_id=ai_user_id,
                                             scope=scope, created_by_id=admin.id)
    except (Invalid, Conflict) as exc:
        return render_form_errors(request, exc, "pages/prompt_sets_detail.html", _detail_context(session, prompt_set),
                                  prefix="ai_", block="ai_form")
    flash(request, f"AI labeling queued as job {job.id}.", "success")
    return redirect(request, f"/jobs/{job.id}")


def _change(request: Request, session, prompt_set_id: int, change: Callable[..., Any],
            message: Callable[[PromptSet, Any], str], **kwargs: Any):
    """Apply a life-cycle change (start, pause, resume, archive), say what it did, back to the set."""
    prompt_set = prompt_sets.get_prompt_set(session, prompt_set_id)
    result = change(session, prompt_set=prompt_set, **kwargs)
    flash(request, message(prompt_set, result), "success")
    return redirect(request, f"/admin/prompt-sets/{prompt_set.id}")


@router.post("/{prompt_set_id}/start")
def start(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id):
    queued = " Generation of responses is queued."
    return _change(request, session, prompt_set_id, prompt_sets.start_prompt_set, user_id=admin.id,
                   message=lambda s, job: f"Started '{s.name}'.{queued if job else ''}")


@router.post("/{prompt_set_id}/pause")
def pause(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id):
    return _change(request, session, prompt_set_id, prompt_sets.pause_prompt_set,
                   message=lambda s, _: f"Paused '{s.name}': labelers get no new tasks from it.")


@router.post("/{prompt_set_id}/resume")
def resume(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id):
    queued = " Generation of the new prompts is queued."
    return _change(request, session, prompt_set_id, prompt_sets.resume_prompt_set, user_id=admin.id,
                   message=lambda s, job: f"Resumed '{s.name}'.{queued if job else ''}")


@router.post("/{prompt_set_id}/archive")
def archive(request: Request, session: SessionDep, admin: AdminUser, prompt_set_id: Id):
    return _change(request, session, prompt_set_id, prompt_sets.archive_prompt_set,
                   message=lambda s, _: f"Archived '{s.name}'.")
