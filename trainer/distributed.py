"""Data-parallel training over several processes (`accelerate launch`, `torchrun`), on accelerate.

When the launcher starts N processes (WORLD_SIZE = N > 1), every process runs
the same training function on the same data and:
- takes its own shard of every micro-batch (rows rank, rank + N, ...), so an
  optimizer step still sees config.batch_size examples in all and a run has
  the same number of optimizer steps as in one process;
- scales its loss by its share of the step's examples (or tokens); the
  engine's backward (Engine.backward) makes the step's gradient the sum over
  the processes, the one a single process would compute on the whole batch;
- evaluates its shard of the validation data; sums are reduced across processes;
- shuffles with the same seed, and stops when rank 0 says so; only rank 0
  calls on_step / should_stop and saves.

The strategy setting (trainer/configs.py STRATEGIES) picks how the trained
models are spread over the processes:
- single: one process; a launch with several is refused;
- ddp: a full copy per process, gradients all-reduced during the backward pass
  (accelerate's DistributedDataParallel);
- fsdp: weights, gradients and optimizer state sharded (FSDP2's fully_shard per
  decoder layer and over the whole, as accelerate's FSDP2 plugin lays them out;
  applied here because accelerate keeps FSDP for accelerators and the runs must
  also work on CPU with gloo);
- zero2, zero3: DeepSpeed ZeRO stage 2 or 3 through accelerate's DeepSpeedPlugin
  (needs the deepspeed package and a GPU per process).
In one process every strategy but single trains as single does.

The trainers call a model's backbone and head directly (reward and value heads,
response-only logits), so the trained models are held in one module (Bundle)
whose forward runs a function given to it: Engine.run(fn, ...) calls fn inside
the wrapper's forward, where DDP prepares its gradient reduction and FSDP
gathers the weights. Everything that reads the trained weights goes through
Engine.run; under FSDP every process makes the same number of calls
(Engine.batches pads the shorter shards) and generation keeps every process
stepping until all are done (synced_gpus).

With WORLD_SIZE unset or 1 nothing here calls a collective and the device is
the config's (trainer.models.pick_device): one process trains exactly as before.
"""

import contextlib
import copy
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from trainer.common import Cancelled
from trainer.configs import STRATEGIES
from trainer.models import pick_device

T = TypeVar("T")


