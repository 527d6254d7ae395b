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

import collections
import math
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import msgspec
import numpy as np

from .connection import Connection
from .errors import BadRequest, StaleHandle, UnknownName, UnsupportedArray
from .protocol import (
    BFLOAT16,
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
    Grant,
    Handle,
    HandleReply,
    HandlesReply,
    Layout,
    Lookup,
    Message,
    Ping,
    Publish,
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
    storage_dtype,
)
from .rows import unpack

if TYPE_CHECKING:
    import torch

__all__ = ["Client", "array_spec", "SINK"]

SINK = "__sink__"  # the stage name the driver (or a program collecting results) registers as
POOL_MAX = 64 << 10  # arrays up to this size are placed in blocks the client pre-allocates
POOL_REFILL_BYTES = 256 << 10  # one refill asks for about this many bytes of one size class


def _finite(seconds: float) -> float:
    if not math.isfinite(seconds) or seconds < 0:
        raise BadRequest(f"timeout must be a finite number of seconds >= 0, got {seconds!r}")
    return seconds


def _size_class(nbytes: int) -> int:
    return max(256, 1 << (nbytes - 1).bit_length())


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
                 transport: str = "unix", pool: bool = True) -> None:
        """``curve=(broker_public_key_file, own_secret_key_file)`` for a CURVE-protected broker.

        ``transport``: ``"unix"`` (default) carries requests over the Unix
        connection the arena came through; ``"zmq"`` keeps them on ZeroMQ.

        ``pool``: arrays of at most ``POOL_MAX`` bytes go into blocks this
        client takes from the broker a batch at a time (one round trip per
        batch of a size class: powers of two from 256 B), so most small
        ``put``/``alloc`` calls need no round trip. The blocks not yet used
        stay reserved for this client, at most ``POOL_REFILL_BYTES`` (or 4
        blocks) per size class, and return to the arena when it closes.
        """
        self.endpoint = endpoint
        self.pool = pool
        self._pool: dict[int, collections.deque[Handle]] = {}
        self._held: dict[int, Handle] = {}
        self._grants = 0
        self.conn = Connection(endpoint, name=name or f"{role}-{socket.gethostname()}-{os.getpid()}",
                               role=role, timeout=timeout, curve=curve, transport=transport)
        self.broker = self.conn.broker
        self.cid = self.conn.cid

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
        region = self.conn.region
        assert region is not None, "client is closed"
        dt = storage_dtype(handle.dtype)
        count = math.prod(handle.shape)
        if dt.itemsize * count > handle.nbytes or handle.offset + handle.nbytes > region.capacity:
            raise StaleHandle(f"handle {handle} does not fit its block")
        flat = np.frombuffer(region.buffer, dtype=dt, count=count, offset=handle.offset)
        return flat.reshape(handle.shape)

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
        wire = array_spec(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
        itemsize = storage_dtype(wire).itemsize
        nbytes = itemsize * math.prod(shape)
        wait = _finite(self.timeout if timeout is None else timeout)
        if self.pool and 0 < nbytes <= POOL_MAX:
            block = self._from_pool(nbytes, wait)
            handle = Handle(self.broker, block.oid, block.generation, block.offset, nbytes, wire,
                            shape, c_strides(shape, itemsize))
        else:
            reply = self._request(Alloc(nbytes=nbytes, dtype=wire, shape=list(shape), timeout=wait),
                                  wait + 5.0)
            handle = reply.handle
        self._held[handle.oid] = handle
        return handle, self.view(handle)

    def _from_pool(self, nbytes: int, wait: float) -> Handle:
        """A block of ``nbytes``' size class this client already holds; refilled in one round trip."""
        size = _size_class(nbytes)
        blocks = self._pool.setdefault(size, collections.deque())
        if not blocks:
            count = max(4, min(64, POOL_REFILL_BYTES // size))
            reply: HandlesReply = self._request(AllocMany(nbytes=size, count=count, timeout=wait),
                                                wait + 5.0)
            blocks.extend(reply.handles)
        return blocks.popleft()

    def put(self, array: Any, timeout: float | None = None) -> Handle:
        """Copy ``array`` into the arena (exactly one copy) and return its handle.

        Non-contiguous, negatively strided and non-native byte-order inputs are
        accepted: the one copy makes them C-contiguous and native.
        """
        array = np.asarray(array)
        handle, out = self.alloc(array.shape, array.dtype, timeout)
        np.copyto(out, array, casting="no" if array.dtype == out.dtype else "equiv")
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
        held = self._held.get(handle.oid)
        if held is None or held.generation != handle.generation:
            raise StaleHandle(f"grant: this client holds no lease on {handle}; only an array it "
                              f"has put, allocated or got (and not released) can be granted")
        self.conn.poll_late()
        self._grants += 1
        token = self.cid << 32 | self._grants
        expires = time.monotonic() + ttl / 2
        self.conn.notify(Grant(oid=handle.oid, gen=handle.generation, token=token, uses=uses, ttl=ttl))
        if self.conn.transport == "zmq":
            self.ping()  # handled after the grant: when it returns, the grant is in the broker
            self.conn.raise_late()
        return msgspec.structs.replace(handle, grant=token, expires=expires)

    def get(self, handle: Handle) -> np.ndarray:
        """A writable view of the array (no copy); takes a lease until ``release``.

        For a handle from ``grant`` (before its ``expires``), the lease is
        claimed without waiting for the broker.
        """
        self._check_broker(handle)
        held = self._held.get(handle.oid)
        if handle.grant and time.monotonic() < handle.expires:
            if held is None or held.generation != handle.generation:
                held = msgspec.structs.replace(handle, grant=0, expires=0.0)
            array = self.view(held)  # bounds checked against the arena before anything else
            # claimed even when this client holds a lease already: the grant is used up
            self.conn.notify(Claim(oid=handle.oid, gen=handle.generation, token=handle.grant))
            self._held[held.oid] = held
            return array
        if held is None or held.generation != handle.generation:
            reply = self._request(Acquire(oid=handle.oid, gen=handle.generation))
            held = self._adopt(handle, reply.handle)
        return self.view(held)

    def get_many(self, handles: Iterable[Handle]) -> list[np.ndarray]:
        """``get`` for many handles: one round trip per 1024 of those this client does not hold yet.

        A stale handle raises ``StaleHandle`` and no lease of its group of 1024
        is taken; the leases of earlier groups are kept (``release`` drops them).
        """
        hs = list(handles)
        for h in hs:
            self._check_broker(h)
        todo = [h for h in hs if (held := self._held.get(h.oid)) is None or held.generation != h.generation]
        for i in range(0, len(todo), MAX_REFS):
            part = todo[i:i + MAX_REFS]
            reply: HandlesReply = self._request(AcquireMany(refs=[(h.oid, h.generation) for h in part]))
            for h, srv in zip(part, reply.handles, strict=True):
                self._adopt(h, srv)
        return [self.view(self._held[h.oid]) for h in hs]

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
                self._held[srv.oid] = srv  # the lease is taken: release(handle) still drops it
                raise StaleHandle(f"handle {handle} does not fit the broker's block {srv}")
            srv = Handle(srv.broker, srv.oid, srv.generation, srv.offset, nbytes, handle.dtype,
                         handle.shape, c_strides(handle.shape, itemsize))
        self._held[srv.oid] = srv
        return srv

    def tensor(self, handle: Handle) -> torch.Tensor:
        """``torch.from_numpy(get(handle))``: zero-copy and writable (bfloat16 viewed as such).

        The one place the client touches torch, imported here and only here.
        """
        import torch

        t = torch.from_numpy(self.get(handle))
        return t.view(torch.bfloat16) if handle.dtype == BFLOAT16 else t

    def release(self, handles: Handle | Iterable[Handle]) -> None:
        """Drop this client's reference(s); the block is freed with its last one.

        Does not wait for the broker: it frees the block when it reads the
        message, before anything this client sends afterwards.
        """
        hs = [handles] if isinstance(handles, Handle) else list(handles)
        for h in hs:
            self._check_broker(h)
            self._held.pop(h.oid, None)
        for i in range(0, len(hs), MAX_REFS):
            self.conn.notify(Drop(refs=[(h.oid, h.generation) for h in hs[i:i + MAX_REFS]]))

    def publish(self, name: str, handle: Handle) -> None:
        """Make ``handle`` discoverable by ``name``; the broker keeps it alive until replaced."""
        self._check_broker(handle)
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
        return reply.stage

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

    def commit(self, reserved: Reserved | int, *, wait: bool = True) -> int:
        """The reservation's items are written: they become tasks of its stage."""
        rsv = reserved if isinstance(reserved, int) else reserved.rsv
        return self._maybe_wait(Commit(rsv=rsv), wait)

    def cancel(self, reserved: Reserved | int, *, wait: bool = True) -> int:
        """Give a reservation back unwritten."""
        rsv = reserved if isinstance(reserved, int) else reserved.rsv
        return self._maybe_wait(Cancel(rsv=rsv), wait)

    def task_rows(self, task: Task) -> list[Any]:
        """The items of a task, one per row: arrays (views), or the tuples/dicts of a layout."""
        view = self.view(task.handle)
        if not (task.batched or task.each):
            return [unpack(view, task.layout)]
        rows = task.valid if task.valid is not None else range(len(task.items))
        return [unpack(view[r], task.layout) for r in rows]

    def done(self, task: Task | int, rsvs: Sequence[int] = (), *, busy: float = 0.0, copied: int = 0,
             credit: int = 1, wait: bool = False) -> int:
        """A task is finished, its outputs in reservations ``rsvs``; by default not waited for
        (its reply comes through ``next_message``; the broker handles it before anything this
        client sends next)."""
        tid = task if isinstance(task, int) else task.task
        return self._maybe_wait(Done(task=tid, rsvs=list(rsvs), credit=credit, busy=busy,
                                     copied=copied), wait)

    def fail(self, task: Task | int, error: str, trace: str = "", *, item: int | None = None,
             arena: bool = False, credit: int = 1) -> None:
        """A task's stage raised (``item``: the one row of a grouped task that did), or its
        output found no arena space in time (``arena``)."""
        tid = task if isinstance(task, int) else task.task
        self._request(Fail(task=tid, error=error, trace=trace, credit=credit, item=item, arena=arena))

    def eof(self, items: int) -> None:
        """The source is exhausted after ``items`` items: partial batches may go now."""
        self._request(Eof(items=items))

    def next_message(self, timeout: float | None) -> Message | None:
        """The next task, failure report, or reply to a request sent without waiting; None
        after ``timeout`` s."""
        return self.conn.next_message(timeout)

    def _maybe_wait(self, msg: Message, wait: bool) -> int:
        rid = self.conn.send(msg)
        if wait:
            self.conn.wait(rid)
        return rid

    # -- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
