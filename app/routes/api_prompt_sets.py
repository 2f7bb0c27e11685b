"""JSON API for prompt sets under /api/v1/prompt-sets (admins)."""

from typing import Annotated

from fastapi import APIRouter, Depends, status
from sqlalchemy.orm import Session

from app.db.models import PromptSet
from app.routes.deps import AdminUser, EngineerUser, SessionDep
from app.routes.uploads import ImportPayload, PreferencePayload, read_import_payload, read_preference_payload
from app.schemas.common import Id, problem_response
from app.schemas.jobs import JobOut, job_out
from app.schemas.prompt_sets import (
    AILabelRunIn,
    AISettingsIn,
    AISettingsOut,
    ImportResultOut,
    PreferenceImportBody,
    PreferenceImportResultOut,
    PromptImportBody,
    PromptSetCreate,
    PromptSetOut,
    PromptSetUpdate,
    TaskOrderBody,
    TaskOrderOut,
    prompt_set_out,
    task_order_out,
)
from app.services import active_learning, ai_labelers, preference_import, prompt_import, prompt_sets

router = APIRouter(prefix="/prompt-sets", tags=["prompt sets"])


def _out(session: Session, prompt_set: PromptSet) -> PromptSetOut:
    return prompt_set_out(prompt_set, prompt_sets.counts(session, prompt_set),
                          prompt_sets.latest_generation_job(session, prompt_set))


def _change(session: Session, prompt_set_id: int, change, **kwargs) -> PromptSetOut:
    """Apply a life-cycle change (start, pause, resume, archive) to the set and return it."""
    prompt_set = prompt_sets.get_prompt_set(session, prompt_set_id)
    change(session, prompt_set=prompt_set, **kwargs)
    return _out(session, prompt_set)


@router.get("", response_model=list[PromptSetOut])
def list_prompt_sets(session: SessionDep, admin: AdminUser):
    return [prompt_set_out(s.prompt_set, s.counts, s.generation_job) for s in prompt_sets.list_prompt_sets(session)]


@router.post("", response_model=PromptSetOut, status_code=status.HTTP_201_CREATED)
def create_prompt_set(body: PromptSetCreate, session: SessionDep, admin: AdminUser):
    prompt_set = prompt_sets.create_prompt_set(session, **body.model_dump(), created_by_id=admin.id)
    return _out(session, prompt_set)


@router.get("/{prompt_set_id}", response_model=PromptSetOut)
def get_prompt_set(prompt_set_id: Id, session: SessionDep, admin: AdminUser):
    return _out(session, prompt_sets.get_prompt_set(session, prompt_set_id))


@router.patch("/{prompt_set_id}", response_model=PromptSetOut)
def update_prompt_set(prompt_set_id: Id, body: PromptSetUpdate, session: SessionDep, admin: AdminUser):
    prompt_set = prompt_sets.get_prompt_set(session, prompt_set_id)
    prompt_sets.update_prompt_set(session, prompt_set=prompt_set, **body.model_dump(exclude_unset=True))
    return _out(session, prompt_set)


_IMPORT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": PromptImportBody.model_json_schema()},
            "multipart/form-data": {"schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "format": {"type": "string", "enum": ["auto", "jsonl", "json", "csv"]},
                },
            }},
        },
    },
}


@router.post("/{prompt_set_id}/prompts", response_model=ImportResultOut, openapi_extra=_IMPORT_BODY,
             responses={422: problem_response("Nothing stored; `errors` lists the problems by line.")})
def import_prompts(prompt_set_id: Id, session: SessionDep, admin: AdminUser,
                   payload: Annotated[ImportPayload, Depends(read_import_payload)]):
    """Import JSONL, a JSON array or CSV, all or nothing. Exact duplicates are skipped."""
    prompt_set = prompt_sets.get_prompt_set(session, prompt_set_id)
    result = prompt_import.import_prompts(
        session, prompt_set=prompt_set, data=payload.data(), format=payload.format,
        filename=payload.filename, user_id=admin.id,
    )
    return ImportResultOut(
        added=result.added, duplicates=result.duplicates, duplicates_in_file=result.duplicates_in_file,
        duplicates_existing=result.duplicates_existing, per_split=result.per_split,
        generation_job_id=result.generation_job_id,
    )


_PREFERENCE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": PreferenceImportBody.model_json_schema()},
            "multipart/form-data": {"schema": {
                "type": "object",
                "required": ["file", "source"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "source": {"type": "string", "maxLength": 100},
                    "format": {"type": "string", "enum": list(preference_import.FORMATS)},
                },
            }},
        },
    },
}


@router.post("/{prompt_set_id}/preferences", response_model=PreferenceImportResultOut,
             openapi_extra=_PREFERENCE_BODY,
             responses={422: problem_response("Nothing stored; `errors` lists the problems by line and field."),
                        409: problem_response("The set is archived or not a ranking set.")})
