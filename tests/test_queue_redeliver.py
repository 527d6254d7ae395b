"""Handle queues with ``redeliver=N``: an item whose receiver dies before releasing it comes back."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

import numpy as np
import pytest

from broker import BadRequest, BrokerError, BrokerTimeout, Client
from broker.holds import fence_available

SPAWN = multiprocessing.get_context("spawn")

pytestmark = pytest.mark.skipif(not fence_available(), reason="membarrier is not available on this host")


def _take_and_die(endpoint: str, name: str, redeliver: int, conn, holds: bool = True) -> None:
    with Client(endpoint, holds=holds) as c:
        h = c.queue(name, redeliver=redeliver).get(timeout=20)
        conn.send(int(c.get(h)[0]))
        time.sleep(60)  # killed here, the item still held


def _kill_a_receiver(endpoint: str, name: str, redeliver: int, before_kill=None, holds: bool = True) -> int:
    """A process gets one item of ``name``, reports its value, and is killed with SIGKILL."""
    r, w = SPAWN.Pipe(duplex=False)
    proc = SPAWN.Process(target=_take_and_die, args=(endpoint, name, redeliver, w, holds))
    proc.start()
    assert r.poll(30), "the receiver never got the item"
    value = r.recv()
    if before_kill is not None:
        before_kill()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    return value


def _comes_back(c: Client, q, value: float, poll, what: str) -> None:
    """The item of ``value`` is back in ``q``: got again, whole, and released."""
    poll(lambda: q.qsize() == 1, what=what)
    h = q.get(timeout=5)
    assert (c.get(h) == value).all()
    c.release(h)


def test_an_item_held_by_a_receiver_killed_with_sigkill_comes_back_and_is_freed_after(fresh_broker, poll):
    ep = fresh_broker.endpoint
    with Client(ep, pool=False) as c:
        q = c.queue("work", maxsize=4, redeliver=2)
        base = c.stats()["used"]
        q.put(np.full(1 << 17, 7.0))  # 1 MiB: the broker's block, so "used" shows it
        q.put(np.full(1 << 17, 8.0))
        assert _kill_a_receiver(ep, "work", 2) == 7.0
        poll(lambda: q.qsize() == 2, what="the dead receiver's item to come back")
        assert q.stats()["redelivered"] == 1 and q.stats()["pending"] == 0
        for expected in (7.0, 8.0):  # given back in front: the order holds
            h = q.get(timeout=5)
            assert (c.get(h) == expected).all()
            assert q.stats()["pending"] == 1
            c.release(h)
            assert q.stats()["pending"] == 0
        poll(lambda: c.stats()["used"] == base and c.stats()["sizes"]["retiring"] == 0,
             what="both items' blocks to be freed")


def test_a_receiver_without_a_hold_table_is_refused_and_the_item_stays(fresh_broker):
    """``holds=False`` takes leases by message, which cannot see a block kept alive by a queue
    alone (its sender released it): refused with the reason, nothing taken."""
    ep = fresh_broker.endpoint
    with Client(ep, pool=False) as c, Client(ep, holds=False) as leases:
        q = c.queue("leases", maxsize=2, redeliver=1)
        q.put(np.full(64, 4.0))
        with pytest.raises(BadRequest, match="hold table"):
            leases.queue("leases").get(timeout=1)
        assert q.qsize() == 1
        h = q.get(timeout=5)
        assert (c.get(h) == 4.0).all()
        c.release(h)


def test_a_full_hold_table_makes_get_fail_and_keeps_the_item(fresh_broker):
    ep = fresh_broker.endpoint
    with Client(ep) as c, Client(ep) as sender:
        q = c.queue("crowded", maxsize=2)
        q.put(np.full(8, 7.0))
        n = len(c.holds.table)
        hs = [sender.put(np.full(8, float(i))) for i in range(n)]
        for h in hs:
            c.get(h)  # every hold of c taken
        with pytest.raises(BrokerError, match="hold table is full"):
            q.get(timeout=1)
        assert q.qsize() == 1  # not lost
        c.release(hs[0])
        h = q.get(timeout=1)
        assert (c.get(h) == 7.0).all()
        c.release([h, *hs[1:]])


def _pend_and_die(endpoint: str, name: str) -> None:
    import broker.queue as bq

    pend = bq.HandleQueue._pend

    def pend_then_die(self, s, handle):
        pend(self, s, handle)  # the pending entry is written, the ring slot not yet cleared
        os.kill(os.getpid(), signal.SIGKILL)

    bq.HandleQueue._pend = pend_then_die
    with Client(endpoint) as c:
        c.queue(name).get(timeout=10)


def test_a_receiver_killed_in_the_middle_of_get_loses_nothing_and_doubles_nothing(fresh_broker, poll):
    ep = fresh_broker.endpoint
    with Client(ep) as c:
        q = c.queue("midget", maxsize=4, redeliver=3)
        for i in range(4):  # full: the ring has no spare slot for a second copy
            q.put(np.full(16, float(i)))
        proc = SPAWN.Process(target=_pend_and_die, args=(ep, "midget"))
        proc.start()
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        poll(lambda: c.stats()["clients"] == 1, what="the broker to drop the killed receiver")
        got = []
        for _ in range(4):
            h = q.get(timeout=5)
            got.append(float(c.get(h)[0]))
            c.release(h)
        assert got == [0.0, 1.0, 2.0, 3.0]
        assert q.stats() | {"redeliver": 3} == {"size": 0, "pending": 0, "redelivered": 0, "dropped": 0,
                                                "maxsize": 4, "redeliver": 3}


def test_an_item_got_and_put_back_into_the_same_queue_does_not_wait_for_its_own_room(fresh_broker):
    with Client(fresh_broker.endpoint) as c:
        q = c.queue("retry", maxsize=2, redeliver=1)
        q.put(np.full(8, 1.0))
        q.put(np.full(8, 2.0))
        h = q.get(timeout=1)  # one waiting + this one pending: the queue is full
        q.put(h, timeout=1)  # back in: its own pending entry is the room it needs
        assert q.stats()["size"] == 2 and q.stats()["pending"] == 0
        for expected in (2.0, 1.0):
            h = q.get(timeout=1)
            assert (c.get(h) == expected).all()
            c.release(h)
        assert q.stats()["pending"] == 0


def test_an_item_is_dropped_after_its_redeliveries_and_its_block_freed(fresh_broker, poll):
    ep = fresh_broker.endpoint
    with Client(ep, pool=False) as c:
        q = c.queue("poison", maxsize=4, redeliver=1)
        base = c.stats()["used"]
        q.put(np.full(1 << 17, 3.0))
        assert _kill_a_receiver(ep, "poison", 1) == 3.0
        poll(lambda: q.qsize() == 1, what="the first death to give the item back")
        assert _kill_a_receiver(ep, "poison", 1) == 3.0  # its second and last delivery
        poll(lambda: q.stats()["dropped"] == 1, what="the item to be dropped")
        assert q.stats() == {"size": 0, "pending": 0, "redelivered": 1, "dropped": 1, "maxsize": 4,
                             "redeliver": 1}
        poll(lambda: c.stats()["used"] == base, what="the dropped item's block to be freed")
        with pytest.raises(BrokerTimeout):
            q.get(timeout=0.2)


def test_without_redeliver_an_item_got_frees_its_room_at_once_with_it_only_at_release(fresh_broker):
    with Client(fresh_broker.endpoint) as c:
        plain, acked = c.queue("plain", maxsize=2), c.queue("acked", maxsize=2, redeliver=1)
        for q in (plain, acked):
            q.put(np.zeros(8))
            q.put(np.ones(8))
        held = {q.name: q.get(timeout=1) for q in (plain, acked)}
        plain.put(np.full(8, 2.0), timeout=1)  # room: the got item left the queue
        with pytest.raises(BrokerTimeout, match="stayed full"):
            acked.put(np.full(8, 2.0), timeout=0.3)  # one waiting + one pending = maxsize
        c.release(held["acked"])
        acked.put(np.full(8, 2.0), timeout=1)  # the release gave the room back
        c.release(held["plain"])


def test_a_client_closed_with_an_item_unreleased_gives_it_back(fresh_broker, poll):
    ep = fresh_broker.endpoint
    with Client(ep) as c:
        q = c.queue("closing", redeliver=3)
        q.put(np.full(16, 5.0))
        other = Client(ep)
        h = other.queue("closing").get(timeout=5)  # no redeliver= given: the queue's own holds
        assert (other.get(h) == 5.0).all()
        other.close()  # without release: not handled, so it is delivered again
        _comes_back(c, q, 5.0, poll, "the closed client's item to come back")


def test_putting_a_got_handle_into_another_queue_releases_it_from_the_first(fresh_broker):
    with Client(fresh_broker.endpoint) as c:
        first, second = c.queue("stage0", redeliver=1), c.queue("stage1", redeliver=1)
        first.put(np.arange(10.0))
        h = first.get(timeout=5)
        assert first.stats()["pending"] == 1
        second.put(h)  # handed on: done with, as far as the first queue goes
        assert first.stats()["pending"] == 0 and second.qsize() == 1
        out = second.get(timeout=5)
        assert (c.get(out) == np.arange(10.0)).all()
        c.release(out)
        assert second.stats()["pending"] == 0


def test_the_broker_does_not_wait_for_a_queue_lock_another_process_holds(fresh_broker, poll):
    ep = fresh_broker.endpoint
    with Client(ep) as c:
        q = c.queue("busy", redeliver=1)
        q.put(np.full(16, 9.0))
        try:  # this process holds the mutex while the receiver dies
            assert _kill_a_receiver(ep, "busy", 1, before_kill=q._acquire) == 9.0
            time.sleep(0.3)
            assert c.ping(timeout=5) > 0  # the broker goes on serving
            assert q.qsize() == 0  # and has not touched the ring
        finally:
            from broker.queue import _unlock

            _unlock(q.mutex)
        _comes_back(c, q, 9.0, poll, "the broker's second try once the lock is free")


def test_redeliver_is_checked_and_the_first_users_setting_is_kept(fresh_broker):
    with Client(fresh_broker.endpoint) as c:
        for bad in (-1, 1001, 1.5, True, "2"):
            with pytest.raises(BadRequest, match="redeliver"):
                c.queue("checked", redeliver=bad)
        q = c.queue("checked", redeliver=2)
        assert c.queue("checked").redeliver == 2
        with pytest.raises(BadRequest, match="redeliver=2 by its first user"):
            c.queue("checked", redeliver=5)
        assert q.stats()["redeliver"] == 2


def _flaky_consumer(endpoint: str, name: str, out) -> None:
    with Client(endpoint) as c:
        q = c.queue(name)
        while True:
            h = q.get(timeout=30)
            v = c.get(h)
            time.sleep(0.002)  # "work": most kills land while an item is held
            first = int(v[0])
            # reported before the release, in one write of a pipe (atomic: a kill loses all or none)
            out.send((first, bool((v == first).all())))
            c.release(h)


def test_receivers_killed_at_random_points_lose_no_item_and_never_see_a_reused_block(fresh_broker, poll):
    """kill -9 at any point of get, read and release: every item arrives at least once, whole."""
    ep = fresh_broker.endpoint
    n = 300
    with Client(ep, pool=False) as c:
        q = c.queue("chaos", maxsize=8, redeliver=100)
        base = c.stats()["used"]
        rng = random.Random(13)
        seen: dict[int, int] = {}
        torn = 0
        readers = []

        def start() -> multiprocessing.process.BaseProcess:
            r, w = SPAWN.Pipe(duplex=False)
            readers.append(r)
            proc = SPAWN.Process(target=_flaky_consumer, args=(ep, "chaos", w))
            proc.start()
            w.close()
            return proc

        def drain() -> None:
            nonlocal torn
            for r in list(readers):
                try:
                    while r.poll(0):
                        value, whole = r.recv()
                        seen[value] = seen.get(value, 0) + 1
                        torn += not whole
                except EOFError:  # a killed consumer's pipe, read to its end
                    readers.remove(r)

        consumers = [start() for _ in range(2)]
        kills, put = 0, 0
        deadline = time.monotonic() + 90
        while put < n and time.monotonic() < deadline:
            q.put(np.full(1024, put, np.int64), timeout=30)
            put += 1
            if put % 25 == 0:  # now and then a consumer dies wherever it is, and a new one starts
                k = rng.randrange(len(consumers))
                time.sleep(rng.uniform(0, 0.005))
                os.kill(consumers[k].pid, signal.SIGKILL)
                consumers[k].join(10)
                consumers[k] = start()
                kills += 1
            drain()
        poll(lambda: (drain(), len(seen) == n)[1], timeout=60, what="every item to arrive")
        for proc in consumers:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
        drain()
        assert put == n and kills == n // 25
        assert sorted(seen) == list(range(n)) and torn == 0
        assert q.stats()["redelivered"] > 0  # some kills did hit a receiver holding an item
        poll(lambda: q.stats()["pending"] == 0, timeout=20, what="the last receivers' items to come back")
        # what the killed consumers held came back; take it, then all memory is free again
        while q.qsize():
            h = q.get(timeout=5)
            c.release(h)
        poll(lambda: c.stats()["used"] == base, timeout=20, what="every item's block to be freed")
