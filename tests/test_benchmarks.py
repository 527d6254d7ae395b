"""The benchmarks start, run their peers on tiny sizes, and skip what cannot run here with the reason.

Smokes only (a few reps of the smallest size): the numbers are not checked, the code paths are.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import handoff  # noqa: E402

HAVE_ICEORYX2 = importlib.util.find_spec("iceoryx2") is not None
HAVE_SPDL = importlib.util.find_spec("spdl") is not None


def run(args: list[str], hide: str = "", timeout: float = 110) -> subprocess.CompletedProcess[str]:
    """A benchmark script in a fresh interpreter; ``hide``: a package made unimportable there first
    (as if it were not installed)."""
    if hide:
        code = (f"import runpy, sys; sys.modules[{hide!r}] = None; sys.argv = {args!r}; "
                f"runpy.run_path({args[0]!r}, run_name='__main__')")
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="checks the no-CUDA path; on a GPU host run the benchmarks themselves")
@pytest.mark.parametrize("cmd", [["benchmarks/gpu.py"], ["benchmarks/pipeline.py", "--device", "cuda"]])
def test_gpu_benchmarks_skip_with_the_reason(tmp_path: Path, cmd: list[str]) -> None:
    out = tmp_path / "r.json"
    ran = subprocess.run([sys.executable, *cmd, "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert "skipped" in ran.stdout and "CUDA" in ran.stdout
    data = json.loads(out.read_text())
    assert "is_available() is False" in data["skipped"] and data["machine"]["cpu_count"] >= 1


NEW_PEERS = ["shm_handle", "shm_copy", "shmbroker", "shmbroker_pickle", "shmbroker_put", "queue", "queue_spin", "iceoryx2"]


def test_handoff_new_peers_run_on_a_tiny_size(tmp_path: Path) -> None:
    """The hand-rolled shared_memory peers, put + Handle, both queue consumers and iceoryx2 (or its
    skip line) hand off 4 KiB arrays; every label names its timed window; nothing is left behind."""
    out = tmp_path / "h.json"
    ran = run(["benchmarks/handoff.py", "--sizes", "4KiB", "--repeat", "3", "--no-plot", "--no-refs",
               "--spin-ms", "5", "--peers", ",".join(NEW_PEERS), "--out", str(out)])
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "KeyError" not in ran.stderr  # the resource tracker never saw the consumer's attach
    data = json.loads(out.read_text())
    ran_peers = set(data["handoff"])
    expected = set(NEW_PEERS) - ({"iceoryx2"} if not HAVE_ICEORYX2 else set())
    assert ran_peers == expected
    for key in ran_peers:
        res = data["handoff"][key]["4096"]
        assert res["touch"]["n"] == 3 and res["read_all"]["n"] == 3 and res["touch"]["p50_us"] > 0
        assert "[" in data["peers"][key] and "]" in data["peers"][key]  # the timed window, in brackets
    assert data["consumer_info"]["queue_spin"]["spin_budget_us_p50"] == pytest.approx(5000)
    if HAVE_ICEORYX2:
        assert data["iceoryx2_files"]["left_by_this_run"] == []
        assert any(line.startswith("  (c)") and "vs iceoryx2" in line and ("met" in line or "MISSED" in line)
                   for line in data["targets"])
    else:
        assert "not importable" in data["skipped"]["iceoryx2"]
    assert any("(b)" in line and "copy in + handle" in line for line in data["targets"])


@pytest.mark.timeout(200)
def test_handoff_runs_report_the_median_of_the_per_run_p50s_and_ratios(tmp_path: Path) -> None:
    """--runs 2: every row keeps both runs' p50s and reports their median, the peers' order is
    rotated, and goal (a) records the ratio within each run and how many runs met it."""
    out = tmp_path / "h.json"
    ran = run(["benchmarks/handoff.py", "--sizes", "4KiB", "--repeat", "3", "--no-plot", "--no-refs",
               "--runs", "2", "--peers", "shm_handle,shmbroker", "--out", str(out)], timeout=180)
    assert ran.returncode == 0, ran.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["config"]["runs"] == 2 and len(data["runs"]) == 2
    assert [r["order"] for r in data["runs"]] == [["shm_handle", "shmbroker"], ["shmbroker", "shm_handle"]]
    for key in ("shm_handle", "shmbroker"):
        for mode in ("touch", "read_all"):
            row = data["handoff"][key]["4096"][mode]
            per_run = [r["handoff"][key]["4096"][mode]["p50_us"] for r in data["runs"]]
            assert row["runs_p50"] == per_run and all(p > 0 for p in per_run)
            assert row["p50_us"] == pytest.approx(statistics.median(per_run), abs=0.006)
            assert row["n"] == 3
    goal = next(g for g in data["goals"] if g["tag"] == "(a)")
    assert (goal["key"], goal["peer"], goal["runs"]) == ("shmbroker", "shm_handle", 2)
    size = goal["sizes"]["4096"]
    p50 = [{k: r["handoff"][k]["4096"]["touch"]["p50_us"] for k in ("shmbroker", "shm_handle")}
           for r in data["runs"]]
    expected = [p["shmbroker"] / p["shm_handle"] for p in p50]
    assert size["runs_ratio"] == pytest.approx(expected, abs=1e-4)
    assert size["runs_met"] == [x <= 1.25 for x in expected] == goal["runs_met"]
    assert goal["met_runs"] == sum(x <= 1.25 for x in expected)
    assert size["median_ratio"] == pytest.approx(statistics.median(expected), abs=1e-4)
    assert goal["met"] == (statistics.median(expected) <= 1.25)
    line = next(line for line in data["targets"] if line.startswith("  (a)"))
    assert f"{'met' if goal['met'] else 'MISSED'}, met in {goal['met_runs']} of 2 runs" in line
    assert line in ran.stdout and "median over the runs of the ratio within each run" in ran.stdout


def test_handoff_aggregation_over_runs() -> None:
    """Fabricated runs: each row is the median of the runs' p50s; the verdict is the median of
    the per-run ratios (met here, although the ratio of the median p50s, 1.3x, would miss)."""
    def st(p50: float) -> dict[str, float | int]:
        return {"p50_us": p50, "p99_us": 2 * p50, "min_us": p50 / 2, "max_us": 3 * p50, "n": 5}

    merged = handoff.merge_runs([{"nbytes": 4096, "touch": st(p)} for p in (10.0, 40.0, 20.0)])
    assert merged["nbytes"] == 4096
    assert merged["touch"] == {"p50_us": 20.0, "p99_us": 40.0, "min_us": 10.0, "max_us": 60.0, "n": 5,
                               "runs_p50": [10.0, 40.0, 20.0]}
    with pytest.raises(ValueError):
        handoff.median_stats([st(1.0), {**st(1.0), "n": 4}])
    assert [handoff.peer_order(["a", "b", "c"], i) for i in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]

    handle, broker = (100.0, 60.0, 50.0), (100.0, 78.0, 60.0)  # ratios 1.0, 1.3, 1.2 in runs 1-3
    runs: list[dict[str, Any]] = [
        {"handoff": {"shm_handle": {"4096": {"nbytes": 4096, "touch": st(a)}},
                     "shmbroker": {"4096": {"nbytes": 4096, "touch": st(b)}}}}
        for a, b in zip(handle, broker, strict=True)]
    result: dict[str, Any] = {
        "config": {"sizes": [4096]}, "skipped": {}, "runs": runs,
        "handoff": {k: handoff.merge_runs([r["handoff"][k] for r in runs]) for k in ("shm_handle", "shmbroker")}}
    goal = handoff.goal_records(result)[0]
    assert goal["tag"] == "(a)" and goal["runs"] == 3
    size = goal["sizes"]["4096"]
    assert size["runs_ratio"] == pytest.approx([1.0, 1.3, 1.2])
    assert size["runs_met"] == [True, False, True] and goal["met_runs"] == 2
    assert size["median_ratio"] == pytest.approx(1.2) and goal["met"] is True
    assert size["ratio_of_median_p50s"] == pytest.approx(1.3)
    line = handoff.targets(result)[1]
    assert "<= 1.25x at every size: met, met in 2 of 3 runs (4 KiB: median ratio 1.20x" in line
    runs[2]["handoff"]["shmbroker"]["4096"]["touch"] = st(65.0)  # run 3: 1.3x, so the median is 1.3x
    result["handoff"]["shmbroker"] = handoff.merge_runs([r["handoff"]["shmbroker"] for r in runs])
    goal = handoff.goal_records(result)[0]
    assert goal["met"] is False and goal["met_runs"] == 1
    assert "MISSED, met in 1 of 3 runs" in handoff.targets(result)[1]


def test_handoff_skips_iceoryx2_with_the_reason_when_it_is_missing(tmp_path: Path) -> None:
    out = tmp_path / "h.json"
    ran = run(["benchmarks/handoff.py", "--sizes", "4KiB", "--repeat", "3", "--no-plot", "--no-refs",
               "--peers", "iceoryx2", "--out", str(out)], hide="iceoryx2")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "iceoryx2: skipped, not importable" in ran.stderr
    data = json.loads(out.read_text())
    assert data["handoff"] == {} and "not importable" in data["skipped"]["iceoryx2"]
    assert any("(c)" in line and "not checked (" in line and "iceoryx2 skipped: not importable" in line
               for line in data["targets"])


def test_handoff_segments_are_unlinked_by_the_producer() -> None:
    from multiprocessing import shared_memory

    peer = handoff.ShmPeer(copy=True)
    peer.open(__import__("multiprocessing").get_context("spawn"))
    name, _src, dst = peer.prepare(4096)
    seg = handoff.attach_untracked(name)  # what a consumer does
    assert float(seg.buf.cast("f")[0]) == handoff.FILL
    seg.close()
    del dst
    peer.close()
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=name)


def test_pipeline_spdl_runs_or_skips_with_the_reason(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    ran = run(["benchmarks/pipeline.py", "--systems", "spdl", "--sizes", "4KiB", "--seconds", "0.2",
               "--reps", "3", "--out", str(out)])
    assert ran.returncode == 0, ran.stderr[-3000:]
    data = json.loads(out.read_text())
    if HAVE_SPDL:
        res = data["results"]["spdl/4096"]
        assert len(res["runs"]) == 3 and all(r["items"] == res["count"] for r in res["runs"])
        assert "spdl (one process, all threads)" in res["stats"]["cpu_ms_per_item"]
    else:
        assert "spdl: skipped, not importable" in ran.stdout
    assert any("not checked: shmbroker not run" in line for line in data["goals"])


def test_pipeline_hand_wired_queues_deliver_every_item(tmp_path: Path) -> None:
    """The "queues" system (the pipeline wired by hand on handle queues) runs its timed runs to
    the end and is set beside shmbroker's Pipeline, its broker's share of CPU reported."""
    out = tmp_path / "p.json"
    ran = run(["benchmarks/pipeline.py", "--systems", "shmbroker,rings,queues", "--sizes", "4KiB",
               "--seconds", "0.2", "--reps", "3", "--out", str(out)], timeout=240)
    assert ran.returncode == 0, ran.stderr[-3000:]
    data = json.loads(out.read_text())
    res = data["results"]["queues/4096"]
    assert len(res["runs"]) == 3 and all(r["items"] == res["count"] for r in res["runs"])
    assert {"driver", "broker", "preprocess", "model", "total"} <= set(res["stats"]["cpu_ms_per_item"])
    ratios = data["ratios"]
    assert "queues" in ratios["shmbroker"]["4096"] and 0 <= ratios["queues"]["4096"] < 1
    assert "shmbroker/hand-wired queues" in data["ratio_table"]
    # the Pipeline with tasks in rings delivers every item of every timed run, its goals judged apart
    rings = data["results"]["rings/4096"]
    assert all(r["items"] == rings["count"] and r["duplicates"] == 0 for r in rings["runs"])
    assert "shmbroker rings/hand-wired queues" in data["ratio_table"]
    assert any(g.startswith("pipeline goals of issue 13, rings") for g in data["goals"])


def test_pipeline_skips_spdl_with_the_reason_when_it_is_missing(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    ran = run(["benchmarks/pipeline.py", "--systems", "spdl", "--sizes", "4KiB", "--out", str(out)],
              hide="spdl")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "spdl: skipped, not importable" in ran.stdout
    data = json.loads(out.read_text())
    assert data["results"] == {} and "not importable" in data["systems_skipped"]["spdl"]
