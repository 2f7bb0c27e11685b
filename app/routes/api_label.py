"""JSON API for labelers under /api/v1/label: lease the next task, submit a ranking or a vote."""

from fastapi import APIRouter, Response, status

from app.db.base import utcnow
from app.routes.deps import LabelerUser, SessionDep, SettingsDep
from app.schemas.common import Id
from app.schemas.label import FlagOut, LabelTaskOut, NextTaskOut, ResponseOut, SubmitIn, SubmitOut
from app.services import annotations, assignment

router = APIRouter(prefix="/label", tags=["labeling"])


def _flags(pairs) -> list[FlagOut]:
    return [FlagOut(key=key, label=label) for key, label in pairs]


@router.get("/next", response_model=NextTaskOut)
def next_task(session: SessionDep, user: LabelerUser, settings: SettingsDep):
    """The labeler's leased task (the same one until it is submitted, skipped or the lease
    runs out), or a new lease; `task` is null when nothing is left."""
    # Counted first, in the transaction the lease commits: no second one just to count.
    counts = annotations.labeler_counts(session, user=user, now=utcnow())
    lease = assignment.lease_next_task(session, user=user, lease_s=settings.lease_s)
    task_out = None
    if lease is not None:
        task = lease.task
        task_out = LabelTaskOut(
            id=task.id, prompt_set_id=task.prompt_set_id, prompt_set_name=task.prompt_set.labeler_name,
            instructions=task.prompt_set.instructions, messages=task.prompt.messages, k=task.k,
            mode="vote" if task.prompt_set.pairwise else "rank",
            top_k=task.prompt_set.top_k,
            lease_expires_at=lease.assignment.expires_at,
            responses=[
                ResponseOut(id=item.response_id, label=annotations.letter(item.position),
                            text=item.response.text, finish_reason=item.response.finish_reason)
                for item in task.items
            ],
        )
    return NextTaskOut(task=task_out, today=counts.today, total=counts.total,
                       response_flags=_flags(annotations.RESPONSE_FLAGS),
                       prompt_flags=_flags(annotations.PROMPT_FLAGS))


@router.post("/{task_id}", response_model=SubmitOut, status_code=status.HTTP_201_CREATED,
             responses={200: {"model": SubmitOut,
                             "description": "A retry: this idempotency key's annotation, stored before."}})
def submit(task_id: Id, body: SubmitIn, response: Response, session: SessionDep, user: LabelerUser):
    """Submit ratings and a ranking of every response of a leased task (mode rank; only the
    best top_k with the task's top_k, or all bad with a reason), or a vote on A and B (mode
    vote). Errors name each field (rating-<response_id>, rank-<response_id>, ranks,
    all_bad_reason, vote, strength, ...)."""
    result = annotations.submit_annotation(
        session, user=user, task_id=task_id, ratings=body.ratings, ranks=body.ranks, flags=body.flags,
        prompt_flags=body.prompt_flags, comment=body.comment, time_spent_s=body.time_spent_s,
        idempotency_key=body.idempotency_key, vote=body.vote, strength=body.strength,
        all_bad=body.all_bad, all_bad_reason=body.all_bad_reason,
    )
    if not result.created:
        response.status_code = status.HTTP_200_OK
    return SubmitOut(annotation_id=result.annotation.id, task_id=task_id, created=result.created,
                     comparisons=len(result.annotation.comparisons), warnings=result.warnings)