def import_preferences(prompt_set_id: Id, session: SessionDep, admin: AdminUser,
                       payload: Annotated[PreferencePayload, Depends(read_preference_payload)]):
    """Import preference data (JSONL: TRL plain or conversational, HH-RLHF, ranked or scored
    responses) into a ranking set as annotations of the named source, all or nothing."""
    prompt_set = prompt_sets.get_prompt_set(session, prompt_set_id)
    result = preference_import.import_preferences(
        session, prompt_set=prompt_set, source=payload.data(), source_name=payload.source_name,
        format=payload.format, user_id=admin.id)
    return PreferenceImportResultOut(
        source=result.source, rankings=result.rankings, comparisons=result.comparisons,
        prompts_added=result.prompts_added, skipped_identical=result.skipped_identical, per_format=result.per_format)


@router.post("/{prompt_set_id}/start", response_model=PromptSetOut)
def start_prompt_set(prompt_set_id: Id, session: SessionDep, admin: AdminUser):
    """Draft -> active; queues generation of K responses per prompt."""
    return _change(session, prompt_set_id, prompt_sets.start_prompt_set, user_id=admin.id)


@router.post("/{prompt_set_id}/pause", response_model=PromptSetOut)
def pause_prompt_set(prompt_set_id: Id, session: SessionDep, admin: AdminUser):
    return _change(session, prompt_set_id, prompt_sets.pause_prompt_set)


@router.post("/{prompt_set_id}/resume", response_model=PromptSetOut)
def resume_prompt_set(prompt_set_id: Id, session: SessionDep, admin: AdminUser):
    return _change(session, prompt_set_id, prompt_sets.resume_prompt_set, user_id=admin.id)


@router.post("/{prompt_set_id}/archive", response_model=PromptSetOut)
def archive_prompt_set(prompt_set_id: Id, session: SessionDep, admin: AdminUser):
    return _change(session, prompt_set_id, prompt_sets.archive_prompt_set)


@router.put("/{prompt_set_id}/ai-settings", response_model=AISettingsOut)
def update_ai_settings(prompt_set_id: Id, body: AISettingsIn, session: SessionDep, admin: AdminUser):
    """Principles for AI labelers' judge models, and pre-annotation (see the README, "AI labelers")."""
    return ai_labelers.update_ai_settings(session, prompt_set_id=prompt_set_id, principles=body.principles,
                                          pre_annotator_id=body.pre_annotator_id)


@router.post("/{prompt_set_id}/ai-label", response_model=JobOut, status_code=status.HTTP_201_CREATED)
def start_ai_label(prompt_set_id: Id, body: AILabelRunIn, session: SessionDep, admin: AdminUser):
    """Queue an ai_label job: the AI labeler ranks the set's tasks."""
    job = ai_labelers.start_ai_label_job(session, prompt_set_id=prompt_set_id, ai_user_id=body.ai_user_id,
                                         scope=body.scope, created_by_id=admin.id)
    return job_out(job)
def _order_out(session: Session, prompt_set: PromptSet) -> TaskOrderOut:
    return task_order_out(prompt_set, active_learning.order_summary(session, prompt_set))


@router.put("/{prompt_set_id}/task-order", response_model=TaskOrderOut,
            responses={422: problem_response("`errors` names the bad field."),
                       409: problem_response("The set is archived or not a ranking set.")})
def update_task_order(prompt_set_id: Id, body: TaskOrderBody, session: SessionDep, admin: AdminUser):
    """Set the order tasks are handed out in; switching to uncertainty (or changing its model) queues scoring."""
    prompt_set = prompt_sets.get_prompt_set(session, prompt_set_id)
    active_learning.update_order(session, prompt_set=prompt_set, order=body.task_order,
                                 order_model_id=body.order_model_id, user_id=admin.id)
    return _order_out(session, prompt_set)


@router.get("/{prompt_set_id}/task-scores", response_model=TaskOrderOut)
def task_scores(prompt_set_id: Id, session: SessionDep, engineer: EngineerUser):
    """The set's task order and the open tasks its reward model is least sure of (admins and engineers)."""
    return _order_out(session, prompt_sets.get_prompt_set(session, prompt_set_id))


@router.post("/{prompt_set_id}/task-scores", response_model=JobOut, status_code=status.HTTP_202_ACCEPTED,
             responses={409: problem_response("No reward model is registered, or the set is archived.")})
def score_tasks(prompt_set_id: Id, session: SessionDep, engineer: EngineerUser):
    """Queue a score_tasks job: the set's reward model scores its open tasks."""
    prompt_set = prompt_sets.get_prompt_set(session, prompt_set_id)
    return job_out(active_learning.queue_scoring(session, prompt_set=prompt_set, created_by_id=engineer.id))
