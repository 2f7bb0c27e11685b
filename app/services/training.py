"""Training runs: starting supervised fine-tuning (`train_sft`), reward-model
(`train_reward`), PPO (`train_ppo`), DPO (`train_dpo`) and best-of-N
(`best_of_n`) runs, and the data each reads.

The web process checks settings and data and writes the job; the worker
(trainer/sft_job.py, reward_job.py, ppo_job.py, dpo_job.py, best_of_n_job.py)
trains and registers the result in the model registry (app/services/models.py).
No torch here: the settings are trainer.configs' dataclasses.
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import queue
from app.db.enums import DemonstrationStatus, JobKind, ModelKind, PromptSetKind, PromptSetStatus, Split, UserKind
from app.db.models import Annotation, Demonstration, Job, Model, Prompt, PromptSet, Response, Task, User
from app.services import export, models, run_memory, worker_devices
from app.services.errors import Invalid, raise_for_fields
from app.services.jobs import enqueue_job
from app.services.prompt_sets import GENERATOR_KINDS, default_generator_model
from app.services.run_settings import clean_config, parse_ids, reject_unknown, settings_of
from app.services.validation import as_id, text_problem
from trainer.configs import BestOfNConfig, DPOConfig, PPOConfig, RewardConfig, SFTConfig

MAX_NAME_CHARS = 200
MIN_DEMONSTRATIONS = 2  # SFT: one to train on and one to validate on, at least
VALIDATION_SHARE = 0.1  # of the prompts, borrowed for validation when none is in the validation split
SAMPLE_PROMPTS = 8  # fixed prompts an SFT run is sampled on before and after

# What a form or an API call may set; the other fields keep their defaults.
SFT_SETTINGS = settings_of(SFTConfig)
REWARD_SETTINGS = settings_of(RewardConfig)
PPO_SETTINGS = settings_of(PPOConfig)
DPO_SETTINGS = settings_of(DPOConfig)
BEST_OF_N_SETTINGS = settings_of(BestOfNConfig)


# ---- choices the forms offer --------------------------------------------------------

def ranking_sets(session: Session) -> list[PromptSet]:
    return list(session.scalars(select(PromptSet).where(PromptSet.kind == PromptSetKind.ranking)
                                .order_by(PromptSet.status == PromptSetStatus.archived, PromptSet.name)))


def accepted_counts(session: Session, prompt_set_ids: Iterable[int]) -> dict[int, int]:
    """Accepted demonstrations per set."""
    ids = list(prompt_set_ids)
    if not ids:
        return {}
    rows = session.execute(
        select(Prompt.prompt_set_id, func.count(Demonstration.id))
        .join(Demonstration, Demonstration.prompt_id == Prompt.id)
        .where(Prompt.prompt_set_id.in_(ids), Demonstration.status == DemonstrationStatus.accepted)
        .group_by(Prompt.prompt_set_id)
    ).all()
    return {set_id: 0 for set_id in ids} | dict(rows)


def labelers_with_annotations(session: Session, prompt_set_ids: Sequence[int] | None = None) -> list[tuple[User, int]]:
    """(labeler, included annotations) of the ranking sets (all of them when None); human
    labelers only (AI labelers' annotations are chosen with include_ai)."""
    query = (
        select(User, func.count(Annotation.id))
        .join(Annotation, Annotation.user_id == User.id)
        .join(Task, Task.id == Annotation.task_id)
        .join(PromptSet, PromptSet.id == Task.prompt_set_id)
        .where(Annotation.excluded.is_(False), Task.is_gold.is_(False), PromptSet.kind == PromptSetKind.ranking,
               User.kind == UserKind.human)
        .group_by(User.id).order_by(User.username)
    )
    if prompt_set_ids is not None:
        query = query.where(Task.prompt_set_id.in_(list(prompt_set_ids)))
    return [(user, count) for user, count in session.execute(query)]


def annotation_counts(session: Session, prompt_set_ids: Sequence[int]) -> dict[int, int]:
    """Included annotations per ranking set."""
    if not prompt_set_ids:
        return {}
    included = export.included_annotations_query(prompt_set_ids)
    rows = session.execute(
        select(Task.prompt_set_id, func.count(Annotation.id))
        .join(Task, Task.id == Annotation.task_id)
        .where(Annotation.id.in_(included)).group_by(Task.prompt_set_id)
    ).all()
    return {set_id: 0 for set_id in prompt_set_ids} | dict(rows)


def split_counts(session: Session, prompt_set_ids: Sequence[int], split: Split) -> dict[int, int]:
    """Prompts of a split per set."""
    if not prompt_set_ids:
        return {}
    rows = session.execute(select(Prompt.prompt_set_id, func.count(Prompt.id))
                           .where(Prompt.prompt_set_id.in_(list(prompt_set_ids)), Prompt.split == split)
                           .group_by(Prompt.prompt_set_id)).all()
    return {set_id: 0 for set_id in prompt_set_ids} | dict(rows)


def ppo_prompt_counts(session: Session, prompt_set_ids: Sequence[int]) -> dict[int, str]:
    """Per set, what a PPO run takes from it: rl prompts to train on, validation prompts held out."""
    rl, validation = (split_counts(session, prompt_set_ids, s) for s in (Split.rl, Split.validation))
    return {i: f"{rl[i]} rl / {validation[i]} validation" for i in prompt_set_ids}


# ---- checking what a run may use ------------------------------------------------

def _sets(errors: dict[str, str], session: Session, field: str, raw: Any, kind: PromptSetKind,
          *, required: bool) -> list[int]:
    ids = parse_ids(errors, field, raw, "prompt set")
    if field in errors:
        return []
    if not ids:
        if required:
            errors[field] = f"choose at least one {kind.value} set"
        return []
    found = {s.id: s for s in session.scalars(select(PromptSet).where(PromptSet.id.in_(ids)))}
    wrong = [i for i in ids if i not in found or found[i].kind != kind]
    if wrong:
        errors[field] = f"prompt set {wrong[0]} is not a {kind.value} set"
        return []
    return ids


def _name(errors: dict[str, str], session: Session, raw: Any) -> str | None:
    name = str(raw or "").strip()
    if len(name) > MAX_NAME_CHARS:
        errors["name"] = f"at most {MAX_NAME_CHARS} characters"
    elif text_problem(name):
        errors["name"] = text_problem(name)
    elif name and session.scalar(select(Model.id).where(Model.name == name)) is not None:
        errors["name"] = "a model of that name is already registered"
    return name or None


def clean_sft_params(session: Session, *, base_model_id: Any, prompt_set_ids: Iterable[Any],
                     values: Mapping[str, Any], name: str | None = None, processes: Any = None,
                     queue_name: str = queue.GPU_QUEUE, flags_from_form: bool = False) -> dict[str, Any]:
    """Check a run's settings and data; the job's parameters. Raises Invalid with a
    message per field (base_model_id, prompt_set_ids, processes, epochs, learning_rate ...)."""
    reject_unknown(values, SFTConfig)
    errors: dict[str, str] = {}
    # base model
    model = None
    if base_model_id is None or (isinstance(base_model_id, str) and not base_model_id.strip()):
        model = default_generator_model(session)
        if model is None:
            errors["base_model_id"] = "register a model first (no default model is registered)"
    else:
        model_id = as_id(base_model_id)
        model = session.get(Model, model_id) if model_id is not None else None
        if model is None or model.kind not in GENERATOR_KINDS:
            errors["base_model_id"] = "choose an SFT or policy model from the list"
            model = None
    # data
    set_ids: list[int] = []
    for raw in prompt_set_ids or []:
        set_id = as_id(raw)
        if set_id is None:
            errors["prompt_set_ids"] = f"unknown prompt set {str(raw)[:20]!r}"
        else:
            set_ids.append(set_id)
    set_ids = sorted(set(set_ids))
    if not set_ids and "prompt_set_ids" not in errors:
        errors["prompt_set_ids"] = "choose at least one demonstration set"
    elif set_ids:
        sets = {s.id: s for s in session.scalars(select(PromptSet).where(PromptSet.id.in_(set_ids)))}
        wrong = [i for i in set_ids if i not in sets or sets[i].kind != PromptSetKind.demonstration]
        if wrong:
            errors["prompt_set_ids"] = f"prompt set {wrong[0]} is not a demonstration set"
        else:
            accepted = sum(accepted_counts(session, set_ids).values())
            if accepted < MIN_DEMONSTRATIONS:
                errors["prompt_set_ids"] = (f"the chosen sets hold {accepted} accepted demonstration"
                                            f"{'s' if accepted != 1 else ''}; at least {MIN_DEMONSTRATIONS} are needed")
    # settings
    config = clean_config(values, SFTConfig, errors, flags_from_form=flags_from_form)
    clean_name = _name(errors, session, name)
    count = worker_devices.clean_processes(errors, session, processes, queue_name)
    raise_for_fields(errors)
    assert model is not None
    params = {"base_model_id": model.id, "prompt_set_ids": set_ids, "name": clean_name, "processes": count,
              "config": config}
    run_memory.check_fits(session, "sft", params)
    return params


def start_sft_job(session: Session, *, user_id: int | None, base_model_id: Any, prompt_set_ids: Iterable[Any],
                  values: Mapping[str, Any], name: str | None = None, processes: Any = None,
                  queue_name: str = queue.GPU_QUEUE, flags_from_form: bool = False) -> Job:
    """Queue a train_sft job on the accepted demonstrations of the sets. Raises Invalid
    per field (nothing is queued then). Commits."""
    params = clean_sft_params(session, base_model_id=base_model_id, prompt_set_ids=prompt_set_ids,
                              values=values, name=name, processes=processes, queue_name=queue_name,
                              flags_from_form=flags_from_form)
    return _enqueue_run(session, JobKind.train_sft, params, user_id=user_id, queue_name=queue_name)


def _enqueue_run(session: Session, kind: JobKind, params: dict[str, Any], *, user_id: int | None,
                 queue_name: str) -> Job:
    """Queue a training run on the checked params; a run on one set is filed under that set, a run
    of several processes waits on the queue of the workers that can start them."""
    sets = params["prompt_set_ids"]
    return enqueue_job(session, kind=kind, params=params, created_by_id=user_id,
                       prompt_set_id=sets[0] if len(sets) == 1 else None,
                       queue=queue.processes_queue(queue_name, params.get("processes", 1)))


def _ranking_data(errors: dict[str, str], session: Session, prompt_set_ids: Any, labeler_ids: Any,
                  include_imported: Any = True, include_ai: Any = False) -> tuple[list[int], list[int], bool, bool]:
    """The ranking sets, labelers (none: everyone), whether imported preference data
    counts (the default: it was imported into the set to bootstrap its models) and whether
    AI labelers' annotations count (only when asked: they are the model's own opinion) of a run
    on rankings (reward model, DPO), checked to rank responses to two prompts at least
    (one to train on, one to validate on)."""
    set_ids = _sets(errors, session, "prompt_set_ids", prompt_set_ids, PromptSetKind.ranking, required=True)
    user_ids = parse_ids(errors, "labeler_ids", labeler_ids, "labeler")
    if user_ids:
        known = set(session.scalars(select(User.id).where(User.id.in_(user_ids))))
        if missing := [u for u in user_ids if u not in known]:
            errors["labeler_ids"] = f"unknown labeler {missing[0]}"
    imported = _yes_no(errors, "include_imported", include_imported)
    ai = _yes_no(errors, "include_ai", include_ai)
    if set_ids and "labeler_ids" not in errors:
        included = export.included_annotations_query(set_ids, user_ids=user_ids or None, ranked_only=True,
                                                     include_imported=imported is not False, include_ai=ai is True)
        prompts = session.scalar(
            select(func.count(func.distinct(Task.prompt_id))).join(Annotation, Annotation.task_id == Task.id)
            .where(Annotation.id.in_(included))
        ) or 0
        if prompts < 2:
            errors["prompt_set_ids"] = (f"the chosen data ranks responses to {prompts} prompt"
                                        f"{'s' if prompts != 1 else ''}; at least 2 are needed"
                                        " (one to train on, one to validate on)")
    return set_ids, user_ids, imported is not False, ai is True


def clean_reward_params(session: Session, *, values: Mapping[str, Any], base_model_id: Any = None,
                        prompt_set_ids: Any = None, labeler_ids: Any = None, name: Any = None,
                        include_imported: Any = True, include_ai: Any = False, processes: Any = None,
                        queue_name: str = queue.GPU_QUEUE, flags_from_form: bool = False) -> dict[str, Any]:
    """Check a reward-model run; the job's parameters. Raises Invalid with a message per field
    (base_model_id, prompt_set_ids, labeler_ids, include_imported, include_ai, name, processes and each setting)."""
    reject_unknown(values, RewardConfig)
    errors: dict[str, str] = {}
    base = models.choose_model(errors, session, "base_model_id", base_model_id, GENERATOR_KINDS,
                  default_generator_model(session), "an SFT or policy model")
    set_ids, user_ids, imported, ai = _ranking_data(errors, session, prompt_set_ids, labeler_ids, include_imported,
                                                    include_ai)
    config = clean_config(values, RewardConfig, errors, flags_from_form=flags_from_form)
    clean_name = _name(errors, session, name)
    count = worker_devices.clean_processes(errors, session, processes, queue_name)
    raise_for_fields(errors)
    assert base is not None
    params = {"base_model_id": base.id, "prompt_set_ids": set_ids, "labeler_ids": user_ids or None,
              "include_imported": imported, "include_ai": ai, "name": clean_name, "processes": count,
              "config": config}
    run_memory.check_fits(session, "reward", params)
    return params


def _yes_no(errors: dict[str, str], field: str, raw: Any) -> bool | None:
    """A yes/no choice from JSON (true/false) or a form ("yes"/"no"); empty = yes."""
    if isinstance(raw, bool):
        return raw
    value = str(raw).strip().lower() if isinstance(raw, (str, int)) else None
    if value in ("", "yes", "true", "1", "on"):
        return True
    if value in ("no", "false", "0", "off"):
        return False
    errors[field] = "choose yes or no"
    return None


def clean_ppo_params(session: Session, *, values: Mapping[str, Any], policy_model_id: Any = None,
                     reference_model_id: Any = None, reward_model_id: Any = None, prompt_set_ids: Any = None,
                     sft_set_ids: Any = None, name: Any = None, processes: Any = None,
                     queue_name: str = queue.GPU_QUEUE, flags_from_form: bool = False) -> dict[str, Any]:
    """Check a PPO run; the job's parameters. Prompts are the rl split of the chosen sets;
    the reference defaults to the policy (frozen copy). Raises Invalid per field."""
    reject_unknown(values, PPOConfig)
    errors: dict[str, str] = {}
    policy = models.choose_model(errors, session, "policy_model_id", policy_model_id, GENERATOR_KINDS,
                    default_generator_model(session), "an SFT or policy model")
    reference = models.choose_model(errors, session, "reference_model_id", reference_model_id, GENERATOR_KINDS,
                       policy, "an SFT or policy model")
    reward = models.choose_model(errors, session, "reward_model_id", reward_model_id, (ModelKind.reward,),
                    models.default_reward_model(session), "a reward model")
    set_ids = _sets(errors, session, "prompt_set_ids", prompt_set_ids, PromptSetKind.ranking, required=True)
    if set_ids:
        rl = session.scalar(select(func.count(Prompt.id)).where(Prompt.prompt_set_id.in_(set_ids),
                                                                 Prompt.split == Split.rl)) or 0
        if rl == 0:
            errors["prompt_set_ids"] = "the chosen sets have no prompt in the rl split"
    config = clean_config(values, PPOConfig, errors, flags_from_form=flags_from_form)
    errors.update(PPOConfig.joint_problems(config))  # the trainer's own rules between settings
    sft_ids = _sets(errors, session, "sft_set_ids", sft_set_ids, PromptSetKind.demonstration, required=False)
    ptx = config.get("ptx_coef")
    if isinstance(ptx, float) and ptx > 0 and not sft_ids and "sft_set_ids" not in errors:
        errors["sft_set_ids"] = "a pretraining-loss coefficient above 0 needs demonstration sets"
    clean_name = _name(errors, session, name)
    count = worker_devices.clean_processes(errors, session, processes, queue_name)
    if count > 1 and "processes" not in errors:
        for field in ("batch_size", "mini_batch_size"):  # each process takes an equal share of every batch
            if isinstance(config.get(field), int) and config[field] % count and field not in errors:
                errors[field] = f"must be a multiple of the {count} processes"
    raise_for_fields(errors)
    assert policy is not None and reference is not None and reward is not None
    params = {"policy_model_id": policy.id, "reference_model_id": reference.id, "reward_model_id": reward.id,
              "prompt_set_ids": set_ids, "sft_set_ids": sft_ids, "name": clean_name, "processes": count,
              "config": config}
    run_memory.check_fits(session, "ppo", params)
    return params


def start_reward_job(session: Session, *, user_id: int | None, values: Mapping[str, Any],
                     queue_name: str = queue.GPU_QUEUE, **choices: Any) -> Job:
    """Queue a train_reward job (see clean_reward_params). Commits; nothing is queued on Invalid."""
    params = clean_reward_params(session, values=values, queue_name=queue_name, **choices)
    return _enqueue_run(session, JobKind.train_reward, params, user_id=user_id, queue_name=queue_name)


def start_ppo_job(session: Session, *, user_id: int | None, values: Mapping[str, Any],
                  queue_name: str = queue.GPU_QUEUE, **choices: Any) -> Job:
    """Queue a train_ppo job (see clean_ppo_params). Commits; nothing is queued on Invalid."""
    params = clean_ppo_params(session, values=values, queue_name=queue_name, **choices)
    return _enqueue_run(session, JobKind.train_ppo, params, user_id=user_id, queue_name=queue_name)


def clean_dpo_params(session: Session, *, values: Mapping[str, Any], policy_model_id: Any = None,
                     reference_model_id: Any = None, prompt_set_ids: Any = None, labeler_ids: Any = None,
                     include_imported: Any = True, include_ai: Any = False, name: Any = None,
                     processes: Any = None, queue_name: str = queue.GPU_QUEUE,
                     flags_from_form: bool = False) -> dict[str, Any]:
    """Check a DPO run; the job's parameters. Data: the included rankings of the sets, with or
    without imported preference data and AI labelers' rankings (as a reward model's); the reference defaults to the
    policy (a frozen copy). Raises Invalid per field (processes and each setting too)."""
    reject_unknown(values, DPOConfig)
    errors: dict[str, str] = {}
    policy = models.choose_model(errors, session, "policy_model_id", policy_model_id, GENERATOR_KINDS,
                                 default_generator_model(session), "an SFT or policy model")
    reference = models.choose_model(errors, session, "reference_model_id", reference_model_id, GENERATOR_KINDS,
                                    policy, "an SFT or policy model")
    set_ids, user_ids, imported, ai = _ranking_data(errors, session, prompt_set_ids, labeler_ids, include_imported,
                                                    include_ai)
    config = clean_config(values, DPOConfig, errors, flags_from_form=flags_from_form)
    clean_name = _name(errors, session, name)
    count = worker_devices.clean_processes(errors, session, processes, queue_name)
    raise_for_fields(errors)
    assert policy is not None and reference is not None
    params = {"policy_model_id": policy.id, "reference_model_id": reference.id, "prompt_set_ids": set_ids,
              "labeler_ids": user_ids or None, "include_imported": imported, "include_ai": ai, "name": clean_name,
              "processes": count, "config": config}
    run_memory.check_fits(session, "dpo", params)
    return params


def start_dpo_job(session: Session, *, user_id: int | None, values: Mapping[str, Any],
                  queue_name: str = queue.GPU_QUEUE, **choices: Any) -> Job:
    """Queue a train_dpo job (see clean_dpo_params). Commits; nothing is queued on Invalid."""
    params = clean_dpo_params(session, values=values, queue_name=queue_name, **choices)
    return _enqueue_run(session, JobKind.train_dpo, params, user_id=user_id, queue_name=queue_name)


BEST_OF_N_USES = ("demonstrations", "report")  # kept responses become demonstrations, or only the report


def clean_best_of_n_params(session: Session, *, values: Mapping[str, Any], policy_model_id: Any = None,
                           reward_model_id: Any = None, prompt_set_ids: Any = None, split: Any = None,
                           use: Any = None, flags_from_form: bool = False) -> dict[str, Any]:
    """Check a best-of-N run; the job's parameters. Prompts: the chosen split of the sets.
    use "demonstrations" needs demonstration sets: the kept responses are written to them as
    demonstrations (source best_of_n, submitted for review). Raises Invalid per field."""
    reject_unknown(values, BestOfNConfig)
    errors: dict[str, str] = {}
    policy = models.choose_model(errors, session, "policy_model_id", policy_model_id, GENERATOR_KINDS,
                                 default_generator_model(session), "an SFT or policy model")
    reward = models.choose_model(errors, session, "reward_model_id", reward_model_id, (ModelKind.reward,),
                                 models.default_reward_model(session), "a reward model")
    clean_use = str(use or "demonstrations").strip()
    if clean_use not in BEST_OF_N_USES:
        errors["use"] = f"one of {', '.join(BEST_OF_N_USES)}"
    clean_split = str(split or Split.train.value).strip()
    if clean_split not in {s.value for s in Split}:
        errors["split"] = f"one of {', '.join(s.value for s in Split)}"
    set_ids = parse_ids(errors, "prompt_set_ids", prompt_set_ids, "prompt set")
    if "prompt_set_ids" not in errors and not set_ids:
        errors["prompt_set_ids"] = "choose at least one prompt set"
    elif set_ids and "prompt_set_ids" not in errors:
        found = {s.id: s for s in session.scalars(select(PromptSet).where(PromptSet.id.in_(set_ids)))}
        if missing := [i for i in set_ids if i not in found]:
            errors["prompt_set_ids"] = f"unknown prompt set {missing[0]}"
        elif clean_use == "demonstrations" and (
                wrong := [i for i in set_ids if found[i].kind != PromptSetKind.demonstration]):
            errors["prompt_set_ids"] = (f"prompt set {wrong[0]} is not a demonstration set: kept responses"
                                        " become demonstrations of a demonstration set's prompts")
        elif "split" not in errors and not session.scalar(
                select(func.count(Prompt.id)).where(Prompt.prompt_set_id.in_(set_ids), Prompt.split == clean_split)):
            errors["prompt_set_ids"] = f"the chosen sets have no prompt in the {clean_split} split"
    config = clean_config(values, BestOfNConfig, errors, flags_from_form=flags_from_form)
    raise_for_fields(errors)
    assert policy is not None and reward is not None
    return {"policy_model_id": policy.id, "reward_model_id": reward.id, "prompt_set_ids": set_ids,
            "split": clean_split, "use": clean_use, "config": config}


def start_best_of_n_job(session: Session, *, user_id: int | None, values: Mapping[str, Any],
                        queue_name: str = queue.GPU_QUEUE, **choices: Any) -> Job:
    """Queue a best_of_n job (see clean_best_of_n_params). Commits; nothing is queued on Invalid."""
    params = clean_best_of_n_params(session, values=values, **choices)
    return _enqueue_run(session, JobKind.best_of_n, params, user_id=user_id, queue_name=queue_name)


# ---- memory ---------------------------------------------------------------------------

# The runs whose memory is estimated: their config and the field naming the trained model.
ESTIMATED = {"sft": (SFTConfig, "base_model_id"), "reward": (RewardConfig, "base_model_id"),
             "ppo": (PPOConfig, "policy_model_id"), "dpo": (DPOConfig, "policy_model_id")}


def estimate_memory(session: Session, *, kind: Any, values: Mapping[str, Any], model_id: Any = None,
                    reference_model_id: Any = None, prompt_set_ids: Any = None, processes: Any = None,
                    flags_from_form: bool = False) -> dict[str, Any]:
    """The memory per device a run would need on the workers (app/services/run_memory.py): the model
    (default: the default SFT model), its reference (PPO, DPO; default: the same model), the ranking sets
    (their K responses per ranking make the reward model's and DPO's batches), the processes (one per GPU,
    spread by the config's strategy) and the settings. Raises
    Invalid per field (kind, model_id, reference_model_id, prompt_set_ids, each setting)."""
    if kind not in ESTIMATED:
        raise_for_fields({"kind": f"one of {', '.join(ESTIMATED)}"})
    config_class, _ = ESTIMATED[kind]
    reject_unknown(values, config_class)
    errors: dict[str, str] = {}
    model = models.choose_model(errors, session, "model_id", model_id, GENERATOR_KINDS,
                                default_generator_model(session), "an SFT or policy model")
    reference = model
    if kind in ("ppo", "dpo"):
        reference = models.choose_model(errors, session, "reference_model_id", reference_model_id, GENERATOR_KINDS,
                                        model, "an SFT or policy model")
    set_ids = _sets(errors, session, "prompt_set_ids", prompt_set_ids, PromptSetKind.ranking, required=False) \
        if kind != "sft" else []
    count = worker_devices.whole_processes(errors, processes)
    config = clean_config(values, config_class, errors, flags_from_form=flags_from_form)
    raise_for_fields(errors)
    assert model is not None and reference is not None
    found = run_memory.estimate_run(kind, model, config, separate_reference=reference.id != model.id,
                                    processes=count, responses=run_memory.responses_per_ranking(session, set_ids))
    if found is None:
        raise_for_fields({"model_id": "its config.json cannot be read on this machine: its size is unknown"})
    return found


def form_estimate(session: Session, kind: str, form: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """estimate_memory for a training form's fields (the defaults when None); None while they make no run."""
    form = form or {}
    config_class, model_field = ESTIMATED[kind]
    known = {s.name for s in settings_of(config_class)}
    try:
        return estimate_memory(session, kind=kind, values={k: v for k, v in form.items() if k in known},
                               model_id=form.get(model_field), reference_model_id=form.get("reference_model_id"),
                               prompt_set_ids=form.get("prompt_set_ids") or None,
                               processes=form.get("processes"), flags_from_form=bool(form))
    except Invalid:
        return None


# ---- the data a job reads (in the worker) ---------------------------------------------

def split_by_prompt(prompt_ids: Sequence[int], validation: set[int]) -> set[int]:
    """The validation prompts: those of the validation split, else the last ~10% of
    the prompts in id order (at least one, when there are two or more)."""
    if validation:
        return validation
    prompts = sorted(set(prompt_ids))
    if len(prompts) < 2:
        return set()
    take = max(1, round(VALIDATION_SHARE * len(prompts)))
    return set(prompts[len(prompts) - take:])


def reward_data(session: Session, prompt_set_ids: Sequence[int], labeler_ids: Sequence[int] | None = None,
                include_imported: bool = True,
                include_ai: bool = False) -> tuple[list[export.RankedAnnotation], list[export.RankedAnnotation]]:
    """(train, validation) annotations: validation holds prompts never trained on."""
    items = list(export.iter_ranked_annotations(session, prompt_set_ids, user_ids=labeler_ids,
                                                include_imported=include_imported, include_ai=include_ai))
    validation = split_by_prompt([a.prompt_id for a in items],
                                 {a.prompt_id for a in items if a.split == Split.validation})
    return ([a for a in items if a.prompt_id not in validation], [a for a in items if a.prompt_id in validation])


def ranked_pairs(ranks: Sequence[int]) -> int:
    """The comparisons a ranking gives: pairs of responses ranked apart (ties give none)."""
    return sum(1 for a in ranks for b in ranks if a < b)


def ranking_snapshot(train_items: Sequence[export.RankedAnnotation],
                     validation_items: Sequence[export.RankedAnnotation]) -> dict[str, Any]:
    """The data a run on rankings saw, as its model records it: which annotations (hence which
    comparisons) trained and validated it."""

    return {
        "annotation_ids": [a.annotation_id for a in train_items if a.review_id is None],
        "validation_annotation_ids": [a.annotation_id for a in validation_items if a.review_id is None],
        # Reviewers' corrections that stood in for their tasks' annotations (app/services/review).
        "review_ids": [a.review_id for a in train_items if a.review_id is not None],
        "validation_review_ids": [a.review_id for a in validation_items if a.review_id is not None],
        "comparisons": sum(ranked_pairs(a.ranks) for a in train_items),
        "validation_comparisons": sum(ranked_pairs(a.ranks) for a in validation_items),
    }


MIN_NORMALISATION_SAMPLES = 16
MAX_NORMALISATION_SAMPLES = 1024


def responses_of_model(session: Session, prompt_set_ids: Sequence[int], model_id: int, *,
                       limit: int = MAX_NORMALISATION_SAMPLES) -> list[tuple[list[dict[str, str]], str]]:
    """(prompt messages, response) generated by the model for the sets' prompts, in id
    order: the samples a reward model is normalised on (InstructGPT: the SFT model's)."""
    rows = session.execute(
        select(Prompt.messages, Response.text).join(Response, Response.prompt_id == Prompt.id)
        .where(Prompt.prompt_set_id.in_(list(prompt_set_ids)), Response.model_id == model_id)
        .order_by(Response.id).limit(limit)
    ).all()
    return [(list(messages), text) for messages, text in rows]


def prompts_of(session: Session, prompt_set_ids: Sequence[int], split: Split, *,
               limit: int | None = None) -> list[models.PromptRow]:
    """Prompts of the sets in a split, in id order."""
    query = (select(Prompt.id, Prompt.messages).where(Prompt.prompt_set_id.in_(list(prompt_set_ids)),
                                                     Prompt.split == split).order_by(Prompt.id))
    if limit is not None:
        query = query.limit(limit)
    return [models.PromptRow(pid, list(messages)) for pid, messages in session.execute(query)]


def sample_prompts(session: Session, prompt_set_ids: Sequence[int], *,
                   limit: int = SAMPLE_PROMPTS) -> list[models.PromptRow]:
    """The fixed prompts a run is sampled on before and after: the validation split,
    topped up from the rl split, then train, in id order."""
    rows: list[models.PromptRow] = []
    for split in (Split.validation, Split.rl, Split.train):
        if len(rows) >= limit:
            break
        rows += prompts_of(session, prompt_set_ids, split, limit=limit - len(rows))
    return rows
