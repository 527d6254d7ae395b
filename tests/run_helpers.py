"""Helpers for tests that run ``shmbroker run`` as a real process and stop or kill it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def slow_config(tmp_path: Path, count: int = 40, seconds: float = 0.05, **extra: Any) -> Path:
    """A run of ``count`` items through a stage that takes ``seconds`` per item (x + 1)."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "slow",
        "source": {"type": "synthetic", "count": count, "shape": [3], "dtype": "float64", "seed": 5},
        "stages": [{"name": "slow", "fn": "stage_helpers:slow", "args": {"seconds": seconds},
                    "replicas": 2}],
        "sink": {"type": "npy", "path": str(tmp_path / "out")}, **extra}))
    return cfg


def expected(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.standard_normal([3]) + 1 for _ in range(count)]


def private_env(tmp_path: Path) -> dict[str, str]:
    """The run's runtime directories and temporary files in directories of this test's own, so
    what it leaves behind can be seen (and only its own)."""
    for d in ("rundir", "tmp"):
        (tmp_path / d).mkdir(exist_ok=True)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]),
            "SHMBROKER_RUNTIME_DIR": str(tmp_path / "rundir"), "TMPDIR": str(tmp_path / "tmp")}


def start_run(cfg: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """``shmbroker run`` in a session of its own (its pid is the session's id)."""
    return subprocess.Popen([sys.executable, "-m", "shmbroker", "run", str(cfg), "--no-progress", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def run(cfg: Path, env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmbroker", "run", str(cfg), "--no-progress", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


def session(sid: int) -> dict[int, str]:
    """``{pid: command}`` of the processes (zombies included) in session ``sid``."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    out[int(entry.name)] = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
        except (OSError, IndexError, ValueError):
            continue
    return out


def wait_session_gone(sid: int, timeout: float = 20.0) -> dict[int, str]:
    """Wait until no process of session ``sid`` is left; returns those still there at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        left = session(sid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def results(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.suffix in (".npy", ".npz"))


def wait_results(out: Path, n: int, proc: subprocess.Popen[str], timeout: float = 60.0) -> int:
    """Wait until at least ``n`` result files are in ``out``; returns how many there are."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.is_dir() and len(results(out)) >= n:
            return len(results(out))
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} results after {timeout} s")


def manifest(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "shmbroker-run.json").read_text()))


def check_every_item_once(out: Path, count: int) -> None:
    assert results(out) == [f"{i:06d}.npy" for i in range(count)]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    for i, want in enumerate(expected(count)):
        np.testing.assert_allclose(np.load(out / f"{i:06d}.npy"), want, rtol=1e-12)