def launched_world_size() -> int:
    """How many processes the launcher started (1 when run as a plain script)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def _launcher_wants_cpu() -> bool:
    return os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes")


class Bundle(torch.nn.Module):
    """The models a trainer trains, as one module whose forward runs the function it is given."""

    def __init__(self, models: dict[str, torch.nn.Module]):
        super().__init__()
        for name, model in models.items():
            self.add_module(name, model)

    def forward(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        return fn(*args, **kwargs)


@dataclass
class Runtime:
    """This process's place in the run (rank among world processes, its device) and the engine
    that spreads the trained models over the processes (strategy)."""

    world: int
    rank: int
    device: torch.device
    strategy: str = "ddp"
    _module: torch.nn.Module | None = field(default=None, repr=False)
    _models: dict[str, torch.nn.Module] = field(default_factory=dict, repr=False)
    _skeletons: dict[str, torch.nn.Module] = field(default_factory=dict, repr=False)
    _accelerator: Any = field(default=None, repr=False)
    _optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def shards_weights(self) -> bool:
        """Whether each process holds a part of the trained weights only (FSDP, ZeRO-3): then every
        process must make the same calls to run(), and generation steps until all are done."""
        return self.distributed and self.strategy in ("fsdp", "zero3")

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's share of a batch: items rank, rank + world, ... (all of them in one process)."""
        return list(items[self.rank::self.world])

    def batches(self, items: Sequence[T], size: int) -> list[tuple[list[T], bool]]:
        """This process's shard of items in batches of at most size, each with whether it is real.
        Where the weights are sharded every process gets as many batches: a shorter shard is padded
        with stand-in batches (False) whose results the caller drops."""
        local = self.shard(items)
        out = [(local[i:i + size], True) for i in range(0, len(local), size)]
        if self.shards_weights and items:
            most = int(max(self.gather(len(out))))
            out += [(list(items[:1]), False)] * (most - len(out))
        return out

    def sum(self, values: Sequence[float]) -> list[float]:
        """Elementwise sums over the processes (in float64); the values themselves in one process."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

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

    # ---- the engine ---------------------------------------------------------------

    def prepare(self, models: dict[str, torch.nn.Module], make_optimizer: Callable[[], torch.optim.Optimizer], *,
                max_grad_norm: float, accumulation: int = 1, unused_parameters: bool = False) -> torch.optim.Optimizer:
        """Spread the trained models over the processes by the strategy; returns make_optimizer()'s
        optimizer, made after the wrapping (FSDP replaces the weights by their shards).
        max_grad_norm, accumulation: the trainer's clipping and backward passes per optimizer step
        (DeepSpeed clips and steps inside its backward); unused_parameters: some steps leave a
        trained model without a gradient (DDP must look for them)."""
        self._models = dict(models)
        bundle = Bundle(models)
        self._module = bundle
        if not self.distributed:
            return make_optimizer()
        if self.strategy == "fsdp":
            # Copies without weights to put the full weights back into at the end (unwrapped).
            self._skeletons = {name: _skeleton(m) for name, m in models.items()}
            _fully_shard(bundle)
            self._optimizer = make_optimizer()
            return self._optimizer
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        # The buffers (rotary tables) are the same everywhere: no broadcast, so no collective in a forward.
        ddp = DistributedDataParallelKwargs(broadcast_buffers=False, find_unused_parameters=unused_parameters)
        if self.strategy in ("zero2", "zero3"):
            from accelerate.utils import DeepSpeedPlugin

            if accumulation > 1:
                raise ValueError(f"strategy {self.strategy} steps after every backward pass: set"
                                 " gradient_accumulation_steps to 1 (a larger batch_size instead)")
            plugin = DeepSpeedPlugin(zero_stage=int(self.strategy[-1]), gradient_accumulation_steps=1,
                                     gradient_clipping=max_grad_norm, zero3_init_flag=False,
                                     zero3_save_16bit_model=True)
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1  # batches are the trainers' own
            self._accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=[ddp])
            if self.strategy == "zero3":
                self._skeletons = {name: _skeleton(m) for name, m in models.items()}
            self._module, optimizer = self._accelerator.prepare(bundle, make_optimizer())
            return optimizer
        self._accelerator = Accelerator(cpu=self.device.type == "cpu", kwargs_handlers=[ddp])
        self._module = self._accelerator.prepare(bundle)
        return make_optimizer()

    def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """fn(*args, **kwargs) inside the wrapped models' forward: every computation that reads the
        trained weights (losses, evaluation, generation) goes through here."""
        if self._module is None:
            return fn(*args, **kwargs)
        return self._module(fn, *args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of this process's part of the step's loss: the gradients summed over the processes
        (DDP, FSDP and ZeRO average them, hence the factor)."""
        if self._accelerator is not None and self.strategy in ("zero2", "zero3"):
            self._accelerator.backward(loss * self.world)
        else:
            (loss * self.world).backward()

    @contextlib.contextmanager
    def no_sync(self, skip: bool = True) -> Iterator[None]:
        """Accumulate gradients without reducing them (all but the last micro-batch of a step)."""
        if not (skip and self.distributed) or self.strategy in ("zero2", "zero3"):
            yield
        elif self.strategy == "fsdp":
            self._module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self._module.set_requires_gradient_sync(True)
        else:
            with self._module.no_sync():
                yield

    def clip_grad_norm_(self, params: Sequence[torch.nn.Parameter], max_norm: float) -> float:
        """Clip the gradients' norm over every process's part; returns the norm before clipping."""
        if self._accelerator is not None and self.strategy in ("zero2", "zero3"):
            norm = self._accelerator.clip_grad_norm_(params, max_norm)
            return float(norm) if norm is not None else float("nan")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def unwrapped(self, name: str) -> torch.nn.Module:
        """The trained model `name` as a plain model with all its weights (to save or keep using), in
        every process; under FSDP and ZeRO-3 in the main process only, in host memory, so that a GPU
        never holds the whole model (the others get it without weights, on the meta device). Every
        process must call it, once training is over: under FSDP the optimizer's state is dropped
        first, so that the gathered weights take its place rather than adding to the run's peak."""
        model = self._models[name]
        if not self._skeletons:
            return self._accelerator.unwrap_model(self._module).get_submodule(name) if self._accelerator else model
        plain = self._skeletons[name]
        if self.strategy == "zero3":  # DeepSpeed gathers the 16-bit weights in the main process
            bundle = self._accelerator.get_state_dict(self._module) or {}
            if not self.main:
                return plain
            full = {key[len(name) + 1:]: value for key, value in bundle.items() if key.startswith(name + ".")}
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            if self._optimizer is not None:
                self._optimizer.state.clear()
            # cpu_offload: each weight gathered in full goes to the main process's host memory (DeepSpeed's
            # gathering does the same), the others drop theirs at once.
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if not self.main:
                return plain
        plain.load_state_dict(full, assign=True)
        live = dict(model.named_buffers())
        for key, buffer in list(plain.named_buffers()):
            if buffer.is_meta:  # not in the state dict (rotary tables): the live model's, never sharded
                owner, _, attr = key.rpartition(".")
                plain.get_submodule(owner)._buffers[attr] = live[key].clone()
        if hasattr(plain, "tie_weights"):
            plain.tie_weights()
        return plain.cpu()

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



