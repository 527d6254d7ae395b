"""Pipelines whose tasks travel in rings (``broker.rings: true``): the same results, failures and
crash safety as with tasks as messages, and no broker message per task."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from broker import BadRequest, Client, Pipeline, StageFailed
from broker.errors import WorkerDied
from shmbroker.config import load_config

pytestmark = pytest.mark.timeout(180)


def write_cfg(tmp_path: Path, cfg: dict) -> Path:
    cfg.setdefault("broker", {}).setdefault("rings", True)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def synthetic(count: int, shape: list[int], seed: int = 3) -> dict:
    return {"type": "synthetic", "count": count, "shape": shape, "dtype": "float64", "seed": seed}


def reference(count: int, shape: list[int], seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(count)]


def test_results_match_with_a_batched_stage_and_no_message_per_task(tmp_path: Path) -> None:
    count = 203  # groups of the batch (8), a partial one at the end
    cfg = write_cfg(tmp_path, {
        "broker": {"capacity": "32MiB", "max_inflight": 32},
        "source": synthetic(count, [3, 5]),
        "stages": [{"name": "pre", "fn": "workers.stages:scale", "args": {"factor": 3.0}, "replicas": 2},
                   {"name": "infer", "fn": "stage_helpers:row_sums", "batch": 8}],
    })
    got: dict[int, np.ndarray] = {}

    def sink(i: int, a: np.ndarray) -> None:
        assert i not in got, f"item {i} twice"
        got[i] = a.copy()

    with Pipeline.from_yaml(cfg) as p:
        assert p.client is not None
        p.run(sink=lambda i, a: None)  # warm: the workers' pools are filled
        before = p.client.stats()["requests"]
        summary = p.run(sink=sink)
        after = p.client.stats()["requests"]
        stages = {s["name"]: s for s in summary.stages}
    for i, x in enumerate(reference(count, [3, 5])):
        np.testing.assert_allclose(got[i], np.float32((x * 3.0).sum()), rtol=1e-5)
    assert summary.items == count and summary.duplicates == 0 and not summary.skipped
    assert stages["pre"]["done"] == count and stages["infer"]["done"] == count
    assert stages["pre"]["busy"] > 0 and stages["infer"]["rate"] > 0
    # tasks as messages would be a reserve, a commit, tasks and dones per group: here none at all
    moved = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    for kind in ("reserve", "commit", "done", "fail"):
        assert kind not in moved, moved
    assert sum(moved.values()) < count // 8, moved  # a few pool refills and stats, not per group


def test_map_keeps_input_order_and_tuple_results(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, {
        "broker": {"capacity": "32MiB"},
        "source": synthetic(1, [4]),
        "stages": [{"name": "pair", "fn": "stage_helpers:to_tuple", "replicas": 2}],
    })
    arrays = [np.full(4, float(i)) for i in range(150)]
    with Pipeline.from_yaml(cfg) as p:
        out = list(p.map(arrays))
    assert len(out) == 150
    for i, (a, b) in enumerate(out):
        np.testing.assert_array_equal(a, arrays[i] + 1)
        np.testing.assert_array_equal(b, (arrays[i] * 3).astype(np.int64))


def test_a_row_that_raises_is_skipped_alone(tmp_path: Path) -> None:
    count = 40
    cfg = write_cfg(tmp_path, {
        "source": {"type": "python", "fn": "stage_helpers:counting_source", "args": {"n": count, "shape": [2]}},
        "stages": [{"name": "boom", "fn": "stage_helpers:boom_on", "args": {"value": 7.0},
                    "on_error": "skip"}],
    })
    got: list[int] = []
    with Pipeline.from_yaml(cfg) as p:
        summary = p.run(sink=lambda i, a: got.append(i))
    assert summary.skipped == [7] and sorted(got) == [i for i in range(count) if i != 7]
    assert summary.failures and "boom" in summary.failures[0]["error"]


def test_a_stage_that_fails_stops_the_run_with_its_traceback(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, {
        "source": {"type": "python", "fn": "stage_helpers:counting_source", "args": {"n": 20, "shape": [2]}},
        "stages": [{"name": "boom", "fn": "stage_helpers:boom_on", "args": {"value": 5.0}}],
    })
    with Pipeline.from_yaml(cfg) as p, pytest.raises(StageFailed) as err:
        p.run(sink=lambda i, a: None)
    assert "stage 'boom' failed on item(s) [5]" in str(err.value) and "worker traceback" in str(err.value)


def test_retry_runs_a_failing_row_again(tmp_path: Path) -> None:
    marker = tmp_path / "failed-once"
    cfg = write_cfg(tmp_path, {
        "source": {"type": "python", "fn": "stage_helpers:counting_source", "args": {"n": 10, "shape": [2]}},
        "stages": [{"name": "flaky", "fn": "stage_helpers:fail_first", "args": {"marker": str(marker)},
                    "on_error": "retry", "retries": 2}],
    })
    got: list[int] = []
    with Pipeline.from_yaml(cfg) as p:
        summary = p.run(sink=lambda i, a: got.append(i))
    assert marker.exists() and sorted(got) == list(range(10)) and not summary.skipped


def test_each_item_once_when_workers_are_killed_mid_run(tmp_path: Path) -> None:
    count = 120
    cfg = write_cfg(tmp_path, {
        "broker": {"capacity": "32MiB", "max_inflight": 16},
        "source": synthetic(count, [8]),
        "stages": [{"name": "slow", "fn": "stage_helpers:slow", "args": {"seconds": 0.01}, "replicas": 2,
                    "retries": 5},
                   {"name": "scale", "fn": "workers.stages:scale", "args": {"factor": 2.0}}],
    })
    got: dict[int, np.ndarray] = {}
    kills: list[int] = []
    with Pipeline.from_yaml(cfg) as p:
        def sink(i: int, a: np.ndarray) -> None:
            assert i not in got, f"item {i} delivered twice"
            got[i] = a.copy()
            if len(got) in (20, 60):  # a worker of the slow stage, holding tasks of its queue
                victim = next(w.proc for w in p.workers if w.spec.name == "slow" and w.proc is not None
                              and w.proc.exitcode is None and w.proc.pid not in kills)
                assert victim is not None and victim.pid is not None
                os.kill(victim.pid, signal.SIGKILL)
                kills.append(victim.pid)

        summary = p.run(sink=sink)
        assert p.client is not None
        requeued = p.client.stats()["counters"].get("requeued", 0)
    for i, x in enumerate(reference(count, [8])):
        np.testing.assert_array_equal(got[i], (x + 1) * 2.0)
    assert len(kills) == 2 and summary.restarts.get("slow", 0) >= 1
    assert requeued >= 1, "a killed worker held a task: its queue must have given it back"


def test_an_item_that_kills_its_workers_fails_alone_with_the_exit_code(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, {
        "source": synthetic(3, [2]),
        "stages": [{"name": "crash", "fn": "stage_helpers:die"}],
    })
    with Pipeline.from_yaml(cfg) as p, pytest.raises(WorkerDied) as err:
        p.run(sink=lambda i, a: None)
    text = str(err.value)
    assert re.search(r"stage 'crash' gave up on item\(s\) \[[012]\]", text) and "attempt 3 of 3" in text, text
    assert "exit code 17" in text, text


def test_the_stage_queues_are_the_brokers_and_nothing_leaks(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, {
        "broker": {"capacity": "16MiB"},
        "source": synthetic(50, [16]),
        "stages": [{"name": "pre", "fn": "workers.stages:scale", "replicas": 2}],
    })
    with Pipeline.from_yaml(cfg) as p:
        assert p.client is not None and p.broker is not None
        p.run(sink=lambda i, a: None)
        # another client may not make a queue under a stage queue's name, nor take its tasks
        # with a plain handle queue of the same name by mistake
        with Client(p.broker.endpoint) as c, pytest.raises(BadRequest, match="stage queues"):
            c.queue("__stage__/9")
        for _ in range(3):
            summary = p.run(sink=lambda i, a: None)
        st = p.client.stats()
        stages = {s["name"]: s for s in st["stages"]}
    assert summary.items == 50
    assert stages["pre"]["queue"] == 0 and stages["pre"]["inflight"] == 0  # every task was released
    assert stages["__sink__"]["queue"] == 0


def test_rings_need_one_host(tmp_path: Path) -> None:
    path = write_cfg(tmp_path, {
        "source": synthetic(2, [2]),
        "stages": [{"name": "s", "fn": "workers.stages:identity"}],
        "cluster": {"address": "auto"},
    })
    with pytest.raises(Exception, match="rings"):
        load_config(path)


def test_a_broker_that_dies_stops_ring_workers(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, {
        "source": synthetic(5, [2]),
        "stages": [{"name": "s", "fn": "workers.stages:identity", "replicas": 2}],
    })
    with Pipeline.from_yaml(cfg) as p:
        p.run(sink=lambda i, a: None)
        assert p.broker is not None
        os.kill(p.broker.pid, signal.SIGKILL)
        procs = [w.proc for w in p.workers if w.proc is not None]
        deadline = time.monotonic() + 30
        while any(pr.exitcode is None for pr in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(pr.exitcode is not None for pr in procs), "ring workers did not notice the broker is gone"
    from broker.rundir import cleanup

    cleanup()  # the dead broker's runtime directory stays until a cleanup (or the next broker start)


def test_the_next_tasks_input_is_prefetched_and_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU overlap's bookkeeping with tasks in rings, run on the CPU (SHMBROKER_PREFETCH=1):
    while one batch computes, the next one's input is made on the side stream and then used (as
    with tasks as messages, for batches: a stage that takes one item at a time moves each row
    to the device as it calls the stage)."""
    from broker import Broker
    from broker.protocol import Task
    from workers.runtime import Worker
    from workers.spec import StageSpec

    monkeypatch.setenv("SHMBROKER_PREFETCH", "1")
    spec = StageSpec(name="prep", index=0, fn="workers.stages:scale", args={"factor": 2.0}, batch=2)
    with Broker(capacity=16 * 2**20, stages=[{"name": "prep", "batch": 2}], max_inflight=8, rings=True) as b, \
            Client(b.endpoint, role="driver") as c:
        c.register("__sink__")
        first, sink = c.task_queue(0), c.task_queue(1)
        for g in range(2):
            h, block = c.alloc((2, 3), "float32")
            block[:] = [[g + 1] * 3, [g + 10] * 3]
            first.put(Task(task=0, stage=0, items=[2 * g, 2 * g + 1], handle=h, rows=2, batched=True))
        w = Worker(b.endpoint, spec, "cpu")
        try:
            assert w.rings is not None and w.rings.prefetch
            w.rings.run(lambda: sink.qsize() >= 2)
            assert w.compute.counters_prefetched == 1 and not w.compute.prefetched
        finally:
            w.close()
        got = {}
        for _ in range(2):
            t = sink.get(timeout=5)
            for i, row in zip(t.items, c.task_rows(t), strict=True):
                got[i] = row.copy()
            c.release(t.handle)
    assert {i: float(v[0]) for i, v in got.items()} == {0: 2.0, 1: 20.0, 2: 4.0, 3: 22.0}


