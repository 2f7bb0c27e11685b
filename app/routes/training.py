"""Engineer pages: start a supervised fine-tuning run (`train_sft`, on accepted
demonstrations), a reward-model run (`train_reward`), a PPO run (`train_ppo`), a DPO
run (`train_dpo`) or best-of-N sampling (`best_of_n`) and see the recent runs of each
(and the SFT models made so far)."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import FormData
from starlette.responses import Response

from app.db.enums import JobKind, ModelKind
from app.routes.deps import EngineerUser, SessionDep
from app.services import demonstrations as demos
from app import queue
from app.services import jobs, models, training, worker_devices
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


@dataclass(frozen=True)
class RunForm:
    """A training method's page: its template and context, and how its submitted form
    (`settings` plus the `choice_names` fields) starts a job with `start`."""
    template: str
    context: Callable[..., dict[str, Any]]
    settings: Any
    choice_names: tuple[str, ...]
    start: Callable[..., Any]
    what: str  # the job's name in the flash message
    block: str = "run_form"  # the form's block, what an htmx post gets back with the errors
    memory: str | None = None  # the kind of run whose memory the form shows (training.ESTIMATED)

    def _memory(self, session, form: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"memory": training.form_estimate(session, self.memory, form) if self.memory else None}

    def page(self, request: Request, session) -> Response:
        return render(request, self.template, self.context(session) | self._memory(session))

    def submit(self, request: Request, session, user, data: FormData) -> Response:
        """Queue the run and go to its job page, or show the form again with each error beside its field."""
        values = submitted_settings(data, self.settings)
        choices = _choices(data, *self.choice_names)
        try:
            job = self.start(session, user_id=user.id, values=values, flags_from_form=True, **choices)
        except Invalid as exc:
            context = self.context(session, form=values | choices) | self._memory(session, values | choices)
            return render_form_errors(request, exc, self.template, context, block=self.block, status_code=422)
        flash(request, f"Queued {self.what} job #{job.id}.", "success")
        return redirect(request, f"/jobs/{job.id}")


# ---- supervised fine-tuning --------------------------------------------------------

SFT_CHOICES = ("base_model_id", "prompt_set_ids", "name", "processes")


def _sft_context(session, *, form: dict[str, Any] | None = None) -> dict[str, Any]:
    sets = demos.demonstration_sets(session, include_archived=True)
    bases = models.models_of(session, GENERATOR_KINDS)
    default_form = form_values(training.SFT_SETTINGS) | {
        "base_model_id": str(bases[0].id) if bases else "", "prompt_set_ids": [], "name": "", "processes": "1",
    }
    return {
        "form": default_form | (form or {}), "form_errors": {},
        "models": bases, "sets": sets, "accepted": training.accepted_counts(session, [s.id for s in sets]),
        "settings": training.SFT_SETTINGS, "runs": jobs.list_jobs(session, kind=JobKind.train_sft, limit=20),
        "sft_models": models.sft_models(session),
        "processes_offered": worker_devices.most_processes(session, queue.GPU_QUEUE),
    }


SFT_FORM = RunForm(template="pages/sft.html", context=_sft_context,
                   settings=training.SFT_SETTINGS, choice_names=SFT_CHOICES,
                   start=training.start_sft_job, what="SFT", block="sft_form", memory="sft")


@sft_router.get("")
def sft_page(request: Request, session: SessionDep, user: EngineerUser):
    return SFT_FORM.page(request, session)


@sft_router.post("")
def start_sft(request: Request, session: SessionDep, user: EngineerUser, data: FormDep):
    return SFT_FORM.submit(request, session, user, data)


# ---- reward model -----------------------------------------------------------------

REWARD_CHOICES = ("base_model_id", "prompt_set_ids", "labeler_ids", "include_imported", "include_ai", "name", "processes")


def _reward_context(session, *, form: dict[str, Any] | None = None) -> dict[str, Any]:
    bases = models.models_of(session, GENERATOR_KINDS)
    sets = training.ranking_sets(session)
    default_form = form_values(training.REWARD_SETTINGS) | {
        "base_model_id": str(bases[0].id) if bases else "", "prompt_set_ids": [], "labeler_ids": [], "include_imported": "yes",
        "include_ai": "no", "name": "", "processes": "1"}
    return {
        "form": default_form | (form or {}), "form_errors": {},
        "bases": bases, "sets": sets, "counts": training.annotation_counts(session, [s.id for s in sets]),
        "labelers": training.labelers_with_annotations(session), "settings": training.REWARD_SETTINGS,
        "runs": jobs.list_jobs(session, kind=JobKind.train_reward, limit=20),
        "processes_offered": worker_devices.most_processes(session, queue.GPU_QUEUE),
    }


REWARD_FORM = RunForm(template="pages/training_reward.html", context=_reward_context,
                      settings=training.REWARD_SETTINGS, choice_names=REWARD_CHOICES,
                      start=training.start_reward_job, what="reward-model", memory="reward")


@router.get("/reward")
def reward_page(request: Request, session: SessionDep, user: EngineerUser):
    return REWARD_FORM.page(request, session)


@router.post("/reward")
def start_reward(request: Request, session: SessionDep, user: EngineerUser, data: FormDep):
    return REWARD_FORM.submit(request, session, user, data)


# ---- PPO ---------------------------------------------------------------------------

PPO_CHOICES = ("policy_model_id", "reference_model_id", "reward_model_id", "prompt_set_ids", "sft_set_ids", "name",
               "processes")


def _ppo_context(session, *, form: dict[str, Any] | None = None) -> dict[str, Any]:
    policies = models.models_of(session, GENERATOR_KINDS)
    rewards = models.models_of(session, (ModelKind.reward,))
    default_reward = models.default_reward_model(session)
    sets = training.ranking_sets(session)
    default_form = form_values(training.PPO_SETTINGS) | {
        "policy_model_id": str(policies[0].id) if policies else "", "reference_model_id": "",
        "reward_model_id": str(default_reward.id) if default_reward else "", "prompt_set_ids": [],
        "sft_set_ids": [], "name": "", "processes": "1"}
    return {
        "form": default_form | (form or {}), "form_errors": {},
        "policies": policies, "rewards": rewards, "sets": sets,
        "sft_sets": demos.demonstration_sets(session, include_archived=True),
        "rl_counts": training.ppo_prompt_counts(session, [s.id for s in sets]), "settings": training.PPO_SETTINGS,
        "runs": jobs.list_jobs(session, kind=JobKind.train_ppo, limit=20),
        "processes_offered": worker_devices.most_processes(session, queue.GPU_QUEUE),
    }


PPO_FORM = RunForm(template="pages/training_ppo.html", context=_ppo_context,
                   settings=training.PPO_SETTINGS, choice_names=PPO_CHOICES,
                   start=training.start_ppo_job, what="PPO", memory="ppo")


@router.get("/ppo")
def ppo_page(request: Request, session: SessionDep, user: EngineerUser):
    return PPO_FORM.page(request, session)


@router.post("/ppo")
def start_ppo(request: Request, session: SessionDep, user: EngineerUser, data: FormDep):
    return PPO_FORM.submit(request, session, user, data)


# ---- DPO ---------------------------------------------------------------------------

DPO_CHOICES = ("policy_model_id", "reference_model_id", "prompt_set_ids", "labeler_ids", "include_imported",
               "include_ai", "name", "processes")


def _dpo_context(session, *, form: dict[str, Any] | None = None) -> dict[str, Any]:
    policies = models.models_of(session, GENERATOR_KINDS)
    sets = training.ranking_sets(session)
    default_form = form_values(training.DPO_SETTINGS) | {
        "policy_model_id": str(policies[0].id) if policies else "", "reference_model_id": "",
        "prompt_set_ids": [], "labeler_ids": [], "include_imported": "yes", "include_ai": "no", "name": "",
        "processes": "1"}
    return {
        "form": default_form | (form or {}), "form_errors": {},
        "policies": policies, "sets": sets, "counts": training.annotation_counts(session, [s.id for s in sets]),
        "labelers": training.labelers_with_annotations(session), "settings": training.DPO_SETTINGS,
        "runs": jobs.list_jobs(session, kind=JobKind.train_dpo, limit=20),
        "processes_offered": worker_devices.most_processes(session, queue.GPU_QUEUE),
    }


DPO_FORM = RunForm(template="pages/training_dpo.html", context=_dpo_context,
                   settings=training.DPO_SETTINGS, choice_names=DPO_CHOICES,
                   start=training.start_dpo_job, what="DPO", memory="dpo")


@router.get("/dpo")
def dpo_page(request: Request, session: SessionDep, user: EngineerUser):
    return DPO_FORM.page(request, session)


@router.post("/dpo")
def start_dpo(request: Request, session: SessionDep, user: EngineerUser, data: FormDep):
    return DPO_FORM.submit(request, session, user, data)


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


BEST_OF_N_FORM = RunForm(template="pages/training_best_of_n.html", context=_best_of_n_context,
                         settings=training.BEST_OF_N_SETTINGS, choice_names=BEST_OF_N_CHOICES,
                         start=training.start_best_of_n_job, what="best-of-N")


@router.get("/best-of-n")
def best_of_n_page(request: Request, session: SessionDep, user: EngineerUser):
    return BEST_OF_N_FORM.page(request, session)


@router.post("/best-of-n")
def start_best_of_n(request: Request, session: SessionDep, user: EngineerUser, data: FormDep):
    return BEST_OF_N_FORM.submit(request, session, user, data)
