"""The devices the running workers advertise, and the `processes` a training run may ask for.

A worker records its row when it starts (trainer/worker.py), touches it at every
heartbeat and removes it when it stops; a row not seen for
worker_stalled_after_s is a dead worker's and counts for nothing. A run of N > 1
processes waits on its own queue ("gpu-2p", app/queue.processes_queue), which
only workers that can start N processes listen on: N GPUs, or N CPUs on a
machine without CUDA.
"""

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.config import get_settings
from app.db.models import WorkerDevices

MAX_PROCESSES = 64


def advertise(session: Session, *, worker: str, queues: Sequence[str], cuda_devices: Sequence[Mapping[str, Any]],
              cpu_count: int, memory_bytes: int, max_processes: int) -> None:
    """Record (or replace) a starting worker's devices; rows of workers long dead go. Commits."""
    values = dict(queues=list(queues), cuda_devices=[dict(d) for d in cuda_devices], cpu_count=cpu_count,
                  memory_bytes=memory_bytes, max_processes=max_processes, started_at=func.now(), seen_at=func.now())
    session.execute(insert(WorkerDevices).values(worker=worker, **values)
                    .on_conflict_do_update(index_elements=[WorkerDevices.worker], set_=values))
    session.execute(delete(WorkerDevices).where(WorkerDevices.seen_at < func.now() - timedelta(days=1)))
    session.commit()


def seen(session: Session, *, worker: str) -> None:
    """The worker is alive (its heartbeat). Commits."""
    session.execute(WorkerDevices.__table__.update().where(WorkerDevices.worker == worker)
                    .values(seen_at=func.now()))
    session.commit()


def forget(session: Session, *, worker: str) -> None:
    """The worker stopped. Commits."""
    session.execute(delete(WorkerDevices).where(WorkerDevices.worker == worker))
    session.commit()


def live_workers(session: Session, *, queue: str | None = None) -> list[WorkerDevices]:
    """Workers seen within worker_stalled_after_s (those listening on `queue` when given), most
    processes first."""
    fresh = func.now() - timedelta(seconds=get_settings().worker_stalled_after_s)
    rows = session.scalars(select(WorkerDevices).where(WorkerDevices.seen_at >= fresh)
                           .order_by(WorkerDevices.max_processes.desc(), WorkerDevices.worker))
    return [w for w in rows if queue is None or queue in w.queues]


def most_processes(session: Session, queue: str) -> int:
    """The most processes a job on `queue` can get from a live worker (1 when none runs: a
    one-process job waits for the next worker)."""
    workers = live_workers(session, queue=queue)
    return max([1, *(w.max_processes for w in workers)])


def whole_processes(errors: dict[str, str], raw: Any) -> int:
    """`processes` (default 1) as a whole number 1..MAX_PROCESSES; a message in errors["processes"] otherwise."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return 1
    try:
        number = float(str(raw).strip()) if not isinstance(raw, bool) else None
    except ValueError:
        number = None
    if number is None or not number.is_integer() or not 1 <= number <= MAX_PROCESSES:
        errors["processes"] = f"must be a whole number 1..{MAX_PROCESSES}"
        return 1
    return int(number)


def clean_processes(errors: dict[str, str], session: Session, raw: Any, queue: str) -> int:
    """A run's `processes` (default 1): a whole number from 1 to what a live worker on `queue`
    advertises; a message in errors["processes"] otherwise."""
    processes = whole_processes(errors, raw)
    if processes == 1:
        return 1
    workers = live_workers(session, queue=queue)
    offered = max([1, *(w.max_processes for w in workers)])
    if processes > offered:
        if not workers:
            errors["processes"] = (f"no running worker listens on the '{queue}' queue to start {processes}"
                                   " processes; start one (rlhf worker) or choose 1")
        else:
            best = workers[0]
            what = (f"{len(best.cuda_devices)} GPU{'s' if len(best.cuda_devices) != 1 else ''}" if best.cuda_devices
                    else f"{best.cpu_count} CPU{'s' if best.cpu_count != 1 else ''} and no GPU")
            errors["processes"] = (f"the running workers can start at most {offered} process"
                                   f"{'es' if offered != 1 else ''} (the largest, {best.worker}, has {what})")
    return processes
