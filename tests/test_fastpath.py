"""The fast paths: requests over the Unix connection, pooled small arrays, release without waiting."""

from __future__ import annotations

import multiprocessing
import os
import socket
import time

import msgpack
import numpy as np
import pytest

from broker import Broker, Client
from broker.arena import recv_fd
from broker.client import POOL_REFILL_BYTES
from broker.errors import BadRequest, StaleHandle
from broker.pool import size_class
from broker.protocol import (
    MAX_MESSAGE,
    MAX_REFS,
    VERSION,
    AcquireMany,
    Claim,
    FrameReader,
    Grant,
    Hello,
    Ping,
    Publish,
    Stats,
    decode,
    encode,
    frame,
)


def _requests(c: Client) -> dict[str, int]:
    return c.stats()["requests"]


@pytest.mark.parametrize("transport", ["unix", "zmq"])
def test_both_transports_serve_every_kind_of_request(fresh_broker, transport):
    with Client(fresh_broker.endpoint, transport=transport) as c, Client(fresh_broker.endpoint) as other:
        a = np.arange(3_000_000, dtype=np.float32)  # 12 MB, above 1/8 of the arena: a broker allocation
        h = c.put(a)
        small = c.put(np.arange(12, dtype=np.int16).reshape(3, 4))  # pooled
        c.publish("big", h)
        assert np.array_equal(other.get(other.lookup("big")), a)
        assert np.array_equal(other.get(small), np.arange(12, dtype=np.int16).reshape(3, 4))
        assert c.ping() > 0
        c.release([h, small])
        other.release([h, small])
        assert c.stats()["objects"] >= 1  # the published name keeps "big"


def test_unix_client_needs_no_zeromq_after_connecting(fresh_broker):
    with Client(fresh_broker.endpoint) as c:
        c.conn._sock.close(0)  # the DEALER is gone: every request below must travel the Unix connection
        h = c.put(np.ones(100_000))
        assert c.get(h).sum() == 100_000
        c.release(h)
        assert c.stats()["used"] >= 0


def test_small_puts_take_one_round_trip_per_refill(fresh_broker):
    with Client(fresh_broker.endpoint) as c:
        before = _requests(c)
        count = POOL_REFILL_BYTES // 4096  # blocks of the 4 KiB class in one refill
        hs = [c.put(np.full(1024, i, np.float32)) for i in range(count)]
        after = _requests(c)
        assert after.get("alloc_many", 0) - before.get("alloc_many", 0) == 1
        assert after.get("alloc", 0) == before.get("alloc", 0)
        for i, h in enumerate(hs):
            assert c.get(h)[0] == i and h.shape == (1024,) and h.nbytes == 4096
        assert len({h.offset for h in hs}) == count
        c.put(np.zeros(1024, np.float32))  # the pool is empty: the next refill
        assert _requests(c)["alloc_many"] - before.get("alloc_many", 0) == 2


def test_pooled_array_in_another_client_has_its_dtype_shape_and_data(fresh_broker):
    with Client(fresh_broker.endpoint) as c, Client(fresh_broker.endpoint) as other:
        a = np.random.default_rng(1).standard_normal((7, 9))  # 504 B: the 512 B class
        h = c.put(a)
        got = other.get(h)
        assert got.dtype == a.dtype and got.shape == (7, 9) and np.array_equal(got, a)
        c.get(h)[0, 0] = 42.0  # one block, seen by both
        assert got[0, 0] == 42.0
        c.publish("small", h)
        looked = other.lookup("small")  # the broker's record was given the dtype and shape
        assert (looked.dtype, looked.shape, looked.nbytes) == (h.dtype, h.shape, h.nbytes)


def test_publish_cannot_retype_an_array_that_is_not_a_pool_block(fresh_broker):
    with Client(fresh_broker.endpoint, pool=False) as c:
        h = c.put(np.zeros(16, np.float32))
        with pytest.raises(Exception, match="is <f4\\[16\\], not <f8\\[8\\]"):
            c._request(Publish(name="x", oid=h.oid, gen=h.generation, dtype="<f8", shape=[8]))
        with Client(fresh_broker.endpoint) as other:
            other.get(h)
            small = other.put(np.zeros(4, np.uint8))  # a 256 B pool block of the other client
            c.get(small)
            with pytest.raises(BadRequest, match=r"is \|u1\[256\], not <f8\[1048576\]"):
                c._request(Publish(name="y", oid=small.oid, gen=small.generation,
                           dtype="<f8", shape=[1 << 20]))  # larger than its block


