"""JSON API of review and correction and of labeler trust (admins)."""

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query

from app.routes.deps import AdminUser, SessionDep
from app.schemas.common import Id
from app.schemas.review import (
    QueueItemOut,
    ReviewIn,
    ReviewOut,
    ShowQueue,
    TrustOut,
    TrustRowOut,
    TrustRulesIn,
    queue_item_out,
    review_out,
    trust_row_out,
)
from app.services import review, trust
from app.services.errors import Invalid, NotFound

router = APIRouter(prefix="/prompt-sets/{prompt_set_id}", tags=["review"])


@router.get("/review-queue", response_model=list[QueueItemOut])
def review_queue(session: SessionDep, admin: AdminUser, prompt_set_id: Id, show: ShowQueue = "open",
                 limit: Annotated[int, Query(ge=1, le=1000)] = 100):
    """The set's labeled tasks, most disagreed first (open: not reviewed yet)."""
    items = review.review_queue(session, prompt_set_id=prompt_set_id, show=show, limit=limit)
    return [queue_item_out(item) for item in items]


@router.post("/tasks/{task_id}/reviews", response_model=ReviewOut, status_code=201)
def add_review(session: SessionDep, admin: AdminUser, prompt_set_id: Id, task_id: Id, body: ReviewIn):
    """Accept the task, or correct it with a ranking used in training or as gold. Kept
    beside the annotations (nothing is changed or deleted); the latest review counts."""
    if body.decision == "accepted":
        if body.ranking is not None or body.use is not None:
            raise Invalid("An accepted task takes no ranking or use; send decision \"corrected\" to correct it.",
                          errors={"decision": "accepted takes no ranking or use"})
        row = review.accept_task(session, prompt_set_id=prompt_set_id, task_id=task_id, reviewer=admin,
                                 note=body.note)
    else:
        row = review.correct_task(session, prompt_set_id=prompt_set_id, task_id=task_id, reviewer=admin,
                                  ranking=body.ranking, use=body.use.value if body.use else None, note=body.note)
    return review_out(row)


@router.get("/trust", response_model=TrustOut)
def set_trust(session: SessionDep, admin: AdminUser, prompt_set_id: Id):
    """Every labeler's trust figures, the rules that flag them and their quarantine."""
    result = trust.set_trust(session, prompt_set_id=prompt_set_id)
    return TrustOut(rules=asdict(result.rules), set_median_time_s=result.set_median_time_s,
                    labelers=[trust_row_out(r) for r in result.rows])


@router.put("/trust-rules", response_model=dict[str, float | int | bool])
def put_trust_rules(session: SessionDep, admin: AdminUser, prompt_set_id: Id, body: TrustRulesIn):
    """Replace the set's trust rules; a rule left out gets its default."""
    return asdict(trust.save_rules(session, prompt_set_id=prompt_set_id, values=body.model_dump(exclude_none=True)))


def _row(session, prompt_set_id: int, user_id: int) -> TrustRowOut:
    rows = trust.trust_rows(session, prompt_set_id=prompt_set_id, user_id=user_id)
    if not rows:
        raise NotFound(f"User {user_id} has no annotations or quarantine on prompt set {prompt_set_id}.")
    return trust_row_out(rows[0])


@router.post("/labelers/{user_id}/quarantine", response_model=TrustRowOut)
def quarantine(session: SessionDep, admin: AdminUser, prompt_set_id: Id, user_id: Id):
    """Hold back the labeler's new annotations on the set until the quarantine is lifted."""
    trust.quarantine(session, prompt_set_id=prompt_set_id, user_id=user_id, by=admin)
    return _row(session, prompt_set_id, user_id)


@router.post("/labelers/{user_id}/release", response_model=TrustRowOut)
def release(session: SessionDep, admin: AdminUser, prompt_set_id: Id, user_id: Id):
    """Lift the quarantine: the held-back annotations count again; the rules leave the labeler be."""
    trust.release(session, prompt_set_id=prompt_set_id, user_id=user_id, by=admin)
    return _row(session, prompt_set_id, user_id)
