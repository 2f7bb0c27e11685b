"""JSON API of training runs: start SFT, reward-model, PPO, DPO and best-of-N jobs (follow them with
/api/v1/jobs), the settings each accepts with their defaults, and the memory a run would need."""

from collections.abc import Sequence

from fastapi import APIRouter, status

from app.routes.deps import EngineerUser, SessionDep
from app.schemas.common import problem_response
from app.schemas.jobs import JobOut, job_out
from app.schemas.training import (
    BestOfNRunIn,
    DPORunIn,
    EstimateIn,
    EstimateOut,
    PPORunIn,
    RewardRunIn,
    SettingOut,
    SFTRunIn,
    TrainingSettingsOut,
)
from app.services import training
from app.services.run_settings import Setting

router = APIRouter(prefix="/training", tags=["training"])

_422 = {422: problem_response("Nothing queued; `errors` names each bad field (`memory`: the run cannot fit the"
                                 " workers' devices, with settings that would).")}
_422_ESTIMATE = {422: problem_response("`errors` names each bad field.")}


def _settings_out(settings: Sequence[Setting]) -> list[SettingOut]:
    return [SettingOut(name=s.name, label=s.title, type=s.kind.__name__, default=s.default,
                       low=None if s.kind in (bool, str) else s.low, high=None if s.kind in (bool, str) else s.high,
                       choices=list(s.choices) or None, optional=s.optional, help=s.help) for s in settings]


@router.get("/settings", response_model=TrainingSettingsOut)
def settings(user: EngineerUser):
    """What `config` may hold for each kind of run, with defaults and ranges."""
    return TrainingSettingsOut(sft=_settings_out(training.SFT_SETTINGS), reward=_settings_out(training.REWARD_SETTINGS),
                               ppo=_settings_out(training.PPO_SETTINGS), dpo=_settings_out(training.DPO_SETTINGS),
                               best_of_n=_settings_out(training.BEST_OF_N_SETTINGS))


@router.post("/estimate", response_model=EstimateOut, responses=_422_ESTIMATE)
def estimate(body: EstimateIn, session: SessionDep, user: EngineerUser):
    """The peak memory per device a run would need on the workers, before it is queued; the start
    endpoints refuse a run that does not fit, with the same message."""
    return training.estimate_memory(session, kind=body.kind, values=body.config, model_id=body.model_id,
                                    reference_model_id=body.reference_model_id, prompt_set_ids=body.prompt_set_ids,
                                    processes=body.processes)


@router.post("/sft", response_model=JobOut, status_code=status.HTTP_201_CREATED, responses=_422)
def start_sft(body: SFTRunIn, session: SessionDep, user: EngineerUser):
    job = training.start_sft_job(session, user_id=user.id, base_model_id=body.base_model_id,
                                 prompt_set_ids=body.prompt_set_ids, values=body.config, name=body.name,
                                 processes=body.processes)
    return job_out(job)


@router.post("/reward", response_model=JobOut, status_code=status.HTTP_201_CREATED, responses=_422)
def start_reward(body: RewardRunIn, session: SessionDep, user: EngineerUser):
    job = training.start_reward_job(session, user_id=user.id, values=body.config,
                                    base_model_id=body.base_model_id, prompt_set_ids=body.prompt_set_ids,
                                    labeler_ids=body.labeler_ids, include_imported=body.include_imported,
                                    include_ai=body.include_ai, name=body.name, processes=body.processes)
    return job_out(job)


@router.post("/ppo", response_model=JobOut, status_code=status.HTTP_201_CREATED, responses=_422)
def start_ppo(body: PPORunIn, session: SessionDep, user: EngineerUser):
    job = training.start_ppo_job(session, user_id=user.id, values=body.config,
                                 policy_model_id=body.policy_model_id, reference_model_id=body.reference_model_id,
                                 reward_model_id=body.reward_model_id, prompt_set_ids=body.prompt_set_ids,
                                 sft_set_ids=body.sft_set_ids, name=body.name, processes=body.processes)
    return job_out(job)


@router.post("/dpo", response_model=JobOut, status_code=status.HTTP_201_CREATED, responses=_422)
def start_dpo(body: DPORunIn, session: SessionDep, user: EngineerUser):
    job = training.start_dpo_job(session, user_id=user.id, values=body.config,
                                 policy_model_id=body.policy_model_id, reference_model_id=body.reference_model_id,
                                 prompt_set_ids=body.prompt_set_ids, labeler_ids=body.labeler_ids,
                                 include_imported=body.include_imported, include_ai=body.include_ai, name=body.name,
                                 processes=body.processes)
    return job_out(job)


@router.post("/best-of-n", response_model=JobOut, status_code=status.HTTP_201_CREATED, responses=_422)
def start_best_of_n(body: BestOfNRunIn, session: SessionDep, user: EngineerUser):
    job = training.start_best_of_n_job(session, user_id=user.id, values=body.config,
                                       policy_model_id=body.policy_model_id, reward_model_id=body.reward_model_id,
                                       prompt_set_ids=body.prompt_set_ids, split=body.split, use=body.use)
    return job_out(job)
