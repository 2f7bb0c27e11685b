"""Data-parallel training over several processes (`accelerate launch`, `torchrun`).

When the launcher starts N processes (WORLD_SIZE = N > 1), every process runs
the same training function on the same data and:
- takes its own shard of every micro-batch (rows rank, rank + N, ...), so an
  optimizer step still sees config.batch_size examples in all and a run has
  the same number of optimizer steps as in one process;
- scales its loss by its share of the step's examples (or tokens) and adds its
  gradients to the others' (all-reduce, sum) before clipping, so the step's
  gradient is the one a single process would compute on the whole batch;
- evaluates its shard of the validation data; sums are reduced across processes;
- starts from rank 0's weights, shuffles with the same seed, and stops when
  rank 0 says so; only rank 0 calls on_step / should_stop and saves.

accelerate's PartialState sets up the process group (NCCL on GPUs, one GPU per
process; gloo on CPU) from the launcher's environment. The gradients are
all-reduced here rather than by a DistributedDataParallel wrapper: the
trainers call a model's backbone and head directly (reward and value heads,
response-only logits), which bypasses the wrapper's forward that DDP needs.
The reduction is bucketed to keep the number of collective calls low.

With WORLD_SIZE unset or 1 nothing here calls a collective and the device is
the config's (trainer.models.pick_device): one process trains exactly as before.
"""

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from trainer.common import Cancelled
from trainer.models import pick_device

T = TypeVar("T")

_BUCKET_ELEMENTS = 1 << 25  # gradient elements per all-reduce call (128 MiB of float32)


def launched_world_size() -> int:
    """How many processes the launcher started (1 when run as a plain script)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def _launcher_wants_cpu() -> bool:
    return os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Runtime:
    """This process's place in the run: rank among world processes, and its device."""

    world: int
    rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's share of a batch: items rank, rank + world, ... (all of them in one process)."""
        return list(items[self.rank::self.world])

    def sum(self, values: Sequence[float]) -> list[float]:
        """Elementwise sums over the processes (in float64); the values themselves in one process."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def mean(self, values: Sequence[float]) -> list[float]:
        """Elementwise means over the processes."""
        if not self.distributed:
            return list(values)
        return [v / self.world for v in self.sum(values)]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's obj, in rank order (picklable objects; [obj] in one process)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def sync_parameters(self, *models) -> None:
        """Every process starts from rank 0's weights (equal by seeding already; this makes sure)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for model in models:
                if model is None:
                    continue
                for tensor in [*model.parameters(), *model.buffers()]:
                    dist.broadcast(tensor.data, src=0)

    def reduce_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients over the processes, in place (each loss was scaled to its share of the batch).

        A parameter that got no gradient in any process keeps grad None, as in
        one process (AdamW skips it); one that got a gradient elsewhere only
        receives it here.
        """
        if not self.distributed:
            return
        import torch.distributed as dist

        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.device)
        dist.all_reduce(has)
        live = [p for p, n in zip(params, has.tolist()) if n > 0]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        size = 0
        for p in live:
            if bucket and (size + p.grad.numel() > _BUCKET_ELEMENTS or p.grad.dtype != bucket[0].dtype):
                _all_reduce_flat(bucket)
                bucket, size = [], 0
            bucket.append(p.grad)
            size += p.grad.numel()
        if bucket:
            _all_reduce_flat(bucket)

    def agree_to_stop(self, should_stop: Callable[[], bool] | None, message: str) -> None:
        """Ask should_stop() on rank 0 only; raise Cancelled(message) in every process if it says so.

        If should_stop() raises on rank 0 (a job's cancellation), the other
        processes raise Cancelled and rank 0 lets its own exception through.
        """
        if not self.distributed:
            if should_stop is not None and should_stop():
                raise Cancelled(message)
            return
        import torch.distributed as dist

        decision, error = 0, None
        if self.main and should_stop is not None:
            try:
                decision = 1 if should_stop() else 0
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the others
                decision, error = 2, exc
        flag = torch.tensor([decision], dtype=torch.int32, device=self.device)
        dist.broadcast(flag, src=0)
        if error is not None:
            raise error
        if int(flag.item()):
            raise Cancelled(message)


def _all_reduce_flat(grads: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    if len(grads) == 1:
        dist.all_reduce(grads[0])
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def runtime(device: str = "auto") -> Runtime:
    """This process's Runtime: one process on pick_device(device) (CPU under `accelerate launch
    --cpu`), or, under a launcher with several processes, accelerate's rank and device: a GPU
    per process where CUDA is available and device is not "cpu"; CPU and gloo otherwise."""
    world = launched_world_size()
    if world == 1:
        return Runtime(1, 0, torch.device("cpu") if _launcher_wants_cpu() else pick_device(device))
    from accelerate import PartialState

    cpu = device == "cpu" or _launcher_wants_cpu() or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    assert state.num_processes == world, f"accelerate sees {state.num_processes} processes, the launcher {world}"
    return Runtime(state.num_processes, state.process_index, torch.device(state.device))


def shutdown() -> None:
    """Tear the process group down at the end of a launched script (nothing to do in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