def test_large_groups_are_reused_by_their_writers_without_messages(tmp_path: Path) -> None:
    """Groups of 1/8 of the arena (8 MiB of 512 KiB items): a writer reuses its group's block
    once the next stage is done with it, as iceoryx2's publishers reuse their samples; no
    allocation and no drop message per group (the per-client budget of large blocks allows one
    such block, which cost two messages per group and writer). A run's messages are its pools'
    first blocks, whatever its length."""
    cfg = write_cfg(tmp_path, {
        "broker": {"capacity": "64MiB", "max_inflight": 48},
        "source": synthetic(1, [1 << 16]),
        "stages": [{"name": "pre", "fn": "workers.stages:scale"},
                   {"name": "sum", "fn": "stage_helpers:row_sums", "batch": 16}],
    })
    arrays = [np.full(1 << 16, float(i)) for i in range(16 * 40)]

    def messages(p: Pipeline, n: int) -> int:
        assert p.client is not None
        before = p.client.stats()["requests"]
        out = list(p.map(arrays[:n]))
        assert [float(o) for o in out] == [2.0 * i * (1 << 16) for i in range(n)]
        after = p.client.stats()["requests"]
        return sum(after.get(k, 0) - before.get(k, 0) for k in ("alloc_many", "alloc", "drop"))

    with Pipeline.from_yaml(cfg) as p:
        messages(p, 64)  # warm
        short, long = messages(p, 16 * 10), messages(p, 16 * 40)
    assert long - short < 10, (short, long)  # 30 more groups: not 60 more messages


