"""The model registry: SFT, reward and policy checkpoints with their lineage, the
samples a run leaves for reading side by side, and promoting a trained policy to be
the generator of a prompt set (closing the loop generate -> label -> train -> generate).

A checkpoint is a directory (safetensors + config.json + tokenizer) stored under
the artifacts directory (its path is then kept relative to it, so the directory
can move) or anywhere else (absolute path), or a hub id for machines that can
reach a hub. The default model's name and directory, the hash of a checkpoint and
where a stored path points on a machine are trainer.models' (imported without
torch). No torch here: the web process lists and chooses models.
"""

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.enums import ModelKind, PromptSetKind, PromptSetStatus
from app.db.models import Job, Model, ModelSample, PromptSet
from app.services import active_learning
from app.services.errors import Conflict, Invalid, NotFound, raise_for_fields
from app.services.prompt_sets import GENERATOR_KINDS, clean_best_of_n, queue_generation_if_needed
from app.services.run_settings import parse_ids
from app.services.validation import as_id
from trainer.models import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME, PROVISIONED_MARKER, checkpoint_sha256
from trainer.learning_curve import interval_is_wide

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 200


def stored_path(path: Path, artifacts_dir: Path) -> str:
    """How a directory is stored: relative to the artifacts dir when inside it."""
    # abspath, not resolve(): a symlink placed inside the artifacts dir stays inside it.
    absolute, root = Path(os.path.abspath(path)), Path(os.path.abspath(artifacts_dir))
    try:
        return str(absolute.relative_to(root))
    except ValueError:
        return str(absolute)


def register_model(
    session: Session,
    *,
    name: str,
    kind: ModelKind | str,
    path: str,
    source: str,
    parent_id: int | None = None,
    job_id: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    sha256: str | None = None,
    make_default: bool = False,
    commit: bool = True,
) -> Model:
    """Add a checkpoint to the registry. Raises Invalid (field by field) or
    Conflict when the name is taken."""
    errors: dict[str, str] = {}
    name = (name or "").strip()
    if not name:
        errors["name"] = "required"
    elif len(name) > MAX_NAME_CHARS:
        errors["name"] = f"at most {MAX_NAME_CHARS} characters"
    try:
        kind = ModelKind(kind)
    except ValueError:
        errors["kind"] = "one of " + ", ".join(k.value for k in ModelKind)
    if not (path or "").strip():
        errors["path"] = "required"
    source = (source or "").strip()[:100] or "unknown"
    if parent_id is not None and session.get(Model, parent_id) is None:
        errors["parent_id"] = f"no model with id {parent_id}"
    if errors:
        raise Invalid("The model cannot be registered: " + "; ".join(f"{k}: {v}" for k, v in errors.items()) + ".",
                      errors=errors)
    if session.scalar(select(Model.id).where(Model.name == name)) is not None:
        raise Conflict(f"A model named '{name}' is already registered; choose another name.",
                       errors={"name": "already taken"})
    model = Model(name=name, kind=kind, path=path.strip(), source=source, parent_id=parent_id,
                  job_id=job_id, metrics=dict(metrics or {}), config=dict(config or {}), sha256=sha256)
    session.add(model)
    session.flush()
    if make_default:
        _make_default(session, model)
    # Sets ordered by uncertainty that follow the newest reward model are scored with it.
    active_learning.queue_scoring_for_new_model(session, model=model)
    if commit:
        session.commit()
    return model