def test_pool_off_and_large_arrays_use_plain_allocations(fresh_broker):
    with Client(fresh_broker.endpoint, pool=False) as c, Client(fresh_broker.endpoint) as p:
        before = _requests(c)
        c.put(np.zeros(10, np.float32))
        assert p._pool.max_size == c.region.capacity // 8
        p.put(np.zeros(p._pool.max_size // 8 + 1, np.float64))  # just over the pooled size
        after = _requests(c)
        assert after["alloc"] - before.get("alloc", 0) == 2
        assert after.get("alloc_many", 0) == before.get("alloc_many", 0)


def test_a_put_release_loop_of_large_arrays_sends_nothing_after_the_first(fresh_broker):
    with Client(fresh_broker.endpoint) as c:
        a = np.arange(1 << 19, dtype=np.float64)  # 4 MiB: above POOL_MAX, within 1/8 of 64 MiB
        before = _requests(c)
        offsets = set()
        for i in range(20):
            h = c.put(a + i)
            offsets.add(h.offset)
            assert c.get(h)[7] == 7 + i
            c.release(h)
        after = _requests(c)
        assert after.get("alloc_many", 0) - before.get("alloc_many", 0) == 1  # the first put only
        assert after.get("alloc", 0) == before.get("alloc", 0) and after.get("drop", 0) == before.get("drop", 0)
        assert len(offsets) == 1  # one warm block


def test_large_pool_blocks_stay_within_the_clients_budget_and_go_back_on_close(fresh_broker, poll):
    ep = fresh_broker.endpoint
    four = 4 << 20
    with Client(ep) as watcher:
        base = watcher.stats()["used"]
        c = Client(ep)
        keep = c._pool.large_keep
        assert keep == 8 << 20  # 1/8 of the 64 MiB arena
        hs = [c.put(np.full(four // 8, float(i))) for i in range(3)]  # 12 MiB in use at once
        assert watcher.stats()["used"] >= base + 3 * four
        c.release(hs)  # one goes back at once, two stay the pool's (8 MiB: the budget)
        assert c._pool.large == keep
        poll(lambda: watcher.stats()["used"] < base + 3 * four, what="the block beyond the budget to be freed")
        h = c.put(np.zeros((2 << 20) // 8))  # 2 MiB, another class: the 4 MiB blocks go back first
        assert c._pool.large == 2 << 20
        poll(lambda: watcher.stats()["used"] < base + four, what="the other class's blocks to be freed")
        c.release(h)
        c.close()
        poll(lambda: watcher.stats()["used"] == base, what="the closed client's blocks to be freed")


def test_all_clients_large_pools_together_keep_at_most_a_quarter_of_the_arena(fresh_broker, poll):
    ep = fresh_broker.endpoint
    four = 4 << 20
    with Client(ep) as a, Client(ep) as b, Client(ep) as c:
        region = a.holds.region
        for k in (a, b):  # each keeps two 4 MiB blocks: its 8 MiB, a quarter of 64 MiB together
            hs = [k.put(np.zeros(four // 8)) for _ in range(2)]
            k.release(hs)
            assert k._pool.large == 2 * four
        assert region.pooled_large() == 4 * four == a.region.capacity // 4
        h = c.put(np.zeros(four // 8))
        assert region.pooled_large() == 5 * four  # in use counts as well
        c.release(h)  # over the quarter: back to the broker, not kept
        assert c._pool.large == 0 and region.pooled_large() == 4 * four
        b.close()  # a closed client's report is cleared by the broker
        poll(lambda: region.pooled_large() == 2 * four, what="the closed client's report to be cleared")

def test_an_array_whose_block_would_pass_the_pool_limit_is_allocated_by_the_broker():
    """The pool limit is on the block (its size class, up to a fifth larger than the array)."""
    with Broker(capacity=100 << 20) as b, Client(b.endpoint) as c:
        keep = c._pool.max_size  # 1/8 of 100 MiB: 12.5 MiB
        under = (keep - (1 << 20)) // 8  # float64s: 11.5 MiB, whose size class is 12 MiB
        over = (keep - 4096) // 8  # just under the limit, but its size class is 14 MiB
        assert size_class(under * 8) <= keep < size_class(over * 8)
        before = _requests(c)
        for n in (under, over):
            h = c.put(np.full(n, 1.0))
            assert c.get(h)[-1] == 1.0
            c.release(h)
        after = _requests(c)
        assert after.get("alloc_many", 0) - before.get("alloc_many", 0) == 1  # the one that fits
        assert after.get("alloc", 0) - before.get("alloc", 0) == 1  # the other, by message


def test_a_published_large_block_leaves_the_pool_and_its_budget(fresh_broker):
    with Client(fresh_broker.endpoint) as c:
        h = c.put(np.full((4 << 20) // 8, 2.0))
        assert c._pool.large == 4 << 20
        c.publish("kept", h)  # the broker keeps it alive now: not the pool's any more
        c.release(h)
        assert c._pool.large == 0
        before = _requests(c)
        for _ in range(5):  # the budget is whole: the next 4 MiB block is pooled and reused
            c.release(c.put(np.zeros((4 << 20) // 8)))
        after = _requests(c)
        assert after.get("alloc_many", 0) - before.get("alloc_many", 0) == 1
        assert after.get("drop", 0) == before.get("drop", 0)
        assert (c.get(c.lookup("kept")) == 2.0).all()


def _regrant(endpoint: str, conn) -> None:
    with Client(endpoint) as c:
        while (h := conn.recv()) != "done":
            c.get(h)
            conn.send(c.grant(h))
            c.release(h)


def test_a_large_block_granted_back_to_its_owner_leaves_the_pools_budget(fresh_broker):
    """A claims a grant of its own pooled block while holding it (``_held_twice``)."""
    ctx = multiprocessing.get_context("spawn")
    with Client(fresh_broker.endpoint) as a:
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_regrant, args=(fresh_broker.endpoint, there))
        proc.start()
        try:
            for _ in range(3):
                h = a.put(np.zeros(2 << 20, np.uint8))  # 2 MiB: a large pooled block
                here.send(h)
                g = here.recv()
                a.get(g)  # still holding h: the block leaves the pool for the lease
                a.release(g)
                assert a._pool.large == 0 and a.holds.region.pooled_large() == 0
        finally:
            here.send("done")
            proc.join(30)


def test_a_large_pool_block_is_not_reused_while_another_client_holds_it(fresh_broker):
    ep = fresh_broker.endpoint
    with Client(ep) as producer, Client(ep) as reader:
        a = np.full((2 << 20) // 8, 1.0)
        h = producer.put(a)
        view = reader.get(h)  # a hold in shared memory
        producer.release(h)
        h2 = producer.put(a * 2)  # the first block is held: a new one
        assert h2.offset != h.offset and (view == 1.0).all()
        reader.release(h)
        producer.release(h2)
        h3 = producer.put(a * 3)  # free again: reused
        assert h3.offset in (h.offset, h2.offset) and (producer.get(h3) == 3.0).all()
        producer.release(h3)


def test_closing_a_client_returns_its_unused_pool_blocks(fresh_broker):
    with Client(fresh_broker.endpoint) as watcher:
        base = watcher.stats()["used"]
        with Client(fresh_broker.endpoint) as c:
            h = c.put(np.zeros(100, np.float32))  # 400 B: the 448 B class, 64 blocks in a refill
            assert watcher.stats()["used"] == base + 64 * (448 + 64)  # the refill, with headers
            c.release(h)
        deadline = time.monotonic() + 5
        while watcher.stats()["used"] != base and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watcher.stats()["used"] == base


def test_release_does_not_wait_but_is_ordered_before_the_next_request(fresh_broker):
    with Client(fresh_broker.endpoint, pool=False) as c:
        hs = [c.put(np.zeros(100_000)) for _ in range(5)]
        before = _requests(c)
        for h in hs:
            c.release(h)  # one "drop" message each, no reply
        st = c.stats()  # sent after the drops on the same connection: sees them done
        assert st["used"] == 0
        assert st["requests"]["drop"] - before.get("drop", 0) == 5
        assert st["requests"].get("release", 0) == before.get("release", 0)
        c.release(hs[0])  # already released: counted as stale, no error
        assert c.stats()["counters"]["stale_drops"] == 1


def test_get_many_takes_all_leases_in_one_round_trip_or_none(fresh_broker):
    """Without holds in shared memory (``holds=False``): leases, one round trip for many."""
    ep = fresh_broker.endpoint
    with Client(ep, pool=False) as c, Client(ep, pool=False, holds=False) as other:
        arrays = [np.full(1000 * (i + 1), i, np.int32) for i in range(6)]
        hs = [c.put(a) for a in arrays]
        before = _requests(other)
        views = other.get_many(hs)
        assert _requests(other)["acquire_many"] - before.get("acquire_many", 0) == 1
        assert all(np.array_equal(v, a) for v, a in zip(views, arrays, strict=True))
        c.release(hs)
        assert other.get(hs[0])[0] == 0 and c.stats()["objects"] == 6  # other's leases keep them
        other.release(hs[5])
        base = other.stats()["objects"]  # other's connection: its release is in before this
        fresh = [c.put(a) for a in arrays[:2]]
        with pytest.raises(StaleHandle):
            other.get_many([*fresh, hs[5]])  # one stale handle: none of the leases taken
        c.release(fresh)
        assert c.stats()["objects"] == base  # freed: other holds no lease on them
        other.release(hs[:5])
        assert other.stats()["objects"] == 0


class RawUnix:
    """A client that speaks the Unix transport by hand."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        self.ctx = zmq.Context()
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(endpoint)
        dealer.send(encode(Hello(rid=1, name="raw", pid=os.getpid(), role="test")))
        assert dealer.poll(5000)
        hello = decode(dealer.recv())
        self.dealer = dealer
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(hello.fd_path)
        self.sock.sendall(f"{hello.key}+unix".encode())
        _meta, fd = recv_fd(self.sock)
        os.close(fd)
        self.frames = FrameReader()
        self.got: list = []

    def read(self, n: int) -> list:
        while len(self.got) < n:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("closed")
            self.got.extend(decode(p) for p in self.frames.feed(data))
        out, self.got = self.got[:n], self.got[n:]
        return out

    def close(self) -> None:
        self.sock.close()
        self.dealer.close(0)
        self.ctx.term()


def test_frames_split_and_joined_arbitrarily_are_reassembled(fresh_broker):
    raw = RawUnix(fresh_broker.endpoint)
    try:
        stream = b"".join(frame(encode(Ping(rid=rid))) for rid in range(2, 60))
        rng = np.random.default_rng(3)
        pos = 0
        while pos < len(stream):
            step = int(rng.integers(1, 40))
            raw.sock.sendall(stream[pos:pos + step])
            pos += step
            time.sleep(0.0005)
        replies = raw.read(58)
        assert [r.rid for r in replies] == list(range(2, 60))
        assert all(r.kind == "ok" for r in replies)
    finally:
        raw.close()


def test_bad_payloads_get_errors_and_a_bad_length_closes_only_that_connection(fresh_broker):
    with Client(fresh_broker.endpoint) as good:
        h = good.put(np.arange(1000.0))
        raw = RawUnix(fresh_broker.endpoint)
        try:
            raw.sock.sendall(frame(b"\xc1garbage") + frame(msgpack.packb({"v": VERSION, "op": "x", "rid": 3})))
            errors = raw.read(2)
            assert [e.kind for e in errors] == ["error", "error"] and errors[1].rid == 0
            raw.sock.sendall(frame(encode(Hello(rid=4, name="again", pid=1, role="x"))))
            assert "already connected" in raw.read(1)[0].message
            raw.sock.sendall((MAX_MESSAGE + 1).to_bytes(4, "little") + b"x" * 100)
            with pytest.raises((ConnectionError, OSError)):
                raw.read(1)  # the broker hung up: a stream cannot be resynchronised
        finally:
            raw.close()
        assert np.array_equal(good.get(h), np.arange(1000.0))
        assert good.stats()["counters"]["bad_messages"] >= 3


def test_replies_the_socket_cannot_take_at_once_are_queued_not_lost(fresh_broker):
    raw = RawUnix(fresh_broker.endpoint)
    try:
        n = 3000  # ~1 KiB stats replies: several times the socket's buffer, unread while sent
        raw.sock.sendall(b"".join(frame(encode(Stats(rid=rid))) for rid in range(10, 10 + n)))
        time.sleep(0.5)
        replies = raw.read(n)
        assert [r.rid for r in replies] == list(range(10, 10 + n))
    finally:
        raw.close()


def test_frame_reader_limits_and_order():
    r = FrameReader()
    data = frame(b"a") + frame(b"") + frame(b"bc" * 1000)
    assert r.feed(data[:3]) == [] and r.pending == 3
    assert r.feed(data[3:7]) == [b"a"]
    assert r.feed(data[7:]) == [b"", b"bc" * 1000] and r.pending == 0
    with pytest.raises(Exception, match="exceeds"):
        r.feed((MAX_MESSAGE + 1).to_bytes(4, "little"))


# -- grants: a hand-off with no round trip on the receiver's side -------------------------------------
@pytest.mark.parametrize("transport", ["unix", "zmq"])
def test_granted_handle_is_read_without_a_round_trip_and_outlives_the_granter(fresh_broker, transport):
    ep = fresh_broker.endpoint
    with Client(ep, pool=False) as watcher, Client(ep) as receiver:
        a = np.arange(50_000, dtype=np.float32)
        with Client(ep, transport=transport) as giver:
            h = giver.put(a)
            g = giver.grant(h)
            assert g.grant and g.expires > time.monotonic() and g.oid == h.oid
            giver.release(h)
        # the giver is gone and released: the grant alone keeps the array
        assert watcher.stats()["grants"] == 1
        before = _requests(receiver)
        got = receiver.get(g)
        assert np.array_equal(got, a)
        after = _requests(receiver)
        assert after.get("acquire", 0) == before.get("acquire", 0)
        assert after["claim"] - before.get("claim", 0) == 1
        st = receiver.stats()
        assert st["grants"] == 0 and st["objects"] >= 1  # the grant's reference became the lease
        receiver.release(g)
        assert receiver.stats()["objects"] == 0


def test_a_claim_that_overtakes_its_grant_still_gets_one_lease(fresh_broker):
    ep = fresh_broker.endpoint
    with Client(ep, pool=False) as giver, Client(ep) as receiver:
        h = giver.put(np.ones(1000))
        token = giver.cid << 32 | 999
        receiver.conn.notify(Claim(oid=h.oid, gen=h.generation, token=token))  # before the grant
        assert receiver.stats()["objects"] == 1
        giver.conn.notify(Grant(oid=h.oid, gen=h.generation, token=token, uses=1, ttl=30))
        giver.release(h)
        assert giver.stats()["grants"] == 0  # the early claim used it up: no extra reference
        assert giver.stats()["objects"] == 1  # the receiver's lease
        receiver.release(h)
        assert receiver.stats()["objects"] == 0


def test_unclaimed_grants_expire_and_free_the_array(fresh_broker):
    ep = fresh_broker.endpoint
    with Client(ep, pool=False) as c:
        h = c.put(np.ones(1000))
        g = c.grant(h, ttl=0.3)
        c.release(h)
        assert c.stats()["objects"] == 1
        deadline = time.monotonic() + 5
        while c.stats()["objects"] and time.monotonic() < deadline:
            time.sleep(0.05)
        st = c.stats()
        assert st["objects"] == 0 and st["counters"]["grants_expired"] == 1
        with Client(ep) as late:
            assert time.monotonic() > g.expires  # too late for the fast path: an ordinary get
            with pytest.raises(StaleHandle):
                late.get(g)


def test_grant_for_two_receivers_and_bad_grants(fresh_broker):
    ep = fresh_broker.endpoint
    with Client(ep, pool=False) as c, Client(ep) as r1, Client(ep) as r2:
        h = c.put(np.arange(10.0))
        g = c.grant(h, uses=2)
        c.release(h)
        assert r1.get(g)[3] == 3.0 and r2.get(g)[4] == 4.0
        r1.ping()  # each receiver's claim is in once its next request is answered
        assert r2.stats()["grants"] == 0
        r1.release(g)
        r1.ping()  # its drop is in (a drop is not answered; r2's next request could overtake it)
        r2.release(g)
        assert r2.stats()["objects"] == 0 and r1.stats()["objects"] == 0
        with pytest.raises(ValueError):
            c.grant(g, uses=0)
        c.conn.notify(Grant(oid=1, gen=1, token=12345, uses=1, ttl=1))  # another client's token space
        c.ping()  # the refusal arrives while this waits; its own answer is not lost
        with pytest.raises(BadRequest, match="an earlier message was refused: grant: the token"):
            c.ping()
        h2 = c.put(np.zeros(3))
        c.release(h2)
        with pytest.raises(StaleHandle, match="holds no lease"):
            c.grant(h2)  # refused here, before anything is sent: a receiver never gets it
        h3 = c.put(np.zeros(3))
        c.conn.notify(Grant(oid=h3.oid, gen=h3.generation, token=c.cid << 32 | 999, uses=1, ttl=1))
        with pytest.raises(BadRequest, match="earlier message.*holds no lease"):
            r1.conn.notify(Grant(oid=h3.oid, gen=h3.generation, token=r1.cid << 32 | 1, uses=1, ttl=1))
            r1.ping()  # the broker refuses a grant by a client that holds no lease, too
            r1.ping()
        c.release(h3)


def test_many_handles_go_in_messages_of_bounded_size(fresh_broker):
    n = MAX_REFS + 10
    with Client(fresh_broker.endpoint) as c, Client(fresh_broker.endpoint, holds=False) as other:
        hs = [c.put(np.full(4, i, np.int32)) for i in range(n)]
        before = _requests(other)
        views = other.get_many(hs)
        assert views[-1][0] == n - 1
        after = _requests(other)
        assert after["acquire_many"] - before.get("acquire_many", 0) == -(-n // MAX_REFS)
        other.release(hs)
        assert _requests(other)["drop"] - after.get("drop", 0) == -(-n // MAX_REFS)
        c.release(hs)
        with pytest.raises(ValueError, match="length <= 1024"):  # the broker's schema refuses it
            other._request(AcquireMany(refs=[(h.oid, h.generation) for h in hs]))


def test_a_pooled_block_is_typed_once_by_its_first_publish(fresh_broker):
    with Client(fresh_broker.endpoint) as c:
        h = c.put(np.zeros(8, np.float32))
        c.publish("a", h)
        with pytest.raises(BadRequest, match="is <f4\\[8\\], not <i2\\[16\\]"):
            c._request(Publish(name="b", oid=h.oid, gen=h.generation, dtype="<i2", shape=[16]))
        assert c.lookup("a").shape == (8,)


def test_getting_a_granted_handle_twice_uses_the_grant_up(fresh_broker):
    with Client(fresh_broker.endpoint, pool=False) as c, Client(fresh_broker.endpoint) as r:
        h = c.put(np.ones(100))
        g = c.grant(h)
        r.get(h)  # r holds a lease already, through an ordinary get
        r.get(g)  # ... and still claims the grant, so it does not pin the block until its ttl
        assert r.stats()["grants"] == 0
        r.release(h)
        r.ping()  # r's release is in
        c.release(h)
        assert c.stats()["objects"] == 0


def test_get_many_takes_holds_with_no_message_and_a_stale_handle_refuses_the_lot(fresh_broker):
    ep = fresh_broker.endpoint
    with Client(ep, pool=False) as c, Client(ep) as other:
        assert other.holds is not None
        arrays = [np.full(1000 * (i + 1), i, np.int32) for i in range(6)]
        hs = [c.put(a) for a in arrays]
        before = _requests(other)
        views = other.get_many(hs)
        after = _requests(other)
        assert {k: v for k, v in after.items() if k != "stats"} == \
            {k: v for k, v in before.items() if k != "stats"}  # no message for the holds
        assert all(np.array_equal(v, a) for v, a in zip(views, arrays, strict=True))
        c.release(hs)
        st = c.stats()  # c's releases are in: the blocks stay while other holds them
        assert st["sizes"]["retiring"] == 6 and st["used"] >= sum(a.nbytes for a in arrays)
        assert all(np.array_equal(v, a) for v, a in zip(views, arrays, strict=True))
        fresh = [c.put(a) for a in arrays[:2]]
        assert not {h.offset for h in fresh} & {h.offset for h in hs}  # held blocks are not reused
        other.release(hs[5])
        c.stats()  # hs[5] is unheld now: the broker retires it
        with pytest.raises(StaleHandle):
            other.get_many([*fresh, hs[5]])  # one stale handle: none of the holds is kept
        assert not any(other.holds_handle(h) for h in fresh)
        c.release(fresh)
        other.release(hs[:5])
        assert c.stats()["used"] == 0
