"""The README's setup (`make install`, behind `make demo` and `make test`): a disk without room for
the environment stops it before anything is created, with one line naming the fix."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _install(venv: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "install", f"VENV={venv}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_install_refuses_a_disk_without_room_before_creating_anything(tmp_path):
    venv = tmp_path / "deeper" / "venv"
    # PYTHON=false: were the check missing, the venv step would fail at once instead of installing.
    done = _install(venv, "MIN_FREE_GB=100000000", "PYTHON=false")
    assert done.returncode != 0
    line = next(x for x in done.stderr.splitlines() if "needs about" in x)
    assert line.startswith(f"make: {venv} needs about 100000000 GB free, and {tmp_path} has ")
    assert line.endswith("free some space, or put it on a larger disk with VENV=/path/to/venv")
    assert not (tmp_path / "deeper").exists()


def test_install_goes_on_where_the_disk_has_room(tmp_path):
    # PYTHON=echo: the step after the check prints its arguments instead of creating the venv, and
    # the pip step then fails, so nothing is installed; it shows that the check let it go on.
    venv = tmp_path / "venv"
    done = _install(venv, "MIN_FREE_GB=0", "PYTHON=echo")
    assert "needs about" not in done.stderr
    assert f"-m venv {venv}" in done.stdout
    assert done.returncode != 0
