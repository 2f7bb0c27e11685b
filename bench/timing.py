"""The timing the benchmarks share, and waiting for and stopping the server they measure."""

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """The best of `repeat` runs of fn, in seconds, and its last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def wait_until_ready(proc: subprocess.Popen, base: str, log_path: Path, timeout_s: float) -> None:
    """Poll the server's /readyz until it answers 200; exit with the log's path if the
    server exits or is not ready within timeout_s."""
    import httpx  # only the server benchmarks need it

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise SystemExit(f"the server did not get ready; see {log_path}")


def stop_server(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """Ask the server to stop; kill it if it has not within timeout_s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
