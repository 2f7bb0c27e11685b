"""Jobs of several processes: what this machine can run, and running a job as a group of
training processes started by `accelerate launch`, watched by the worker.

A worker advertises its devices (local_devices) and listens on the queues of the
process counts it can start (app/queue.with_processes): N GPUs, or N CPUs on a
machine without CUDA (gloo). For a job whose params ask for processes > 1 the
worker does not run the handler in its own thread; run_processes starts

    python -m accelerate.commands.launch --multi_gpu --num_processes N ... -m trainer.job_process ...

in a session of its own, with the database URL and the worker's settings in its
environment, and watches it:
- the job is cancelled (page, API) or the worker shuts down: every process of the
  run gets SIGTERM, then SIGKILL after a grace period; JobCancelled goes up to
  the worker, which records the job cancelled (or queues it again on shutdown);
- the launcher exits non-zero (a process raised, was killed, ran out of
  memory): every process left is stopped and the job fails with the first
  process's error, or the tail of the run's output when none wrote one;
- it exits 0: rank 0's result and model become the job's.
On a GPU worker each run takes GPUs of its own from the worker's (GPUS; a run waits
while runs going on at once hold them) and sees only those (CUDA_VISIBLE_DEVICES).
The launcher's training processes run in sessions of their own
(torch.distributed.elastic starts them so); the watch keeps the ids of all the
launcher's descendants so that none outlives the run, even when the launcher
itself was killed.
"""

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import psutil

from app.db.session import get_engine
from trainer.job_process import outcome_path, running
from trainer.jobs import JobCancelled, JobContext, JobFailed

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.2  # how often the watch looks at the processes (the cancel check reads the database less often)
STOP_GRACE_S = 5.0  # between SIGTERM and SIGKILL
OUTPUT_TAIL_CHARS = 4000  # of the run's output, kept as the failed job's details


@dataclass(frozen=True)
class Devices:
    """What one machine offers a job: its CUDA devices, CPUs and memory."""

    cuda: list[dict[str, Any]] = field(default_factory=list)  # {"name", "memory_bytes"} each
    cpu_count: int = 1
    memory_bytes: int = 0

    @property
    def uses_cuda(self) -> bool:
        return bool(self.cuda)

    @property
    def max_processes(self) -> int:
        """A process per GPU; without CUDA, a process per CPU."""
        return len(self.cuda) if self.cuda else self.cpu_count


@cache
def local_devices(device: str = "auto") -> Devices:
    """This machine's devices as a worker whose device setting is `device` uses them
    (RLHF_DEVICE=cpu: no GPU)."""
    import torch

    cuda = []
    if device not in ("cpu", "mps") and torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            cuda.append({"name": props.name, "memory_bytes": int(props.total_memory)})
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    memory = psutil.virtual_memory().total
    return Devices(cuda=cuda, cpu_count=cpus, memory_bytes=int(memory))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(job_id: int, processes: int, outcome_dir: Path) -> list[str]:
    """The launcher's command line for the job's `processes` processes."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()),
            "-m", "trainer.job_process", "--job-id", str(job_id), "--outcome", str(outcome_dir)]


class GpuPool:
    """The worker's GPUs (indices 0..n-1 of those it sees) handed out to its multi-process runs, so
    that runs going on at once (--concurrency above 1) each get GPUs of their own."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._busy: set[int] = set()

    @contextmanager
    def hold(self, count: int, available: int, check: Callable[[], None]) -> Iterator[list[int]]:
        """`count` of the `available` GPUs for the duration, waiting while others hold them;
        check() is called every second meanwhile (it raises to give up: JobCancelled)."""
        with self._changed:
            while len(free := [i for i in range(available) if i not in self._busy]) < count:
                self._changed.wait(timeout=1.0)
                check()
            taken = free[:count]
            self._busy.update(taken)
        try:
            yield taken
        finally:
            with self._changed:
                self._busy.difference_update(taken)
                self._changed.notify_all()


GPUS = GpuPool()


def visible_devices(indices: Sequence[int]) -> str:
    """CUDA_VISIBLE_DEVICES for the worker's GPUs `indices`: numbered among those the worker
    itself sees (its own CUDA_VISIBLE_DEVICES, when set, names them)."""
    own = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return ",".join(own[i] if i < len(own) else str(i) for i in indices)


