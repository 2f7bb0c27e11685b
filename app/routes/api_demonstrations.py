"""JSON API of demonstrations. Labelers: lease the next prompt, save a draft, submit,
skip. Admins: the review queue, accept, reject, edit, import and export."""

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from app.db.base import utcnow
from app.db.enums import DemonstrationStatus
from app.routes.deps import AdminUser, LabelerUser, SessionDep, SettingsDep
from app.routes.uploads import read_import_payload
from app.schemas.common import Id, Offset, error_lines, problem_response
from app.schemas.demonstrations import (
    DemonstrationImportOut,
    DemonstrationOut,
    DemonstrationSubmitIn,
    DemonstrationSubmitOut,
    DraftIn,
    DraftOut,
    EditIn,
    NextDemonstrationOut,
    RejectIn,
    SkipIn,
    demonstration_out,
)
from app.schemas.prompt_sets import PromptImportBody
from app.services import demonstrations as demos
from app.services.errors import Invalid
from app.services.prompt_sets import get_prompt_set
from app.services.validation import JsonProblem, load_json
from app.web import download_headers

router = APIRouter(tags=["demonstrations"])


# ---- labelers -------------------------------------------------------------------

@router.get("/demonstrations/next", response_model=NextDemonstrationOut)
def next_demonstration(session: SessionDep, user: LabelerUser, settings: SettingsDep):
    """The prompt you hold, or a new lease on the next one; null when none is left."""
    demo = demos.lease_next_demonstration(session, user=user, lease_s=settings.lease_s)
    return NextDemonstrationOut(demonstration=demonstration_out(demo) if demo else None)


@router.put("/demonstrations/{demonstration_id}/draft", response_model=DraftOut)
def save_draft(demonstration_id: Id, body: DraftIn, session: SessionDep, user: LabelerUser, settings: SettingsDep):
    """Autosave the draft and renew the lease (a submitted one is left as it is: saved=false)."""
    result = demos.save_draft(session, user=user, demonstration_id=demonstration_id, text=body.text,
                              lease_s=settings.lease_s, time_spent_s=body.time_spent_s,
                              prompt_flags=body.prompt_flags)
    return DraftOut(demonstration=demonstration_out(result.demonstration), saved=result.saved,
                    holds_lease=result.holds_lease)


@router.post("/demonstrations/{demonstration_id}/submit", response_model=DemonstrationSubmitOut)
def submit(demonstration_id: Id, body: DemonstrationSubmitIn, session: SessionDep, user: LabelerUser,
           settings: SettingsDep):
    """Submit for review. Sending it again changes nothing (already=true)."""
    result = demos.submit_demonstration(session, user=user, demonstration_id=demonstration_id, text=body.text,
                                        lease_s=settings.lease_s, time_spent_s=body.time_spent_s,
                                        prompt_flags=body.prompt_flags)
    return DemonstrationSubmitOut(demonstration=demonstration_out(result.demonstration), already=result.already)


@router.post("/demonstrations/{demonstration_id}/skip", response_model=DemonstrationOut)
def skip(demonstration_id: Id, body: SkipIn, session: SessionDep, user: LabelerUser):
    return demonstration_out(demos.skip_demonstration(session, user=user, demonstration_id=demonstration_id,
                                                      reason=body.reason))


# ---- admins ---------------------------------------------------------------------

@router.get("/demonstrations", response_model=list[DemonstrationOut])
def review_queue(session: SessionDep, admin: AdminUser, status: DemonstrationStatus = DemonstrationStatus.submitted,
                 prompt_set_id: Id | None = None, limit: Annotated[int, Query(ge=1, le=500)] = 50,
                 offset: Offset = 0):
    """The review queue: submitted demonstrations, oldest first (another `status`
    lists those instead, least recently changed first)."""
    found = demos.list_demonstrations(session, status=status, prompt_set_id=prompt_set_id, limit=limit, offset=offset)
    return [demonstration_out(d) for d in found]


@router.post("/demonstrations/{demonstration_id}/accept", response_model=DemonstrationOut)
def accept(demonstration_id: Id, session: SessionDep, admin: AdminUser):
    return demonstration_out(demos.accept_demonstration(session, reviewer=admin, demonstration_id=demonstration_id,
                                                        now=utcnow()))


@router.post("/demonstrations/{demonstration_id}/reject", response_model=DemonstrationOut)
def reject(demonstration_id: Id, body: RejectIn, session: SessionDep, admin: AdminUser):
    return demonstration_out(demos.reject_demonstration(session, reviewer=admin, demonstration_id=demonstration_id,
                                                        reason=body.reason, now=utcnow()))


