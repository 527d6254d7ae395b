"""End-to-end pipelines through the Python API and the CLI: numbers, exactly-once, batching, zero copy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from broker import Pipeline, Skipped, StageFailed
from shmbroker.config import load_config
from workers.stages import linear, normalize, scale

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def write_cfg(tmp_path: Path, cfg: dict, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def synthetic(count: int, shape: list[int], dtype: str = "float64", seed: int = 3) -> dict:
    return {"type": "synthetic", "count": count, "shape": shape, "dtype": dtype, "seed": seed}


def reference_items(count: int, shape: list[int], dtype: str = "float64", seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for _ in range(count)]


def test_run_to_npy_sink_matches_reference_with_partial_batch(tmp_path: Path) -> None:
    count = 23  # 23 = 5 batches of 4 + a partial batch of 3
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path, {
        "name": "t",
        "broker": {"capacity": "32MiB"},
        "source": synthetic(count, [2, 8, 8]),
        "stages": [
            {"name": "pre", "fn": "workers.stages:scale", "args": {"factor": 3.0}, "replicas": 2},
            {"name": "infer", "fn": "workers.stages:normalize", "device": "auto", "batch": 4},
        ],
        "sink": {"type": "npy", "path": str(out)},
    })
    with Pipeline.from_yaml(cfg) as p:
        summary = p.run()
    assert summary.items == count and not summary.skipped and summary.duplicates == 0
    files = sorted(out.glob("*.npy"))
    assert [f.name for f in files] == [f"{i:06d}.npy" for i in range(count)]
    for i, x in enumerate(reference_items(count, [2, 8, 8])):
        got = np.load(out / f"{i:06d}.npy")
        assert got.dtype == np.float64  # float64 in, float64 out
        ref = normalize(scale(torch.from_numpy(x)[None], 3.0))[0].numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    infer = summary.stages[1]
    assert infer["done"] == count
    # bytes copied: the source's write and scale's result, per item; normalize takes out= and
    # writes into its slot directly, except for the first input of each shape (its output shape
    # is learnt then): the first batch of 4 and the partial batch of 3
    item = 2 * 8 * 8 * 8
    assert summary.copied_per_item == pytest.approx((2 * count + 4 + 3) * item / count)
    assert infer["copied"] == (4 + 3) * item
    assert not list(out.glob(".*.tmp"))


def test_map_yields_in_input_order_and_dtype_cast(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, {
        "source": synthetic(1, [4]),
        "stages": [
            {"name": "slow", "fn": "stage_helpers:slow", "args": {"seconds": 0.005}, "replicas": 2},
            {"name": "half", "fn": "workers.stages:identity", "dtype": "float32", "batch": 3},
        ],
    })
    arrays = [np.full((5,), float(i)) for i in range(40)]
    with Pipeline.from_yaml(cfg) as p:
        got = list(p.map(arrays))
    assert len(got) == 40
    for i, y in enumerate(got):
        assert y.dtype == np.float32
        np.testing.assert_array_equal(y, np.full((5,), i + 1.0, dtype=np.float32))


@pytest.mark.parametrize("batch", [1, 4])
def test_driver_feeds_items_of_one_shape_in_groups(tmp_path: Path, batch: int) -> None:
    from shmbroker.driver import FEED_ITEMS

    cfg = write_cfg(tmp_path, {
        "source": synthetic(1, [4]),
        "broker": {"max_inflight": 64},
        "stages": [{"name": "id", "fn": "workers.stages:identity", "batch": batch}],
    })
    shapes = [(3,)] * 5 + [(4,)] + [(3,)] * 40 + [(2, 2)] * 2 + [(3,)] * 40
    arrays = [np.full(shape, float(i)) for i, shape in enumerate(shapes)]
    with Pipeline.from_yaml(cfg) as p:
        got = list(p.map(arrays))
        assert p.client is not None
        requests = p.client.stats()["requests"]
    assert [g.shape for g in got] == shapes
    for i, y in enumerate(got):
        np.testing.assert_array_equal(y, np.full(shapes[i], float(i)))
    # only the driver commits: one reserve and one commit per group of at most FEED_ITEMS items
    # of one shape (the shape changes 4 times)
    assert 4 + len(arrays) // FEED_ITEMS <= requests["commit"] < len(arrays) // 2, requests
    # the worker takes small items a few per task: one reserve per task, not per item
    assert requests["reserve"] - requests["commit"] < len(arrays) // 2, requests


def test_stages_that_declare_out_but_do_not_use_it_still_give_right_results(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, {
        "source": synthetic(1, [4]),
        "stages": [{"name": "twice", "fn": "stage_helpers:ignores_out"},
                   {"name": "cut", "fn": "stage_helpers:shape_by_value"},
                   {"name": "norm", "fn": "workers.stages:normalize", "args": {"mean": 1.0, "std": 2.0}}],
    })
    arrays = [np.full((6,), float(i)) for i in range(30)]
    with Pipeline.from_yaml(cfg) as p:
        got = list(p.map(arrays))
        summary_stages = {s["name"]: s for s in p.client.stats()["stages"]}  # type: ignore[union-attr]
    for i, y in enumerate(got):
        n = (2 * i) % 3 + 1
        np.testing.assert_allclose(y, (np.full((n,), 2.0 * i) - 1.0) / 2.0)
    assert summary_stages["twice"]["copied"] == 30 * 48  # a new tensor each time: copied
    assert summary_stages["norm"]["copied"] < 30 * 24  # into the slot once each length was seen


def test_worker_input_is_an_arena_view_and_batches_are_collated_in_place(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, {
        "source": synthetic(1, [4]),
        "stages": [
            {"name": "one", "fn": "stage_helpers:probe"},
            {"name": "batched", "fn": "stage_helpers:probe_batched", "batch": 4, "batch_timeout": 5.0},
        ],
    })
    arrays = [np.full((3,), float(i)) for i in range(8)]
    with Pipeline.from_yaml(cfg) as p:
        out = list(p.map(arrays))
    for i, rows in enumerate(out):
        # the batched stage got the first stage's 5-value outputs as rows of one [4, 5] tensor
        in_arena, nrows, first_stage_in_arena = rows
        assert in_arena == 1.0, f"item {i}: the batch was not a view of the arena (a stacking copy)"
        assert nrows == 4, f"item {i}: rows were not collated into one batch slot"
        assert first_stage_in_arena == 1.0, f"item {i}: the first stage's input was a copy"


def test_exactly_once_when_a_worker_is_killed_mid_run(tmp_path: Path) -> None:
    count = 60
    cfg = write_cfg(tmp_path, {
        "source": synthetic(count, [8]),
        "stages": [{"name": "slow", "fn": "stage_helpers:slow", "args": {"seconds": 0.02}, "replicas": 2}],
    })
    got: dict[int, np.ndarray] = {}
    killed = []

    def sink(idx: int, arr: np.ndarray) -> None:
        assert idx not in got, f"item {idx} delivered twice"
        got[idx] = arr.copy()
        if len(got) == 10 and not killed:
            victim = p.workers[0].proc
            assert victim is not None
            os.kill(victim.pid, signal.SIGKILL)
            killed.append(victim.pid)

    with Pipeline.from_yaml(cfg) as p:
        summary = p.run(sink=sink)
        assert p.client is not None
        requeued = p.client.stats()["counters"].get("requeued", 0)
    assert killed and summary.restarts.get("slow", 0) >= 1
    assert requeued >= 1, "the killed worker held a task: the broker must have re-queued it"
    assert sorted(got) == list(range(count))
    for i, x in enumerate(reference_items(count, [8])):
        np.testing.assert_array_equal(got[i], x + 1)


def test_on_error_skip_records_items_and_fail_stops_with_traceback(tmp_path: Path) -> None:
    arrays = [np.full((2,), float(i)) for i in range(6)]
    stage = {"name": "boom", "fn": "stage_helpers:boom_on", "args": {"value": 3.0}, "on_error": "skip"}
    cfg = write_cfg(tmp_path, {"source": synthetic(1, [2]), "stages": [stage]})
    with Pipeline.from_yaml(cfg) as p:
        got = list(p.map(arrays, on_skip="marker"))
        assert p.last_summary.skipped == [3]
    assert isinstance(got[3], Skipped) and got[3].index == 3
    assert [float(g[0]) for i, g in enumerate(got) if i != 3] == [0, 10, 20, 40, 50]
    stage["on_error"] = "fail"
    cfg = write_cfg(tmp_path, {"source": synthetic(1, [2]), "stages": [stage]}, "fail.yaml")
    with Pipeline.from_yaml(cfg) as p, pytest.raises(StageFailed) as err:
        list(p.map(arrays))
    text = str(err.value)
    assert "'boom'" in text and "[3]" in text and "RuntimeError: boom on 3.0" in text
    assert "stage_helpers.py" in text  # the worker's traceback came back


def test_cuda_stage_falls_back_to_cpu_with_one_warning(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: the fallback does not apply")
    cfg = write_cfg(tmp_path, {
        "source": synthetic(5, [3]),
        "stages": [{"name": "g", "fn": "workers.stages:scale", "device": "cuda", "replicas": 2}],
    })
    got = {}
    with Pipeline.from_yaml(cfg) as p:
        p.run(sink=lambda i, a: got.__setitem__(i, a.copy()))
        assert len(p.warnings) == 1 and "no CUDA device" in p.warnings[0]
        assert {w.device for w in p.workers} == {"cpu"}
    for i, x in enumerate(reference_items(5, [3])):
        np.testing.assert_array_equal(got[i], x * 2)
    from broker.errors import ConfigError

    with pytest.raises(ConfigError, match="would run on the CPU: this host has no CUDA"):
        Pipeline.from_yaml(cfg, require_gpu=True).plan()


def test_cli_run_json_summary_and_config_error(tmp_path: Path) -> None:
    out = tmp_path / "o"
    cfg = write_cfg(tmp_path, {
        "name": "cli", "source": synthetic(9, [4, 4]),
        "stages": [{"name": "s", "fn": "workers.stages:scale", "args": {"factor": -1.0}}],
        "sink": {"type": "npy", "path": str(out)},
    })
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{TESTS}"}
    cmd = [sys.executable, "-m", "shmbroker", "run", str(cfg), "--json", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["items"] == 9 and summary["skipped"] == []
    for i, x in enumerate(reference_items(9, [4, 4])):
        np.testing.assert_array_equal(np.load(out / f"{i:06d}.npy"), -x)

    bad = write_cfg(tmp_path, {"source": synthetic(1, [1]),
                               "stages": [{"name": "s", "fn": "workers.stages:scale", "replicas": "two"}]},
                    "bad.yaml")
    proc = subprocess.run([sys.executable, "-m", "shmbroker", "run", str(bad)], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert f"{bad}: stages[0].replicas:" in proc.stderr


def test_set_overrides_apply_by_stage_name(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, {"source": synthetic(1, [1]),
                               "stages": [{"name": "s", "fn": "workers.stages:scale"}]})
    c = load_config(cfg, ["stages.s.batch=8", "broker.capacity=16MiB", "stages[0].args.factor=0.5"])
    assert c.stages[0].batch == 8 and int(c.broker.capacity) == 16 * 2**20
    assert c.stages[0].args == {"factor": 0.5}


def test_demo_config_runs_as_shipped(tmp_path: Path) -> None:
    with Pipeline.from_yaml(ROOT / "configs" / "demo.yaml",
                            [f"sink.path={tmp_path}", "source.count=40"]) as p:
        summary = p.run()
    assert summary.items == 40 and len(list(tmp_path.glob("*.npy"))) == 40
    rng = np.random.default_rng(0)
    model = linear(64, 16, seed=0)
    for i in range(40):
        x = rng.standard_normal([3, 64, 64]).astype(np.float32)
        ref = model(normalize(torch.from_numpy(x)[None]))[0].numpy()
        np.testing.assert_allclose(np.load(tmp_path / f"{i:06d}.npy"), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", [None, "cuda"])
def test_worker_attached_from_another_terminal_is_picked_up(tmp_path: Path, device: str | None) -> None:
    """`--device cuda` without an index means the stage's planned device (here, with no GPU,
    the CPU after a warning), never a crash in set_device."""
    # the stage has no workers of its own (replicas: 0): only the attached one can finish the run
    cfg = write_cfg(tmp_path, {
        "source": synthetic(12, [4]),
        "stages": [{"name": "ext", "fn": "workers.stages:scale", "args": {"factor": 5.0}, "replicas": 0}],
    })
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{TESTS}"}
    got: dict[int, np.ndarray] = {}
    with Pipeline.from_yaml(cfg) as p:
        assert p.broker is not None and not p.workers
        extra = ["--device", device] if device else []
        attached = subprocess.Popen([sys.executable, "-m", "shmbroker", "worker", "--config", str(cfg),
                                     "--stage", "ext", "--endpoint", p.broker.endpoint, *extra], env=env)
        try:
            p.run(sink=lambda i, a: got.__setitem__(i, a.copy()))
            stats = p.client.stats() if p.client else {}
        finally:
            attached.terminate()
            attached.wait(30)
    assert [w["pid"] for w in stats["stages"][0]["workers"]] == [attached.pid]
    assert stats["stages"][0]["workers"][0]["device"] == "cpu"
    for i, x in enumerate(reference_items(12, [4])):
        np.testing.assert_array_equal(got[i], x * 5)


def test_npy_files_config_runs_as_shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the shipped config names its data relative to the repository
    with Pipeline.from_yaml(ROOT / "configs" / "npy_files.yaml", [f"sink.path={tmp_path}"]) as p:
        summary = p.run()
    files = sorted((ROOT / "configs" / "data").glob("*.npy"))
    assert summary.items == len(files) == 10
    for i, f in enumerate(files):
        got = np.load(tmp_path / f"{i:06d}.npy")
        assert got.dtype == np.float32  # the infer stage casts; float64 came in
        np.testing.assert_allclose(got, (np.load(f) * 2).astype(np.float32))


def test_a_second_run_reports_its_own_counts(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, {"source": synthetic(7, [16]),
                               "stages": [{"name": "s", "fn": "workers.stages:scale"}]})
    with Pipeline.from_yaml(cfg) as p:
        first = p.run(sink=lambda i, a: None)
        second = p.run(sink=lambda i, a: None)
    for summary in (first, second):
        assert summary.items == 7 and summary.stages[0]["done"] == 7
        assert summary.copied_per_item == 2 * 16 * 8  # the source's write + the stage's


def test_skip_writes_a_failures_file_and_retry_recovers_a_flaky_stage(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path, {
        "source": {"type": "python", "fn": "stage_helpers:counting_source", "args": {"n": 5, "shape": [2]}},
        "stages": [{"name": "boom", "fn": "stage_helpers:boom_on", "args": {"value": 3.0}, "on_error": "skip"}],
        "sink": {"type": "npy", "path": str(out)},
    })
    with Pipeline.from_yaml(cfg) as p:
        p.run(sink=None)
    lines = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["items"] == [3] and lines[0]["stage"] == "boom"
    assert "RuntimeError: boom on 3.0" in lines[0]["trace"]

    marker = tmp_path / "flaky"
    cfg = write_cfg(tmp_path, {
        "source": synthetic(1, [2]),
        "stages": [{"name": "flaky", "fn": "stage_helpers:fail_first", "args": {"marker": str(marker)},
                    "on_error": "retry", "retries": 2}],
    }, "retry.yaml")
    with Pipeline.from_yaml(cfg) as p:
        got = list(p.map([np.full((2,), float(i)) for i in range(4)]))
        assert p.last_summary.skipped == []
    assert [float(g[0]) for g in got] == [0.0, 1.0, 2.0, 3.0]
    assert marker.read_text() == "failed once"  # the first attempt did fail


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this host)")
def test_gpu_stage_with_pinned_arena_matches_cpu_reference(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, {
        "source": synthetic(33, [3, 16, 16], dtype="float32"),
        "stages": [{"name": "g", "factory": "workers.stages:linear", "device": "cuda", "devices": "all",
                    "replicas_per_device": 1, "batch": 8,
                    "args": {"in_features": 16, "out_features": 4, "seed": 0}}],
    })
    got: dict[int, np.ndarray] = {}
    with Pipeline.from_yaml(cfg, require_gpu=True) as p:
        p.run(sink=lambda i, a: got.__setitem__(i, a.copy()))
        assert all(w.device.startswith("cuda:") for w in p.workers)
    model = linear(16, 4, seed=0)
    for i, x in enumerate(reference_items(33, [3, 16, 16], "float32")):
        np.testing.assert_allclose(got[i], model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-4)


def test_tuple_and_dict_results_flow_between_stages_and_to_the_sink(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path, {
        "source": synthetic(10, [4, 3]),
        "stages": [
            {"name": "split", "fn": "stage_helpers:to_dict"},
            {"name": "join", "fn": "stage_helpers:from_dict", "batch": 4},  # 10 items: a partial batch
            {"name": "pair", "fn": "stage_helpers:to_tuple"},
        ],
        "sink": {"type": "npy", "path": str(out)},
    })
    with Pipeline.from_yaml(cfg) as p:
        summary = p.run()
        assert summary.items == 10 and not summary.skipped
        pairs = list(p.map(reference_items(3, [4, 3])))
    for i, x in enumerate(reference_items(10, [4, 3])):
        joined = x * 2 + x.sum(-1).astype(np.float32).astype(np.float64)[:, None]
        with np.load(out / f"{i:06d}.npz") as z:
            np.testing.assert_allclose(z["arr_0"], joined + 1)
            assert z["arr_1"].dtype == np.int64
            np.testing.assert_array_equal(z["arr_1"], (joined * 3).astype(np.int64))
        if i < 3:
            first, second = pairs[i]
            np.testing.assert_allclose(first, joined + 1)


_DRIVER = """
import json, os, sys
from broker import Pipeline
with Pipeline.from_yaml(sys.argv[1], ["source.count=20", "sink={type: 'null'}"]) as p:
    s = p.run()
    ppids = [int(open(f"/proc/{w.proc.pid}/stat").read().rsplit(")", 1)[1].split()[1]) for w in p.workers]
