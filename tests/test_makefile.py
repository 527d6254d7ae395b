"""`make demo` installs only what the demo needs; `make test` installs the dev extra, also after `make demo`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def dry_run(target: str, venv: Path) -> str:
    """The commands ``make TARGET`` would run (``make -n``) for a venv at ``venv``."""
    out = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_demo_installs_no_dev_tools_and_test_installs_them(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    demo = dry_run("demo", venv)
    assert "pip install -q -e .\n" in demo and "[dev]" not in demo
    assert "shmbroker run configs/demo.yaml --overwrite" in demo  # a second `make demo` works too
    assert '-e ".[dev]"' in dry_run("test", venv)
    deps = " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    for tool in ("ruff", "mypy", "hadolint", "pytest"):
        assert tool not in deps


def test_test_after_demo_still_installs_the_dev_extra(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").touch()  # what `make demo` leaves (newer than pyproject.toml)
    os.utime(venv / ".installed")
    test = dry_run("test", venv)
    assert '-e ".[dev]"' in test and "-m venv" not in test
    assert "pip install" not in dry_run("demo", venv)  # the demo's needs are met
