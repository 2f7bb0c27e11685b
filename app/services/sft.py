"""Starting supervised fine-tuning runs (`train_sft` jobs) from the dashboard or the API.

The web process checks the settings and the data and writes the job; the
worker (trainer/sft_job.py) trains and registers the result. No torch here:
the settings are trainer.configs.SFTConfig's.
"""

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import queue
from app.db.enums import DemonstrationStatus, JobKind, ModelKind, PromptSetKind
from app.db.models import Demonstration, Job, Model, Prompt, PromptSet
from app.services.errors import Invalid
from app.services.jobs import enqueue_job
from app.services.prompt_sets import GENERATOR_KINDS, default_generator_model
from app.services.run_settings import clean_config, settings_of
from app.services.validation import as_id, text_problem
from trainer.configs import SFTConfig

SETTINGS = settings_of(SFTConfig)  # what a form or an API call may set; others keep their defaults
MIN_DEMONSTRATIONS = 2  # one to train on and one to validate on, at least
MAX_NAME_CHARS = 200


def base_models(session: Session) -> list[Model]:
    """Causal LMs that can be fine-tuned (SFT and policy checkpoints), defaults first."""
    return list(session.scalars(
        select(Model).where(Model.kind.in_(GENERATOR_KINDS))
        .order_by(Model.is_default.desc(), Model.kind, Model.created_at.desc(), Model.id.desc())
    ))


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


def clean_sft_params(session: Session, *, base_model_id: Any, prompt_set_ids: Iterable[Any],
                     values: Mapping[str, Any], name: str | None = None,
                     flags_from_form: bool = False) -> dict[str, Any]:
    """Check a run's settings and data; the job's parameters. Raises Invalid with a
    message per field (base_model_id, prompt_set_ids, epochs, learning_rate ...)."""
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
    name = (name or "").strip()
    if len(name) > MAX_NAME_CHARS:
        errors["name"] = f"at most {MAX_NAME_CHARS} characters"
    elif text_problem(name):
        errors["name"] = text_problem(name)
    elif name and session.scalar(select(Model.id).where(Model.name == name)) is not None:
        errors["name"] = "a model of that name is already registered"
    if errors:
        raise Invalid("Please correct the highlighted fields: " + ", ".join(errors) + ".", errors=errors)
    assert model is not None
    return {"base_model_id": model.id, "prompt_set_ids": set_ids, "name": name or None, "config": config}


def start_sft_job(session: Session, *, user_id: int | None, base_model_id: Any, prompt_set_ids: Iterable[Any],
                  values: Mapping[str, Any], name: str | None = None, queue_name: str = queue.GPU_QUEUE,
                  flags_from_form: bool = False) -> Job:
    """Queue a train_sft job on the accepted demonstrations of the sets. Raises Invalid
    per field (nothing is queued then). Commits."""
    params = clean_sft_params(session, base_model_id=base_model_id, prompt_set_ids=prompt_set_ids,
                              values=values, name=name, flags_from_form=flags_from_form)
    sets = params["prompt_set_ids"]
    return enqueue_job(session, kind=JobKind.train_sft, params=params, created_by_id=user_id,
                       prompt_set_id=sets[0] if len(sets) == 1 else None, queue=queue_name)


def sft_models(session: Session, *, limit: int = 20) -> list[Model]:
    """SFT models made by train_sft jobs, newest first."""
    return list(session.scalars(
        select(Model).where(Model.kind == ModelKind.sft, Model.source == "train_sft")
        .order_by(Model.created_at.desc(), Model.id.desc()).limit(limit)
    ))
