"""The model registry: SFT, reward and policy checkpoints with their lineage.

A checkpoint is a directory (safetensors + config.json + tokenizer) stored under
the artifacts directory (its path is then kept relative to it, so the directory
can move) or anywhere else (absolute path), or a hub id for machines that can
reach a hub. No torch here: the web process lists and chooses models.
"""

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.enums import ModelKind
from app.db.models import Model
from app.services.errors import Conflict, Invalid, NotFound

log = logging.getLogger(__name__)

# Same values as trainer.models (which imports torch, so it is not imported
# here); tests/test_models_registry.py checks they agree.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_DIR = "models/smollm2-135m-instruct"
_PROVISIONED_MARKER = ".provisioned"
MAX_NAME_CHARS = 200


def checkpoint_sha256(directory: Path) -> str | None:
    """One hash over a checkpoint's weight files (the same as trainer.models'),
    None when the directory holds no safetensors."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        inner = hashlib.sha256()
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                inner.update(chunk)
        digest.update(file.name.encode())
        digest.update(inner.hexdigest().encode())
    return digest.hexdigest()


def stored_path(path: Path, artifacts_dir: Path) -> str:
    """How a directory is stored: relative to the artifacts dir when inside it."""
    # abspath, not resolve(): a symlink placed inside the artifacts dir stays inside it.
    absolute, root = Path(os.path.abspath(path)), Path(os.path.abspath(artifacts_dir))
    try:
        return str(absolute.relative_to(root))
    except ValueError:
        return str(absolute)


def local_path(model: Model, artifacts_dir: Path) -> Path | None:
    """The model's directory on this machine, None for a hub id."""
    candidate = Path(model.path)
    if candidate.is_absolute():
        return candidate
    if (artifacts_dir / candidate).exists():
        return artifacts_dir / candidate
    return None


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


def list_models(session: Session, *, kind: ModelKind | str | None = None) -> Sequence[Model]:
    """Defaults first, then newest."""
    query = select(Model).order_by(Model.is_default.desc(), Model.created_at.desc(), Model.id.desc())
    if kind is not None:
        query = query.where(Model.kind == ModelKind(kind))
    return session.scalars(query).all()


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
        if not (directory / _PROVISIONED_MARKER).exists():
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
