"""The client API against a real broker: fidelity of every dtype, zero copy across processes, lifetimes, backpressure.

Child processes use the ``spawn`` start method and get the Handle pickled,
as a real worker would; this module imports torch lazily so they start fast.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import time

import msgspec
import numpy as np
import pytest

from broker import (
    ArenaFull,
    Broker,
    BrokerError,
    Client,
    Handle,
    ItemTooLarge,
    StaleHandle,
    UnknownName,
    UnsupportedArray,
)

MiB = 2**20
SPAWN = multiprocessing.get_context("spawn")
CHILD_TIMEOUT = 30.0

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "complex64", "complex128"]


def _values(dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random values over a dtype's whole range, with NaN/inf/-0.0 where the dtype has them."""
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.random(shape) > 0.5
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
    if dt.kind == "c":
        part = "float32" if dt.itemsize == 8 else "float64"
        out = np.empty(shape, dt)
        out.real, out.imag = _values(part, shape, rng), _values(part, shape, rng)[::-1]
        return out
    a = (rng.standard_normal(shape) * 1e3).astype(dt)
    special = np.array([np.nan, np.inf, -np.inf, -0.0], dt)
    a.reshape(-1)[: min(a.size, 4)] = special[: min(a.size, 4)]
    return a


def _bits(a: np.ndarray, dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(a, dtype=dtype).tobytes()


def _ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _arena_range(c: Client) -> tuple[int, int]:
    base = np.frombuffer(c.region.buffer, np.uint8)
    return base.ctypes.data, base.ctypes.data + base.nbytes


# -- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_round_trips_exactly(client, dtype):
    rng = np.random.default_rng(abs(hash(dtype)) % 2**32)
    base = _values(dtype, (6, 10), rng)
    cases = {
        "c-contiguous": base,
        "0-d": base[2, 3].copy().reshape(()),
        "empty": base[:0],
        "empty-2d": base[:, :0],
        "non-contiguous": base[::2, 1::3],
        "fortran": np.asfortranarray(base),
        "negative-strides": base[::-1, ::-2],
    }
    if np.dtype(dtype).itemsize > 1:
        cases["big-endian"] = base.astype(np.dtype(dtype).newbyteorder(">"))
        cases["big-endian-reversed"] = cases["big-endian"][::-1]
    handles = []
    for what, a in cases.items():
        h = client.put(a)
        handles.append(h)
        out = client.get(h)
        native = np.dtype(dtype)
        assert out.dtype == native and out.dtype.isnative, what
        assert h.dtype == native.str and h.shape == a.shape, what
        assert out.shape == a.shape and out.flags.c_contiguous, what
        assert out.tobytes() == _bits(a, native), f"{dtype} {what}: values changed"
        if a.dtype.kind in "fc":
            assert np.array_equal(out, a, equal_nan=True), what
        else:
            assert np.array_equal(out, a), what
    client.release(handles)


def test_handle_describes_the_array(client):
    a = np.zeros((3, 4, 5), np.float32)
    h = client.put(a)
    try:
        assert h.shape == (3, 4, 5) and h.strides == (80, 20, 4)
        assert h.nbytes == a.nbytes and h.dtype == "<f4"
        assert h.broker == client.broker
        assert h.offset % 64 == 0
    finally:
        client.release(h)


def test_large_array_round_trips(client):
    a = np.random.default_rng(1).random(8 * MiB, dtype=np.float32)  # 32 MiB
    h = client.put(a)
    try:
        out = client.get(h)
        assert out.nbytes == 32 * MiB
        assert np.array_equal(out, a)
        assert h.offset % 4096 == 0  # large blocks start on a page
    finally:
        del out
        client.release(h)


@pytest.mark.parametrize("array", [
    np.array([{"a": 1}, None], dtype=object),
    np.zeros(4, dtype=[("x", "<f4"), ("y", "<i2")]),
    np.zeros(4, dtype="(2,)f4,i4"),
    np.array(["text"]),
], ids=["object", "structured", "subarray-fields", "unicode"])
def test_unsupported_dtypes_are_refused_before_anything_is_allocated(client, array):
    before = client.stats()["objects"]
    with pytest.raises(UnsupportedArray):
        client.put(array)
    with pytest.raises(UnsupportedArray):
        client.alloc(array.shape, array.dtype)
    assert client.stats()["objects"] == before


# -- zero copy ----------------------------------------------------------------------------------
def test_get_is_a_view_of_the_arena(client):
    h = client.put(np.arange(100, dtype=np.int32))
    try:
        v = client.get(h)
        lo, hi = _arena_range(client)
        assert lo <= _ptr(v) and _ptr(v) + v.nbytes <= hi
        assert _ptr(v) == lo + h.offset
        assert np.shares_memory(v, np.frombuffer(client.region.buffer, np.uint8))
        assert v.flags.writeable
        again = client.get(h)
        assert np.shares_memory(v, again)
        v[5] = -1
        assert again[5] == -1
    finally:
        del v, again
        client.release(h)


def test_tensor_shares_the_views_memory(client):
    import torch

    h = client.put(np.arange(24, dtype=np.float64).reshape(4, 6))
    try:
        v = client.get(h)
        t = client.tensor(h)
        assert t.dtype == torch.float64 and tuple(t.shape) == (4, 6)
        assert t.data_ptr() == _ptr(v)
        t[1, 1] = 1000.0
        assert v[1, 1] == 1000.0
        v[3, 5] = -7.0
        assert t[3, 5].item() == -7.0
    finally:
        del v, t
        client.release(h)


def test_alloc_gives_a_writable_slot_another_client_sees(broker, client):
    h, slot = client.alloc((4, 5), "uint16")
    try:
        assert slot.shape == (4, 5) and slot.dtype == np.uint16 and slot.flags.writeable
        slot[:] = np.arange(20, dtype=np.uint16).reshape(4, 5)
        with Client(broker.endpoint) as other:
            seen = other.get(h)
            assert seen.tolist() == slot.tolist()
            assert _ptr(seen) != _ptr(slot)  # its own mapping of the same bytes
            other.release(h)
            del seen
    finally:
        del slot
        client.release(h)


def _child_write(endpoint: str, wire: bytes, conn) -> None:
    handle = pickle.loads(wire)
    with Client(endpoint) as c:
        v = c.get(handle)
        conn.send(("seen", int(v.sum()), v.dtype.str, v.shape))
        v[0] = -1
        v[-1] = 12345
        lo, hi = _arena_range(c)
        conn.send(("wrote", lo <= _ptr(v) < hi))
        del v
        c.release(handle)
    conn.close()


def test_a_child_process_writes_into_the_parents_array(broker, client):
    a = np.arange(1000, dtype=np.int64)
    h = client.put(a)
    view = client.get(h)
    parent, child = SPAWN.Pipe()
    p = SPAWN.Process(target=_child_write, args=(broker.endpoint, pickle.dumps(h), child))
    p.start()
    child.close()
    try:
        assert parent.poll(CHILD_TIMEOUT), "child never answered"
        assert parent.recv() == ("seen", int(a.sum()), "<i8", (1000,))
        assert parent.poll(CHILD_TIMEOUT)
        assert parent.recv() == ("wrote", True)
        p.join(CHILD_TIMEOUT)
        assert p.exitcode == 0
        assert view[0] == -1 and view[-1] == 12345  # the child's writes, no copy back
        assert np.array_equal(view[1:-1], a[1:-1])
    finally:
        p.join(CHILD_TIMEOUT)
        parent.close()
        del view
        client.release(h)


# -- lifetime: handles, generations, leases ---------------------------------------------------------
def test_put_release_reuses_the_same_block(fresh_broker):
    with Client(fresh_broker.endpoint, pool=False) as c:
        seen = []
        for i in range(20):
            h = c.put(np.full(10_000, i, np.float32))
            seen.append((h.offset, h.generation))
            assert c.stats()["used"] == 40_064  # 40 000 B and a 64 B header: 626 granules of 64 B
            c.release(h)
            assert c.stats()["used"] == 0
        assert {o for o, _g in seen} == {seen[0][0]}
        assert all(a[1] < b[1] for a, b in zip(seen, seen[1:], strict=False))  # a new generation each time
        assert c.stats()["peak"] == 40_064


def test_stale_handle_is_refused_here_and_in_another_client(fresh_broker):
    with Client(fresh_broker.endpoint, pool=False) as c, Client(fresh_broker.endpoint, pool=False) as other:
        old = c.put(np.arange(16.0))
        c.release(old)
        c.stats()  # the release is in and the broker retired the block: it is free again
        new = c.put(np.full(16, 7.0))
        assert new.offset == old.offset and new.generation > old.generation
        with pytest.raises(StaleHandle, match="stale"):
            c.get(old)
        with pytest.raises(StaleHandle, match="stale"):
            other.get(old)
        forged = msgspec.structs.replace(new, generation=old.generation)  # live oid, old generation
        with pytest.raises(StaleHandle):
            other.get(forged)
        assert other.get(new).tolist() == [7.0] * 16  # the live handle still works
        other.release(new)
        c.release(new)
        c.stats()  # c's release is in, and the broker retired the block (nobody holds it)
        with pytest.raises(StaleHandle):
            other.get(new)


def test_handle_of_another_broker_is_refused(broker, client, fresh_broker):
    with Client(fresh_broker.endpoint) as theirs:
        h = theirs.put(np.arange(4))
        assert h.broker != client.broker
        with pytest.raises(StaleHandle, match="another broker|of broker"):
            client.get(h)
        with pytest.raises(StaleHandle):
            client.publish("foreign", h)
        with pytest.raises(StaleHandle):
            client.release(h)
        theirs.release(h)


def test_forged_offsets_are_never_read(client):
    h = client.put(np.arange(8, dtype=np.int64))
    try:
        with Client(client.endpoint) as other:
            # offsets and sizes outside the block the handle names are refused, never mapped
            for change in ({"offset": 2**40, "nbytes": 2**41}, {"nbytes": 2**20},
                           {"offset": h.offset + 64}, {"base": 2**40}, {"base": h.offset + 8}):
                with pytest.raises(StaleHandle):
                    other.get(msgspec.structs.replace(h, **change))
            assert other.get(h).tolist() == list(range(8))
            other.release(h)
        for bogus in (msgspec.structs.replace(h, generation=h.generation + 1),
                      msgspec.structs.replace(h, generation=0)):
            with pytest.raises(StaleHandle):
                client.get(bogus)
    finally:
        client.release(h)


def test_second_clients_lease_keeps_the_object_alive(fresh_broker):
    with Client(fresh_broker.endpoint, pool=False) as a, Client(fresh_broker.endpoint, pool=False) as b:
        h = a.put(np.arange(1000, dtype=np.float64))
        held = b.get(h)
        a.release(h)
        s = a.stats()  # b holds the block: it stays, and it is not handed out again
        assert s["used"] == 8064 and s["sizes"]["retiring"] == 1
        h2 = a.put(np.zeros(1000))
        assert h2.offset != h.offset, "a block with a live lease must not be handed out again"
        assert held.tolist() == list(range(1000))
        assert b.get(h).tolist() == list(range(1000))
        b.release(h)  # a hold: nothing is sent; the broker finds it gone at its next look
        assert b.stats()["sizes"]["retiring"] == 0
        with pytest.raises(StaleHandle):
            a.get(h)
        a.release(h2)
        assert a.stats()["used"] == 0
        del held


def test_release_accepts_many_handles_and_ignores_ones_not_held(fresh_broker):
    with Client(fresh_broker.endpoint, pool=False) as c:
        hs = [c.put(np.full(3, i)) for i in range(5)]
        c.release(hs)
        assert c.stats()["objects"] == 0
        c.release(hs[0])  # already released: not an error, nothing freed twice
        with pytest.raises(TypeError):
            c.release(["not a handle"])  # type: ignore[list-item]


def test_publish_and_lookup(fresh_broker):
    with Client(fresh_broker.endpoint, pool=False) as a, Client(fresh_broker.endpoint, pool=False) as b:
        h = a.put(np.arange(5))
        a.publish("weights", h)
        a.release(h)
        assert a.stats()["objects"] == 1, "a published array stays alive"
        found = b.lookup("weights", timeout=5)
        assert isinstance(found, Handle) and (found.oid, found.generation) == (h.oid, h.generation)
        assert b.get(found).tolist() == [0, 1, 2, 3, 4]
        b.release(found)
        h2 = a.put(np.arange(5) * 10)
        a.publish("weights", h2)  # replacing the name drops the old array
        a.release(h2)
        assert a.stats()["objects"] == 1
        assert b.get(b.lookup("weights")).tolist() == [0, 10, 20, 30, 40]
        with pytest.raises(StaleHandle):
            b.get(found)
        t = time.monotonic()
        with pytest.raises(UnknownName, match="'missing'"):
            b.lookup("missing", timeout=0.2)
        assert time.monotonic() - t < 2


def test_lookup_waits_for_a_later_publish(fresh_broker):
    with Client(fresh_broker.endpoint) as a, Client(fresh_broker.endpoint) as b:
        h = a.put(np.arange(3))

        def later() -> None:
            time.sleep(0.3)
            a.publish("late", h)

        t = threading.Thread(target=later)
        t.start()
        try:
            assert b.lookup("late", timeout=10).oid == h.oid
        finally:
            t.join()
        a.release(h)


def test_stats(fresh_broker):
    with Client(fresh_broker.endpoint, pool=False) as c:
        s = c.stats()
        assert s["capacity"] == 64 * MiB and s["used"] == 0 and s["free"] == 64 * MiB - s["control"]
        assert s["clients"] == 1 and s["objects"] == 0 and s["pid"] == fresh_broker.pid
        assert s["memfd"].startswith(f"shmbroker-{fresh_broker.pid}-")
        h = c.put(np.zeros(5000, np.uint8))
        s = c.stats()
        assert s["used"] == 5120 and s["objects"] == 1 and s["blocks"] == 1  # 5000 + a 64 B header -> 64 B granules
        assert s["free"] == 64 * MiB - s["control"] - 5120
        assert 64 * MiB - s["control"] - 5120 - 4096 < s["largest_free"] <= s["free"]  # the data is page-aligned
        c.release(h)
        assert c.ping() < 5


# -- bounded memory ---------------------------------------------------------------------------------
def test_full_arena_waits_then_raises_arena_full_naming_sizes(fresh_broker):
    with Client(fresh_broker.endpoint) as c:
        h = c.put(np.zeros(40 * MiB, np.uint8))
        t = time.monotonic()
        with pytest.raises(ArenaFull) as e:
            c.alloc((40 * MiB,), "uint8", timeout=0.2)
        took = time.monotonic() - t
        assert 0.2 <= took < 5, took
        msg = str(e.value)
        assert "40.0 MiB" in msg and "63.5 MiB" in msg and "23.5 MiB" in msg, msg  # 0.5 MiB: control region
        assert isinstance(e.value, MemoryError)
        assert c.stats()["pending"] == 0
        c.release(h)
        h2, _slot = c.alloc((40 * MiB,), "uint8", timeout=0.2)  # fits once released
        del _slot
        c.release(h2)


def test_full_arena_waits_for_a_release(fresh_broker):
    with Client(fresh_broker.endpoint) as a, Client(fresh_broker.endpoint) as b:
        h = a.put(np.zeros(40 * MiB, np.uint8))

        def release_later() -> None:
            time.sleep(0.3)
            a.release(h)

        t = threading.Thread(target=release_later)
        start = time.monotonic()
        t.start()
        try:
            h2, slot = b.alloc((40 * MiB,), "uint8", timeout=20)
        finally:
            t.join()
        assert 0.25 < time.monotonic() - start < 10
        assert h2.offset == h.offset
        del slot
        b.release(h2)


def test_array_larger_than_the_arena_is_refused_at_once(fresh_broker):
    with Client(fresh_broker.endpoint) as c:
        t = time.monotonic()
        with pytest.raises(ItemTooLarge) as e:
            c.put(np.empty(65 * MiB, np.uint8), timeout=30)
        assert time.monotonic() - t < 3, "too large can never fit: no waiting"
        assert "65.0 MiB" in str(e.value) and "64.0 MiB" in str(e.value)
        with pytest.raises(ItemTooLarge, match="1.0 TiB"):
            c.alloc((2**40,), "uint8", timeout=30)
        assert time.monotonic() - t < 3
        assert c.stats()["pending"] == 0


# -- leases of processes that exit ----------------------------------------------------------------
def _child_hold(endpoint: str, wire: bytes, how: str, conn) -> None:
    c = Client(endpoint, pool=False)  # a lease of the broker's (a pooled array would be in 4 blocks)
    mine = c.put(np.ones(MiB, np.uint8))
    theirs = pickle.loads(wire)
    c.get(theirs)  # a lease on the parent's array too
    conn.send(pickle.dumps(mine))
    conn.poll(CHILD_TIMEOUT)  # the parent says when to go
    if how == "return":
        return  # normal exit, client never closed
    if how == "os._exit":
        os._exit(3)
    if how == "raise":
        raise SystemExit(4)
    time.sleep(CHILD_TIMEOUT)  # SIGKILL arrives here


@pytest.mark.parametrize("how", ["return", "os._exit", "raise", "SIGKILL"])
def test_leases_of_an_exited_process_are_dropped(fresh_broker, poll, how):
    with Client(fresh_broker.endpoint, pool=False) as c:
        h = c.put(np.arange(1000, dtype=np.int32))
        base = c.stats()
        parent, child = SPAWN.Pipe()
        p = SPAWN.Process(target=_child_hold, args=(fresh_broker.endpoint, pickle.dumps(h), how, child))
        p.start()
        child.close()
        try:
            assert parent.poll(CHILD_TIMEOUT), "child never answered"
            theirs = pickle.loads(parent.recv())
            s = c.stats()
            assert s["clients"] == 2 and s["used"] == base["used"] + MiB + 64  # and its header
            if how == "SIGKILL":
                p.kill()
            else:
                parent.send("go")
            p.join(CHILD_TIMEOUT)
            assert p.exitcode == {"return": 0, "os._exit": 3, "raise": 4, "SIGKILL": -9}[how]
        finally:
            p.join(CHILD_TIMEOUT)
            parent.close()
        poll(lambda: c.stats()["clients"] == 1, what="the broker to notice the exit")
        s = c.stats()
        assert s["used"] == base["used"] and s["objects"] == 1, s
        with pytest.raises(StaleHandle):
            c.get(theirs)
        assert c.get(h).tolist() == list(range(1000)), "the parent's array survives"
        c.release(h)
        assert c.stats()["used"] == 0, "the child's lease on it was dropped too"


def test_closing_a_client_drops_its_leases(fresh_broker, poll):
    with Client(fresh_broker.endpoint, pool=False) as c:
        other = Client(fresh_broker.endpoint, pool=False)
        other.put(np.zeros(1000))
        assert c.stats()["objects"] == 1
        other.close()
        poll(lambda: c.stats()["objects"] == 0, what="the closed client's leases to go")
        assert c.stats()["used"] == 0


def test_many_brokers_do_not_mix(broker):
    with Broker(capacity=8 * MiB) as other, Client(other.endpoint) as c2, \
            Client(broker.endpoint) as c1:
        assert c1.broker != c2.broker
        h1, h2 = c1.put(np.array([1])), c2.put(np.array([2]))
        assert c1.get(h1).tolist() == [1] and c2.get(h2).tolist() == [2]
        assert c2.stats()["capacity"] == 8 * MiB
        c1.release(h1)
        c2.release(h2)


def test_a_client_used_in_a_forked_child_fails_clearly(client):
    """A forked child inherits the parent's socket and leases; using them would mix the two
    processes' messages. Every call in the child raises, saying what to do; the parent is fine."""
    h = client.put(np.arange(4.0))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: whatever happens, it reports and exits here
        try:
            os.close(r)
            outcome = []
            for call in (client.ping, lambda: client.get(h), lambda: client.put(np.ones(3))):
                try:
                    call()
                    outcome.append("no error")
                except BrokerError as e:
                    outcome.append(str(e))
            os.write(w, "\n".join(outcome).encode())
        except BaseException as e:
            os.write(w, f"unexpected {type(e).__name__}: {e}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        lines = f.read().splitlines()
    os.waitpid(pid, 0)
    assert len(lines) == 3
    for line in lines:
        assert "used in its forked child" in line and "create a new Client in the child" in line, line
    assert client.get(h).tolist() == [0.0, 1.0, 2.0, 3.0]  # the parent's client still works
    client.release(h)