print(json.dumps({"items": s.items, "torch": "torch" in sys.modules, "me": os.getpid(), "ppids": ppids}))
"""


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_the_driver_never_imports_torch_and_workers_start_by_the_chosen_method(method: str) -> None:
    env = dict(os.environ, SHMBROKER_START_METHOD=method)
    out = subprocess.run([sys.executable, "-c", _DRIVER, str(ROOT / "configs" / "demo.yaml")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["items"] == 20
    # forkserver: stage imports and the CUDA count are asked of a process forked like a worker
    assert got["torch"] is (method == "spawn")
    if method == "forkserver":  # forked by the fork server (which holds torch), not by the driver
        assert all(pp != got["me"] for pp in got["ppids"])
    else:
        assert all(pp == got["me"] for pp in got["ppids"])


def test_an_unknown_start_method_is_refused() -> None:
    from shmbroker.supervisor import worker_context

    with pytest.raises(ValueError, match="forkserver or spawn"):
        worker_context("fork")


def test_prefetch_copies_the_next_tasks_input_ahead_and_that_copy_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU overlap's bookkeeping, run on the CPU (SHMBROKER_PREFETCH=1): while one task
    computes, the next waiting task's input is already made; its task then uses it."""
    from broker import Broker, Client
    from broker.protocol import Task
    from workers.runtime import Worker
    from workers.spec import StageSpec

    monkeypatch.setenv("SHMBROKER_PREFETCH", "1")
    spec = StageSpec(name="prep", index=0, fn="workers.stages:scale", args={"factor": 2.0}, credits=2)
    with Broker(capacity=16 * 2**20, stages=[{"name": "prep", "batch": 0}]) as b, \
            Client(b.endpoint, role="driver", pool=False) as c:
        c.register("__sink__", credits=8)
        for i in range(2):
            reserved = c.reserve(0, [i], [3], "<f4", timeout=1.0)
            c.rows(reserved)[0][:] = i + 1
            c.commit(reserved)
        w = Worker(b.endpoint, spec, "cpu")
        inbox = w.client.conn.inbox
        try:
            deadline = time.monotonic() + 10
            while sum(isinstance(m, Task) for m in inbox) < 2 and time.monotonic() < deadline:
                msg = w.client.conn.recv(0.5)
                if msg is not None:
                    inbox.append(msg)
            first = inbox.popleft()
            w._prefetch_next()
            second = inbox[0]
            assert list(w.compute.prefetched) == [second.task]
            w.process(first)
            w.process(inbox.popleft())
            assert w.compute.counters_prefetched == 1 and not w.compute.prefetched
            got = {}
            while len(got) < 2 and time.monotonic() < deadline:
                msg = c.next_message(0.5)
                if isinstance(msg, Task):
                    got[msg.items[0]] = c.task_rows(msg)[0].copy()
            np.testing.assert_array_equal(got[0], [2, 2, 2])
            np.testing.assert_array_equal(got[1], [4, 4, 4])
        finally:
            w.close()


