"""Engineer pages: start a supervised fine-tuning run (`train_sft`, on accepted
demonstrations), a reward-model run (`train_reward`), a PPO run (`train_ppo`), a DPO
run (`train_dpo`) or best-of-N sampling (`best_of_n`) and see the recent runs of each
(and the SFT models made so far)."""

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import FormData

from app.db.enums import JobKind, ModelKind
from app.routes.deps import EngineerUser, SessionDep
from app.services import demonstrations as demos
from app.services import jobs, models, training
from app.services.errors import Invalid
from app.services.prompt_sets import GENERATOR_KINDS
from app.services.run_settings import form_values, submitted_settings
from app.web import flash, redirect, render, render_form_errors

router = APIRouter(prefix="/training", include_in_schema=False)
sft_router = APIRouter(prefix="/sft", include_in_schema=False)


async def read_form(request: Request) -> FormData:
    return await request.form()


FormDep = Annotated[FormData, Depends(read_form)]


def _choices(data: FormData, *names: str) -> dict[str, Any]:
    """The model selects (a string each) and the set/labeler checkboxes (lists) of a form."""
    out: dict[str, Any] = {}
    for name in names:
        out[name] = [str(v) for v in data.getlist(name)] if name.endswith("_ids") else str(data.get(name) or "")
    return out


def _start(request: Request, session, user, data: FormData, *, settings, choice_names, start: Callable[..., Any],
           context: Callable[..., dict[str, Any]], template: str, what: str, block: str = "run_form"):
    """Queue the run and go to its job page, or show the form again with each error beside its field."""
    values = submitted_settings(data, settings)
    choices = _choices(data, *choice_names)
    try:
        job = start(session, user_id=user.id, values=values, flags_from_form=True, **choices)
    except Invalid as exc:
        return render_form_errors(request, exc, template, context(session, form=values | choices), block=block,
                                  status_code=422)
    flash(request, f"Queued {what} job #{job.id}.", "success")
    return redirect(request, f"/jobs/{job.id}")


# ---- supervised fine-tuning --------------------------------------------------------

SFT_CHOICES = ("base_model_id", "prompt_set_ids", "name")


def _sft_context(session, *, form: dict[str, Any] | None = None) -> dict[str, Any]:
    sets = demos.demonstration_sets(session, include_archived=True)
    bases = models.models_of(session, GENERATOR_KINDS)
    default_form = form_values(training.SFT_SETTINGS) | {
        "base_model_id": str(bases[0].id) if bases else "", "prompt_set_ids": [], "name": "",
    }
    return {
        "form": default_form | (form or {}), "form_errors": {},
        "models": bases, "sets": sets, "accepted": training.accepted_counts(session, [s.id for s in sets]),
        "settings": training.SFT_SETTINGS, "runs": jobs.list_jobs(session, kind=JobKind.train_sft, limit=20),
        "sft_models": models.sft_models(session),
    }


@sft_router.get("")
def sft_page(request: Request, session: SessionDep, user: EngineerUser):
    return render(request, "pages/sft.html", _sft_context(session))


@sft_router.post("")
def start_sft(request: Request, session: SessionDep, user: EngineerUser, data: FormDep):
    return _start(request, session, user, data, settings=training.SFT_SETTINGS, choice_names=SFT_CHOICES,
                  start=training.start_sft_job, context=_sft_context, template="pages/sft.html", what="SFT",
                  block="sft_form")


# ---- reward model -----------------------------------------------------------------

REWARD_CHOICES = ("base_model_id", "prompt_set_ids", "labeler_ids", "include_imported", "name")


def _reward_context(session, *, form: dict[str, Any] | None = None) -> dict[str, Any]:
    bases = models.models_of(session, GENERATOR_KINDS)
    sets = training.ranking_sets(session)
    default_form = form_values(training.REWARD_SETTINGS) | {
        "base_model_id": str(bases[0].id) if bases else "", "prompt_set_ids": [], "labeler_ids": [], "include_imported": "yes",
        "name": ""}
    return {
        "form": default_form | (form or {}), "form_errors": {},
        "bases": bases, "sets": sets, "counts": training.annotation_counts(session, [s.id for s in sets]),
        "labelers": training.labelers_with_annotations(session), "settings": training.REWARD_SETTINGS,
        "runs": jobs.list_jobs(session, kind=JobKind.train_reward, limit=20),
    }


@router.get("/reward")
def reward_page(request: Request, session: SessionDep, user: EngineerUser):
    return render(request, "pages/training_reward.html", _reward_context(session))


@router.post("/reward")
def start_reward(request: Request, session: SessionDep, user: EngineerUser, data: FormDep):
    return _start(request, session, user, data, settings=training.REWARD_SETTINGS, choice_names=REWARD_CHOICES,
                  start=training.start_reward_job, context=_reward_context,
                  template="pages/training_reward.html", what="reward-model")


# ---- PPO ---------------------------------------------------------------------------

