"""JSON API of a set's quality: agreement figures, progress, streamed exports, exclusion."""

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from app.routes.deps import AdminUser, SessionDep
from app.routes.exports import ExportPlan, meta_response, stream
from app.schemas.common import Id
from app.services import ai_labelers, labelers
from app.services.agreement import SetAgreement, compute_set_agreement
from app.services.progress import SetProgress, set_progress
from app.services.prompt_sets import get_prompt_set

router = APIRouter(prefix="/prompt-sets/{prompt_set_id}", tags=["quality"])


@router.get("/agreement", response_model=SetAgreement)
def agreement(session: SessionDep, admin: AdminUser, prompt_set_id: Id):
    """Pairwise agreement, Kendall's tau-b, Krippendorff's alpha and per-labeler figures
    (conventions: app/services/agreement.py)."""
    get_prompt_set(session, prompt_set_id)
    return compute_set_agreement(session, prompt_set_id=prompt_set_id)


@router.get("/prefill-study", response_model=ai_labelers.PrefillStudy)
def prefill_study(session: SessionDep, admin: AdminUser, prompt_set_id: Id):
    """The pre-annotation study: labelers' mean time, changes of the pre-fill and agreement with
    the AI labeler, on tasks with and without its ranking shown."""
    return ai_labelers.prefill_study(session, prompt_set_id=prompt_set_id)


@router.get("/progress", response_model=SetProgress)
def progress(session: SessionDep, admin: AdminUser, prompt_set_id: Id,
             hours: Annotated[int, Query(ge=1, le=24 * 31)] = 48):
    """Tasks by state, labels per hour for the last `hours`, and the estimated time to finish."""
    return set_progress(session, prompt_set_id=prompt_set_id, hours=hours)


@router.get("/export", responses={200: {"content": {"application/x-ndjson": {}, "text/csv": {}}}})
def export_file(session: SessionDep, admin: AdminUser, plan: ExportPlan):
    """The export file, streamed. `labelers`: ids (repeat or comma-separate); dates:
    YYYY-MM-DD (date_to's day included) or ISO times. Excluded annotations never appear."""
    return stream(session, plan)


@router.get("/export/meta")
def export_sidecar(session: SessionDep, admin: AdminUser, plan: ExportPlan):
    """The sidecar of the same export: filters, what was left out, row count, time, format."""
    return meta_response(session, plan)


class ExclusionOut(BaseModel):
    prompt_set_id: int
    user_id: int
    scope: str  # "set" or "everywhere"
    changed: int  # annotations whose flag changed
    annotations: int  # the labeler's annotations on this set
    excluded: int  # of those, excluded now


def _exclusion(session, prompt_set_id: int, user_id: int, *, excluded: bool, everywhere: bool) -> ExclusionOut:
    get_prompt_set(session, prompt_set_id)
    changed = labelers.set_excluded(session, user_id=user_id, excluded=excluded,
                                    prompt_set_id=None if everywhere else prompt_set_id)
    counts = labelers.annotation_counts(session, prompt_set_id=prompt_set_id, user_id=user_id)
    return ExclusionOut(prompt_set_id=prompt_set_id, user_id=user_id, scope="everywhere" if everywhere else "set",
                        changed=changed, annotations=counts[0], excluded=counts[1])


@router.post("/labelers/{user_id}/exclude", response_model=ExclusionOut)
def exclude(session: SessionDep, admin: AdminUser, prompt_set_id: Id, user_id: Id, everywhere: bool = False):
    """Leave the labeler's annotations (on this set, or on every set) out of figures,
    exports and training data. Nothing is deleted."""
    return _exclusion(session, prompt_set_id, user_id, excluded=True, everywhere=everywhere)


@router.post("/labelers/{user_id}/include", response_model=ExclusionOut)
def include(session: SessionDep, admin: AdminUser, prompt_set_id: Id, user_id: Id, everywhere: bool = False):
    """Bring the labeler's excluded annotations back."""
    return _exclusion(session, prompt_set_id, user_id, excluded=False, everywhere=everywhere)
