"""The code base stays lint- and type-clean (ruff and mypy as configured in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("cmd", [
    ["ruff", "check", "."],
    ["mypy"],
])
def test_clean(cmd: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout + out.stderr
