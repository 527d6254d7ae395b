"""The client API: map a broker's arena, move arrays by handle, and the typed pipeline operations.

::

    c = Client(endpoint)                 # hello, the arena's descriptor, one mapping
    h = c.put(array)                     # one copy into the arena -> Handle (~100 B)
    v = c.get(h)                         # a view of the arena in any process: no copy
    c.release(h)                         # no wait; the block is freed with its last holder

    r = c.reserve(0, [i], shape, dtype)  # pipeline: a slot in stage 0 (split mode: a
    c.rows(r)[0][...] = item             #   program of yours feeding a running broker)
    c.commit(r)                          # -> a task for stage 0's workers

Messages and the connection are ``connection.py``'s; the message kinds
``protocol.py``'s. A client is one process's: it is neither thread-safe nor
fork-safe (handles pickle and may go anywhere; clients may not).
"""

from __future__ import annotations

import math
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import msgspec
import numpy as np

from .connection import Connection
from .errors import BadRequest, BrokerError, StaleHandle, UnknownName, UnsupportedArray
from .holds import HEADER, ControlRegion, Holds, register_reader
from .holds import Layout as ControlLayout
from .pool import POOL_MAX, REFILL_BYTES, Pool, size_class
from .protocol import (
    BFLOAT16,
    LARGE_KEEP_MAX,
    LARGE_KEEP_PART,
    MAX_REFS,
    Acquire,
    AcquireMany,
    Alloc,
    AllocMany,
    Cancel,
    Claim,
    Commit,
    Configured,
    ConfigurePipeline,
    Done,
    Drop,
    Eof,
    Fail,
    Failure,
    Grant,
    Handle,
    HandleReply,
    HandlesReply,
    Layout,
    Lookup,
    Message,
    OutSpec,
    Ping,
    Publish,
    QueueInfo,
    QueueOpen,
    Register,
    Registered,
    Reserve,
    Reserved,
    Shutdown,
    StageSettings,
    Stats,
    StatsReply,
    Task,
    c_strides,
    ring_name,
    storage_dtype,
)
from .queue import REDELIVER_MAX, HandleQueue, TaskQueue
from .rows import unpack

if TYPE_CHECKING:
    import torch

__all__ = ["Client", "array_spec", "SINK", "POOL_MAX"]

SINK = "__sink__"  # the stage name the driver (or a program collecting results) registers as
POOL_REFILL_BYTES = REFILL_BYTES
# How this client holds an array (the second item of a ``_held`` entry):
POOLED = 0  # in a block of its own pool (the third item: that block's handle)
LEASE = 1  # by a lease in the broker's table (put/alloc of a large array, a claimed grant, ...)
HOLD = 2  # by a hold in its table in shared memory (the third item: the entry's index)
_Spec = tuple[str, np.dtype, tuple[int, ...], int, tuple[int, ...], int]


def _finite(seconds: float) -> float:
    if not math.isfinite(seconds) or seconds < 0:
        raise BadRequest(f"timeout must be a finite number of seconds >= 0, got {seconds!r}")
    return seconds


def array_spec(dtype: Any) -> str:
    """The wire dtype an array of ``dtype`` is stored as, or ``UnsupportedArray``.

    Non-native byte order is stored native (converted during the one copy that
    ``put`` makes anyway); object and structured dtypes are refused;
    ``"bfloat16"`` is stored as its raw bits (``<u2`` to NumPy).
    """
    if isinstance(dtype, str) and dtype == BFLOAT16:
        return BFLOAT16
    dt = np.dtype(dtype)
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise UnsupportedArray(
            f"dtype {dt} cannot be shared: object and structured arrays hold pointers or "
            f"mixed fields; convert to a plain numeric dtype first")
    if dt.kind not in "biufcmM":
        raise UnsupportedArray(f"dtype {dt} (kind {dt.kind!r}) is not supported; use a numeric dtype")
    return (dt.newbyteorder("=") if dt.byteorder not in "=|" else dt).str


