"""The GPU benchmarks say why they did not run on a host without CUDA, and exit 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="checks the no-CUDA path; on a GPU host run the benchmarks themselves")


@pytest.mark.parametrize("cmd", [["benchmarks/gpu.py"], ["benchmarks/pipeline.py", "--device", "cuda"]])
def test_gpu_benchmarks_skip_with_the_reason(tmp_path: Path, cmd: list[str]) -> None:
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, *cmd, "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "skipped" in run.stdout and "CUDA" in run.stdout
    data = json.loads(out.read_text())
    assert "is_available() is False" in data["skipped"] and data["machine"]["cpu_count"] >= 1