PPO_CHOICES = ("policy_model_id", "reference_model_id", "reward_model_id", "prompt_set_ids", "sft_set_ids", "name")


def _ppo_context(session, *, form: dict[str, Any] | None = None) -> dict[str, Any]:
    policies = models.models_of(session, GENERATOR_KINDS)
    rewards = models.models_of(session, (ModelKind.reward,))
    default_reward = models.default_reward_model(session)
    sets = training.ranking_sets(session)
    default_form = form_values(training.PPO_SETTINGS) | {
        "policy_model_id": str(policies[0].id) if policies else "", "reference_model_id": "",
        "reward_model_id": str(default_reward.id) if default_reward else "", "prompt_set_ids": [],
        "sft_set_ids": [], "name": ""}
    return {
        "form": default_form | (form or {}), "form_errors": {},
        "policies": policies, "rewards": rewards, "sets": sets,
        "sft_sets": demos.demonstration_sets(session, include_archived=True),
        "rl_counts": training.ppo_prompt_counts(session, [s.id for s in sets]), "settings": training.PPO_SETTINGS,
        "runs": jobs.list_jobs(session, kind=JobKind.train_ppo, limit=20),
    }


@router.get("/ppo")
def ppo_page(request: Request, session: SessionDep, user: EngineerUser):
    return render(request, "pages/training_ppo.html", _ppo_context(session))


@router.post("/ppo")
def start_ppo(request: Request, session: SessionDep, user: EngineerUser, data: FormDep):
    return _start(request, session, user, data, settings=training.PPO_SETTINGS, choice_names=PPO_CHOICES,
                  start=training.start_ppo_job, context=_ppo_context, template="pages/training_ppo.html",
                  what="PPO")


# ---- DPO ---------------------------------------------------------------------------

DPO_CHOICES = ("policy_model_id", "reference_model_id", "prompt_set_ids", "labeler_ids", "name")


def _dpo_context(session, *, form: dict[str, Any] | None = None) -> dict[str, Any]:
    policies = models.models_of(session, GENERATOR_KINDS)
    sets = training.ranking_sets(session)
    default_form = form_values(training.DPO_SETTINGS) | {
        "policy_model_id": str(policies[0].id) if policies else "", "reference_model_id": "",
        "prompt_set_ids": [], "labeler_ids": [], "name": ""}
    return {
        "form": default_form | (form or {}), "form_errors": {},
        "policies": policies, "sets": sets, "counts": training.annotation_counts(session, [s.id for s in sets]),
        "labelers": training.labelers_with_annotations(session), "settings": training.DPO_SETTINGS,
        "runs": jobs.list_jobs(session, kind=JobKind.train_dpo, limit=20),
    }


@router.get("/dpo")
def dpo_page(request: Request, session: SessionDep, user: EngineerUser):
    return render(request, "pages/training_dpo.html", _dpo_context(session))


@router.post("/dpo")
def start_dpo(request: Request, session: SessionDep, user: EngineerUser, data: FormDep):
    return _start(request, session, user, data, settings=training.DPO_SETTINGS, choice_names=DPO_CHOICES,
                  start=training.start_dpo_job, context=_dpo_context, template="pages/training_dpo.html",
                  what="DPO")


# ---- best-of-N ---------------------------------------------------------------------

BEST_OF_N_CHOICES = ("policy_model_id", "reward_model_id", "prompt_set_ids", "split", "use")


def _best_of_n_context(session, *, form: dict[str, Any] | None = None) -> dict[str, Any]:
    policies = models.models_of(session, GENERATOR_KINDS)
    rewards = models.models_of(session, (ModelKind.reward,))
    default_reward = models.default_reward_model(session)
    sets = demos.demonstration_sets(session, include_archived=True) + training.ranking_sets(session)
    default_form = form_values(training.BEST_OF_N_SETTINGS) | {
        "policy_model_id": str(policies[0].id) if policies else "",
        "reward_model_id": str(default_reward.id) if default_reward else "", "prompt_set_ids": [],
        "split": "train", "use": "demonstrations"}
    return {
        "form": default_form | (form or {}), "form_errors": {},
        "policies": policies, "rewards": rewards, "sets": sets,
        "kinds": {s.id: s.kind.value for s in sets}, "uses": training.BEST_OF_N_USES,
        "settings": training.BEST_OF_N_SETTINGS, "runs": jobs.list_jobs(session, kind=JobKind.best_of_n, limit=20),
    }


@router.get("/best-of-n")
def best_of_n_page(request: Request, session: SessionDep, user: EngineerUser):
    return render(request, "pages/training_best_of_n.html", _best_of_n_context(session))


@router.post("/best-of-n")
def start_best_of_n(request: Request, session: SessionDep, user: EngineerUser, data: FormDep):
    return _start(request, session, user, data, settings=training.BEST_OF_N_SETTINGS,
                  choice_names=BEST_OF_N_CHOICES, start=training.start_best_of_n_job, context=_best_of_n_context,
                  template="pages/training_best_of_n.html", what="best-of-N")
