"""Crashes and hostile input: killed clients and brokers, runtime directories, descriptors, malformed frames."""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import random
import signal
import socket
import stat
import time
from pathlib import Path

import msgpack
import msgspec
import numpy as np
import pytest
import zmq
from conftest import memfd_links, our_tree, ours_in_dev_shm

from broker import BadRequest, Broker, BrokerGone, Client, StaleHandle
from broker.arena import recv_fd
from broker.protocol import (
    MAX_MESSAGE,
    VERSION,
    Alloc,
    Hello,
    Lookup,
    Message,
    Ping,
    ProtocolError,
    decode,
    encode,
)
from broker.rundir import base_dir, cleanup, list_rundirs

MiB = 2**20
SPAWN = multiprocessing.get_context("spawn")
CHILD_TIMEOUT = 30.0




def _maps(pid: int | str = "self") -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def _rundir(b: Broker) -> Path:
    return Path(b.info["fd_path"]).parent


def _kill_broker(b: Broker) -> None:
    os.kill(b.pid, signal.SIGKILL)
    b.proc.wait(10)


# -- a client killed mid-write ---------------------------------------------------------------------
def _child_scribble(endpoint: str, wire: bytes, conn) -> None:
    c = Client(endpoint)
    theirs = c.get(pickle.loads(wire))  # holds a lease on the parent's array, reads it
    h, slot = c.alloc((MiB,), "uint8")
    conn.send((int(theirs.sum()), pickle.dumps(h)))
    i = 0
    while True:  # writing into its own slot when SIGKILL arrives
        slot[:] = i % 251
        i += 1


