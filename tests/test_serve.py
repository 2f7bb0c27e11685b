"""`rlhf serve --workers N`: N web processes from the app factory, answering at once."""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import typer

from app.cli import cli
from tests.conftest import _free_port


def _web_processes(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sum("spawn_main" in Path(f"/proc/{child}/cmdline").read_text() for child in children)


def test_serve_with_workers_runs_that_many_processes_without_a_nagle_delay(database_url, committed, tmp_path):
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "RLHF_DATA_DIR": str(tmp_path),
           "RLHF_ADMIN_PASSWORD": "serve-test-password", "PYTHONPATH": os.getcwd()}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", "from app.cli import main; main()", "serve", "--no-worker",
                             "--workers", "2", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert _web_processes(proc.pid) == 2
        with httpx.Client(base_url=base) as client:
            client.get("/healthz")
            times = []
            for _ in range(30):
                started = time.perf_counter()
                assert client.get("/healthz").status_code == 200
                times.append(time.perf_counter() - started)
        # Without TCP_NODELAY every answer waited ~40 ms for the client's delayed ACK.
        assert statistics.median(times) < 0.02, times
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize(("args", "workers"), [([], None), (["--workers", "3"], 3)])
def test_serve_takes_the_number_of_cores_unless_told(args, workers):
    """`scripts/run.sh` runs `rlhf serve` with no --workers: the default must parse (None: one
    web process per core, decided at start), and a number given is kept."""
    serve = typer.main.get_command(cli).commands["serve"]
    assert serve.make_context("serve", args).params["workers"] == workers


def test_serve_refuses_zero_workers():
    serve = typer.main.get_command(cli).commands["serve"]
    with pytest.raises(typer.BadParameter):
        serve.make_context("serve", ["--workers", "0"])


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_stops_serve_and_its_job_worker(database_url, committed, tmp_path):
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "RLHF_DATA_DIR": str(tmp_path),
           "RLHF_ADMIN_PASSWORD": "serve-test-password", "PYTHONPATH": os.getcwd()}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", "from app.cli import main; main()", "serve",
                             "--workers", "1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        workers = [int(c) for c in children if "worker" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(workers) == 1, children
        proc.terminate()
        proc.wait(30)
        # The worker used to outlive `serve`: uvicorn's re-raised SIGTERM killed serve first.
        deadline = time.monotonic() + 5
        while _alive(workers[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(workers[0]), (tmp_path / "serve.log").read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
