"""The test harness itself: its leak checks look only at what this project makes, and it leaves no
directories behind in /tmp."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import _RUNTIME_BASE, our_tree, ours_in_dev_shm

TESTS = Path(__file__).resolve().parent


def test_dev_shm_check_sees_our_entries_and_ignores_other_programs() -> None:
    if not os.path.isdir("/dev/shm"):
        return
    ours = f"/dev/shm/shmbroker-harness-{os.getpid()}"
    by_pid = f"/dev/shm/torch_{os.getpid()}_0_harness"
    other = f"/dev/shm/someone-else-{os.getpid()}"
    foreign_pid = "/dev/shm/torch_1_0_harness"  # pid 1 is not a process of this test
    made = [ours, by_pid, other, foreign_pid]
    try:
        for path in made:
            Path(path).touch()
        found = ours_in_dev_shm(our_tree())
        assert {Path(ours).name, Path(by_pid).name} <= found
        assert Path(other).name not in found and Path(foreign_pid).name not in found
    finally:
        for path in made:
            Path(path).unlink(missing_ok=True)


def test_a_child_that_imports_conftest_makes_no_directory_of_its_own() -> None:
    """A spawned child imports conftest again (to unpickle a test's function); it must reuse the
    session's runtime base, not leave another empty /tmp/shmbroker-tests-* behind."""
    pattern = os.path.join(tempfile.gettempdir(), "shmbroker-tests-*")
    before = set(glob.glob(pattern))
    out = subprocess.run([sys.executable, "-c", "import conftest, os; print(os.environ['SHMBROKER_RUNTIME_DIR'])"],
                         cwd=TESTS, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(_RUNTIME_BASE)
    assert set(glob.glob(pattern)) - before == set()
