"""JSON API of evaluations (engineers and admins): start one, read its results, export its votes."""

from fastapi import APIRouter, status
from fastapi.responses import StreamingResponse

from app.routes.deps import EngineerUser, SessionDep
from app.routes.exports import stream
from app.schemas.common import Id, problem_response
from app.schemas.evaluations import EvaluationBrief, EvaluationIn, EvaluationOut, FiguresIn, ModelOut
from app.schemas.jobs import JobOut, job_out
from app.services import evaluation, export

router = APIRouter(prefix="/evaluations", tags=["evaluations"])


@router.get("", response_model=list[EvaluationBrief])
def list_evaluations(session: SessionDep, user: EngineerUser):
    """Every evaluation set, newest first, with its models."""
    return [
        EvaluationBrief(prompt_set_id=s.id, name=s.name, status=s.status, created_at=s.created_at,
                        models=[ModelOut(id=m.id, name=m.name, kind=m.kind.value, position=i)
                                for i, m in enumerate(evaluation.set_models(session, s.id))])
        for s in evaluation.list_evaluations(session)
    ]


@router.post("", response_model=EvaluationOut, status_code=status.HTTP_201_CREATED,
             responses={422: problem_response("Nothing created; `errors` names each bad field."),
                        409: problem_response("The name is taken.")})
def create_evaluation(body: EvaluationIn, session: SessionDep, user: EngineerUser):
    """Create an evaluation of two or more models and start it: the worker samples one
    response per (prompt, model), and labelers get blind A/B tasks."""
    created = evaluation.create_evaluation(session, created_by_id=user.id, **body.model_dump())
    return evaluation.results_dict(evaluation.results(session, prompt_set_id=created.id))


@router.get("/{prompt_set_id}", response_model=EvaluationOut)
def get_results(prompt_set_id: Id, session: SessionDep, user: EngineerUser):
    """Per pair of models: wins, losses, ties, win rate (ties half) with a 95% interval;
    the same per labeler; the labelers' agreement; mean response length per model; and
    under `automatic` (null until an eval_figures job succeeded) the reward model's win
    rate and agreement with the votes per pair, and each policy's KL from its reference."""
    return evaluation.results_dict(evaluation.results(session, prompt_set_id=prompt_set_id))


@router.get("/{prompt_set_id}/votes", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {}},
                             "description": "One JSON line per vote (loads with datasets' json loader)."}})
def votes(prompt_set_id: Id, session: SessionDep, user: EngineerUser):
    """The counted votes as JSONL: prompt, both responses, both models, outcome, winner, strength."""
    evaluation.get_evaluation(session, prompt_set_id)
    plan = export.plan_export(session, kind="votes", fmt="votes",
                              filters=export.parse_filters(prompt_set_ids=prompt_set_id))
    return stream(session, plan)


@router.post("/{prompt_set_id}/figures", response_model=JobOut, status_code=status.HTTP_201_CREATED,
             responses={422: problem_response("Nothing queued; `errors` names the bad field."),
                        409: problem_response("A figures job of this evaluation is queued or running.")})
def start_figures(prompt_set_id: Id, session: SessionDep, user: EngineerUser, body: FiguresIn | None = None):
    """Queue an eval_figures job: the reward model (the default one when `reward_model_id` is
    left out) scores every response, and each policy's KL from its reference is estimated."""
    return job_out(evaluation.start_figures_job(session, user_id=user.id, prompt_set_id=prompt_set_id,
                                                reward_model_id=body.reward_model_id if body else None))