class Client:
    """A connection to a broker and a mapping of its arena. A context manager."""

    def __init__(self, endpoint: str, *, name: str | None = None, role: str = "client",
                 timeout: float = 30.0, curve: tuple[str, str] | None = None,
                 transport: str = "unix", pool: bool = True, holds: bool = True) -> None:
        """``curve=(broker_public_key_file, own_secret_key_file)`` for a CURVE-protected broker.

        ``transport``: ``"unix"`` (default) carries requests over the Unix
        connection the arena came through; ``"zmq"`` keeps them on ZeroMQ.

        ``holds``: take holds in shared memory (no message; ``holds.py``) where
        the broker offers a hold table; ``False`` takes every lease by message.

        ``pool``: arrays of at most ``POOL_MAX`` (1 MiB) go into blocks this
        client takes from the broker a batch at a time and reuses once nobody
        holds them (``pool.py``), so a steady ``put``/``release`` loop needs no
        message. The blocks stay this client's (about as many as it used at
        once, at most 4 MiB of free ones per size class) until it closes.
        Larger arrays, up to 1/8 of the arena (64 MiB at most), are pooled one
        block at a time within that same budget of 1/8 of the arena per client,
        and a quarter of it for all clients' pools together.
        """
        self.endpoint = endpoint
        self.pool = pool
        self._held: dict[int, tuple[Handle, int, Any]] = {}
        # oid -> the pending entries of redelivering queues its release ends: (queue, entry, block)
        self._pending: dict[int, list[tuple[HandleQueue, int, int]]] = {}
        self.rings = False  # set by register: this pipeline's tasks travel in rings (task_queue)
        self._grants = 0
        self._wait = timeout
        self._specs: dict[tuple[Any, Any], _Spec] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self.conn = Connection(endpoint, name=name or f"{role}-{socket.gethostname()}-{os.getpid()}",
                               role=role, timeout=timeout, curve=curve, transport=transport)
        self.broker = self.conn.broker
        self.cid = self.conn.cid
        self._buffer = self.conn.region.buffer if self.conn.region is not None else None
        self._capacity = self.conn.capacity
        self.holds: Holds | None = None
        assert self.conn.region is not None
        if holds and self.conn.slot >= 0 and register_reader():
            control = ControlRegion(self.conn.region.buffer, ControlLayout.for_capacity(self.conn.capacity))
            self.holds = Holds(control, self.conn.slot)
        self._pool = Pool(self._refill, self.holds.region if self.holds else None, self._give_back,
                          large_keep=min(LARGE_KEEP_MAX, self._capacity // LARGE_KEEP_PART),
                          slot=self.conn.slot, capacity=self._capacity)

    @property
    def timeout(self) -> float:
        return self.conn.timeout

    @property
    def name(self) -> str:
        return self.conn.name

    @property
    def region(self) -> Any:
        return self.conn.region

    def _request(self, msg: Message, timeout: float | None = None) -> Any:
        return self.conn.request(msg, timeout)

    # -- arrays -------------------------------------------------------------------------------------
    def view(self, handle: Handle) -> np.ndarray:
        """The array a handle this client may read names, as a view of the arena."""
        self.conn.check_process()
        buffer = self._buffer
        if buffer is None:
            raise BrokerError("this client is closed")
        dt = self._dtypes.get(handle.dtype) or self._dtype(handle.dtype)
        if dt.itemsize * math.prod(handle.shape) > handle.nbytes or \
                handle.offset + handle.nbytes > self._capacity:
            raise StaleHandle(f"handle {handle} does not fit its block")
        return np.ndarray(handle.shape, dt, buffer, handle.offset)

    def _dtype(self, wire: str) -> np.dtype:
        try:
            dt = self._dtypes[wire] = storage_dtype(wire)
        except (TypeError, ValueError):
            raise BadRequest(f"a handle names dtype {wire!r}, which NumPy does not know") from None
        return dt

    def _check_broker(self, handle: Handle) -> None:
        if not isinstance(handle, Handle):
            raise TypeError(f"expected a Handle, got {type(handle).__name__}")
        if handle.broker != self.broker:
            raise StaleHandle(
                f"handle of broker {handle.broker!r} given to a client of broker {self.broker!r}; "
                f"a handle is valid only with the broker that made it")

    def alloc(self, shape: Iterable[int] | int, dtype: Any = "float32",
              timeout: float | None = None) -> tuple[Handle, np.ndarray]:
        """A writable slot: ``(handle, view)``. Waits up to ``timeout`` s for space."""
        key = (dtype, shape if isinstance(shape, (int, tuple)) else tuple(shape))
        spec = self._specs.get(key)
        if spec is None:
            spec = self._spec(key)
        wire, dt, shape, nbytes, strides, size = spec
        wait = self.timeout if timeout is None else _finite(timeout)
        if size and self.pool:
            self._wait = wait
            block, gen = self._pool.take(size)
            handle = Handle(self.broker, block.oid, gen, block.offset, nbytes, wire, shape, strides)
            self._held[block.oid] = (handle, POOLED, block)
        else:
            reply = self._request(Alloc(nbytes=nbytes, dtype=wire, shape=list(shape), timeout=wait),
                                  wait + 5.0)
            handle = reply.handle
            self._held[handle.oid] = (handle, LEASE, None)
        self.conn.check_process()
        assert self._buffer is not None
        return handle, np.ndarray(shape, dt, self._buffer, handle.offset)

    def _spec(self, key: tuple[Any, Any]) -> _Spec:
        """``(wire dtype, NumPy dtype, shape, nbytes, strides, pool size class or 0)`` of an
        array to allocate (cached)."""
        dtype, shape = key
        wire = array_spec(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
        dt = storage_dtype(wire)
        nbytes = dt.itemsize * math.prod(shape)
        size = size_class(nbytes) if nbytes > 0 else 0  # the block's size: up to a fifth more
        spec = (wire, dt, shape, nbytes, c_strides(shape, dt.itemsize),
                size if size <= self._pool.max_size else 0)
        if len(self._specs) > 1024:
            self._specs.clear()
        self._specs[key] = spec
        return spec

    def _refill(self, size: int, count: int) -> list[Handle]:
        reply: HandlesReply = self._request(AllocMany(nbytes=size, count=count, timeout=self._wait),
                                            self._wait + 5.0)
        return reply.handles

    def _give_back(self, blocks: list[Handle]) -> None:
        """Pooled blocks this client lets go of (their generation is whatever the header says)."""
        region = self.holds.region if self.holds else None
        self._drop([(b.oid, region.generation(b.offset) if region else b.generation) for b in blocks])

    def _drop(self, refs: list[tuple[int, int]]) -> None:
        for i in range(0, len(refs), MAX_REFS):
            self.conn.notify(Drop(refs=refs[i:i + MAX_REFS]))

    def put(self, array: Any, timeout: float | None = None) -> Handle:
        """Copy ``array`` into the arena (exactly one copy) and return its handle.

        Non-contiguous, negatively strided and non-native byte-order inputs are
        accepted: the one copy makes them C-contiguous and native.
        """
        array = np.asarray(array)
        handle, out = self.alloc(array.shape, array.dtype, timeout)
        out[...] = array  # the same dtype, or the same in native byte order: exact
        return handle

    def grant(self, handle: Handle, uses: int = 1, ttl: float = 30.0) -> Handle:
        """A copy of ``handle`` that carries a lease for its receiver(s).

        The broker holds the lease until ``uses`` receivers have claimed it
        or ``ttl`` seconds have passed, even if this client releases or dies
        meanwhile. A receiver's ``get`` then maps the array at once and claims
        the lease with a message it does not wait for: a hand-off with no
        round trip on the receiver's side. After ``ttl / 2`` seconds the
        receiver falls back to an ordinary ``get`` (a round trip; the array
        must still be alive). Over ``transport="zmq"`` the grant waits for
        its reply, since a message ZeroMQ has queued is lost if this process
        dies; over the Unix connection it is in the kernel when this returns.

        Only an array this client holds (``put``, ``alloc``, ``get``) can be
        granted: that is checked here, before anything is sent, so a grant the
        broker accepted cannot be refused later and a receiver never reads a
        block that is not kept alive for it. A client with more than 100,000
        grants nobody claimed is told so by an error of its next request
        (the grants are kept).
        """
        self._check_broker(handle)
        if not 0 < ttl <= 3600 or not 0 < uses <= 1024:
            raise ValueError("grant: ttl must be in (0, 3600] s and uses in 1..1024")
        entry = self._held.get(handle.oid)
        if entry is None or entry[0].generation != handle.generation:
            raise StaleHandle(f"grant: this client holds no lease on {handle}; only an array it "
                              f"has put, allocated or got (and not released) can be granted")
        self._lease_for_broker(entry)
        self.conn.poll_late()
        self._grants += 1
        token = self.cid << 32 | self._grants
        expires = time.monotonic() + ttl / 2
        self.conn.notify(Grant(oid=handle.oid, gen=handle.generation, token=token, uses=uses, ttl=ttl))
        if self.conn.transport == "zmq":
            self.ping()  # handled after the grant: when it returns, the grant is in the broker
            self.conn.raise_late()
        return msgspec.structs.replace(handle, grant=token, expires=expires)

    def _lease_for_broker(self, entry: tuple[Handle, int, Any]) -> None:
        """The broker is to keep this array alive (a grant, a name): a pooled block leaves the
        pool (its release becomes a drop); a hold becomes a lease (the broker must know it)."""
        handle, kind, extra = entry
        if kind == POOLED:
            self._pool.forget(extra)
            self._held[handle.oid] = (handle, LEASE, None)
        elif kind == HOLD:
            self._request(Acquire(oid=handle.oid, gen=handle.generation))
            assert self.holds is not None
            self.holds.drop(extra)
            self._held[handle.oid] = (handle, LEASE, None)

    def holds_handle(self, handle: Handle) -> bool:
        """Whether this client holds ``handle``'s array (put, alloc or get, not released)."""
        entry = self._held.get(handle.oid)
        return entry is not None and entry[0].generation == handle.generation

    def get(self, handle: Handle) -> np.ndarray:
        """A writable view of the array (no copy), held until ``release``.

        The hold is taken in this client's table in shared memory, without a
        message (a stale handle is refused at once); where there is no table,
        by a lease from the broker (one round trip). A handle from ``grant``
        (before its ``expires``) claims the lease the broker keeps for it with
        a message nobody waits for.
        """
        self._check_broker(handle)
        if self._buffer is None:
            raise BrokerError("this client is closed")
        entry = self._held.get(handle.oid)
        if entry is not None and entry[0].generation != handle.generation:
            entry = None
        if handle.grant and time.monotonic() < handle.expires:
            plain = msgspec.structs.replace(handle, grant=0, expires=0.0)
            array = self.view(entry[0] if entry is not None else plain)  # bounds checked first
            # claimed even when this client holds it already: the grant is used up, not left to expire
            self.conn.notify(Claim(oid=handle.oid, gen=handle.generation, token=handle.grant))
            if entry is not None:
                self._held_twice(entry)
            else:
                self._held[plain.oid] = (plain, LEASE, None)
            return array
        if entry is not None:
            return self.view(entry[0] if entry[1] == LEASE else handle)
        held = self._hold(handle)
        if held is not None:
            return held
        reply = self._request(Acquire(oid=handle.oid, gen=handle.generation))
        return self.view(self._adopt(handle, reply.handle))

    def _held_twice(self, entry: tuple[Handle, int, Any]) -> None:
        """A claim made while already holding the array took a lease this client does not need:
        keep one reference (the lease, which the broker now has) and let the other go."""
        handle, kind, extra = entry
        if kind == HOLD:
            assert self.holds is not None
            self.holds.drop(extra)
            self._held[handle.oid] = (handle, LEASE, None)
        elif kind == POOLED:  # the broker keeps the block alive for the lease: it leaves the pool
            self._pool.forget(extra)
            self._held[handle.oid] = (handle, LEASE, None)
        else:  # a lease already: the claim did not add one (the broker counts one lease per client)
            pass

    def _hold(self, handle: Handle) -> np.ndarray | None:
        """Hold ``handle``'s block in shared memory and return its view; None if this client has
        no free hold (then the caller takes a lease). ``StaleHandle`` if the array was released."""
        holds = self.holds
        if holds is None:
            return None
        self.conn.check_process()
        base = handle.base or handle.offset
        if base & 63 or not HEADER <= base < self._capacity:
            raise StaleHandle(f"handle {handle} names no block of this arena")
        dt = self._dtypes.get(handle.dtype) or self._dtype(handle.dtype)  # before the hold is taken
        i = holds.take(base, handle.generation)
        if i is None:
            return None
        if i < 0:
            raise StaleHandle(f"handle (object {handle.oid}, generation {handle.generation}) is stale: "
                              f"the array was released or its memory reused; keep a reference (do "
                              f"not release) while it is in use")
        room = holds.words[((base - HEADER) >> 3) + 1]  # the block's size, from its header
        offset, shape = handle.offset, handle.shape
        if not base <= offset or offset + handle.nbytes > base + room or \
                dt.itemsize * math.prod(shape) > handle.nbytes:
            holds.drop(i)
            raise StaleHandle(f"handle {handle} does not fit its block of {room} bytes")
        self._held[handle.oid] = (handle, HOLD, i)
        return np.ndarray(shape, dt, self._buffer, offset)

    def get_many(self, handles: Iterable[Handle]) -> list[np.ndarray]:
        """``get`` for many handles: holds in shared memory, or one round trip per 1024 leases.

        A stale handle raises ``StaleHandle`` and none of the holds of this call
        is kept; leases taken by earlier groups of 1024 are (``release`` drops them).
        """
        hs = list(handles)
        for h in hs:  # bad handles are refused before anything is held
            self._check_broker(h)
            if h.dtype not in self._dtypes:
                self._dtype(h.dtype)
        taken: list[Handle] = []
        todo = []
        try:
            for h in hs:
                if self.holds_handle(h):
                    continue
                if self._hold(h) is not None:
                    taken.append(h)
                else:
                    todo.append(h)
        except BaseException:
            self.release(taken)  # a stale handle refuses the lot: none of these holds is kept
            raise
        for i in range(0, len(todo), MAX_REFS):
            part = todo[i:i + MAX_REFS]
            reply: HandlesReply = self._request(AcquireMany(refs=[(h.oid, h.generation) for h in part]))
            for h, srv in zip(part, reply.handles, strict=True):
                self._adopt(h, srv)
        return [self.get(h) for h in hs]

    def _adopt(self, handle: Handle, srv: Handle) -> Handle:
        """Hold an object after the broker granted its lease and returned its record.

        The broker's record is what gets mapped. A pooled block's record is
        only bytes (``|u1``) until it is published, so for one the caller's
        dtype and shape are used, checked to fit inside the block.
        """
        if srv.dtype == "|u1" and srv.shape == (srv.nbytes,) and \
                (handle.dtype, handle.shape) != (srv.dtype, srv.shape):
            itemsize = storage_dtype(handle.dtype).itemsize
            nbytes = itemsize * math.prod(handle.shape)
            if nbytes > srv.nbytes:
                self._held[srv.oid] = (srv, LEASE, None)  # the lease is taken: release still drops it
                raise StaleHandle(f"handle {handle} does not fit the broker's block {srv}")
            srv = Handle(srv.broker, srv.oid, srv.generation, srv.offset, nbytes, handle.dtype,
                         handle.shape, c_strides(handle.shape, itemsize))
        self._held[srv.oid] = (srv, LEASE, None)
        return srv

    def tensor(self, handle: Handle) -> torch.Tensor:
        """``torch.from_numpy(get(handle))``: zero-copy and writable (bfloat16 viewed as such).

        The one place the client touches torch, imported here and only here.
        """
        import torch

        t = torch.from_numpy(self.get(handle))
        return t.view(torch.bfloat16) if handle.dtype == BFLOAT16 else t

    def release(self, handles: Handle | Iterable[Handle]) -> None:
        """Drop this client's reference(s); the block is reused once nobody holds it.

        Sends nothing for a hold (the entry is cleared) or an array of this
        client's pool (its block waits to be reused); a lease is dropped with a
        message that is not waited for, which the broker handles before
        anything this client sends afterwards.
        """
        hs = [handles] if isinstance(handles, Handle) else list(handles)
        drops = []
        for h in hs:
            self._check_broker(h)
            if self._pending:
                for q, at, block in self._pending.pop(h.oid, ()):
                    q._ack(at, block)  # a redelivering queue's pending entry: the item was handled
            entry = self._held.get(h.oid)
            if entry is None or entry[0].generation != h.generation:
                drops.append((h.oid, h.generation))  # not held here: the broker counts it stale
                continue
            del self._held[h.oid]
            handle, kind, extra = entry
            if kind == POOLED:
                self._pool.retire(extra, handle.generation)
            elif kind == HOLD:
                assert self.holds is not None
                self.holds.drop(extra)
            else:
                drops.append((h.oid, h.generation))
        if drops:
            self._drop(drops)

    def trim_pool(self) -> int:
        """Give the free and released blocks of this client's pool back to the broker (one
        message, not waited for; none if there are none): for a client that goes idle, so
        its pool keeps no one else from the arena. Returns how many blocks."""
        return self._pool.trim()

    def publish(self, name: str, handle: Handle) -> None:
        """Make ``handle`` discoverable by ``name``; the broker keeps it alive until replaced."""
        self._check_broker(handle)
        entry = self._held.get(handle.oid)
        if entry is not None and entry[0].generation == handle.generation:
            self._lease_for_broker(entry)
        self._request(Publish(name=name, oid=handle.oid, gen=handle.generation, dtype=handle.dtype,
                              shape=list(handle.shape)))

    def lookup(self, name: str, timeout: float = 5.0) -> Handle:
        """Wait up to ``timeout`` s for a handle published under ``name``."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            reply: HandleReply = self._request(Lookup(name=name))
            if reply.handle is not None:
                return reply.handle
            if time.monotonic() + delay > deadline:
                raise UnknownName(f"nothing was published as {name!r} within {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def stats(self) -> dict[str, Any]:
        """Arena and pipeline statistics: capacity, used, peak, objects, stages, ..."""
        reply: StatsReply = self._request(Stats())
        return reply.stats

    def ping(self, timeout: float | None = None) -> float:
        t = time.perf_counter()
        self._request(Ping(), timeout)
        return time.perf_counter() - t

    def shutdown(self) -> None:
        """Ask the broker to stop (it removes its runtime directory)."""
        self._request(Shutdown())

    def queue(self, name: str, maxsize: int = 64, spin: float | None = None,
              redeliver: int = 0) -> HandleQueue:
        """The named handle queue (made on first use; ``maxsize`` and ``redeliver`` are the first
        user's): the zero-copy replacement for ``torch.multiprocessing.Queue``, see ``broker.queue``.

        ``redeliver``: 0 (default): an item whose receiver dies before releasing it is freed.
        N > 0: at-least-once; the broker gives such an item back to the queue, up to N times,
        then drops it (``q.stats()["dropped"]``); items got and not yet released count against
        ``maxsize``.

        ``spin``: how long this process's waits spin before they sleep in the kernel. None
        (default): adaptively, at most ``SPIN_MAX`` (200 µs). A number of seconds: that long,
        every time; ``0`` sleeps at once, a long spin polls like a busy subscriber (the lowest
        latency, at the price of a core kept busy while waiting)."""
        if spin is not None and (isinstance(spin, bool) or not isinstance(spin, (int, float))
                                 or not (math.isfinite(spin) and 0 <= spin <= 3600)):
            raise BadRequest(f"spin must be None or seconds in [0, 3600], got {spin!r}")
        if isinstance(redeliver, bool) or not isinstance(redeliver, int) or not 0 <= redeliver <= REDELIVER_MAX:
            raise BadRequest(f"redeliver must be an int in [0, {REDELIVER_MAX}], got {redeliver!r}")
        info: QueueInfo = self._request(QueueOpen(name=name, maxsize=maxsize, redeliver=redeliver))
        return HandleQueue(self, name, info.offset, info.maxsize, info.slot_words, spin)

    # -- pipeline operations ------------------------------------------------------------------------
    def configure(self, stages: Sequence[StageSettings | dict[str, Any]], max_inflight: int = 0,
                  pipeline: str = "") -> list[str]:
        """Give the broker its stages (or check that it runs these); returns their names and the sink's.
        ``pipeline``: which pipeline this is (refused if the broker runs another)."""
        settings = [s if isinstance(s, StageSettings) else msgspec.convert(s, StageSettings) for s in stages]
        reply: Configured = self._request(ConfigurePipeline(stages=settings, max_inflight=max_inflight,
                                                            pipeline=pipeline))
        return reply.stages

    def register(self, stage: str, credits: int = 1, device: str = "host", pinned: bool = False,
                 pipeline: str = "") -> int:
        """Receive tasks of ``stage`` (``SINK``: finished items), at most ``credits`` at a time.
        ``pipeline``: the pipeline this client belongs to; refused if the broker runs another."""
        reply: Registered = self._request(Register(stage=stage, credits=credits, device=device,
                                                   pinned=pinned, pipeline=pipeline))
        self.rings = reply.rings  # tasks travel in the stages' queues: take them with task_queue
        self._pool.in_pipeline = self.rings  # the driver bounds what is in flight (pool.py)
        self._pool.large = self._pool.large
        return reply.stage

    def task_queue(self, stage: int, spin: float | None = None) -> TaskQueue:
        """Stage ``stage``'s queue of tasks (the sink's is the last) in a pipeline whose tasks
        travel in rings (``Registered.rings``; the broker made the queues when it was configured)."""
        name = ring_name(stage)
        info: QueueInfo = self._request(QueueOpen(name=name, maxsize=1))
        return TaskQueue(self, name, info.offset, info.maxsize, info.slot_words, spin)

    def reserve(self, stage: int, items: Sequence[int], shape: Sequence[int], dtype: Any, *,
                timeout: float | None = None, layout: Layout | None = None) -> Reserved:
        """Slots in ``stage`` for ``items`` (ids of your choosing), each ``shape``/``dtype``.

        Waits for arena space up to ``timeout`` s (the broker's ``wait_timeout``
        when None). Write each item into ``rows(reservation)``, then ``commit``
        (or ``cancel``) it.
        """
        wait = _finite(self.timeout if timeout is None else timeout)
        return self._request(self._reserve_msg(stage, items, shape, dtype, timeout, layout),
                             max(wait, 3600.0 if timeout is None else 0.0) + 5.0)

    def reserve_nowait(self, stage: int, items: Sequence[int], shape: Sequence[int], dtype: Any, *,
                       timeout: float | None = None, layout: Layout | None = None) -> int:
        """``reserve`` without waiting: returns the request id; the ``Reserved`` reply (or an
        ``Error``) arrives through ``next_message``."""
        return self.conn.send(self._reserve_msg(stage, items, shape, dtype, timeout, layout))

    @staticmethod
    def _reserve_msg(stage: int, items: Sequence[int], shape: Sequence[int], dtype: Any,
                     timeout: float | None, layout: Layout | None) -> Reserve:
        return Reserve(stage=stage, items=list(items), shape=[int(d) for d in shape],
                       dtype=array_spec(dtype), timeout=timeout, layout=layout)

    def rows(self, reserved: Reserved) -> list[np.ndarray]:
        """One writable view per item of a reservation, in item order."""
        out: list[np.ndarray] = []
        for handle, n in reserved.segments:
            slot = self.view(handle)
            out.extend(slot[r] for r in range(n))
        return out

    def commit(self, reserved: Reserved | int, *, wait: bool = False, defer: bool = False) -> None:
        """The reservation's items are written: they become tasks of its stage. Not answered
        (a refusal is raised by this client's next request); ``wait=True`` pings after it, so it
        is in the broker, and any refusal raised, when this returns. ``defer=True``: it goes
        with this client's next message to the broker, or before it next waits for one."""
        rsv = reserved if isinstance(reserved, int) else reserved.rsv
        self._notify(Commit(rsv=rsv), wait, defer)

    def cancel(self, reserved: Reserved | int, *, wait: bool = False) -> None:
        """Give a reservation back unwritten (not answered, as ``commit``)."""
        rsv = reserved if isinstance(reserved, int) else reserved.rsv
        self._notify(Cancel(rsv=rsv), wait)

    def task_rows(self, task: Task) -> list[Any]:
        """The items of a task, one per row: arrays (views), or the tuples/dicts of a layout."""
        view = self.view(task.handle)
        if not (task.batched or task.each):
            return [unpack(view, task.layout)]
        rows = task.valid if task.valid is not None else range(len(task.items))
        return [unpack(view[r], task.layout) for r in rows]

    def done(self, task: Task | int, rsvs: Sequence[int] = (), *, busy: float = 0.0, copied: int = 0,
             credit: int = 1, wait: bool = False, next_out: OutSpec | None = None,
             defer: bool = False) -> None:
        """A task is finished, its outputs in reservations ``rsvs``. Not answered: the broker
        handles it before anything this client sends next (``wait=True`` pings after it).
        ``next_out``: the slot each item of the next task will likely need; the broker then
        sends that task with its output slots reserved (``Task.out``). ``defer``: as for
        ``commit``."""
        tid = task if isinstance(task, int) else task.task
        self._notify(Done(task=tid, rsvs=list(rsvs), credit=credit, busy=busy, copied=copied,
                          next_out=next_out), wait, defer)

    def fail(self, task: Task | int, error: str, trace: str = "", *, item: int | None = None,
             arena: bool = False, credit: int = 1) -> None:
        """A task's stage raised (``item``: the one row of a grouped task that did), or its
        output found no arena space in time (``arena``)."""
        tid = task if isinstance(task, int) else task.task
        self._request(Fail(task=tid, error=error, trace=trace, credit=credit, item=item, arena=arena))

    def report(self, failure: Failure) -> None:
        """Items a worker gave up on, when tasks travel in rings (the broker tells the driver;
        not answered, as ``done``)."""
        self._notify(failure, False)

    def eof(self, items: int) -> None:
        """The source is exhausted after ``items`` items: partial batches may go now."""
        self._request(Eof(items=items))

    def next_message(self, timeout: float | None) -> Message | None:
        """The next task, failure report, or reply to a request sent without waiting; None
        after ``timeout`` s."""
        return self.conn.next_message(timeout)

    def _notify(self, msg: Message, wait: bool, defer: bool = False) -> None:
        self.conn.raise_late()
        self.conn.notify(msg, defer=defer and not wait)
        if wait:
            self.ping()

    def flush(self) -> None:
        """Send the messages deferred with ``defer=True`` now (they go anyway with this client's
        next message, or before it waits for the broker)."""
        self.conn.flush()

    # -- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Let go of the arena (mapped while any view of it lives) and of the broker."""
        self._buffer = None
        if self.holds is not None:
            self.holds.table.release()
            self.holds.words.release()
        self.holds = None  # views of the control region: gone before the mapping is closed
        self._pool.region = None
        self.conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
