"""The handle queue: zero-copy items, bounded, many producers and consumers, crash-safe."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from broker import BadRequest, BrokerTimeout, Client, StaleHandle
from broker.holds import fence_available

SPAWN = multiprocessing.get_context("spawn")

pytestmark = pytest.mark.skipif(not fence_available(), reason="membarrier is not available on this host")


def _arena_range(c: Client) -> tuple[int, int]:
    base = np.frombuffer(c.region.buffer, np.uint8).ctypes.data
    return base, base + c.region.capacity


def test_items_arrive_in_order_as_zero_copy_tensors_and_cost_no_message(fresh_broker):
    with Client(fresh_broker.endpoint) as p, Client(fresh_broker.endpoint) as c:
        qp, qc = p.queue("frames", maxsize=8), c.queue("frames")
        assert qc.maxsize == 8  # the first caller's size
        for i in range(5):
            qp.put(np.full((3, 4), i, np.float32))
        before = {k: v for k, v in c.stats()["requests"].items() if k != "stats"}
        lo, hi = _arena_range(c)
        for i in range(5):
            h = qc.get(timeout=5)
            t = c.tensor(h)
            assert t.dtype == torch.float32 and t.shape == (3, 4) and (t == i).all()
            assert lo <= t.data_ptr() < hi  # a view of the arena, not a copy
            c.release(h)
        after = {k: v for k, v in c.stats()["requests"].items() if k != "stats"}
        assert after == before  # get, tensor and release: no message
        assert qc.qsize() == 0


def test_a_full_queue_blocks_then_times_out_and_an_empty_one_too(fresh_broker):
    with Client(fresh_broker.endpoint) as c:
        q = c.queue("small", maxsize=2)
        q.put(np.zeros(4))
        q.put(np.ones(4))
        t = time.monotonic()
        with pytest.raises(BrokerTimeout, match="stayed full"):
            q.put(np.zeros(4), timeout=0.3)
        assert 0.25 <= time.monotonic() - t < 5
        for expected in (0.0, 1.0):
            h = q.get(timeout=1)
            assert c.get(h)[0] == expected
            c.release(h)
        t = time.monotonic()
        with pytest.raises(BrokerTimeout, match="stayed empty"):
            q.get(timeout=0.3)
        assert 0.25 <= time.monotonic() - t < 5


def _producer(endpoint: str, name: str, start: int, n: int) -> None:
    with Client(endpoint) as c:
        q = c.queue(name)
        for i in range(start, start + n):
            q.put(np.full(256, i, np.int64), timeout=30)


def _consumer(endpoint: str, name: str, n: int, conn) -> None:
    seen = []
    with Client(endpoint) as c:
        q = c.queue(name)
        for _ in range(n):
            h = q.get(timeout=30)
            v = c.get(h)
            assert (v == v[0]).all()
            seen.append(int(v[0]))
            c.release(h)
    conn.send(seen)


def test_many_producers_and_consumers_each_item_exactly_once(fresh_broker):
    ep = fresh_broker.endpoint
    with Client(ep) as c:
        c.queue("mpmc", maxsize=16)
        producers = [SPAWN.Process(target=_producer, args=(ep, "mpmc", k * 1000, 300)) for k in range(3)]
        pipes = [SPAWN.Pipe(duplex=False) for _ in range(2)]
        consumers = [SPAWN.Process(target=_consumer, args=(ep, "mpmc", 450, w)) for _, w in pipes]
        for proc in producers + consumers:
            proc.start()
        got = []
        for r, _ in pipes:
            assert r.poll(60), "a consumer never finished"
            got += r.recv()
        for proc in producers + consumers:
            proc.join(30)
            assert proc.exitcode == 0
        assert sorted(got) == sorted(k * 1000 + i for k in range(3) for i in range(300))
        assert c.stats()["used"] > 0  # the queue's ring
        st = c.stats()
        assert st["sizes"]["leases"] == 0 or st["clients"] == 1


def test_an_item_in_the_queue_outlives_its_sender(fresh_broker, poll):
    ep = fresh_broker.endpoint
    p = SPAWN.Process(target=_producer, args=(ep, "orphans", 7, 3))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    with Client(ep) as c:
        q = c.queue("orphans")
        c.stats()  # the sender is gone and its blocks were reclaimed, except the queued ones
        for i in range(7, 10):
            h = q.get(timeout=5)
            assert (c.get(h) == i).all()
            c.release(h)
        poll(lambda: c.stats()["sizes"]["retiring"] == 0, what="the items' blocks to be freed")


def _take_and_die(endpoint: str, name: str, conn) -> None:
    with Client(endpoint) as c:
        h = c.queue(name).get(timeout=10)
        c.get(h)
        conn.send((h.offset, h.generation))
        time.sleep(60)


def test_an_item_held_by_a_consumer_killed_with_sigkill_is_freed_not_leaked(fresh_broker, poll):
    ep = fresh_broker.endpoint
    with Client(ep, pool=False) as c:
        q = c.queue("lossy", maxsize=4)
        q.put(np.arange(1 << 17, dtype=np.float64))  # 1 MiB: the broker's block
        r, w = SPAWN.Pipe(duplex=False)
        proc = SPAWN.Process(target=_take_and_die, args=(ep, "lossy", w))
        proc.start()
        assert r.poll(30)
        r.recv()
        used = c.stats()["used"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        poll(lambda: c.stats()["used"] < used, what="the dead consumer's item to be freed")
        assert q.qsize() == 0 and c.stats()["sizes"]["retiring"] == 0


def _lock_and_die(endpoint: str, name: str, conn) -> None:
    with Client(endpoint) as c:
        q = c.queue(name)
        q._acquire()  # dies holding the queue's mutex
        conn.send("locked")
        time.sleep(60)


def test_a_process_that_dies_holding_the_queues_lock_does_not_wedge_it(fresh_broker):
    ep = fresh_broker.endpoint
    with Client(ep) as c:
        q = c.queue("robust", maxsize=4)
        q.put(np.full(3, 5.0))
        r, w = SPAWN.Pipe(duplex=False)
        proc = SPAWN.Process(target=_lock_and_die, args=(ep, "robust", w))
        proc.start()
        assert r.poll(30) and r.recv() == "locked"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        h = q.get(timeout=5)  # EOWNERDEAD: the ring is repaired, the item is still there
        assert (c.get(h) == 5.0).all()
        c.release(h)
        q.put(np.full(3, 6.0), timeout=5)
        h = q.get(timeout=5)
        assert (c.get(h) == 6.0).all()
        c.release(h)


def test_put_of_a_handle_passes_the_senders_hold_and_refuses_one_it_does_not_hold(fresh_broker):
    with Client(fresh_broker.endpoint) as a, Client(fresh_broker.endpoint) as b:
        h = a.put(np.full(10, 3.0))
        q = a.queue("forward")
        q.put(h)  # the queue holds it now: a's reference went with it
        assert not a.holds_handle(h)
        with pytest.raises(StaleHandle, match="not held here"):
            q.put(h)
        got = b.queue("forward").get(timeout=5)
        assert got.offset == h.offset and (b.get(got) == 3.0).all()
        b.release(got)


def test_a_waiting_consumer_sleeps_and_wakes_for_a_later_item(fresh_broker):
    """After its spin, a consumer sleeps in the kernel (not burning a core) and is woken."""
    ep = fresh_broker.endpoint
    with Client(ep) as c:
        q = c.queue("sleepy")
        r, w = SPAWN.Pipe(duplex=False)
        proc = SPAWN.Process(target=_consumer, args=(ep, "sleepy", 1, w))
        proc.start()
        deadline = time.monotonic() + 30
        while q.words[q.first + 7] == 0:  # the consumers-waiting counter: it is inside get now
            assert time.monotonic() < deadline, "the consumer never waited"
            time.sleep(0.01)
        time.sleep(0.2)  # past its spin
        with open(f"/proc/{proc.pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        cpu0 = _cpu(proc.pid)
        time.sleep(0.5)
        assert _cpu(proc.pid) - cpu0 < 0.1, "the waiting consumer burned CPU"
        assert state in ("S", "D"), state
        q.put(np.full(256, 42, np.int64))
        assert r.poll(10) and r.recv() == [42]
        proc.join(10)


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")



def test_a_fixed_spin_keeps_its_length_is_cut_by_the_timeout_and_bad_ones_are_refused(fresh_broker):
    """``spin=S`` spins S every wait, unrewarded or rewarded (the adaptive spin would halve the
    first and cut the second to SPIN_MAX); never past the caller's timeout; nonsense is refused."""
    with Client(fresh_broker.endpoint) as c:
        for bad in (-1.0, float("nan"), float("inf"), 1e9, True, "0.1"):
            with pytest.raises(BadRequest, match="spin"):
                c.queue("spun", spin=bad)  # type: ignore[arg-type]
        short = c.queue("spun", spin=1e-4)
        with pytest.raises(BrokerTimeout):
            short.get(timeout=0.05)  # spun 100 µs, then slept: unrewarded
        assert short.spin == 1e-4
        polling = c.queue("spun", spin=30.0)  # would spin 30 s: the 0.2 s timeout ends it
        t = time.monotonic()
        with pytest.raises(BrokerTimeout):
            polling.get(timeout=0.2)
        assert time.monotonic() - t < 5 and polling.spin == 30.0
        long = c.queue("spun", spin=0.5)
        threading.Timer(0.01, lambda: short.put(np.arange(4))).start()
        assert list(c.get(long.get(timeout=5))) == [0, 1, 2, 3]  # came during the spin: rewarded
        assert long.spin == 0.5
        sleeper = c.queue("spun", spin=0.0)
        with pytest.raises(BrokerTimeout):
            sleeper.get(timeout=0.05)
        assert sleeper.spin == 0.0


def test_an_item_whose_array_the_receiver_holds_already_keeps_one_hold(fresh_broker):
    with Client(fresh_broker.endpoint) as a, Client(fresh_broker.endpoint) as b:
        q = a.queue("twice")
        h = a.put(np.arange(8, dtype=np.int64))
        assert b.get(h)[3] == 3  # b holds it before the queue brings it
        q.put(h)  # a's reference travels with the item
        bq = b.queue("twice")
        got = bq.get(timeout=5)
        assert got == h and b.holds_handle(h)
        assert b.holds is not None
        in_use = b.holds.table.tolist().count(h.block)
        assert in_use == 1  # one hold in b's table, not two (the second would never be dropped)
        b.release(got)
        assert b.holds.table.tolist().count(h.block) == 0
