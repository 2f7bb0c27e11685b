"""The deployment files stay valid."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_docker_compose_file_is_valid():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed; scripts/test.sh installs it")
    result = subprocess.run([exe, "config", "-q"], cwd=ROOT, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    services = subprocess.run([exe, "config", "--services"], cwd=ROOT, capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin"}).stdout.split()
    assert set(services) == {"postgres", "web", "worker"}
