"""What the training jobs (train_sft, train_reward, train_ppo) share: where a run
writes its checkpoint, how its steps reach the job page, and how the result is
registered, with its side-by-side samples, in one transaction."""

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.db.enums import ModelKind
from app.services import models
from app.services.errors import Conflict
from trainer.jobs import JobContext
from trainer.models import checkpoint_sha256


def fresh_output_dir(ctx: JobContext, prefix: str) -> Path:
    """artifacts/models/<prefix>-job-<id>, emptied: a directory left there belongs to an
    earlier run of this same job that stopped before registering it. (Only the main process
    of a multi-process run empties it; the trainers save from that process alone.)"""
    directory = ctx.settings.artifacts_path / "models" / f"{prefix}-job-{ctx.job_id}"
    if ctx.main and directory.exists():
        shutil.rmtree(directory)
    return directory


def step_callbacks(ctx: JobContext) -> tuple[Callable[[int, dict[str, float]], None], Callable[[], bool]]:
    """(on_step, should_stop) for a trainer: each step's metrics become the job's curves
    and its progress (a metric "total_steps" sets the total); should_stop raises
    JobCancelled when the job is cancelled, which the worker records."""
    total = 0

    def on_step(step: int, metrics: dict[str, float]) -> None:
        nonlocal total
        metrics = dict(metrics)
        total = int(metrics.pop("total_steps", total) or 0)
        ctx.metrics(step, metrics)
        if total:
            ctx.progress(min(step, total), total)

    def should_stop() -> bool:
        ctx.check_cancelled()
        return False

    return on_step, should_stop


def device_setting(ctx: JobContext, config: Mapping[str, Any]) -> str:
    """The run's device: its own setting, else the worker's (RLHF_DEVICE)."""
    chosen = str(config.get("device") or "auto")
    return ctx.settings.device if chosen == "auto" else chosen


@dataclass
class Registered:
    model_id: int | None  # None in a multi-process run's other processes: only the main one registers
    name: str


def register(ctx: JobContext, *, name: str, kind: ModelKind, output_dir: Path, source: str, parent_id: int | None,
             metrics: Mapping[str, Any], config: Mapping[str, Any],
             samples: Sequence[tuple[str, Sequence[Mapping[str, Any]]]] = (),
             sample_prompts: Sequence[models.PromptRow] = ()) -> Registered:
    """Register the checkpoint (a taken name gets the job id appended) and store its
    samples ((stage, samples) pairs answering sample_prompts), in one transaction. In a
    multi-process run only the main process registers; the others get model_id None."""
    if not ctx.main:
        return Registered(None, name)
    artifacts = ctx.settings.artifacts_path
    values = dict(kind=kind, path=models.stored_path(output_dir, artifacts), source=source, parent_id=parent_id,
                  job_id=ctx.job_id, metrics=dict(metrics), sha256=checkpoint_sha256(output_dir),
                  config=dict(config) | {"architectures": architectures(output_dir)})
    with ctx.new_session() as session:
        try:
            model = models.register_model(session, name=name, commit=False, **values)
        except Conflict:  # the name was taken while the job ran
            session.rollback()
            model = models.register_model(session, name=f"{name} #{ctx.job_id}", commit=False, **values)
        for stage, rows in samples:
            if rows:
                models.save_samples(session, model_id=model.id, stage=stage, samples=rows, prompts=sample_prompts)
        session.commit()
        ctx.set_model(model.id)
        return Registered(model.id, model.name)


def architectures(directory: Path) -> list[str]:
    config = Path(directory) / "config.json"
    if not config.exists():
        return []
    return json.loads(config.read_text()).get("architectures") or []
