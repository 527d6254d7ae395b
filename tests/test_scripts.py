"""A user's script as written by a new user: a Pipeline built at top level, without the
``if __name__ == "__main__":`` guard, run as ``python script.py`` and as ``python - < script.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """\
source: {type: synthetic, count: 1, shape: [4]}
stages:
  - {name: twice, fn: "workers.stages:scale", args: {factor: 2.0}, replicas: 2}
"""

UNGUARDED = """\
import numpy as np
from broker import Pipeline

arrays = [np.full(4, float(i)) for i in range(6)]
with Pipeline.from_yaml("p.yaml") as p:
    out = list(p.map(arrays))
print("results", [float(o[0]) for o in out])
"""

# What a CPython whose process launch this project cannot adjust would do: run the main script
# again in every worker. The run must then stop at once with one message showing the guard.
STOCK_LAUNCH = """\
import multiprocessing.popen_forkserver, multiprocessing.popen_spawn_posix
import shmbroker.supervisor as sup
sup._ForkServerProcess._popen = multiprocessing.popen_forkserver.Popen
sup._SpawnProcess._popen = multiprocessing.popen_spawn_posix.Popen
"""


def run_script(tmp_path: Path, text: str, how: str, method: str,
               timeout: float = 90) -> subprocess.CompletedProcess[str]:
    (tmp_path / "p.yaml").write_text(CONFIG)
    script = tmp_path / "script.py"
    script.write_text(text)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SHMBROKER_START_METHOD": method}
    if how == "file":
        return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=timeout)
    return subprocess.run([sys.executable, "-"], input=text, cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("how, method", [("file", "forkserver"), ("stdin", "forkserver"),
                                         ("file", "spawn"), ("stdin", "spawn")])
def test_a_script_without_the_main_guard_runs(tmp_path: Path, how: str, method: str) -> None:
    out = run_script(tmp_path, UNGUARDED, how, method)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "results [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]" in out.stdout
    assert "bootstrapping" not in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_where_the_main_script_runs_again_the_run_stops_at_once_showing_the_guard(
        tmp_path: Path, method: str) -> None:
    out = run_script(tmp_path, STOCK_LAUNCH + UNGUARDED, "file", method, timeout=60)
    assert out.returncode == 1
    assert out.stderr.count('if __name__ == "__main__":') == 1, out.stderr[-3000:]
    assert "bootstrapping" not in out.stderr and "OOM" not in out.stderr
    assert "exited" not in out.stderr  # not a crash loop of restarted workers