def register_checkpoint(
    session: Session,
    *,
    settings: Settings,
    path_or_hub_id: str,
    name: str | None = None,
    kind: ModelKind | str = ModelKind.sft,
    source: str | None = None,
    parent_id: int | None = None,
    make_default: bool = False,
) -> Model:
    """Register a causal LM from a local directory (it must hold config.json) or a
    hub id. Raises Invalid saying what is wrong with the directory."""
    raw = (path_or_hub_id or "").strip()
    if not raw:
        raise Invalid("Give a checkpoint directory or a hub id.", errors={"path": "required"})
    candidate = Path(raw).expanduser()
    looks_local = candidate.exists() or raw.startswith((".", "/", "~")) or raw.count("/") > 1
    if looks_local:
        if not candidate.is_dir():
            raise Invalid(f"{raw}: no such directory.", errors={"path": "no such directory"})
        config_file = candidate / "config.json"
        if not config_file.is_file():
            raise Invalid(f"{raw} has no config.json: it is not a transformers checkpoint directory.",
                          errors={"path": "no config.json"})
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise Invalid(f"{config_file}: not valid JSON ({exc}).", errors={"path": "bad config.json"}) from None
        architectures = config.get("architectures") or []
        if ModelKind(kind) != ModelKind.reward and architectures and not any(
                a.endswith("ForCausalLM") for a in architectures):
            raise Invalid(f"{raw} is a {', '.join(architectures)}, not a causal language model.",
                          errors={"path": "not a causal LM"})
        return register_model(
            session, name=name or candidate.resolve().name, kind=kind,
            path=stored_path(candidate, settings.artifacts_path), source=source or "local",
            parent_id=parent_id, sha256=checkpoint_sha256(candidate),
            config={"architectures": architectures, "model_type": config.get("model_type")},
            make_default=make_default,
        )
    return register_model(session, name=name or raw, kind=kind, path=raw, source=source or "hub",
                          parent_id=parent_id, make_default=make_default)


def get_model(session: Session, model_id: int) -> Model:
    """The model with this id; raises NotFound."""
    model = session.get(Model, model_id)
    if model is None:
        raise NotFound(f"No model with id {model_id}.")
    return model


def get_model_by_name(session: Session, name: str) -> Model | None:
    return session.scalar(select(Model).where(Model.name == name))


def models_of(session: Session, kinds: Iterable[ModelKind] = tuple(ModelKind)) -> list[Model]:
    """Registered models of the kinds (all by default), defaults first, then by kind, newest first."""
    return list(session.scalars(
        select(Model).where(Model.kind.in_(list(kinds)))
        .order_by(Model.is_default.desc(), Model.kind, Model.created_at.desc(), Model.id.desc())
    ))


def sft_models(session: Session, *, limit: int = 20) -> list[Model]:
    """SFT models made by train_sft jobs, newest first."""
    return list(session.scalars(
        select(Model).where(Model.kind == ModelKind.sft, Model.source == "train_sft")
        .order_by(Model.created_at.desc(), Model.id.desc()).limit(limit)
    ))


def default_reward_model(session: Session) -> Model | None:
    """The default reward model, else the newest one."""
    return session.scalar(select(Model).where(Model.kind == ModelKind.reward)
                          .order_by(Model.is_default.desc(), Model.created_at.desc(), Model.id.desc()).limit(1))


def default_model(session: Session, kind: ModelKind | str = ModelKind.sft) -> Model | None:
    return session.scalar(select(Model).where(Model.kind == ModelKind(kind), Model.is_default))


def set_default(session: Session, *, model_id: int) -> Model:
    """Make the model the default of its kind (the previous default stops being one)."""
    model = get_model(session, model_id)
    _make_default(session, model)
    session.commit()
    return model


def _make_default(session: Session, model: Model) -> None:
    session.execute(update(Model).where(Model.kind == model.kind, Model.is_default, Model.id != model.id)
                    .values(is_default=False))
    session.flush()  # the partial unique index allows one default per kind
    model.is_default = True
    session.flush()