@router.post("/demonstrations/{demonstration_id}/edit", response_model=DemonstrationOut)
def edit(demonstration_id: Id, body: EditIn, session: SessionDep, admin: AdminUser):
    """Replace the text and accept it."""
    return demonstration_out(demos.edit_demonstration(session, reviewer=admin, demonstration_id=demonstration_id,
                                                      text=body.text, now=utcnow()))


def _as_jsonl(items: list[Any]) -> str:
    """A JSON list as JSONL: item N is line N of the problems reported."""
    return "\n".join(json.dumps(item, ensure_ascii=False) for item in items)


def _list_or_text(content: str) -> str:
    """Pasted text: JSONL, or a JSON list of demonstrations."""
    if not content.lstrip().startswith("["):
        return content
    try:
        parsed = load_json(content)
    except json.JSONDecodeError:
        return content  # the import reports it by line
    except JsonProblem as exc:
        raise Invalid(f"Nothing was imported: the JSON {exc}.", errors=[f"line 1: the JSON {exc}"]) from None
    return _as_jsonl(parsed) if isinstance(parsed, list) else content


async def read_demonstration_import(request: Request) -> bytes | str:
    """The demonstrations of an import request: a multipart form (file or pasted
    text), a JSON list of demonstrations, a JSON object {"content": "..."}, or the
    JSONL itself as the body (text/plain, application/jsonl)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        payload = await read_import_payload(request)
        data = payload.data()
        return _list_or_text(data) if isinstance(data, str) else data
    body = await request.body()  # its size is bounded by the app's body limit (app/main.py)
    if content_type not in ("", "application/json"):
        return body  # JSONL as it is: the import decodes and checks it
    try:
        parsed = load_json(body)
    except JsonProblem as exc:
        raise Invalid(f"Nothing was imported: the JSON {exc}.", errors=[f"line 1: the JSON {exc}"]) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Invalid("Send a JSON list of demonstrations, JSON like {\"content\": \"...JSONL...\"},"
                      " or the JSONL itself with Content-Type: application/jsonl.",
                      errors=["the body is not valid JSON"]) from None
    if isinstance(parsed, list):
        return _as_jsonl(parsed)
    try:
        content = PromptImportBody.model_validate(parsed).content
    except ValidationError as exc:
        raise Invalid("Send a JSON list of demonstrations or JSON like {\"content\": \"...JSONL...\"}.",
                      errors=error_lines(exc)) from None
    return _list_or_text(content)


_DEMO_ITEM = {"type": "object", "description": '{"prompt", "response"} or {"messages": [..., assistant]}'}
_IMPORT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"oneOf": [
                {"type": "array", "items": _DEMO_ITEM},
                {"type": "object", "required": ["content"],
                 "properties": {"content": {"type": "string", "description": "JSONL, one demonstration a line"}}},
            ]}},
            "application/jsonl": {"schema": {"type": "string"}},
            "multipart/form-data": {"schema": {
                "type": "object", "properties": {"file": {"type": "string", "format": "binary"},
                                                 "content": {"type": "string"}},
            }},
        },
    },
}


@router.post("/prompt-sets/{prompt_set_id}/demonstrations", response_model=DemonstrationImportOut,
             openapi_extra=_IMPORT_BODY,
             responses={422: problem_response("Nothing stored; `errors` lists the problems by line.")})
def import_demonstrations(prompt_set_id: Id, session: SessionDep, admin: AdminUser,
                          data: Annotated[bytes | str, Depends(read_demonstration_import)],
                          status: str = "accepted"):
    """Lines {"prompt", "response"} or {"messages": [..., assistant]}, as JSONL or a JSON
    list (item N is reported as line N); all or nothing. ?status=submitted sends them
    through review instead of accepting them."""
    prompt_set = get_prompt_set(session, prompt_set_id)
    result = demos.import_demonstrations(session, prompt_set=prompt_set, data=data, user=admin,
                                         now=utcnow(), status=status)
    return DemonstrationImportOut(added=result.added, prompts_added=result.prompts_added,
                                  duplicates_in_file=result.duplicates_in_file,
                                  duplicates_existing=result.duplicates_existing)


@router.get("/prompt-sets/{prompt_set_id}/demonstrations.jsonl",
            responses={200: {"content": {"application/jsonl": {}}}})
def export_demonstrations(prompt_set_id: Id, session: SessionDep, admin: AdminUser, format: str = "messages"):
    """Accepted demonstrations as JSONL for TRL's SFTTrainer: format=messages or prompt_completion."""
    prompt_set = get_prompt_set(session, prompt_set_id)
    lines = demos.iter_export(session, prompt_set_ids=[prompt_set.id], fmt=format)
    return StreamingResponse(lines, media_type="application/jsonl",
                             headers=download_headers(f"demonstrations-{prompt_set.id}-{format}.jsonl"))
