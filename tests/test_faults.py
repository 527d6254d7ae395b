"""Faults injected into running pipelines: killed workers (soak), a killed broker."""

from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from broker import BrokerGone, Pipeline, WorkerDied
from broker.rundir import base_dir


def _cfg(tmp_path: Path, count: int, seconds: float = 0.002, rings: bool = False) -> Path:
    path = tmp_path / "soak.yaml"
    path.write_text(yaml.safe_dump({
        "name": "soak",
        "broker": {"capacity": "32MiB", "max_inflight": 32, "rings": rings},
        "source": {"type": "synthetic", "count": count, "shape": [64], "dtype": "float64", "seed": 11},
        "stages": [
            {"name": "a", "fn": "stage_helpers:slow", "args": {"seconds": seconds}, "replicas": 2},
            {"name": "b", "fn": "workers.stages:scale", "args": {"factor": 2.0}, "replicas": 2, "batch": 4},
        ],
    }))
    return path


def _broker_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def soak(tmp_path: Path, count: int, kills: int, rings: bool = False) -> dict[str, int]:
    rng = random.Random(5)
    kill_at = sorted(rng.sample(range(count // 10, count * 8 // 10), kills))
    got: dict[int, np.ndarray] = {}
    killed: list[int] = []
    with Pipeline.from_yaml(_cfg(tmp_path, count, rings=rings)) as p:
        assert p.broker is not None and p.client is not None
        deadline = time.monotonic() + 60  # every worker and the driver connected: the baseline
        while p.client.stats()["clients"] < len(p.workers) + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        fds_before = _broker_fds(p.broker.pid)
        empty = p.client.stats()  # the arena before the run: the stages' queues with rings, else nothing

        def sink(idx: int, arr: np.ndarray) -> None:
            assert idx not in got, f"item {idx} delivered twice"
            got[idx] = arr.copy()
            while kill_at and len(got) >= kill_at[0]:
                alive = [w for w in p.workers if w.proc is not None and w.proc.exitcode is None
                         and w.proc.pid not in killed]  # not one killed but not reaped yet
                if not alive:
                    break  # every worker is down: the next item's sink call kills one
                kill_at.pop(0)
                # a random worker among those killed least, so kills spread over the run's
                # workers instead of tripping one worker's crash-loop limit
                least = min(len(w.deaths) for w in alive)
                victim = rng.choice([w for w in alive if len(w.deaths) == least]).proc
                assert victim is not None and victim.pid is not None
                os.kill(victim.pid, signal.SIGKILL)
                killed.append(victim.pid)

        summary = p.run(sink=sink)
        stats = p.client.stats()
        deadline = time.monotonic() + 10  # ring workers give their pools back once idle (0.5 s)
        while stats["used"] != empty["used"] and time.monotonic() < deadline:
            time.sleep(0.1)
            stats = p.client.stats()
        fds_after = _broker_fds(p.broker.pid)
        rundir = base_dir()
    ref = np.random.default_rng(11)
    for i in range(count):
        x = ref.standard_normal([64])
        np.testing.assert_array_equal(got[i], (x + 1) * 2)
    assert sorted(got) == list(range(count))
    assert stats["used"] == empty["used"] and stats["objects"] == empty["objects"], "arena not back to empty"
    assert empty["used"] == 0 or rings
    # the broker holds the same descriptors as before (workers come and go, their sockets close)
    assert fds_after <= fds_before + 2, f"broker fds grew from {fds_before} to {fds_after}"
    assert not [e for e in rundir.glob("*-*")], "runtime directory left behind"
    return {"items": count, "kills": len(killed), "restarts": sum(summary.restarts.values()),
            "leaked_bytes": stats["used"] - empty["used"], "duplicates_dropped": summary.duplicates}


@pytest.mark.parametrize("rings", [False, True], ids=["messages", "rings"])
def test_soak_short(tmp_path: Path, rings: bool) -> None:
    result = soak(tmp_path, count=400, kills=3, rings=rings)
    assert result["kills"] == 3 and result["restarts"] >= 3
    print("soak:", result)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_long(tmp_path: Path) -> None:
    count = int(os.environ.get("SOAK_ITEMS", "5000"))
    result = soak(tmp_path, count=count, kills=int(os.environ.get("SOAK_KILLS", "25")))
    print("soak:", result)


def test_broker_killed_mid_run_stops_the_pipeline_with_a_clear_error(tmp_path: Path) -> None:
    delivered = []
    with Pipeline.from_yaml(_cfg(tmp_path, 100_000, seconds=0.001)) as p:
        assert p.broker is not None
        broker_pid = p.broker.pid
        workers = [w.proc for w in p.workers]

        def sink(idx: int, arr: np.ndarray) -> None:
            delivered.append(idx)
            if len(delivered) == 20:
                os.kill(broker_pid, signal.SIGKILL)

        t = time.monotonic()
        with pytest.raises(BrokerGone, match="exited"):
            p.run(sink=sink)
        assert time.monotonic() - t < 60
        deadline = time.monotonic() + 20  # the workers notice on their own (same socket) and exit
        while any(w is not None and w.exitcode is None for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        codes = [w.exitcode for w in workers if w is not None]
        assert all(c == 3 for c in codes), f"workers did not exit on their own: {codes}"
    # the dead broker's runtime directory stays until a cleanup (or the next broker start)
    from broker.rundir import cleanup, list_rundirs

    assert [e for e in list_rundirs() if not e.live]
    cleanup()
    assert not list_rundirs()


def test_a_crash_looping_worker_fails_the_run_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "die.yaml"
    path.write_text(yaml.safe_dump({
        "source": {"type": "synthetic", "count": 3, "shape": [2]},
        "stages": [{"name": "crash", "fn": "stage_helpers:die"}],
    }))
    from broker import BrokerError

    with Pipeline.from_yaml(path) as p, pytest.raises(BrokerError) as err:
        p.run(sink=lambda i, a: None)
    text = str(err.value)
    # the item that kills every worker fails after its stage's retries (2): 3 attempts, not a
    # crash loop forever; the error names the item, the attempts and the exit code
    assert isinstance(err.value, WorkerDied), text
    assert re.search(r"stage 'crash' gave up on item\(s\) \[[012]\]", text) and "attempt 3 of 3" in text, text
    assert "exit code 17" in text, text


def test_a_worker_that_cannot_start_fails_the_run_with_its_exit_code(tmp_path: Path) -> None:
    path = tmp_path / "nostart.yaml"
    path.write_text(yaml.safe_dump({
        "source": {"type": "synthetic", "count": 3, "shape": [2]},
        "stages": [{"name": "crash", "factory": "stage_helpers:die_at_start"}],
    }))
    from broker import BrokerError

    with Pipeline.from_yaml(path) as p, pytest.raises(BrokerError) as err:
        p.run(sink=lambda i, a: None)
    assert "worker:crash:0 on cpu exited 6 times within 60 s, last with exit code 17" in str(err.value)