def test_workers_see_the_drivers_environment_as_it_is_when_they_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_cfg(tmp_path, {"source": synthetic(1, [2]),
                               "stages": [{"name": "add", "fn": "stage_helpers:add_env"}]})
    for value in ("1", "5"):  # the fork server is already running for the second pipeline
        monkeypatch.setenv("SHMBROKER_TEST_ADD", value)
        with Pipeline.from_yaml(cfg) as p:
            got = list(p.map([np.zeros(2)]))
        np.testing.assert_array_equal(got[0], [float(value)] * 2)


def test_grouped_source_writes_fit_a_small_arena(tmp_path: Path) -> None:
    """Items of 3.5 MiB through a 16 MiB arena: the driver's groups stay a small part of the
    arena and the source gate counts a request's bytes, so the stage always finds room."""
    cfg = write_cfg(tmp_path, {"broker": {"capacity": "16MiB", "wait_timeout": 5},
                               "source": synthetic(1, [4]),
                               "stages": [{"name": "id", "fn": "workers.stages:scale", "args": {"factor": 1.0}}]})
    arrays = [np.full(int(3.5 * 2**20) // 8, float(i)) for i in range(12)]
    with Pipeline.from_yaml(cfg) as p:
        got = list(p.map(arrays))
    assert [float(g[0]) for g in got] == [float(i) for i in range(12)]


def test_a_failing_item_in_a_grouped_task_gets_exactly_its_retries(tmp_path: Path) -> None:
    calls = tmp_path / "calls.txt"
    stage = {"name": "f", "fn": "stage_helpers:count_and_fail", "on_error": "retry", "retries": 1,
             "args": {"value": 2.0, "path": str(calls)}}
    cfg = write_cfg(tmp_path, {"source": synthetic(1, [2]), "stages": [stage]})
    with Pipeline.from_yaml(cfg) as p, pytest.raises(StageFailed, match=r"\[2\]"):
        list(p.map([np.full((2,), float(i)) for i in range(4)]))  # one group, one task of 4 rows
    assert calls.read_text().count("called") == 2  # the first try and one retry, not three


def test_a_result_that_aliases_its_slot_with_another_shape_is_kept_intact(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, {"source": synthetic(1, [2]),
                               "stages": [{"name": "r", "fn": "stage_helpers:reshapes_out"}]})
    arrays = [np.full((3,), float(i)) for i in range(6)]
    with Pipeline.from_yaml(cfg) as p:
        got = list(p.map(arrays))
    for i, y in enumerate(got):
        np.testing.assert_array_equal(y.reshape(-1), np.full((3,), 2.0 * i))


def test_a_stalled_sink_makes_stage_writes_wait_not_fail(tmp_path: Path) -> None:
    """The sink stops reading for a while: the stage's writes wait for room (up to
    broker.wait_timeout) and every item arrives; nothing is counted as the stage's failure."""
    cfg = write_cfg(tmp_path, {
        "broker": {"capacity": "8MiB", "wait_timeout": 10},
        "source": synthetic(12, [1 << 18], "float32"),  # 1 MiB items
        "stages": [{"name": "twice", "fn": "workers.stages:scale", "args": {"factor": 2.0},
                    "on_error": "skip"}],
    })
    got: list[int] = []

    def sink(idx: int, arr: np.ndarray) -> None:
        if not got:
            time.sleep(1.0)  # the consumer stalls while the stage keeps producing
        got.append(idx)

    with Pipeline.from_yaml(cfg) as p:
        summary = p.run(sink=sink)
        assert p.client is not None
        failed = p.client.stats()["stages"][0]["failed"]
    assert summary.items == 12 and summary.skipped == [] and sorted(got) == list(range(12))
    assert failed == 0


def test_a_stage_write_that_finds_no_room_in_time_is_backpressure_not_a_skip() -> None:
    """A worker's write into the next stage that times out waiting for arena space is never the
    stage's error: with `on_error: skip` the item is not dropped but goes back to its queue, the
    driver is told the run is stuck (ArenaFull, naming the stage), and once room appears the
    same item is processed."""
    from broker import Broker, Client
    from broker.protocol import Failure, Task
    from workers.runtime import Worker
    from workers.spec import StageSpec

    spec = StageSpec(name="twice", index=0, fn="workers.stages:scale", args={"factor": 2.0})
    with Broker(capacity=4 * 2**20, stages=[{"name": "twice", "on_error": "skip"}],
                wait_timeout=0.3) as b, Client(b.endpoint, role="driver", pool=False) as c:
        c.register("__sink__", credits=4)
        reserved = c.reserve(0, [7], [1 << 18], "<f4")  # one 1 MiB item
        c.rows(reserved)[0][:] = 1.5
        c.commit(reserved)
        hog, _ = c.alloc((5 << 19,), "uint8")  # 2.5 MiB: the stage's 1 MiB result cannot fit
        w = Worker(b.endpoint, spec, "cpu")
        try:
            task = w.client.next_message(5)
            assert isinstance(task, Task) and task.items == [7]
            w.process(task)  # its reserve waits 0.3 s, then: backpressure
            msg = c.next_message(5)
            assert isinstance(msg, Failure) and msg.code == "ArenaFull" and msg.items == [7], msg
            assert "stage 'twice' could not write its result" in msg.error and msg.fatal
            st = c.stats()
            assert st["stages"][0]["failed"] == 0 and st["counters"]["arena_waits"] == 1
            assert st["stages"][0]["queue"] + st["stages"][0]["inflight"] == 1  # not dropped
            c.release(hog)
            again = w.client.next_message(5)
            assert isinstance(again, Task) and again.items == [7] and again.attempts == 0
            w.process(again)
            result = c.next_message(5)
            assert isinstance(result, Task) and result.items == [7]
            np.testing.assert_array_equal(c.task_rows(result)[0], np.full(1 << 18, 3.0, np.float32))
            c.done(result, wait=True)
        finally:
            w.close()


def test_bfloat16_results_flow_between_stages_and_reach_the_sink_as_their_raw_bits(tmp_path: Path) -> None:
    """NumPy has no bfloat16: a stage with `dtype: bfloat16` stores its results as 16 raw bits,
    the next stage receives torch.bfloat16 tensors, and NumPy consumers see uint16 bits."""
    import torch

    arrays = [np.linspace(-3, 3, 10, dtype=np.float32) * (i + 1) for i in range(6)]
    want = [torch.from_numpy(a).bfloat16() for a in arrays]
    one = write_cfg(tmp_path, {"source": synthetic(1, [10]),
                               "stages": [{"name": "half", "fn": "workers.stages:identity",
                                           "dtype": "bfloat16"}]}, "one.yaml")
    with Pipeline.from_yaml(one) as p:
        bits = list(p.map(arrays))
    for b, w in zip(bits, want, strict=True):
        assert b.dtype == np.uint16
        assert torch.equal(torch.from_numpy(b.astype(np.int16)).view(torch.bfloat16), w)
    two = write_cfg(tmp_path, {"source": synthetic(1, [10]),
                               "stages": [{"name": "half", "fn": "workers.stages:identity", "dtype": "bfloat16"},
                                          {"name": "back", "fn": "workers.stages:cast",
                                           "args": {"dtype": "float32"}, "batch": 4}]}, "two.yaml")
    with Pipeline.from_yaml(two) as p:
        back = list(p.map(arrays))
    for b, w in zip(back, want, strict=True):  # the second stage got bfloat16 values, not their bits
        assert b.dtype == np.float32
        np.testing.assert_array_equal(b, w.float().numpy())


def test_workers_get_their_output_slots_with_their_tasks(tmp_path: Path) -> None:
    """After its first task, a worker says what its results need (``done.next_out``) and the
    broker sends each next task with its output slots reserved: a worker asks nothing while it
    works, so the broker handles two messages a task (the task, its done) instead of four."""
    count = 120
    cfg = write_cfg(tmp_path, {
        "source": synthetic(count, [80_000], "float32"),  # 320 KB: one item per task
        "stages": [{"name": "twice", "fn": "workers.stages:scale", "args": {"factor": 2.0},
                    "replicas": 2},
                   {"name": "sum", "fn": "stage_helpers:row_sums", "batch": 4}],
    })
    got: dict[int, np.ndarray] = {}
    with Pipeline.from_yaml(cfg) as p:
        p.run(sink=lambda i, a: got.__setitem__(i, a.copy()))
        assert p.client is not None
        requests = p.client.stats()["requests"]
    assert sorted(got) == list(range(count))
    for i, x in enumerate(reference_items(count, [80_000], "float32")):
        np.testing.assert_allclose(got[i], np.float32((x * 2).sum()), rtol=1e-4)
    groups = requests.get("commit", 0)  # the driver's reservations, one per group of items
    workers = requests["reserve"] - groups
    assert workers <= 12, requests  # ~ the first task of each of the 3 workers, not ~160
