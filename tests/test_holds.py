"""Holds in shared memory: get and release cost no message, a held block is never reused, a dead holder leaks nothing."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time

import msgspec
import numpy as np
import pytest

from broker import BadRequest, BrokerError, Client, Handle, StaleHandle
from broker.holds import GEN_BITS, fence_available
from broker.protocol import ProtocolError

SPAWN = multiprocessing.get_context("spawn")

pytestmark = pytest.mark.skipif(not fence_available(), reason="membarrier is not available on this host")


def _requests(c: Client) -> dict[str, int]:
    return {k: v for k, v in c.stats()["requests"].items() if k != "stats"}


def test_get_and_release_of_another_clients_array_send_no_message(fresh_broker):
    with Client(fresh_broker.endpoint) as a, Client(fresh_broker.endpoint) as b:
        hs = [a.put(np.full(1 << 16, i, np.float32)) for i in range(4)]  # pooled
        big = a.put(np.arange(1 << 20, dtype=np.float64))  # 8 MiB: the broker's block
        before = _requests(b)
        for i, h in enumerate(hs):
            assert b.get(h)[0] == i
        assert b.get(big)[12345] == 12345
        b.release([*hs, big])
        assert _requests(b) == before  # no acquire, no drop
        a.release([*hs, big])


def test_a_held_block_is_not_reused_until_its_hold_is_gone(fresh_broker):
    with Client(fresh_broker.endpoint) as a, Client(fresh_broker.endpoint) as b:
        h = a.put(np.full(1000, 7.0))
        view = b.get(h)
        a.release(h)
        # the owner keeps putting arrays of the same size: its pool never hands out the held block
        offsets = set()
        for i in range(200):
            h2 = a.put(np.full(1000, float(i)))
            offsets.add(h2.offset)
            a.release(h2)
        assert h.offset not in offsets
        assert (view == 7.0).all(), "the held array was overwritten"
        b.release(h)
        for i in range(200):  # once the hold is gone, the owner reuses the block (a new generation)
            h3 = a.put(np.full(1000, float(i)))
            a.release(h3)
            if h3.offset == h.offset:
                assert h3.generation > h.generation
                break
        else:
            pytest.fail("the block was never reused after its hold was dropped")
        with pytest.raises(StaleHandle):
            b.get(h)


def _reader(endpoint: str, wire: bytes, conn) -> None:
    """Hold every handle it is sent, check the values, report, until told to stop."""
    with Client(endpoint) as c:
        while True:
            msg = conn.recv()
            if msg is None:
                return
            h, value = pickle.loads(msg)
            try:
                v = c.get(h)
                ok = bool((v == value).all())
                c.release(h)
                conn.send(("ok" if ok else "WRONG", h.offset))
            except StaleHandle:
                conn.send(("stale", h.offset))


def test_a_reader_racing_the_owners_reuse_sees_its_values_or_a_stale_handle(fresh_broker):
    """The owner releases each array as soon as it has sent the handle, and reuses blocks at
    once; the reader either holds the array it was sent, with that array's values, or is told
    the handle is stale. Never another array's values."""
    parent, child = SPAWN.Pipe()
    p = SPAWN.Process(target=_reader, args=(fresh_broker.endpoint, b"", child))
    p.start()
    child.close()
    outcomes: dict[str, int] = {}
    try:
        with Client(fresh_broker.endpoint) as c:
            for i in range(3000):
                value = float(i)
                h = c.put(np.full(512, value, np.float32))
                parent.send(pickle.dumps((h, value)))
                c.release(h)  # races the reader's get
                if i % 8 == 7:
                    for _ in range(8):
                        kind, _off = parent.recv()
                        outcomes[kind] = outcomes.get(kind, 0) + 1
    finally:
        parent.send(None)
        p.join(30)
    assert "WRONG" not in outcomes, outcomes
    assert sum(outcomes.values()) == 3000 and outcomes.get("ok", 0) > 0, outcomes


def _hold_and_die(endpoint: str, wire: bytes, conn) -> None:
    with Client(endpoint) as c:
        h = pickle.loads(wire)
        c.get(h)
        conn.send("holding")
        time.sleep(60)


def test_the_holds_of_a_process_killed_with_sigkill_vanish(fresh_broker, poll):
    with Client(fresh_broker.endpoint, pool=False) as a:
        h = a.put(np.arange(1 << 18, dtype=np.float32))  # 1 MiB: the broker's block
        parent, child = SPAWN.Pipe()
        p = SPAWN.Process(target=_hold_and_die, args=(fresh_broker.endpoint, pickle.dumps(h), child))
        p.start()
        child.close()
        assert parent.poll(30) and parent.recv() == "holding"
        a.release(h)
        st = a.stats()
        assert st["sizes"]["retiring"] == 1 and st["used"] > 0  # held by the child: kept
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        poll(lambda: a.stats()["used"] == 0, what="the dead holder's block to be freed")
        assert a.stats()["sizes"]["retiring"] == 0