def test_sigkilled_client_does_not_take_the_region(fresh_broker, poll):
    rng = np.random.default_rng(5)
    data = rng.integers(0, 2**31, 2 * MiB // 4, dtype=np.int32)
    with Client(fresh_broker.endpoint, pool=False) as c:  # the broker's block, so "used" ends at 0
        h = c.put(data)
        parent, child = SPAWN.Pipe()
        p = SPAWN.Process(target=_child_scribble, args=(fresh_broker.endpoint, pickle.dumps(h), child))
        p.start()
        child.close()
        try:
            assert parent.poll(CHILD_TIMEOUT), "child never answered"
            seen, wire = parent.recv()
            assert seen == int(data.sum())
            assert c.stats()["clients"] == 2
            time.sleep(0.05)  # let it scribble
            p.kill()
            p.join(CHILD_TIMEOUT)
            assert p.exitcode == -signal.SIGKILL
        finally:
            p.join(CHILD_TIMEOUT)
            parent.close()
        poll(lambda: c.stats()["clients"] == 1, what="the broker to notice the killed client")
        assert c.get(h).tobytes() == data.tobytes(), "the parent's data is intact"
        with pytest.raises(StaleHandle):
            c.get(pickle.loads(wire))  # the child's slot was reclaimed
        with Client(fresh_broker.endpoint) as other:  # and a newcomer is served normally
            assert np.array_equal(other.get(h), data)
            h2 = other.put(np.arange(MiB, dtype=np.uint8))
            assert np.array_equal(c.get(h2), np.arange(MiB, dtype=np.uint8))
            other.release([h, h2])
        c.release([h, h2])
        s = c.stats()
        assert s["used"] == 0 and s["objects"] == 0, s


# -- privacy ---------------------------------------------------------------------------------------
def test_runtime_dir_is_private(broker):
    rundir = _rundir(broker)
    assert rundir.parent == base_dir()
    assert stat.S_IMODE(rundir.stat().st_mode) == 0o700
    assert stat.S_IMODE(base_dir().stat().st_mode) == 0o700
    fd_sock = rundir / "fd.sock"
    st = fd_sock.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    assert broker.endpoint == f"ipc://{rundir / 'broker.sock'}"


def test_fd_socket_refuses_a_wrong_key(broker, client):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(broker.info["fd_path"])
        s.sendall(b"not-the-key")
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(ConnectionError):
            recv_fd(s)  # the broker hangs up without a descriptor
        assert len(os.listdir("/proc/self/fd")) == before
    assert client.ping() < 5  # and keeps serving


# -- the broker killed ------------------------------------------------------------------------------
def test_clients_get_broker_gone_not_a_hang():
    b = Broker(capacity=16 * MiB)
    try:
        with Client(b.endpoint, timeout=30) as c, Client(b.endpoint, timeout=30) as idle:
            h = c.put(np.arange(100.0))
            view = c.get(h)
            _kill_broker(b)
            t = time.monotonic()
            with pytest.raises(BrokerGone, match="exited"):
                c.stats()
            with pytest.raises(BrokerGone):
                c.put(np.zeros(3))
            # a hold needs no broker: the array is still mapped and cannot be reused now
            assert idle.get(h)[99] == 99.0
            with pytest.raises(BrokerGone):
                idle.ping()
            assert time.monotonic() - t < 5, "BrokerGone must come at once, not after the timeout"
            assert view[99] == 99.0, "the mapping outlives the broker"
            del view
    finally:
        b.close()
        cleanup()


def test_runtime_dir_stays_until_cleanup_which_spares_live_brokers(broker):
    dead = Broker(capacity=8 * MiB)
    path = _rundir(dead)
    try:
        _kill_broker(dead)
        assert path.is_dir(), "kill -9 leaves the directory"
        entries = {e.path: e for e in list_rundirs()}
        assert not entries[path].live
        assert entries[_rundir(broker)].live
        assert entries[path].info["pid"] == dead.pid
        assert [e.path for e in cleanup(dry_run=True)] == [path]
        assert path.is_dir(), "a dry run removes nothing"
        removed = cleanup()
        assert [e.path for e in removed] == [path]
        assert not path.exists()
        assert _rundir(broker).is_dir(), "a live broker's directory is never removed"
        assert cleanup() == []
        with Client(broker.endpoint) as c:  # and the live broker is untouched
            assert c.ping() < 5
    finally:
        dead.close()


def test_next_broker_sweeps_a_dead_brokers_directory():
    dead = Broker(capacity=8 * MiB)
    path = _rundir(dead)
    _kill_broker(dead)
    dead.close()
    assert path.is_dir()
    with Broker(capacity=8 * MiB) as b:
        assert not path.exists()
        assert _rundir(b).is_dir()


def test_no_memfd_outlives_a_killed_broker_and_its_clients():
    b = Broker(capacity=16 * MiB)
    name = f"memfd:shmbroker-{b.pid}-"
    try:
        assert any(name in link for link in memfd_links(b.pid))
        assert name in _maps(b.pid)
        c1, c2 = Client(b.endpoint), Client(b.endpoint)
        h = c1.put(np.arange(1000))
        view = c2.get(h)
        assert any(name in link for link in memfd_links())
        _kill_broker(b)
        assert view[999] == 999  # the clients keep the memory alive while they map it
        c1.close()
        c2.close()
        del view
        gc.collect()
        assert not [link for link in memfd_links() if name in link]
        assert name not in _maps(), "no mapping of the arena remains"
    finally:
        b.close()
        cleanup()


def test_a_client_dropped_without_close_lets_go_of_the_arena(broker):
    c = Client(broker.endpoint)
    name = f"memfd:shmbroker-{broker.pid}-"
    assert any(name in link for link in memfd_links())
    h = c.put(np.ones(10))
    assert c.get(h).sum() == 10
    del c
    gc.collect()
    assert not [link for link in memfd_links() if name in link], "the descriptor leaked"
    assert name not in _maps()


def test_no_dev_shm_entries_at_any_point(poll):
    def entries() -> set[str]:  # ours only: other programs on the machine may use /dev/shm
        return ours_in_dev_shm(our_tree())

    before = entries()
    with Broker(capacity=16 * MiB) as b, Client(b.endpoint) as c:
        h = c.put(np.zeros(4 * MiB, np.uint8))
        assert entries() == before
        assert "/dev/shm" not in _maps(b.pid) and "/dev/shm" not in _maps()
        for link in memfd_links(b.pid):
            assert not link.startswith("/dev/shm")
        c.release(h)
    assert entries() == before


# -- hostile input ----------------------------------------------------------------------------------
class Raw:
    """A bare DEALER that sends whatever it is given and reads one reply per request."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.alive: socket.socket | None = None

    def ask(self, *frames: bytes) -> Message:
        self.sock.send_multipart(list(frames))
        assert self.sock.poll(5000), f"no reply to {frames[0][:60]!r} ({len(frames)} frames)"
        reply = self.sock.recv_multipart()
        assert len(reply) == 1
        return decode(reply[0])

    def hello(self) -> None:
        """Say hello and fetch the descriptor (then drop it): a member the broker serves."""
        reply = self.ask(encode(Hello(rid=1, name="raw", pid=os.getpid(), role="fuzz")))
        assert reply.kind == "welcome"
        self.alive = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.alive.settimeout(10)
        self.alive.connect(reply.fd_path)
        self.alive.sendall(reply.key.encode())
        _meta, fd = recv_fd(self.alive)
        os.close(fd)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
        if self.alive is not None:
            self.alive.close()


def _req(op: str, rid: int, **fields) -> bytes:
    return msgpack.packb({"v": VERSION, "op": op, "rid": rid, **fields})


def _junk(rng: random.Random):
    return rng.choice([None, True, -1, 2**63, 1.5, "x" * rng.randrange(50), b"\x00\xff",
                       [], [1, "a"], {"k": [1]}, [[1, 2]], [[-5, 1]], ["a", "b"], float("nan")])


def _hostile(rng: random.Random, rid: int) -> tuple[list[bytes], bool]:
    """One malformed request and whether it must get an error (False: a refusal or a no-op)."""
    kind = rng.randrange(9)
    if kind == 0:
        return [rng.randbytes(rng.randrange(200))], True
    if kind == 1:
        return [rng.randbytes(rng.randrange(1, 30)) for _ in range(rng.randrange(2, 5))], True
    if kind == 2:
        return [_req(rng.choice(["frobnicate", "OK", "", "_op_alloc", "__init__", "drop", "close"]),
                     rid)], True
    if kind == 3:
        return [msgpack.packb(rng.choice([[1, 2], "alloc", 7, None, {"v": 1}, {"v": 2, "op": "ping"}]))], True
    if kind == 4:  # a known kind with fields of random types: an error unless they happen to fit
        op = rng.choice(["alloc", "acquire", "release", "publish", "lookup", "commit", "done"])
        payload = _req(op, rid, oid=_junk(rng), gen=_junk(rng), name=_junk(rng), refs=_junk(rng),
                       nbytes=_junk(rng), dtype=_junk(rng), shape=_junk(rng), rsv=_junk(rng))
        try:
            decode(payload)
        except ProtocolError:
            return [payload], True
        return [payload], False
    if kind == 5:  # well-formed requests nobody may make: dtype/shape nonsense, forged objects
        return [rng.choice([
            _req("alloc", rid, nbytes=8, dtype=rng.choice(["O", "i4,i4", "(2,)f4", "nonsense", "M8[xyz]"]),
                 shape=[2], timeout=0),
            _req("alloc", rid, nbytes=rng.randrange(1000), dtype="<f8", shape=[3, 5], timeout=0),
            _req("alloc", rid, nbytes=8, dtype="<f8", shape=[-1], timeout=0),
            _req("alloc", rid, nbytes=2**63, dtype="u1", shape=[2**47, 2**16], timeout=0),
            _req("acquire", rid, oid=rng.randrange(-2**63, 2**63), gen=rng.randrange(2**32)),
            _req("publish", rid, name="x", oid=rng.randrange(2**63), gen=1),
            _req("commit", rid, rsv=rng.randrange(2**31)),
            _req("done", rid, task=rng.randrange(2**31), rsv=None, credit=1, busy=0.1),
            _req("fail", rid, task=1, error="e", trace="t", credit=1),
            _req("register", rid, stage="nope", credits=1, device="cpu"),
            _req("reserve", rid, stage=rng.randrange(-5, 5), items=[1], shape=[2], dtype="<f4",
                 timeout=0),
        ])], True
    if kind == 6:  # harmless requests with odd content: a reply, not necessarily an error
        return [rng.choice([
            _req("release", rid, refs=[_junk(rng) for _ in range(rng.randrange(5))]),
            _req("lookup", rid, name=rng.randbytes(8).hex()),
            _req("ping", rid, extra=_junk(rng)),
        ])], False
    if kind == 7:
        return [b""], True
    return [encode(Lookup(rid=rid, name="y" * (MAX_MESSAGE + rng.randrange(10))))], True


def test_hostile_frames_get_errors_and_the_broker_keeps_serving(fresh_broker):
    rng = random.Random(20240607)
    good = Client(fresh_broker.endpoint)
    data = np.arange(50_000, dtype=np.float64)
    h = good.put(data)
    used, objects = good.stats()["used"], good.stats()["objects"]
    stranger, member = Raw(fresh_broker.endpoint), Raw(fresh_broker.endpoint)
    try:
        member.hello()
        deadline = time.monotonic() + 20
        for rid in range(2, 2500):
            assert time.monotonic() < deadline, "the fuzz loop must stay quick"
            frames, must_fail = _hostile(rng, rid)
            raw = rng.choice([stranger, member])
            reply = raw.ask(*frames)
            if raw is stranger and reply.kind != "error":
                assert decode(frames[0]).kind in ("ping", "stats", "lookup", "hello"), reply
            if must_fail:
                assert reply.kind == "error", (frames[0][:80], reply)
                assert reply.code in ("BadRequest", "StaleHandle", "ItemTooLarge", "ArenaFull"), reply
                assert reply.message
            if rid % 100 == 0:  # forged offsets and sizes are refused, never mapped
                forged = msgspec.structs.replace(h, offset=rng.randrange(2**62), nbytes=rng.randrange(2**62))
                with Client(fresh_broker.endpoint) as other:
                    with pytest.raises(StaleHandle):
                        other.get(forged)
                    with pytest.raises(StaleHandle):
                        other.get(msgspec.structs.replace(h, generation=rng.randrange(2, 2**62)))
            if rid % 500 == 0:  # the honest client is served correctly throughout
                assert np.array_equal(good.get(h), data)
        # a request without hello, and one from a client that never mapped the arena
        reply = stranger.ask(encode(Alloc(rid=9, nbytes=8, dtype="<f8", shape=[1], timeout=0)))
        assert reply.kind == "error" and "hello" in reply.message
        s = good.stats()
        assert s["counters"]["bad_messages"] > 150
        assert s["objects"] == objects and s["used"] == used, ("hostile requests leaked arena space", s)
        assert np.array_equal(good.get(h), data)
        assert s["clients"] == 2
        assert member.ask(encode(Ping(rid=1))).kind == "ok"
        with Client(fresh_broker.endpoint) as late:
            h2 = late.put(np.arange(10))
            assert good.get(h2).tolist() == list(range(10))
            late.release(h2)
        assert fresh_broker.proc.poll() is None
    finally:
        stranger.close()
        member.close()
        good.close()


def test_a_client_that_never_mapped_the_arena_cannot_hold_memory(fresh_broker, poll):
    """Leases are dropped when the fd connection closes; a client without one may not take any."""
    raw = Raw(fresh_broker.endpoint)
    try:
        assert raw.ask(encode(Hello(rid=1, name="raw", pid=os.getpid(), role="fuzz"))).kind == "welcome"
        reply = raw.ask(encode(Alloc(rid=2, nbytes=MiB, dtype="u1", shape=[MiB], timeout=0)))
        assert reply.kind == "error" and reply.code == "BadRequest", reply
    finally:
        raw.close()
    with Client(fresh_broker.endpoint) as c:
        assert c.stats()["used"] == 0


def test_error_replies_carry_the_request_id_and_rebuild_the_exception(client):
    with pytest.raises(BadRequest, match="shape"):
        client._request(Alloc(nbytes=8, dtype="<f8", shape=[-1], timeout=0))
    assert client.ping() < 5  # the client is still in step with the broker


@pytest.mark.parametrize("change", [
    {"offset": 64 * MiB},  # past the end of the arena
    {"offset": 64 * MiB - 8},  # starts inside, runs past the end
    {"offset": 2**62},
    {"nbytes": 8},  # fewer bytes than its shape and dtype need
    {"shape": (10**6,), "strides": (8,)},
])
def test_view_refuses_a_handle_that_does_not_fit(client, change):
    h = client.put(np.arange(4.0))
    try:
        with pytest.raises(StaleHandle, match="does not fit"):
            client.view(msgspec.structs.replace(h, **change))
        assert client.view(h).tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        client.release(h)
