"""Starting reward-model (`train_reward`) and PPO (`train_ppo`) runs, the data they
read, the samples they leave for reading side by side, and promoting a trained
policy to be the generator of a prompt set (closing the loop generate -> label
-> train -> generate).

The web process checks settings and data and writes the job; the worker
(trainer/reward_job.py, trainer/ppo_job.py) trains and registers the result.
No torch here: the settings are trainer.configs.RewardConfig's and PPOConfig's.
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app import queue
from app.db.enums import JobKind, ModelKind, PromptSetKind, PromptSetStatus, Split
from app.db.models import Annotation, Job, Model, ModelSample, Prompt, PromptSet, Response, Task, User
from app.services import export
from app.services.errors import Conflict, Invalid, NotFound
from app.services.jobs import enqueue_job
from app.services.prompt_sets import GENERATOR_KINDS, default_generator_model, queue_generation_if_needed
from app.services.run_settings import clean_config, parse_ids, settings_of
from app.services.validation import as_id, text_problem
from trainer.configs import PPOConfig, RewardConfig

MAX_NAME_CHARS = 200
VALIDATION_SHARE = 0.1  # of the prompts, borrowed for validation when none is in the validation split
SAMPLE_PROMPTS = 8  # fixed prompts an SFT run is sampled on before and after

REWARD_SETTINGS = settings_of(RewardConfig)  # what a form or an API call may set
PPO_SETTINGS = settings_of(PPOConfig)


# ---- choices the forms offer --------------------------------------------------------

def ranking_sets(session: Session) -> list[PromptSet]:
    return list(session.scalars(select(PromptSet).where(PromptSet.kind == PromptSetKind.ranking)
                                .order_by(PromptSet.status == PromptSetStatus.archived, PromptSet.name)))


def demonstration_sets(session: Session) -> list[PromptSet]:
    return list(session.scalars(select(PromptSet).where(PromptSet.kind == PromptSetKind.demonstration)
                                .order_by(PromptSet.status == PromptSetStatus.archived, PromptSet.name)))


def models_of(session: Session, kinds: Iterable[ModelKind]) -> list[Model]:
    """Registered models of the kinds, defaults first, then newest."""
    return list(session.scalars(
        select(Model).where(Model.kind.in_(list(kinds)))
        .order_by(Model.is_default.desc(), Model.kind, Model.created_at.desc(), Model.id.desc())
    ))


def labelers_with_annotations(session: Session, prompt_set_ids: Sequence[int] | None = None) -> list[tuple[User, int]]:
    """(labeler, included annotations) of the ranking sets (all of them when None)."""
    query = (
        select(User, func.count(Annotation.id))
        .join(Annotation, Annotation.user_id == User.id)
        .join(Task, Task.id == Annotation.task_id)
        .join(PromptSet, PromptSet.id == Task.prompt_set_id)
        .where(Annotation.excluded.is_(False), Task.is_gold.is_(False), PromptSet.kind == PromptSetKind.ranking)
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

def _model(errors: dict[str, str], session: Session, field: str, raw: Any, kinds: Sequence[ModelKind],
           default: Model | None, what: str) -> Model | None:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        if default is None:
            errors[field] = f"register {what} first (none is registered)"
        return default
    model_id = as_id(raw)
    model = session.get(Model, model_id) if model_id is not None else None
    if model is None or model.kind not in kinds:
        errors[field] = f"choose {what} from the list"
        return None
    return model


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


def _raise(errors: dict[str, str]) -> None:
    if errors:
        raise Invalid("Please correct the highlighted fields: " + ", ".join(errors) + ".", errors=errors)


def default_reward_model(session: Session) -> Model | None:
    """The default reward model, else the newest one."""
    return session.scalar(select(Model).where(Model.kind == ModelKind.reward)
                          .order_by(Model.is_default.desc(), Model.created_at.desc(), Model.id.desc()).limit(1))


def clean_reward_params(session: Session, *, values: Mapping[str, Any], base_model_id: Any = None,
                        prompt_set_ids: Any = None, labeler_ids: Any = None, name: Any = None,
                        flags_from_form: bool = False) -> dict[str, Any]:
    """Check a reward-model run; the job's parameters. Raises Invalid with a message per
    field (base_model_id, prompt_set_ids, labeler_ids, name and each setting)."""
    errors: dict[str, str] = {}
    base = _model(errors, session, "base_model_id", base_model_id, GENERATOR_KINDS,
                  default_generator_model(session), "an SFT or policy model")
    set_ids = _sets(errors, session, "prompt_set_ids", prompt_set_ids, PromptSetKind.ranking, required=True)
    user_ids = parse_ids(errors, "labeler_ids", labeler_ids, "labeler")
    if user_ids:
        known = set(session.scalars(select(User.id).where(User.id.in_(user_ids))))
        if missing := [u for u in user_ids if u not in known]:
            errors["labeler_ids"] = f"unknown labeler {missing[0]}"
    if set_ids and "labeler_ids" not in errors:
        prompts = session.scalar(
            select(func.count(func.distinct(Task.prompt_id))).join(Annotation, Annotation.task_id == Task.id)
            .where(Annotation.id.in_(export.included_annotations_query(set_ids, user_ids=user_ids or None)))
        ) or 0
        if prompts < 2:
            errors["prompt_set_ids"] = (f"the chosen data ranks responses to {prompts} prompt"
                                        f"{'s' if prompts != 1 else ''}; at least 2 are needed"
                                        " (one to train on, one to validate on)")
    config = clean_config(values, RewardConfig, errors, flags_from_form=flags_from_form)
    clean_name = _name(errors, session, name)
    _raise(errors)
    assert base is not None
    return {"base_model_id": base.id, "prompt_set_ids": set_ids, "labeler_ids": user_ids or None,
            "name": clean_name, "config": config}


def clean_ppo_params(session: Session, *, values: Mapping[str, Any], policy_model_id: Any = None,
                     reference_model_id: Any = None, reward_model_id: Any = None, prompt_set_ids: Any = None,
                     sft_set_ids: Any = None, name: Any = None, flags_from_form: bool = False) -> dict[str, Any]:
    """Check a PPO run; the job's parameters. Prompts are the rl split of the chosen sets;
    the reference defaults to the policy (frozen copy). Raises Invalid per field."""
    errors: dict[str, str] = {}
    policy = _model(errors, session, "policy_model_id", policy_model_id, GENERATOR_KINDS,
                    default_generator_model(session), "an SFT or policy model")
    reference = _model(errors, session, "reference_model_id", reference_model_id, GENERATOR_KINDS,
                       policy, "an SFT or policy model")
    reward = _model(errors, session, "reward_model_id", reward_model_id, (ModelKind.reward,),
                    default_reward_model(session), "a reward model")
    set_ids = _sets(errors, session, "prompt_set_ids", prompt_set_ids, PromptSetKind.ranking, required=True)
    if set_ids:
        rl = session.scalar(select(func.count(Prompt.id)).where(Prompt.prompt_set_id.in_(set_ids),
                                                                 Prompt.split == Split.rl)) or 0
        if rl == 0:
            errors["prompt_set_ids"] = "the chosen sets have no prompt in the rl split"
    config = clean_config(values, PPOConfig, errors, flags_from_form=flags_from_form)
    batch, mini = config.get("batch_size"), config.get("mini_batch_size")
    if isinstance(batch, int) and isinstance(mini, int) and (mini > batch or batch % mini):
        errors["mini_batch_size"] = f"must divide the batch size ({batch})"
    steps, warmup = config.get("steps"), config.get("value_warmup_steps")
    if isinstance(steps, int) and isinstance(warmup, int) and warmup >= steps:
        errors["value_warmup_steps"] = f"must be below the number of steps ({steps}): the policy would never train"
    sft_ids = _sets(errors, session, "sft_set_ids", sft_set_ids, PromptSetKind.demonstration, required=False)
    ptx = config.get("ptx_coef")
    if isinstance(ptx, float) and ptx > 0 and not sft_ids and "sft_set_ids" not in errors:
        errors["sft_set_ids"] = "a pretraining-loss coefficient above 0 needs demonstration sets"
    clean_name = _name(errors, session, name)
    _raise(errors)
    assert policy is not None and reference is not None and reward is not None
    return {"policy_model_id": policy.id, "reference_model_id": reference.id, "reward_model_id": reward.id,
            "prompt_set_ids": set_ids, "sft_set_ids": sft_ids, "name": clean_name, "config": config}


def start_reward_job(session: Session, *, user_id: int | None, values: Mapping[str, Any],
                     queue_name: str = queue.GPU_QUEUE, **choices: Any) -> Job:
    """Queue a train_reward job (see clean_reward_params). Commits; nothing is queued on Invalid."""
    params = clean_reward_params(session, values=values, **choices)
    sets = params["prompt_set_ids"]
    return enqueue_job(session, kind=JobKind.train_reward, params=params, created_by_id=user_id,
                       prompt_set_id=sets[0] if len(sets) == 1 else None, queue=queue_name)


def start_ppo_job(session: Session, *, user_id: int | None, values: Mapping[str, Any],
                  queue_name: str = queue.GPU_QUEUE, **choices: Any) -> Job:
    """Queue a train_ppo job (see clean_ppo_params). Commits; nothing is queued on Invalid."""
    params = clean_ppo_params(session, values=values, **choices)
    sets = params["prompt_set_ids"]
    return enqueue_job(session, kind=JobKind.train_ppo, params=params, created_by_id=user_id,
                       prompt_set_id=sets[0] if len(sets) == 1 else None, queue=queue_name)


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


def reward_data(session: Session, prompt_set_ids: Sequence[int],
                labeler_ids: Sequence[int] | None = None) -> tuple[list[export.RankedAnnotation], list[export.RankedAnnotation]]:
    """(train, validation) annotations: validation holds prompts never trained on."""
    items = list(export.iter_ranked_annotations(session, prompt_set_ids, user_ids=labeler_ids))
    validation = split_by_prompt([a.prompt_id for a in items],
                                 {a.prompt_id for a in items if a.split == Split.validation})
    return ([a for a in items if a.prompt_id not in validation], [a for a in items if a.prompt_id in validation])


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


@dataclass(frozen=True)
class PromptRow:
    prompt_id: int
    messages: list[dict[str, str]]


def prompts_of(session: Session, prompt_set_ids: Sequence[int], split: Split, *,
               limit: int | None = None) -> list[PromptRow]:
    """Prompts of the sets in a split, in id order."""
    query = (select(Prompt.id, Prompt.messages).where(Prompt.prompt_set_id.in_(list(prompt_set_ids)),
                                                     Prompt.split == split).order_by(Prompt.id))
    if limit is not None:
        query = query.limit(limit)
    return [PromptRow(pid, list(messages)) for pid, messages in session.execute(query)]


def sample_prompts(session: Session, prompt_set_ids: Sequence[int], *, limit: int = SAMPLE_PROMPTS) -> list[PromptRow]:
    """The fixed prompts a run is sampled on before and after: the validation split,
    topped up from the rl split, then train, in id order."""
    rows: list[PromptRow] = []
    for split in (Split.validation, Split.rl, Split.train):
        if len(rows) >= limit:
            break
        rows += prompts_of(session, prompt_set_ids, split, limit=limit - len(rows))
    return rows


# ---- samples side by side -----------------------------------------------------------

def save_samples(session: Session, *, model_id: int, stage: str, samples: Sequence[Mapping[str, Any]],
                 prompts: Sequence[PromptRow]) -> None:
    """Store a model's samples of one stage ("before": its starting point; "after":
    the model). samples[i] answers prompts[i]: {"response", "reward" (or None), "ended"}.
    Replaces earlier ones of the stage. Does not commit."""
    if stage not in ("before", "after"):
        raise ValueError(f"unknown stage {stage!r}")
    session.execute(delete(ModelSample).where(ModelSample.model_id == model_id, ModelSample.stage == stage))
    for position, (prompt, sample) in enumerate(zip(prompts, samples, strict=True)):
        reward = sample.get("reward")
        session.add(ModelSample(model_id=model_id, prompt_id=prompt.prompt_id, position=position, stage=stage,
                                messages=prompt.messages, response=str(sample["response"]),
                                reward=None if reward is None else float(reward),
                                ended=bool(sample.get("ended", True))))


@dataclass
class SidePair:
    position: int
    prompt_id: int | None
    messages: list[dict[str, str]]
    before: ModelSample | None
    after: ModelSample | None


def side_by_side(session: Session, model_id: int) -> list[SidePair]:
    """The model's samples, before and after, one row per prompt."""
    rows: dict[int, SidePair] = {}
    for sample in session.scalars(select(ModelSample).where(ModelSample.model_id == model_id)
                                  .order_by(ModelSample.position, ModelSample.stage)):
        pair = rows.setdefault(sample.position, SidePair(sample.position, sample.prompt_id, list(sample.messages),
                                                         None, None))
        setattr(pair, sample.stage, sample)
    return [rows[p] for p in sorted(rows)]