def test_a_pooled_block_whose_reuse_counter_is_spent_goes_back_to_the_broker(fresh_broker, monkeypatch):
    from broker import pool

    with Client(fresh_broker.endpoint) as c:
        h = c.put(np.zeros(100, np.float32))
        block = c._held[h.oid][2]
        c.release(h)
        # pretend the block was reused (2**GEN_BITS - 1) times: its next reuse would spill over
        last = (block.generation >> GEN_BITS << GEN_BITS) | ((1 << GEN_BITS) - 1)
        retired = c._pool.retired[block.nbytes]
        retired[:] = [(b, last if b.oid == block.oid else g) for b, g in retired]
        c.holds.region.set_generation(block.offset, last)
        monkeypatch.setattr(pool, "KEEP_BYTES", 1 << 30)
        c._pool.free[block.nbytes].clear()
        h2 = c.put(np.zeros(100, np.float32))  # the pool recycles: that block is spent
        assert h2.oid != block.oid
        c.ping()
        with Client(fresh_broker.endpoint) as other, pytest.raises(StaleHandle):
            other.get(h)
        c.release(h2)


def test_without_membarrier_every_lease_is_a_message_and_everything_works(tmp_path):
    """SHMBROKER_HOLDS=0 (what a host without membarrier gets): no hold tables, leases by message."""
    code = (
        "import numpy as np\n"
        "from broker import Broker, Client, StaleHandle\n"
        "with Broker(capacity=16 << 20) as b, Client(b.endpoint) as a, Client(b.endpoint) as c:\n"
        "    assert a.holds is None and c.conn.slot == -1\n"
        "    h = a.put(np.arange(100.0))\n"
        "    assert c.get(h)[99] == 99.0\n"
        "    req = c.stats()['requests']\n"
        "    assert req.get('acquire', 0) == 1, req\n"
        "    c.release(h); a.release(h); a.ping()\n"
        "    try:\n"
        "        c.get(h)\n"
        "        raise SystemExit('a released handle was readable')\n"
        "    except StaleHandle:\n"
        "        pass\n"
        "    print('ok')\n")
    env = {**os.environ, "SHMBROKER_HOLDS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_small_put_get_release_of_one_client_costs_no_message(fresh_broker):
    with Client(fresh_broker.endpoint) as c:
        a = np.zeros(1024, np.float32)
        for _ in range(100):  # the pool is filled
            c.release(c.put(a))
        before = _requests(c)
        for i in range(5000):
            h = c.put(a)
            c.get(h)[0] = i
            c.release(h)
        after = _requests(c)
        assert after == before, (before, after)  # 5,000 triples, no message at all


def test_the_scan_reads_a_copy_of_the_tables_never_the_live_memory(fresh_broker):
    """Other processes write their tables while an owner scans: the words a scan works on are
    copied out first (np.isin over a live table read a min above its max and failed mid-run)."""
    with Client(fresh_broker.endpoint) as a, Client(fresh_broker.endpoint) as b:
        hs = [a.put(np.full(64, i, np.float32)) for i in range(8)]
        for h in hs[:5]:
            b.get(h)  # b's table alone names blocks: one part, the case that was returned as a view
        region = a.holds.region
        words = region.naming_words()
        assert not np.shares_memory(words, region.words)
        assert set(words.tolist()) >= {h.offset for h in hs[:5]}
        bases = np.array([h.offset for h in hs], np.uint64)
        assert region.named(bases).tolist() == [True] * 5 + [False] * 3
        assert region.named(bases[:3]).tolist() == [True] * 3  # the few-blocks path
        assert region.named(bases[3:7]).tolist() == [True, True, False, False]
        b.release(hs[:5])
        a.release(hs)


def test_a_handle_with_a_dtype_numpy_does_not_know_is_refused_and_takes_no_hold(fresh_broker):
    with Client(fresh_broker.endpoint) as a, Client(fresh_broker.endpoint) as b:
        h = a.put(np.arange(16, dtype=np.float32))
        junk = msgspec.structs.replace(h, dtype="zzz")
        with pytest.raises(ProtocolError, match="zzz"):
            Handle.from_bytes(junk.to_bytes())
        assert b.holds is not None
        free = len(b.holds.free)
        with pytest.raises(BadRequest, match="zzz"):
            b.get(junk)
        with pytest.raises(BadRequest, match="zzz"):
            b.get_many([h, junk])  # the good one's hold is let go with the refusal
        assert len(b.holds.free) == free and not b.holds_handle(h)
        assert b.get(h)[5] == 5.0
        b.release(h)
        a.release(h)


def test_get_on_a_closed_client_says_so(fresh_broker):
    with Client(fresh_broker.endpoint) as a:
        h = a.put(np.ones(4))
        b = Client(fresh_broker.endpoint)
        b.close()
        with pytest.raises(BrokerError, match="closed"):
            b.get(h)
        a.release(h)