def test_queues_that_would_not_fit_the_arena_are_refused_with_the_fix() -> None:
    from broker import Broker, BrokerError

    with pytest.raises(BrokerError, match="lower max_inflight"):
        Broker(capacity=8 * 2**20, stages=[{"name": "s"}], max_inflight=20_000, rings=True)


def test_a_batch_larger_than_a_default_slot_travels(tmp_path: Path) -> None:
    """A stage queue's slots are sized for the largest batch's item ids (here 300)."""
    count = 600
    cfg = write_cfg(tmp_path, {
        "broker": {"capacity": "64MiB", "max_inflight": 600},
        "source": {"type": "python", "fn": "stage_helpers:counting_source", "args": {"n": count, "shape": [2]}},
        "stages": [{"name": "sum", "fn": "stage_helpers:row_sums", "batch": 300}],
    })
    got: dict[int, float] = {}
    with Pipeline.from_yaml(cfg) as p:
        p.run(sink=lambda i, a: got.__setitem__(i, float(a)))
    assert got == {i: 2.0 * i for i in range(count)}


def test_rows_of_a_split_task_keep_their_hold_while_another_of_them_is_released(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A task a dead worker held comes back split into rows of one block; a worker that holds
    two of them (the next one taken ahead, as for a GPU's prefetch) and releases the first must
    keep its hold on the block and the second's pending entry (one release ends both)."""
    from broker import Broker
    from broker.protocol import Task
    from workers import rings
    from workers.runtime import Worker
    from workers.spec import StageSpec

    monkeypatch.setenv("SHMBROKER_PREFETCH", "1")
    seen: list[tuple[bool, int]] = []
    process = rings.RingLoop.process

    def watch(self: rings.RingLoop, group: list[Task]) -> None:
        process(self, group)
        if self.carry is not None:  # the next row, taken before this one was released
            seen.append((self.client.holds_handle(self.carry.handle), self.src.counters()["pending"]))

    monkeypatch.setattr(rings.RingLoop, "process", watch)
    spec = StageSpec(name="a", index=0, fn="workers.stages:scale", args={"factor": 2.0}, retries=3)
    with Broker(capacity=16 * 2**20, stages=[{"name": "a", "retries": 3}], max_inflight=8, rings=True) as b, \
            Client(b.endpoint, role="driver") as c:
        c.register("__sink__")
        first, sink = c.task_queue(0), c.task_queue(1)
        h, block = c.alloc((3, 4), "float32")
        block[:] = [[1] * 4, [2] * 4, [3] * 4]
        # as the queue gives a task back after its worker died once
        first.put(Task(task=0, stage=0, items=[0, 1, 2], handle=h, rows=3, each=True, attempts=1))
        w = Worker(b.endpoint, spec, "cpu")
        try:
            assert w.rings is not None
            w.rings.run(lambda: sink.qsize() >= 3)
        finally:
            w.close()
        got = {}
        for _ in range(3):
            t = sink.get(timeout=5)
            got.update({i: float(r[0]) for i, r in zip(t.items, c.task_rows(t), strict=True)})
            c.release(t.handle)
    assert got == {0: 2.0, 1: 4.0, 2: 6.0}
    assert seen and all(held and pending >= 1 for held, pending in seen), seen


def test_items_that_grow_during_a_run_are_held_to_the_arena(tmp_path: Path) -> None:
    """2,000 items of 128 B, then 60 of 2 MiB through three stages in a 48 MiB arena: what an
    item in flight holds is estimated from each stage's result/input ratio, not its result size
    per item so far (which the small items keep tiny: the arena ran full)."""
    cfg = write_cfg(tmp_path, {
        "broker": {"capacity": "48MiB", "max_inflight": 64, "wait_timeout": 10},
        "source": {"type": "python", "fn": "stage_helpers:small_then_big"},
        "stages": [{"name": "s1", "fn": "workers.stages:scale", "args": {"factor": 2.0}},
                   {"name": "s2", "fn": "workers.stages:scale", "args": {"factor": 3.0}},
                   {"name": "s3", "fn": "workers.stages:scale", "args": {"factor": 1.0}}],
    })
    with Pipeline.from_yaml(cfg) as p:
        summary = p.run(sink=lambda i, a: None)
    assert summary.items == 2060


def test_status_of_a_rings_pipeline_shows_its_stages_and_no_made_up_worker_counts(tmp_path: Path) -> None:
    from rich.console import Console

    from shmbroker.summary import render_status

    cfg = write_cfg(tmp_path, {
        "source": synthetic(30, [4]),
        "stages": [{"name": "pre", "fn": "workers.stages:scale", "replicas": 2}],
    })
    with Pipeline.from_yaml(cfg) as p:
        assert p.client is not None
        p.run(sink=lambda i, a: None)
        deadline = time.monotonic() + 60  # both replicas registered (the run may end before)
        while True:
            st = p.client.stats()
            pre = next(s for s in st["stages"] if s["name"] == "pre")
            if len(pre["workers"]) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert pre["done"] == 30 and len(pre["workers"]) == 2
    assert all(w["done"] is None and w["busy"] is None for w in pre["workers"])
    console = Console(record=True, width=140)
    console.print(render_status(st))
    text = console.export_text()
    assert "pre" in text and " - " in text


def test_a_rings_pipeline_refused_for_its_queues_is_not_half_set_up() -> None:
    """Found by the wire fuzzer: a pipeline refused because its queues do not fit left the
    broker with the stages set and no queues, and its stats failed from then on."""
    from broker import Broker
    from broker.protocol import ConfigurePipeline, StageSettings

    with Broker(capacity=8 * 2**20) as b, Client(b.endpoint) as c:
        with pytest.raises(BadRequest, match="lower max_inflight"):
            c._request(ConfigurePipeline(stages=[StageSettings(name="s")], max_inflight=20_000, rings=True))
        assert c.stats()["stages"] == []
        assert c.configure([{"name": "s"}], max_inflight=8) == ["s", "__sink__"]  # as messages
        assert [s["name"] for s in c.stats()["stages"]] == ["s", "__sink__"]


def test_only_a_stages_worker_reports_its_failures() -> None:
    """A failure report passes to the driver (and may stop its run): one from a client that is
    not a worker of that stage, or to a broker whose tasks are messages, is refused."""
    from broker import Broker
    from broker.protocol import Failure

    with Broker(capacity=16 * 2**20, stages=[{"name": "s"}], max_inflight=8, rings=True) as b, \
            Client(b.endpoint) as stranger:
        stranger.report(Failure(stage="s", items=[1], error="made up"))
        with pytest.raises(BadRequest, match="only a worker of stage 's'"):
            stranger.ping()  # the refusal of a message nobody waits for arrives meanwhile ...
            stranger.ping()  # ... and the request after raises it
        assert stranger.stats()["counters"].get("failed", 0) == 0
