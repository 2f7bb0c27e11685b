"""JSON API of demonstrations. Labelers: lease the next prompt, save a draft, submit,
skip. Admins: the review queue, accept, reject, edit, import and export."""

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from app.db.base import utcnow
from app.db.models import Demonstration
from app.routes.deps import AdminUser, LabelerUser, SessionDep, SettingsDep
from app.routes.uploads import ImportPayload, read_import_payload
from app.schemas_training import (
    DemonstrationImportOut,
    DemonstrationOut,
    DraftIn,
    DraftOut,
    EditIn,
    NextDemonstrationOut,
    RejectIn,
    SkipIn,
    SubmitIn,
    SubmitOut,
)
from app.services import demonstrations as demos
from app.services.prompt_sets import get_prompt_set

router = APIRouter(prefix="/api/v1", tags=["demonstrations"])


def _out(demo: Demonstration) -> DemonstrationOut:
    prompt = demo.prompt
    return DemonstrationOut(
        id=demo.id, prompt_id=demo.prompt_id, prompt_set_id=prompt.prompt_set_id, messages=list(prompt.messages),
        instructions=prompt.prompt_set.instructions, user_id=demo.user_id, text=demo.text, status=demo.status,
        edit_mode=demo.edit_mode, prompt_flags=list(demo.prompt_flags), time_spent_s=demo.time_spent_s or 0.0,
        expires_at=demo.expires_at, reject_reason=demo.reject_reason, skip_reason=demo.skip_reason,
        reviewed_by_id=demo.reviewed_by_id, reviewed_at=demo.reviewed_at, updated_at=demo.updated_at,
    )


# ---- labelers -------------------------------------------------------------------

@router.get("/demonstrations/next", response_model=NextDemonstrationOut)
def next_demonstration(session: SessionDep, user: LabelerUser, settings: SettingsDep):
    """The prompt you hold, or a new lease on the next one; null when none is left."""
    demo = demos.lease_next_demonstration(session, user=user, now=utcnow(), lease_s=settings.lease_s)
    return NextDemonstrationOut(demonstration=_out(demo) if demo else None)


@router.put("/demonstrations/{demonstration_id}/draft", response_model=DraftOut)
def save_draft(demonstration_id: int, body: DraftIn, session: SessionDep, user: LabelerUser, settings: SettingsDep):
    """Autosave the draft and renew the lease (a submitted one is left as it is: saved=false)."""
    result = demos.save_draft(session, user=user, demonstration_id=demonstration_id, text=body.text, now=utcnow(),
                              lease_s=settings.lease_s, time_spent_s=body.time_spent_s,
                              prompt_flags=body.prompt_flags)
    return DraftOut(demonstration=_out(result.demonstration), saved=result.saved, holds_lease=result.holds_lease)


@router.post("/demonstrations/{demonstration_id}/submit", response_model=SubmitOut)
def submit(demonstration_id: int, body: SubmitIn, session: SessionDep, user: LabelerUser, settings: SettingsDep):
    """Submit for review. Sending it again changes nothing (already=true)."""
    result = demos.submit_demonstration(session, user=user, demonstration_id=demonstration_id, text=body.text,
                                        now=utcnow(), lease_s=settings.lease_s, time_spent_s=body.time_spent_s,
                                        prompt_flags=body.prompt_flags)
    return SubmitOut(demonstration=_out(result.demonstration), already=result.already)


@router.post("/demonstrations/{demonstration_id}/skip", response_model=DemonstrationOut)
def skip(demonstration_id: int, body: SkipIn, session: SessionDep, user: LabelerUser):
    demos.skip_demonstration(session, user=user, demonstration_id=demonstration_id, reason=body.reason, now=utcnow())
    return _out(demos.load_demonstration(session, demonstration_id))


# ---- admins ---------------------------------------------------------------------

@router.get("/demonstrations", response_model=list[DemonstrationOut])
def review_queue(session: SessionDep, admin: AdminUser, prompt_set_id: int | None = None):
    """Submitted demonstrations waiting for review, oldest first."""
    return [_out(d) for d in demos.review_queue(session, prompt_set_id=prompt_set_id)]


@router.post("/demonstrations/{demonstration_id}/accept", response_model=DemonstrationOut)
def accept(demonstration_id: int, session: SessionDep, admin: AdminUser):
    return _out(demos.accept_demonstration(session, reviewer=admin, demonstration_id=demonstration_id,
                                           now=utcnow()))


@router.post("/demonstrations/{demonstration_id}/reject", response_model=DemonstrationOut)
def reject(demonstration_id: int, body: RejectIn, session: SessionDep, admin: AdminUser):
    return _out(demos.reject_demonstration(session, reviewer=admin, demonstration_id=demonstration_id,
                                           reason=body.reason, now=utcnow()))


@router.post("/demonstrations/{demonstration_id}/edit", response_model=DemonstrationOut)
def edit(demonstration_id: int, body: EditIn, session: SessionDep, admin: AdminUser):
    """Replace the text and accept it."""
    return _out(demos.edit_demonstration(session, reviewer=admin, demonstration_id=demonstration_id,
                                         text=body.text, now=utcnow()))


@router.post("/prompt-sets/{prompt_set_id}/demonstrations", response_model=DemonstrationImportOut,
             responses={422: {"description": "Nothing stored; `errors` lists the problems by line."}})
def import_demonstrations(prompt_set_id: int, session: SessionDep, admin: AdminUser,
                          payload: Annotated[ImportPayload, Depends(read_import_payload)],
                          status: str = "accepted"):
    """JSONL lines {"prompt", "response"} or {"messages": [..., assistant]}, as a JSON body
    {"format": "jsonl", "content": "..."} or a file; all or nothing. ?status=submitted
    sends them through review instead of accepting them."""
    prompt_set = get_prompt_set(session, prompt_set_id)
    result = demos.import_demonstrations(session, prompt_set=prompt_set, data=payload.data(), user=admin,
                                         now=utcnow(), status=status)
    return DemonstrationImportOut(added=result.added, prompts_added=result.prompts_added,
                                  duplicates_in_file=result.duplicates_in_file,
                                  duplicates_existing=result.duplicates_existing)


@router.get("/prompt-sets/{prompt_set_id}/demonstrations.jsonl",
            responses={200: {"content": {"application/jsonl": {}}}})
def export_demonstrations(prompt_set_id: int, session: SessionDep, admin: AdminUser, format: str = "messages"):
    """Accepted demonstrations as JSONL for TRL's SFTTrainer: format=messages or prompt_completion."""
    prompt_set = get_prompt_set(session, prompt_set_id)
    lines = list(demos.iter_export(session, prompt_set_ids=[prompt_set.id], fmt=format))
    return StreamingResponse(iter(lines), media_type="application/jsonl")
