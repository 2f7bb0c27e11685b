"""Multi-process jobs: a training run asking for 2 processes, started from the API, runs
through a real worker as 2 CPU processes under `accelerate launch` (trainer/processes.py);
its curves appear while it runs; cancelling it or losing a process stops every process."""

import os
import re
import signal
from datetime import timedelta

import psutil
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.config import Settings
from app.db.enums import JobKind, JobStatus, ModelKind, Role
from app.db.models import Job, JobMetric, Model, ModelSample, WorkerDevices
from app.db.session import new_session
from app.services import jobs, training, worker_devices
from app.services.errors import Invalid
from tests.conftest import TEST_PASSWORD, csrf_of_page, login
from tests.factories import demonstration_set, make_model, make_user, ranked_set
from tests.workers import load_job, wait_for, workers  # noqa: F401 - the fixture

# Tiny steps; no learning curve (it would train extra models).
QUICK = {"epochs": 2, "batch_size": 4, "learning_rate": 1e-3, "max_length": 96, "warmup_ratio": 0,
         "learning_curve": False}
LONG = QUICK | {"epochs": 100, "early_stopping_patience": 0}


@pytest.fixture
def reward_data(committed, tiny_model_dir):
    with new_session() as session:
        engineer, alice = make_user(session, role=Role.engineer), make_user(session)
        make_model(session, tiny_model_dir, name="tiny-sft", is_default=True)
        prompt_set = ranked_set(session, alice, prompts=24)
        session.commit()
        return {"engineer": engineer, "set": prompt_set.id}


@pytest.fixture
def api(reward_data, tmp_path):
    """The real app on the test database (no per-test session: the worker must see what it writes),
    signed in as the engineer."""
    from app.main import create_app

    with TestClient(create_app(Settings(data_dir=tmp_path, secret_key="test-secret")), follow_redirects=False) as c:
        c.headers["X-CSRF-Token"] = login(c, reward_data["engineer"], TEST_PASSWORD)
        yield c


def start_worker(workers):  # noqa: F811
    proc = workers.start()
    wait_for(lambda: worker_row(proc.pid), 60, "the worker to advertise its devices", workers)
    return proc


def worker_row(pid: int) -> WorkerDevices | None:
    with new_session() as session:
        row = session.scalar(select(WorkerDevices).where(WorkerDevices.worker.endswith(f":{pid}")))
        session.expunge_all()
        return row


