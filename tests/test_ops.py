"""Observability: `shmbroker status` and the Prometheus endpoint report the broker's real state; cleanup."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from broker import Broker, Client
from broker.protocol import Task

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def queue_items(c: Client, n: int, shape: tuple[int, ...] = (256,)) -> None:
    """Play the driver: put ``n`` items into stage 0, where no worker takes them."""
    c.register("__sink__", credits=1)
    for i in range(n):
        reserved = c.reserve(0, [i], shape, "<f4", timeout=1.0)
        c.rows(reserved)[0][0] = i
        c.commit(reserved)


STAGES = [{"name": "prep", "batch": 0}, {"name": "infer", "batch": 4}]


def test_status_json_and_table_match_the_broker_state() -> None:
    with Broker(capacity=16 * 2**20, stages=STAGES) as b, Client(b.endpoint, role="driver", pool=False) as c:
        queue_items(c, 3)
        held = c.put(np.zeros(1000, np.float64))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-m", "shmbroker", "status", "--json", "--endpoint", b.endpoint],
                             capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        st = json.loads(out.stdout)
        ours = c.stats()
        assert st["used"] == ours["used"] > 0
        assert st["objects"] == ours["objects"] == 4  # 3 queued items + the put
        assert [s["name"] for s in st["stages"]] == ["prep", "infer", "__sink__"]
        assert st["stages"][0]["queue"] == 3 and st["stages"][1]["queue"] == 0
        assert st["inflight_items"] == 3
        text = subprocess.run([sys.executable, "-m", "shmbroker", "status", "--endpoint", b.endpoint],
                              capture_output=True, text=True, timeout=60, env={**env, "COLUMNS": "160"})
        assert text.returncode == 0, text.stderr
        prep_row = next(line for line in text.stdout.splitlines() if "prep" in line)
        assert prep_row.split("│")[3].strip() == "3"  # the queue column
        c.release(held)


def test_status_without_a_broker_fails_clearly(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SHMBROKER_RUNTIME_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "shmbroker", "status"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 2
    assert "no running broker found" in out.stderr


def scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in body.splitlines() if line.startswith("shmbroker_")}


def test_prometheus_endpoint_reports_queue_depth_and_arena_use() -> None:
    port = free_port()
    with Broker(capacity=16 * 2**20, stages=STAGES, metrics_port=port) as b, \
            Client(b.endpoint, role="driver") as c:
        queue_items(c, 5)
        used = c.stats()["used"]
        deadline = time.monotonic() + 10
        while True:  # the snapshot refreshes every 0.25 s
            m = scrape(port)
            if m.get('shmbroker_stage_queue_depth{stage="prep"}') == 5 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert m['shmbroker_stage_queue_depth{stage="prep"}'] == 5
        assert m['shmbroker_stage_queue_depth{stage="infer"}'] == 0
        assert m["shmbroker_arena_used_bytes"] == used
        assert m["shmbroker_arena_capacity_bytes"] == 16 * 2**20
        assert m['shmbroker_stage_items_total{stage="prep"}'] == 0
        assert m["shmbroker_inflight_items"] == 5


def test_cleanup_cli_keeps_a_live_broker(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with Broker(capacity=4 * 2**20) as b:
        out = subprocess.run([sys.executable, "-m", "shmbroker", "cleanup"], capture_output=True, text=True,
                             timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        assert "kept" in out.stdout
        with Client(b.endpoint) as c:
            c.ping()


def test_source_backpressure_waits_then_fails_with_the_reason() -> None:
    import pytest

    from broker import ArenaFull

    with Broker(capacity=16 * 2**20, stages=STAGES, max_inflight=2) as b, \
            Client(b.endpoint, role="driver") as c:
        queue_items(c, 2)
        t = time.monotonic()
        with pytest.raises(ArenaFull, match=r"2 items stayed in flight \(max_inflight 2\)"):
            c.reserve(0, [9], [4], "<f4", timeout=0.5)
        assert time.monotonic() - t >= 0.45  # it waited for room before giving up
        # a worker-side write (downstream) is not gated by the source's limit
        assert c.reserve(1, [0], [4], "<f4", timeout=0.5).segments


def test_a_non_finite_wait_is_refused_not_parked_forever() -> None:
    import pytest

    from broker import BadRequest

    with Broker(capacity=4 * 2**20) as b, Client(b.endpoint) as c:
        c.alloc((7 * 2**19,), "uint8")  # 3.5 MiB of 4: the next 1 MiB must wait
        for bad in (float("nan"), float("inf")):
            with pytest.raises(BadRequest, match="finite|timeout"):
                c.alloc((2**20,), "uint8", timeout=bad)


def test_deferred_messages_go_with_the_next_write_or_before_the_next_wait() -> None:
    """``commit(defer=True)`` / ``done(defer=True)`` leave only with the client's next message
    or when it next waits for the broker, in the order they were made."""
    with Broker(capacity=16 * 2**20, stages=STAGES) as b, Client(b.endpoint, role="driver") as c, \
            Client(b.endpoint, role="worker") as w:
        w.register("prep", credits=4)
        first = c.reserve(0, [0], [4], "<f4", timeout=1.0)
        c.commit(first, defer=True)
        assert w.next_message(0.3) is None  # still in the driver's process
        c.flush()
        task = w.next_message(5.0)
        assert isinstance(task, Task) and task.items == [0]
        # deferred, then carried by a request: both arrive, the commit first
        second = c.reserve(0, [1], [4], "<f4", timeout=1.0)
        c.commit(second, defer=True)
        third = c.reserve(0, [2], [4], "<f4", timeout=1.0)
        got = w.next_message(5.0)
        assert isinstance(got, Task) and got.items == [1]
        c.commit(third, defer=True)
        assert c.next_message(0.05) is None  # a wait sends what was deferred
        got = w.next_message(5.0)
        assert isinstance(got, Task) and got.items == [2]
        # what is deferred at close is not lost
        c.register("__sink__", credits=1)
        fourth = c.reserve(0, [3], [4], "<f4", timeout=1.0)
        c.commit(fourth, defer=True)
        c.close()
        got = w.next_message(5.0)
        assert isinstance(got, Task) and got.items == [3]


def test_a_released_block_is_freed_soon_without_anyone_asking() -> None:
    """The broker frees released blocks in batches, but a lone one within a few ms: the next
    allocation of its size reuses it (its pages are warm in every process)."""
    with Broker(capacity=16 * 2**20) as b, Client(b.endpoint, pool=False) as c:
        h = c.put(np.zeros(1 << 16, np.float32))
        c.release(h)
        c.ping()
        time.sleep(0.1)  # no request meanwhile: only the broker's own timer can free it
        h2 = c.put(np.ones(1 << 16, np.float32))
        assert h2.offset == h.offset
        c.release(h2)


def test_a_large_array_goes_into_the_block_just_released() -> None:
    """Arrays above the pools' range reuse a block released just before (warm pages), not a
    new one, even though released blocks are otherwise freed in batches."""
    with Broker(capacity=128 * 2**20) as b, Client(b.endpoint) as c:
        h = c.put(np.zeros(4 << 20, np.float32))  # 16 MiB: allocated by the broker
        offsets = {h.offset}
        for i in range(5):
            c.release(h)  # a drop, handled before the next alloc on the same connection
            h = c.put(np.full(4 << 20, i, np.float32))
            offsets.add(h.offset)
        assert offsets == {h.offset}
        c.release(h)