def _skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of model without its weights (on the meta device), to load the full weights into."""
    memo: dict[int, Any] = {id(b): torch.empty_like(b, device="meta") for b in model.buffers()}
    memo.update({id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                 for p in model.parameters()})
    return copy.deepcopy(model, memo)


def _return_large_blocks_when_freed() -> None:
    """Make glibc's malloc give large blocks their own mappings, returned to the system when freed.

    By default it raises its mmap threshold (up to 32 MiB) to the size of every mapped block freed,
    so after the first ones FSDP's transient full-size buffers (a layer's gathered weights, its
    unsharded gradients and their reduce-scatter copy) are served from the heap, between the
    long-lived shards allocated in the meantime; freeing them there returns nothing, and on the
    CPU a process's resident memory grows to about a full replica's, which sharding was to avoid.
    Fixing the threshold at its initial 128 KiB (which stops the adjustment) keeps those buffers
    mapped; on SmolLM2-135M over two processes it lowers each one's peak from about 2.9 GiB to
    1.5 GiB at no cost in speed. Elsewhere than glibc there is no mallopt to call, or it ignores
    the setting."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, 128 * 1024)


def _fully_shard(bundle: torch.nn.Module) -> None:
    """FSDP2: each decoder layer a unit of its own (the models' _no_split_modules), the rest one unit."""
    from torch.distributed.fsdp import fully_shard

    layers = {name for m in bundle.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    for module in list(bundle.modules()):
        if type(module).__name__ in layers:
            fully_shard(module)
    fully_shard(bundle)


def runtime(device: str = "auto", strategy: str = "ddp") -> Runtime:
    """This process's Runtime: one process on pick_device(device) (CPU under `accelerate launch
    --cpu`), or, under a launcher with several processes, accelerate's rank and device: a GPU
    per process where CUDA is available and device is not "cpu"; CPU and gloo otherwise.
    Raises ValueError for a strategy that cannot run here."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    if strategy in ("zero2", "zero3"):
        try:
            import deepspeed  # noqa: F401
        except ImportError as error:
            raise ValueError(f"strategy {strategy} (DeepSpeed ZeRO) needs the deepspeed package and a GPU per"
                             " process: pip install deepspeed; or pick ddp or fsdp") from error
    world = launched_world_size()
    if world == 1:
        return Runtime(1, 0, torch.device("cpu") if _launcher_wants_cpu() else pick_device(device), strategy)
    if strategy == "single":
        raise ValueError(f"strategy single trains in one process, but the launcher started {world}:"
                         " pick ddp, fsdp, zero2 or zero3")
    from accelerate import PartialState

    cpu = device == "cpu" or _launcher_wants_cpu() or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    assert state.num_processes == world, f"accelerate sees {state.num_processes} processes, the launcher {world}"
    rt = Runtime(state.num_processes, state.process_index, torch.device(state.device), strategy)
    if strategy == "fsdp" and rt.device.type == "cpu":  # before the trainer loads the full models
        _return_large_blocks_when_freed()
    return rt


def shutdown() -> None:
    """Tear the process group down at the end of a launched script (nothing to do in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
