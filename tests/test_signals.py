"""Stopping ``shmbroker run`` from outside: SIGTERM (docker stop, Kubernetes), Ctrl-C (SIGINT to
the terminal's process group) and ``kill -9`` of the driver. Each leaves nothing behind and the
run can be resumed."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from run_helpers import (
    check_every_item_once,
    manifest,
    private_env,
    results,
    run,
    slow_config,
    start_run,
    wait_results,
    wait_session_gone,
)

COUNT = 40


def assert_nothing_left(tmp_path: Path, sid: int) -> None:
    assert wait_session_gone(sid) == {}, "processes of the run are left"
    assert list((tmp_path / "rundir").iterdir()) == [], "a runtime directory is left"
    assert list((tmp_path / "tmp").iterdir()) == [], "temporary files (/tmp/pymp-*) are left"


def resume_to_the_end(tmp_path: Path, cfg: Path, env: dict[str, str], before: int) -> None:
    done = run(cfg, env, "--resume", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["resumed"] == before and summary["items"] == COUNT - before
    check_every_item_once(tmp_path / "out", COUNT)
    assert manifest(tmp_path / "out")["complete"] is True


def stop_gracefully(tmp_path: Path, how: str) -> tuple[str, int]:
    env = private_env(tmp_path)
    cfg = slow_config(tmp_path, COUNT)
    proc = start_run(cfg, env)
    wait_results(tmp_path / "out", 8, proc)
    t0 = time.monotonic()
    if how == "SIGTERM":
        os.kill(proc.pid, signal.SIGTERM)  # the driver only, as docker stop and Kubernetes do
    else:
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's whole process group, as Ctrl-C does
    _out, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 15, "the graceful stop took too long"
    assert_nothing_left(tmp_path, proc.pid)
    for crashlike in ("Traceback", "ERROR", "exited", "Broken pipe", "OOM"):
        assert crashlike not in err, err
    assert f"interrupted by {how}" in err and "--resume" in err
    m = manifest(tmp_path / "out")
    assert m["complete"] is False and m["stopped"] == f"interrupted by {how}"
    before = len(results(tmp_path / "out"))
    assert 0 < before < COUNT
    resume_to_the_end(tmp_path, cfg, env, before)
    return err, proc.returncode


def test_sigterm_stops_gracefully_with_143_and_the_run_resumes(tmp_path: Path) -> None:
    _err, code = stop_gracefully(tmp_path, "SIGTERM")
    assert code == 143


def test_ctrl_c_stops_gracefully_with_130_and_the_run_resumes(tmp_path: Path) -> None:
    _err, code = stop_gracefully(tmp_path, "SIGINT")
    assert code == 130


def test_kill_9_of_the_driver_leaves_nothing_and_the_run_resumes_each_item_once(tmp_path: Path) -> None:
    env = private_env(tmp_path)
    cfg = slow_config(tmp_path, COUNT)
    proc = start_run(cfg, env)
    wait_results(tmp_path / "out", 10, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert_nothing_left(tmp_path, proc.pid)  # the broker and the workers it started went too
    assert manifest(tmp_path / "out")["complete"] is False  # the marker of a partial output
    refused = run(cfg, env)
    assert refused.returncode == 2 and "holds an unfinished run" in refused.stderr
    resume_to_the_end(tmp_path, cfg, env, len(results(tmp_path / "out")))