# ---- the registry: lineage and promotion ------------------------------------------

def get_model(session: Session, model_id: int) -> Model:
    model = session.get(Model, model_id)
    if model is None:
        raise NotFound(f"No model with id {model_id}.")
    return model


def lineage(session: Session, model: Model) -> list[Model]:
    """The model's ancestors through parent_id, nearest first (cycles cut)."""
    chain: list[Model] = []
    seen = {model.id}
    current = model.parent
    while current is not None and current.id not in seen:
        chain.append(current)
        seen.add(current.id)
        current = current.parent
    return chain


def related_models(session: Session, model: Model) -> dict[str, Model | None]:
    """Models a run used besides its parent: the reward model and reference of a policy."""
    out: dict[str, Model | None] = {}
    for key in ("reward_model_id", "reference_model_id", "base_model_id"):
        raw = (model.config or {}).get(key)
        if isinstance(raw, int):
            out[key.removesuffix("_model_id")] = session.get(Model, raw)
    return out


def children(session: Session, model: Model) -> list[Model]:
    return list(session.scalars(select(Model).where(Model.parent_id == model.id).order_by(Model.id)))


def generator_of(session: Session, model: Model) -> list[PromptSet]:
    """Ranking sets this model generates for."""
    return list(session.scalars(select(PromptSet).where(PromptSet.generator_model_id == model.id)
                                .order_by(PromptSet.name)))