def launch_environment(ctx: JobContext, *, cpu: bool, gpus: Sequence[int] = ()) -> dict[str, str]:
    """The worker's environment with its settings and database; on CPU what `accelerate
    launch --cpu` would set (gloo, no GPU), one thread per process; else the run's GPUs."""
    env = {**os.environ, **ctx.settings.environment(),
           "DATABASE_URL": get_engine().url.render_as_string(hide_password=False),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
           "PYTHONUNBUFFERED": "1", "RLHF_WORKER_PID": str(os.getpid())}  # trainer/job_process.py watches it
    if cpu:
        env |= {"ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
        env.setdefault("OMP_NUM_THREADS", "1")
    elif gpus:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices(gpus)
    return env


class ProcessGroup:
    """The launcher and every process it started, known by id even after the launcher is gone."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.known: dict[int, psutil.Process] = {}
        self.refresh()

    def refresh(self) -> None:
        try:
            launcher = psutil.Process(self.proc.pid)
            found = [launcher, *launcher.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in found:
            self.known.setdefault(p.pid, p)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM to every process of the run (the launcher's process group and the training
        processes in their own sessions), SIGKILL to those left after grace_s; waits for them all."""
        self.refresh()
        self._signal_group(signal.SIGTERM)
        others = [p for pid, p in self.known.items() if pid != self.proc.pid and running(p)]
        for p in others:
            _signal(p, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        _, others = psutil.wait_procs(others, timeout=grace_s)
        try:
            self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        for p in others:
            _signal(p, signal.SIGKILL)
        self._signal_group(signal.SIGKILL)
        psutil.wait_procs(others, timeout=grace_s)
        self.proc.wait()

    def _signal_group(self, sig: int) -> None:
        # Only while the launcher is not reaped: until then its id names its group and no other.
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)  # psutil checks the id still names the same process
    except psutil.NoSuchProcess:
        pass


def run_processes(ctx: JobContext, processes: int, devices: Devices) -> dict[str, Any]:
    """Run the job as `processes` training processes; its result (ctx.model_id set from rank 0).
    Raises JobCancelled (every process stopped) or JobFailed with the processes' error."""
    if processes > devices.max_processes:
        what = f"{len(devices.cuda)} GPU(s)" if devices.uses_cuda else f"{devices.cpu_count} CPU(s) and no GPU"
        raise JobFailed(f"The run asks for {processes} processes; this worker has {what}.")
    # CPU processes where the worker has no GPU or the run's own device setting says so.
    cpu = not devices.uses_cuda or str(ctx.params.get("config", {}).get("device") or "auto") == "cpu"
    if cpu:
        return _run_group(ctx, processes, launch_environment(ctx, cpu=True))
    with GPUS.hold(processes, len(devices.cuda), ctx.check_cancelled) as gpus:
        log.info("job %s: GPUs %s", ctx.job_id, visible_devices(gpus))
        return _run_group(ctx, processes, launch_environment(ctx, cpu=False, gpus=gpus))


def _run_group(ctx: JobContext, processes: int, env: dict[str, str]) -> dict[str, Any]:
    """Launch the processes with `env`, watch them to their end and read their outcome."""
    outcome_dir = Path(tempfile.mkdtemp(prefix=f"rlhf-job-{ctx.job_id}-"))
    output = outcome_dir / "output.log"
    try:
        with output.open("wb") as sink:
            proc = subprocess.Popen(launch_command(ctx.job_id, processes, outcome_dir), cwd=ROOT,
                                    env=env, stdin=subprocess.DEVNULL,
                                    stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        group = ProcessGroup(proc)
        log.info("job %s: %d processes launched (launcher pid %d)", ctx.job_id, processes, proc.pid)
        try:
            while proc.poll() is None:
                ctx.check_cancelled()
                group.refresh()
                time.sleep(POLL_S)
            ctx.check_cancelled(force=True)  # a cancelled run may have ended on its own
        finally:
            group.stop()  # whatever happened, no process of the run outlives it
        return _outcome(ctx, proc.returncode, outcome_dir, processes, output)
    finally:
        shutil.rmtree(outcome_dir, ignore_errors=True)


def _outcome(ctx: JobContext, returncode: int, outcome_dir: Path, processes: int, output: Path) -> dict[str, Any]:
    outcomes = []
    for rank in range(processes):
        path = outcome_path(outcome_dir, rank)
        outcomes.append(json.loads(path.read_text()) if path.exists() else {})
    tail = output.read_text(errors="replace")[-OUTPUT_TAIL_CHARS:] if output.exists() else ""
    if returncode == 0 and "result" in outcomes[0]:
        ctx.model_id = outcomes[0].get("model_id")
        return outcomes[0]["result"]
    if cancelled := next((o["cancelled"] for o in outcomes if "cancelled" in o), None):
        raise JobCancelled(cancelled)
    # A process killed from outside (out of memory, say) is the cause; the others' errors follow from it.
    if killed := next((f for f in launcher_failures(tail) if f.signalled), None):
        raise JobFailed(f"Training process {killed.rank} was killed ({killed.message}); the run's other"
                        " processes were stopped. Out of memory?", details=tail)
    if failed := next((o for o in outcomes if "error" in o), None):
        raise JobFailed(failed["error"], details=(failed.get("traceback") or "") + "\n--- output ---\n" + tail)
    last = next((line for line in reversed(tail.splitlines()) if line.strip(" =")), "no output")
    raise JobFailed(f"A training process stopped (launcher exit status {returncode}) without reporting an error;"
                    f" last output: {last[-300:]}", details=tail)


@dataclass(frozen=True)
class LauncherFailure:
    """One failed process as torch.distributed.elastic's summary reports it."""

    rank: int
    exitcode: int
    message: str

    @property
    def signalled(self) -> bool:
        """Ended by a signal other than the launcher's own SIGTERM to the survivors."""
        return self.exitcode < 0 and -self.exitcode != signal.SIGTERM


_FAILURE_FIELDS = re.compile(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+).*?traceback\s*:\s*([^\n]*)", re.S)


def launcher_failures(output: str) -> list[LauncherFailure]:
    """The failed processes listed in the launcher's closing summary ("[0]:\n  rank : 1 ...")."""
    blocks = re.split(r"^\s*\[\d+\]:\s*$", output, flags=re.M)[1:]
    failures = []
    for block in blocks:
        if match := _FAILURE_FIELDS.search(block):
            failures.append(LauncherFailure(int(match[1]), int(match[2]), match[3].strip()))
    return failures