def training_processes(worker_pid: int) -> list[psutil.Process]:
    """The worker's descendants that run trainer.job_process (the training processes)."""
    found = []
    for p in psutil.Process(worker_pid).children(recursive=True):
        try:
            if "trainer.job_process" in " ".join(p.cmdline()) and "accelerate" not in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def all_training_processes() -> list[psutil.Process]:
    """Every process on the machine running trainer.job_process (an orphan included)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if "trainer.job_process" in " ".join(p.info["cmdline"] or []):
            out.append(p)
    return out


def metric_count(job_id: int) -> int:
    with new_session() as session:
        return session.scalar(select(func.count(JobMetric.id)).where(JobMetric.job_id == job_id))


def start_reward_run(api, data, config, processes=2) -> int:
    response = api.post("/api/v1/training/reward", json={"prompt_set_ids": [data["set"]], "processes": processes,
                                                         "config": config, "name": "tiny-rm-2p"})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def training_run(workers, worker, api, data) -> tuple[int, list[psutil.Process]]:  # noqa: F811
    """A long 2-process reward run started from the API, once it trains: (job id, its training processes)."""
    job_id = start_reward_run(api, data, LONG)
    wait_for(lambda: metric_count(job_id) > 0, 180, "the job to train", workers)
    ranks = training_processes(worker.pid)
    assert len(ranks) == 2
    return job_id, ranks


def gone(processes: list[psutil.Process]) -> bool:
    def dead(p):
        try:
            return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    return all(dead(p) for p in processes)


# ---- through a real worker -----------------------------------------------------------

def test_a_two_process_reward_run_from_the_api_runs_through_the_worker_with_live_curves(
        workers, reward_data, api):  # noqa: F811
    worker = start_worker(workers)
    assert worker_row(worker.pid).max_processes >= 2  # 2 CPUs here, no GPU (RLHF_DEVICE=cpu)
    job_id = start_reward_run(api, reward_data, QUICK)
    assert load_job(job_id).queue == "gpu-2p"

    # Curves while it runs: metrics recorded (by rank 0) while the job is still running.
    live = wait_for(lambda: (load_job(job_id).status.finished and "finished") or
                    (metric_count(job_id) > 0 and load_job(job_id).status == JobStatus.running and "live"),
                    180, "the job's first metrics", workers, interval=0.05)
    assert live == "live"
    assert len(training_processes(worker.pid)) == 2
    done = wait_for(lambda: load_job(job_id).status.finished and load_job(job_id), 180, "the job to end", workers)
    assert done.status == JobStatus.succeeded, (done.error, done.traceback)
    with new_session() as session:
        model = session.get(Model, done.model_id)
        assert (model.kind, model.name, model.job_id) == (ModelKind.reward, "tiny-rm-2p", job_id)
        assert model.metrics["processes"] == 2  # the trainer ran as two processes
        assert session.scalar(select(func.count(Model.id)).where(Model.job_id == job_id)) == 1  # rank 0 only
        steps = session.scalars(select(JobMetric.step).where(JobMetric.job_id == job_id,
                                                             JobMetric.name == "loss")).all()
    assert len(steps) == len(set(steps)) == done.result["steps"]  # each step once: one process records
    assert done.progress_done == done.progress_total == done.result["steps"]
    assert training_processes(worker.pid) == [] and not all_training_processes()


@pytest.mark.slow  # about a minute on 2 busy cores
def test_a_two_process_sft_run_registers_its_model_and_samples_once(workers, committed, tiny_model_dir):  # noqa: F811
    with new_session() as session:
        admin = make_user(session, role=Role.admin)
        base = make_model(session, tiny_model_dir, name="tiny-base")
        s = demonstration_set(session, admin, prompts=8, validation=2, question="Question {i}: what colour is the sky?",
                              answer="Blue.")
        start_worker(workers)
        job = training.start_sft_job(session, user_id=admin.id, base_model_id=base.id, prompt_set_ids=[s.id],
                                     values={"epochs": 2, "batch_size": 2, "learning_rate": 1e-3, "max_length": 96},
                                     name="tiny-sft-2p", processes=2)
    done = wait_for(lambda: load_job(job.id).status.finished and load_job(job.id), 240, "the job to end", workers)
    assert done.status == JobStatus.succeeded, (done.error, done.traceback)
    with new_session() as session:
        model = session.get(Model, done.model_id)
        assert (model.kind, model.name, model.metrics["processes"]) == (ModelKind.sft, "tiny-sft-2p", 2)
        samples = session.execute(select(ModelSample.stage, ModelSample.prompt_id)
                                  .where(ModelSample.model_id == model.id)).all()
    # Each prompt answered once before and once after: rank 0 alone samples and registers.
    befores, afters = ([p for stage, p in samples if stage == name] for name in ("before", "after"))
    assert befores and sorted(befores) == sorted(afters) and len(set(befores)) == len(befores)
    assert not all_training_processes()


def test_cancelling_a_running_two_process_job_stops_both_processes(workers, reward_data, api):  # noqa: F811
    worker = start_worker(workers)
    job_id, ranks = training_run(workers, worker, api, reward_data)

    response = api.post(f"/api/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200, response.text
    stopped = wait_for(lambda: load_job(job_id).status.finished and load_job(job_id), 30, "the job to stop", workers)
    assert stopped.status == JobStatus.cancelled
    wait_for(lambda: gone(ranks), 10, "both training processes to end", workers)
    assert not all_training_processes() and worker.poll() is None  # the worker itself goes on
    with new_session() as session:
        assert session.scalar(select(func.count(Model.id)).where(Model.job_id == job_id)) == 0


def test_a_killed_training_process_fails_the_job_and_stops_the_other(workers, reward_data, api):  # noqa: F811
    worker = start_worker(workers)
    job_id, ranks = training_run(workers, worker, api, reward_data)
    os.kill(ranks[-1].pid, signal.SIGKILL)  # out of memory, say

    failed = wait_for(lambda: load_job(job_id).status.finished and load_job(job_id), 60, "the job to fail", workers)
    assert failed.status == JobStatus.failed
    assert re.match(r"Training process [01] was killed \(Signal 9 \(SIGKILL\)", failed.error), failed.error
    wait_for(lambda: gone(ranks), 10, "the other training process to end", workers)
    assert not all_training_processes()


def test_a_worker_that_shuts_down_stops_the_processes_and_queues_the_job_again(workers, reward_data, api):  # noqa: F811
    # The job is not cancelled: only the worker's own stop can end these processes.
    worker = workers.start(RLHF_WORKER_SHUTDOWN_TIMEOUT_S="0.5")
    wait_for(lambda: worker_row(worker.pid), 60, "the worker to advertise its devices", workers)
    job_id, ranks = training_run(workers, worker, api, reward_data)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    wait_for(lambda: gone(ranks), 10, "both training processes to end", workers)
    assert not all_training_processes()
    job = load_job(job_id)
    assert job.status == JobStatus.queued and "worker shut down" in job.error
    assert worker_row(worker.pid) is None  # a stopped worker no longer advertises its devices


def test_the_processes_of_a_killed_worker_stop_by_themselves(workers, reward_data, api):  # noqa: F811
    # SIGKILL: the worker can stop nothing; its run's processes notice it is gone.
    worker = start_worker(workers)
    job_id, ranks = training_run(workers, worker, api, reward_data)
    worker.kill()
    worker.wait(10)
    wait_for(lambda: gone(ranks), 20, "both training processes to end", workers)
    wait_for(lambda: not all_training_processes(), 20, "the launcher to end", workers)


def test_an_error_inside_the_training_processes_fails_the_job_with_that_error(workers, reward_data):  # noqa: F811
    start_worker(workers)
    with new_session() as session:
        params = training.clean_reward_params(session, values=QUICK, prompt_set_ids=[reward_data["set"]])
        # Checked when queued; the model is gone by the time the processes read it.
        job = jobs.enqueue_job(session, kind=JobKind.train_reward, params=params | {"processes": 2,
                               "base_model_id": 999_999}, queue="gpu-2p")
    failed = wait_for(lambda: load_job(job.id).status.finished and load_job(job.id), 120, "the job to fail", workers)
    assert failed.status == JobStatus.failed
    assert "999999" in failed.error and "NotFound" in failed.error, failed.error
    assert "Traceback" in failed.traceback and "reward_job" in failed.traceback
    assert not all_training_processes()


# ---- the setting on the API and the forms ---------------------------------------------

def advertise(max_processes: int, *, worker: str = "gpu-box:1", age_s: float = 0) -> None:
    with new_session() as session:
        worker_devices.advertise(session, worker=worker, queues=["default", "gpu", "gpu-2p"],
                                 cuda_devices=[{"name": "H100", "memory_bytes": 80 << 30}] * max_processes,
                                 cpu_count=16, memory_bytes=128 << 30, max_processes=max_processes)
        if age_s:
            session.execute(update(WorkerDevices).where(WorkerDevices.worker == worker)
                            .values(seen_at=func.now() - timedelta(seconds=age_s)))
            session.commit()


def test_processes_are_checked_against_the_live_workers(reward_data):
    def problem(processes) -> str | None:
        with new_session() as session:
            try:
                training.clean_reward_params(session, values=QUICK, prompt_set_ids=[reward_data["set"]],
                                             processes=processes)
            except Invalid as exc:
                return exc.errors.get("processes")
        return None

    assert problem(1) is None and problem("") is None
    assert "no running worker" in problem(2) and "'gpu' queue" in problem(2)
    for bad in ("two", 0, 1.5, -1, 65, True):
        assert "whole number 1..64" in problem(bad), bad
    advertise(2, age_s=3600)  # a worker that stopped answering counts for nothing
    assert "no running worker" in problem(2)
    advertise(2)
    assert problem(2) is None
    assert problem(3) == "the running workers can start at most 2 processes (the largest, gpu-box:1, has 2 GPUs)"
    with new_session() as session:
        job = training.start_reward_job(session, user_id=None, values=QUICK, prompt_set_ids=[reward_data["set"]],
                                        processes=2)
        assert (job.queue, job.params["processes"]) == ("gpu-2p", 2)


def test_the_api_and_the_form_refuse_more_processes_than_a_worker_offers(reward_data, api):
    advertise(2)
    response = api.post("/api/v1/training/reward", json={"prompt_set_ids": [reward_data["set"]], "processes": 4,
                                                         "config": QUICK})
    assert response.status_code == 422
    assert "at most 2 processes" in response.json()["errors"]["processes"]

    page = api.get("/training/reward")
    assert 'name="processes"' in page.text and "offer up to 2" in page.text
    form = {"csrf_token": csrf_of_page(api, "/training/reward"), "prompt_set_ids": str(reward_data["set"]),
            "processes": "3", **{k: str(v) for k, v in QUICK.items() if not isinstance(v, bool)}}
    refused = api.post("/training/reward", data=form)
    assert refused.status_code == 422 and "at most 2 processes" in refused.text
    with new_session() as session:
        assert session.scalar(select(func.count(Job.id))) == 0
    form["processes"] = "2"
    assert api.post("/training/reward", data=form).status_code == 303
    with new_session() as session:
        assert session.scalar(select(Job.queue)) == "gpu-2p"


def test_dpo_runs_take_processes_on_the_api_and_the_form(reward_data, api):
    quick = {"epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "max_length": 96, "validation_samples": 0}
    advertise(2)
    response = api.post("/api/v1/training/dpo", json={"prompt_set_ids": [reward_data["set"]], "processes": 4,
                                                      "config": quick})
    assert response.status_code == 422
    assert "at most 2 processes" in response.json()["errors"]["processes"]

    page = api.get("/training/dpo")
    assert 'name="processes"' in page.text and "offer up to 2" in page.text
    form = {"csrf_token": csrf_of_page(api, "/training/dpo"), "prompt_set_ids": str(reward_data["set"]),
            "processes": "2", **{k: str(v) for k, v in quick.items()}}
    assert api.post("/training/dpo", data=form).status_code == 303
    with new_session() as session:
        job = session.scalars(select(Job)).one()
        assert (job.kind, job.queue, job.params["processes"]) == (JobKind.train_dpo, "gpu-2p", 2)


# ---- GPUs of its own for each run -----------------------------------------------------

def test_runs_at_once_get_gpus_of_their_own_and_wait_for_them():
    import threading

    from trainer.jobs import JobCancelled
    from trainer.processes import GpuPool

    pool, never = GpuPool(), lambda: None
    with pool.hold(2, 4, never) as first, pool.hold(2, 4, never) as second:
        assert sorted(first + second) == [0, 1, 2, 3]
        got, started = [], threading.Event()

        def third():
            started.set()
            with pool.hold(2, 4, never) as gpus:
                got.append(gpus)

        waiting = threading.Thread(target=third)
        waiting.start()
        started.wait()
        waiting.join(1.5)
        assert waiting.is_alive() and not got  # all four are held

        def cancelled():
            raise JobCancelled("Cancelled.")
        with pytest.raises(JobCancelled), pool.hold(1, 4, cancelled):
            pass  # a cancelled run stops waiting, holding nothing
    waiting.join(5)
    assert len(got) == 1 and len(set(got[0])) == 2  # once they are released, the waiting run takes two


def test_a_run_sees_only_its_gpus_numbered_as_the_worker_sees_them(monkeypatch, tmp_path):
    from trainer.jobs import JobContext
    from trainer.processes import launch_environment, visible_devices

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_devices([1, 3]) == "1,3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert visible_devices([1, 3]) == "5,7"
    ctx = JobContext(job_id=1, kind=JobKind.train_reward, params={}, settings=Settings(data_dir=tmp_path))
    assert launch_environment(ctx, cpu=False, gpus=[0, 2])["CUDA_VISIBLE_DEVICES"] == "4,6"
    assert launch_environment(ctx, cpu=True)["CUDA_VISIBLE_DEVICES"] == ""