def promote_generator(session: Session, *, model_id: Any, prompt_set_id: Any, user_id: int | None) -> tuple[PromptSet, Job | None]:
    """Make the model the generator of a ranking set and open a new generation round:
    every prompt gets K fresh responses from it, as new tasks. The generation job is
    queued now when the set is active (else when it is started or resumed). Raises
    Invalid for a model that cannot generate or a set that is not a ranking set,
    Conflict for an archived set. Commits."""
    errors: dict[str, str] = {}
    model = _model(errors, session, "model_id", model_id, GENERATOR_KINDS, None, "an SFT or policy model")
    set_ids = parse_ids(errors, "prompt_set_id", prompt_set_id, "prompt set")
    prompt_set = session.get(PromptSet, set_ids[0]) if len(set_ids) == 1 else None
    if "prompt_set_id" not in errors and (prompt_set is None or prompt_set.kind != PromptSetKind.ranking):
        errors["prompt_set_id"] = "choose a ranking prompt set"
    _raise(errors)
    assert model is not None and prompt_set is not None
    session.refresh(prompt_set, with_for_update=True)
    if prompt_set.status == PromptSetStatus.archived:
        raise Conflict(f"The prompt set '{prompt_set.name}' is archived: it takes no new round.")
    prompt_set.generator_model_id = model.id
    prompt_set.round += 1
    job = queue_generation_if_needed(session, prompt_set=prompt_set, created_by_id=user_id)
    session.commit()
    return prompt_set, job
