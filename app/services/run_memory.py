"""The memory a training run will need per device, before it is queued: shown on the
training forms and by `POST /api/v1/training/estimate`, and a run that cannot fit the
workers' devices is refused with the settings that would make it fit
(trainer/memory.py does the arithmetic).

The workers' device: `RLHF_WORKER_GPU_MEMORY_GIB` set means CUDA workers with that
much memory per GPU (bf16 frozen weights and activations); unset means CPU workers
with this machine's memory (float32)."""

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import get_settings
from app.db.models import Model, PromptSet
from app.services.errors import Invalid
from trainer.memory import GiB, Architecture, Estimate, alternatives, estimate, read_architecture, refusal, run_of
from trainer.models import resolve_model_path


@dataclass(frozen=True)
class Budget:
    """Memory per device of the workers."""

    bytes: int
    device: str  # cuda | cpu
    where: str  # for messages

    @classmethod
    def of_workers(cls) -> "Budget":
        gib = get_settings().worker_gpu_memory_gib
        if gib is not None:
            return cls(int(gib * GiB), "cuda", "each GPU of the workers (RLHF_WORKER_GPU_MEMORY_GIB)")
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return cls(ram, "cpu", "this machine's memory (CPU workers; set RLHF_WORKER_GPU_MEMORY_GIB for GPUs)")


def architecture_of(model: Model) -> Architecture | None:
    """The model's sizes from its checkpoint's config.json; None when it cannot be read here (a hub id,
    a checkpoint on another machine): its run is then not estimated."""
    try:
        return read_architecture(resolve_model_path(model.path, get_settings().artifacts_path))
    except ValueError:
        return None


def responses_per_ranking(session: Session, prompt_set_ids: list[int]) -> int:
    """K of the ranking sets (the largest): the responses each annotation brings to a batch."""
    if not prompt_set_ids:
        return 2
    return int(session.scalar(select(func.max(PromptSet.k)).where(PromptSet.id.in_(prompt_set_ids))) or 2)


def estimate_run(kind: str, model: Model, config: Mapping[str, Any], *, responses: int = 2,
                 separate_reference: bool = True, processes: int = 1,
                 budget: Budget | None = None) -> dict[str, Any] | None:
    """The estimate per device (GiB) of a run on the workers as `processes` processes (one per GPU, spread by
    the config's strategy), whether it fits, and the settings that would make it fit; None when the model's
    size is unknown."""
    arch = architecture_of(model)
    if arch is None:
        return None
    budget = budget or Budget.of_workers()
    strategy = str(config.get("strategy", "ddp")) if processes > 1 else "single"
    run = replace(run_of(kind, config, responses=responses, dtype="bf16" if budget.device == "cuda" else "fp32",
                         strategy=strategy, devices=processes, parameters=arch.parameters(),
                         separate_reference=separate_reference), device=budget.device)
    need: Estimate = estimate(arch, run)
    fits = need.total <= budget.bytes
    return {
        "per_device_gib": need.as_gib(), "device": budget.device, "limit_gib": round(budget.bytes / GiB, 2),
        "parameters": arch.parameters(), "fits": fits,
        "message": None if fits else refusal(arch, run, budget.bytes, budget.where),
        "alternatives": [] if fits else [label for label, _, _ in alternatives(arch, run, budget.bytes)],
    }


def check_fits(session: Session, kind: str, params: Mapping[str, Any]) -> None:
    """Raise Invalid (field `memory`) when the checked run's params cannot fit the workers' devices."""
    found = estimate_of_params(session, kind, params)
    if found is not None and not found["fits"]:
        raise Invalid(found["message"], errors={"memory": found["message"]})


def estimate_of_params(session: Session, kind: str, params: Mapping[str, Any]) -> dict[str, Any] | None:
    """estimate_run for a job's checked params (app/services/training.py's clean_*_params)."""
    model_id = params.get("base_model_id") or params.get("policy_model_id")
    model = session.get(Model, model_id) if model_id is not None else None
    if model is None:
        return None
    separate = params.get("reference_model_id", model_id) != model_id
    return estimate_run(kind, model, params["config"], separate_reference=separate,
                        processes=int(params.get("processes") or 1),
                        responses=responses_per_ranking(session, list(params.get("prompt_set_ids") or [])))

