"""Engineer pages: evaluations (blind A/B comparisons of models): the list, a new
evaluation, and its results with the votes' export and the automatic figures."""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from starlette.datastructures import FormData

from app.db.enums import ModelKind, PromptSetKind
from app.routes.deps import EngineerUser, SessionDep
from app.routes.exports import stream
from app.schemas.common import Id
from app.services import evaluation, export, leaderboard, models, prompt_sets
from app.services.errors import Conflict, Invalid
from app.web import flash, redirect, render, render_form_errors

router = APIRouter(prefix="/evaluations", include_in_schema=False)

SETTINGS = ("temperature", "top_p", "max_new_tokens", "seed", "overlap")
FIELDS = ("name", "instructions", "prompts", *SETTINGS)


async def read_form(request: Request) -> FormData:
    return await request.form()


FormDep = Annotated[FormData, Depends(read_form)]


def _new_context(session, *, form: dict[str, Any]) -> dict[str, Any]:
    ranking_sets = [s for s in prompt_sets.list_prompt_sets(session) if s.prompt_set.kind == PromptSetKind.ranking]
    return {"form": form, "form_errors": {}, "form_error": None, "models": evaluation.evaluable_models(session),
            "ranking_sets": ranking_sets}


def _default_form() -> dict[str, Any]:
    defaults = prompt_sets.DEFAULTS
    return {"name": "", "instructions": "", "prompts": "", "model_ids": [], "source_set_ids": [],
            **{n: str(defaults[n]) for n in SETTINGS}}


@router.get("")
def list_page(request: Request, session: SessionDep, user: EngineerUser):
    sets = evaluation.list_evaluations(session)
    return render(request, "pages/evaluations_list.html", {
        "evaluations": sets, "counts": prompt_sets.counts_for(session, [s.id for s in sets]),
        "models": {s.id: evaluation.set_models(session, s.id) for s in sets},
    })


@router.get("/new")
def new_page(request: Request, session: SessionDep, user: EngineerUser):
    # ?model_ids=..&model_ids=.. ticks models (the model page's "evaluate against its parent" link).
    form = _default_form() | {"model_ids": [v for v in request.query_params.getlist("model_ids") if v.isdigit()]}
    return render(request, "pages/evaluations_new.html", _new_context(session, form=form))


@router.post("")
def create(request: Request, session: SessionDep, user: EngineerUser, data: FormDep):
    form = {n: str(data.get(n) or "") for n in FIELDS} | {
        "model_ids": [str(v) for v in data.getlist("model_ids")],
        "source_set_ids": [str(v) for v in data.getlist("source_set_ids")],
    }
    try:
        created = evaluation.create_evaluation(
            session, name=form["name"], instructions=form["instructions"], model_ids=form["model_ids"],
            source_set_ids=form["source_set_ids"], prompts=form["prompts"], created_by_id=user.id,
            **{n: form[n] for n in SETTINGS})
    except (Invalid, Conflict) as exc:
        return render_form_errors(request, exc, "pages/evaluations_new.html", _new_context(session, form=form),
                                  block="form", status_code=422 if isinstance(exc, Invalid) else 409)
    flash(request, f"Created the evaluation '{created.name}'; its responses are being generated.", "success")
    return redirect(request, f"/evaluations/{created.id}")


def _results_context(session, prompt_set_id: int) -> dict[str, Any]:
    res = evaluation.results(session, prompt_set_id=prompt_set_id)
    return {
        "res": res, "counts": prompt_sets.counts(session, res.prompt_set),
        "job": prompt_sets.latest_generation_job(session, res.prompt_set),
        "board": leaderboard.model_board(session),
        "reward_models": models.models_of(session, [ModelKind.reward]),
        "figures_job": evaluation.figures_jobs(session, res.prompt_set.id)[0],
        "figures_error": None, "figures_errors": {},
    }


@router.get("/{prompt_set_id}")
def results_page(request: Request, session: SessionDep, user: EngineerUser, prompt_set_id: Id):
    return render(request, "pages/evaluations_detail.html", _results_context(session, prompt_set_id))


@router.post("/{prompt_set_id}/figures")
def start_figures(request: Request, session: SessionDep, user: EngineerUser, prompt_set_id: Id,
                  reward_model_id: Annotated[str, Form()] = ""):
    try:
        job = evaluation.start_figures_job(session, user_id=user.id, prompt_set_id=prompt_set_id,
                                           reward_model_id=reward_model_id)
    except (Invalid, Conflict) as exc:
        session.rollback()
        return render_form_errors(request, exc, "pages/evaluations_detail.html",
                                  _results_context(session, prompt_set_id), prefix="figures_", block="figures")
    flash(request, f"The automatic figures are being computed (job #{job.id}).", "success")
    return redirect(request, f"/evaluations/{prompt_set_id}")


@router.get("/{prompt_set_id}/votes.jsonl")
def votes_download(session: SessionDep, user: EngineerUser, prompt_set_id: Id):
    evaluation.get_evaluation(session, prompt_set_id)
    plan = export.plan_export(session, kind="votes", fmt="votes",
                              filters=export.parse_filters(prompt_set_ids=prompt_set_id))
    return stream(session, plan)