def ensure_default_model(session: Session, settings: Settings) -> Model | None:
    """Register the checkpoint provisioned at setup (SmolLM2-135M-Instruct under the
    artifacts dir) as the default SFT model, if it is not registered yet; make it
    the default when there is no default SFT model. None when it is not provisioned."""
    directory = settings.artifacts_path / DEFAULT_MODEL_DIR
    path = stored_path(directory, settings.artifacts_path)
    model = session.scalar(select(Model).where(Model.path.in_([path, os.path.abspath(directory)])))
    if model is None:
        if not (directory / PROVISIONED_MARKER).exists():
            log.warning("the default model is not provisioned in %s; run `rlhf models provision-default`",
                        directory)
            return None
        name = DEFAULT_MODEL_NAME
        if get_model_by_name(session, name) is not None:  # the name is taken by another checkpoint
            name = f"{DEFAULT_MODEL_NAME} ({path})"
        model = register_model(session, name=name, kind=ModelKind.sft, path=path, source="provisioned",
                               sha256=checkpoint_sha256(directory),
                               config={"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
                               commit=False)
        log.info("registered the default model %s (id %s)", model.name, model.id)
    if default_model(session, ModelKind.sft) is None:
        _make_default(session, model)
    session.commit()
    return model


# ---- choosing a model ---------------------------------------------------------------

def choose_model(errors: dict[str, str], session: Session, field: str, raw: Any, kinds: Sequence[ModelKind],
                 default: Model | None, what: str) -> Model | None:
    """The model of id `raw` if it is of one of the kinds, `default` when none is given;
    else None with a message in errors[field]."""
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


# ---- samples side by side -----------------------------------------------------------

@dataclass(frozen=True)
class PromptRow:
    """A prompt a model is sampled on (training.sample_prompts and prompts_of give them)."""

    prompt_id: int
    messages: list[dict[str, str]]


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


# ---- lineage and promotion ----------------------------------------------------------

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


def promote_generator(session: Session, *, model_id: Any, prompt_set_id: Any, user_id: int | None,
                      best_of_n: Any = None, best_of_n_reward_model_id: Any = None) -> tuple[PromptSet, Job | None]:
    """Make the model the generator of a ranking set and open a new generation round:
    every prompt gets K fresh responses from it, as new tasks; with `best_of_n` (N), the
    K of N samples that the reward model scores highest (prompt_sets.clean_best_of_n).
    The generation job is queued now when the set is active (else when it is started or
    resumed). Raises Invalid for a model that cannot generate, a set that is not a
    ranking set or a bad best-of-N choice, Conflict for an archived set. Commits."""
    errors: dict[str, str] = {}
    model = choose_model(errors, session, "model_id", model_id, GENERATOR_KINDS, None, "an SFT or policy model")
    set_ids = parse_ids(errors, "prompt_set_id", prompt_set_id, "prompt set")
    prompt_set = session.get(PromptSet, set_ids[0]) if len(set_ids) == 1 else None
    if "prompt_set_id" not in errors and (prompt_set is None or prompt_set.kind != PromptSetKind.ranking):
        errors["prompt_set_id"] = "choose a ranking prompt set"
        prompt_set = None
    n, reward_id = clean_best_of_n(errors, session, kind=PromptSetKind.ranking, k=prompt_set.k if prompt_set else None,
                                   n=best_of_n, reward_model_id=best_of_n_reward_model_id)
    raise_for_fields(errors)
    assert model is not None and prompt_set is not None
    session.refresh(prompt_set, with_for_update=True)
    if prompt_set.status == PromptSetStatus.archived:
        raise Conflict(f"The prompt set '{prompt_set.name}' is archived: it takes no new round.")
    prompt_set.generator_model_id = model.id
    prompt_set.best_of_n, prompt_set.best_of_n_reward_model_id = n, reward_id
    prompt_set.round += 1
    job = queue_generation_if_needed(session, prompt_set=prompt_set, created_by_id=user_id)
    session.commit()
    return prompt_set, job


def reward_interval_is_wide(model: Model) -> bool:
    """Whether a reward model's validation-accuracy interval is too wide for runs to be compared."""
    return interval_is_wide(model.metrics or {})
