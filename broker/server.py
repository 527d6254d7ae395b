"""The broker's event loop: object table, leases, stage queues, dispatch with credits, client liveness.

How an item moves (every arrow is a handle, bytes move only where noted)::

    driver ──reserve(stage 0)──▶ broker allocates a slot (or rows of a batch slot)
    driver writes the item into the slot           (copy 1: the source's write)
    driver ──commit──▶ broker: Task(stage 0) ──▶ queue[0]
                                   │  dispatch to a worker with credit > 0
                                   ▼
    worker: view → torch.from_numpy → .to(device) → fn → reserve(stage 1)
    worker writes the result into the slot          (copy 2: the stage's write)
    worker ──done(task, rsv)──▶ broker: releases the input, commits the output
                                   ▼
                   queue[1] ... queue[S] (S = the sink) ──▶ driver ──done──▶ freed

A reservation for a batched stage gets rows of a ``[N, ...]`` batch slot, so
a batch is collated in place; the broker dispatches it when its N rows are
committed, or as a partial batch once nothing upstream can add to it.

Liveness: each client holds a Unix-socket connection to the broker (the one
the arena's descriptor came through). The kernel closes it when the client
dies, however it dies; the broker then drops the client's leases and
re-queues the tasks it held (at-least-once; the driver de-duplicates). The
grants a client made (``Client.grant``) are the one thing that outlives it,
by design, until claimed or until their ttl (at most an hour) passes.
"""

from __future__ import annotations

import argparse
import collections
import heapq
import json
import logging
import math
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from .arena import Allocator, Block, SharedRegion, check_capacity, format_bytes, send_fd
from .errors import ArenaFull, BadRequest, BrokerError, ItemTooLarge, StaleHandle
from .protocol import (
    MAX_MESSAGE,
    NO_REPLY,
    FrameReader,
    Handle,
    ProtocolError,
    c_strides,
    decode,
    encode,
    frame,
)
from .rundir import RunDir, cleanup

log = logging.getLogger("shmbroker.broker")

SINK = "__sink__"
DEFAULT_WAIT = 60.0  # seconds a request may wait for arena space when it names no timeout
# Small items of a stage that takes one item at a time travel a few per task message (the worker
# calls the stage on each row, reserves their outputs with one request and reports them with one
# ``done``): up to TASK_ITEMS and TASK_BYTES per task, more for the sink (the driver).
TASK_ITEMS, TASK_BYTES = 4, 256 << 10
SINK_TASK_ITEMS, SINK_TASK_BYTES = 16, 1 << 20
POOL_BLOCK_MAX = 1 << 20  # the largest block ``alloc_many`` hands out
# Grants of one client not yet claimed or expired. A guard against grants that are never
# claimed (~250 bytes of broker memory each): a program that reaches it has a bug, and the
# refusal reaches the granter as a late error (see Client.grant).
MAX_GRANTS = 100_000
MAX_BACKLOG = 64 << 20  # bytes queued for a Unix-connected client that is not reading: then it is dropped


@dataclass(slots=True, eq=False)
class Obj:
    """An array in the arena: a whole block or a view of rows inside one."""

    oid: int
    block: Block
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    refs: int = 1
    layout: Any = None  # fields packed in each row (a stage that returns a tuple or dict)
    pooled: bool = False  # a block a client sub-allocates: its dtype/shape are set when published


def check_array_spec(dtype: str, shape: Any) -> tuple[np.dtype, tuple[int, ...], int]:
    """Validate a dtype string and shape from the wire; return (dtype, shape, nbytes)."""
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        raise BadRequest(f"unknown dtype {dtype!r}") from None
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise BadRequest(f"dtype {dtype!r} cannot live in shared memory (object or structured)")
    if not isinstance(shape, (list, tuple)) or len(shape) > 32 or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**48 for d in shape
    ):
        raise BadRequest(f"shape must be a list of at most 32 non-negative integers, got {shape!r}")
    nbytes = dt.itemsize * math.prod(shape)
    return dt, tuple(shape), nbytes


def _check_layout(layout: Any, dtype: str, shape: tuple[int, ...]) -> Any:
    """A row layout (fields of a tuple/dict result) is opaque to the broker, but bounded."""
    if layout is None:
        return None
    if not isinstance(layout, dict) or layout.get("kind") not in ("tuple", "dict") or \
            not isinstance(layout.get("fields"), list) or not 0 < len(layout["fields"]) <= 64:
        raise BadRequest("reserve: layout must be {kind: tuple|dict, fields: [1..64 fields]}")
    if dtype != "|u1" or len(shape) != 1:
        raise BadRequest("reserve: a slot with a layout is a row of bytes (dtype |u1, one dimension)")
    return layout


class Table:
    """Objects, their blocks and refcounts, and published names. No I/O."""

    def __init__(self, allocator: Allocator, token: str) -> None:
        self.alloc = allocator
        self.token = token
        self.objects: dict[int, Obj] = {}
        self._block_objs: dict[int, int] = {}
        self.names: dict[str, Obj] = {}
        self._next = 1

    def new(self, nbytes: int, dtype: str, shape: tuple[int, ...]) -> Obj | None:
        if nbytes > self.alloc.capacity:
            raise ItemTooLarge(
                f"an array of {format_bytes(nbytes)} ({dtype}{list(shape)}) is larger than the "
                f"whole arena ({format_bytes(self.alloc.capacity)}); raise broker.capacity"
            )
        block = self.alloc.alloc(nbytes)
        if block is None:
            return None
        return self._add(block, block.offset, nbytes, dtype, shape)

    def view(self, parent: Obj, offset: int, dtype: str, shape: tuple[int, ...]) -> Obj:
        nbytes = np.dtype(dtype).itemsize * math.prod(shape)
        assert parent.offset <= offset and offset + nbytes <= parent.offset + parent.nbytes
        return self._add(parent.block, offset, nbytes, dtype, shape)

    def _add(self, block: Block, offset: int, nbytes: int, dtype: str, shape: tuple[int, ...]) -> Obj:
        obj = Obj(self._next, block, offset, nbytes, dtype, shape)
        self._next += 1
        self.objects[obj.oid] = obj
        self._block_objs[block.offset] = self._block_objs.get(block.offset, 0) + 1
        return obj

    def decref(self, obj: Obj) -> bool:
        """Drop one reference; free the block with its last object. True if freed."""
        obj.refs -= 1
        if obj.refs > 0:
            return False
        del self.objects[obj.oid]
        left = self._block_objs[obj.block.offset] - 1
        if left:
            self._block_objs[obj.block.offset] = left
            return False
        del self._block_objs[obj.block.offset]
        self.alloc.free(obj.block)
        return True

    def get(self, oid: Any, gen: Any) -> Obj:
        obj = self.objects.get(oid) if isinstance(oid, int) else None
        if obj is None or obj.block.generation != gen:
            raise StaleHandle(
                f"handle (object {oid}, generation {gen}) is stale: the array was released "
                f"or its memory reused; keep a reference (do not release) while it is in use"
            )
        return obj

    def handle(self, obj: Obj) -> list[Any]:
        return Handle(self.token, obj.oid, obj.block.generation, obj.offset, obj.nbytes,
                      obj.dtype, obj.shape, c_strides(obj.shape, np.dtype(obj.dtype).itemsize)).to_wire()


@dataclass(eq=False)
class Task:
    tid: int
    stage: int
    items: list[int]
    obj: Obj
    rows: int
    valid: list[int] | None = None
    attempts: int = 0
    each: bool = False  # rows of items for a stage that takes one item at a time


@dataclass(eq=False)
class Batch:
    obj: Obj
    shape: tuple[int, ...]
    dtype: str
    size: int
    rowbytes: int
    items: list[int | None]
    opened: float
    assigned: int = 0
    committed: int = 0
    holes: list[int] = field(default_factory=list)
    closed: bool = False
    layout: Any = None


@dataclass(eq=False)
class Segment:
    obj: Obj
    items: list[int]
    batch: Batch | None = None
    row: int = 0


@dataclass(eq=False)
class Reservation:
    rsv: int
    stage: int
    segments: list[Segment]


@dataclass(eq=False)
class Stage:
    name: str
    batch: int = 0
    on_error: str = "fail"
    retries: int = 0
    batch_timeout: float = 0.05
    queue: collections.deque[Task] = field(default_factory=collections.deque)
    batches: list[Batch] = field(default_factory=list)
    inflight: int = 0
    reserved: int = 0
    done: int = 0
    failed: int = 0
    busy: float = 0.0
    copied: int = 0
    first: float = 0.0
    last: float = 0.0


@dataclass(eq=False)
class Conn:
    cid: int
    identity: bytes
    name: str
    pid: int
    role: str
    key: str
    sock: socket.socket | None = None
    leases: set[int] = field(default_factory=set)
    stage: int = -1
    credits: int = 0
    device: str = ""
    tasks: dict[int, Task] = field(default_factory=dict)
    reservations: dict[int, Reservation] = field(default_factory=dict)
    done: int = 0
    busy: float = 0.0
    started: float = field(default_factory=time.monotonic)
    unix: bool = False  # requests, replies and tasks travel over ``sock`` (else over ZeroMQ)
    frames: FrameReader = field(default_factory=FrameReader)
    backlog: bytearray = field(default_factory=bytearray)  # bytes the socket did not take yet
    dead: str = ""  # set when the connection must be dropped at the next loop turn


@dataclass(eq=False, slots=True)
class Grant:
    """A lease the broker holds for whoever claims ``token`` (``Client.grant``)."""

    obj: Obj
    uses: int
    deadline: float
    cid: int


@dataclass(order=True)
class Pending:
    priority: int
    seq: int
    deadline: float = field(compare=False)
    conn: Conn = field(compare=False)
    msg: dict[str, Any] = field(compare=False)


class BrokerServer:
    """The broker process's state and loop. ``serve()`` runs until stopped."""

    def __init__(self, capacity: int, rundir: RunDir, endpoint: str | None = None,
                 events: str | None = None, hwm: int = 10_000,
                 curve: dict[str, str] | None = None) -> None:
        from .security import check_bind, secure_server

        if endpoint:
            check_bind(endpoint, bool(curve))
        check_capacity(capacity)
        self.rundir = rundir
        self.token = rundir.token
        self.region = SharedRegion.create(capacity, self.token)
        self.table = Table(Allocator(capacity), self.token)
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.SNDHWM, hwm)
        self.router.setsockopt(zmq.RCVHWM, hwm)
        self.router.setsockopt(zmq.LINGER, 0)
        self.auth = None
        if curve:
            self.auth = secure_server(self.ctx, self.router, curve["secret"], curve["authorized"])
        self.endpoint = endpoint or f"ipc://{rundir.file('broker.sock')}"
        self.router.bind(self.endpoint)
        if self.endpoint.startswith("tcp://") and self.endpoint.endswith(":0"):
            self.endpoint = self.router.get_string(zmq.LAST_ENDPOINT)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.events = events or f"ipc://{rundir.file('events.sock')}"
        self.pub.bind(self.events)
        self.fd_path = rundir.file("fd.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.fd_path)
        os.chmod(self.fd_path, 0o600)
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self.listener.fileno(), zmq.POLLIN)
        self.conns: dict[bytes, Conn] = {}
        self.by_fd: dict[int, Conn] = {}
        self.unkeyed: dict[int, tuple[socket.socket, float]] = {}
        self._next_cid = 1
        self._next_id = 1
        self.stages: list[Stage] = []
        self.max_inflight = 0
        self.inflight_items = 0
        self.eof = False
        self.pending: list[Pending] = []
        self.grants: dict[int, Grant] = {}
        self.grant_deadlines: list[tuple[float, int]] = []  # a heap of (deadline, token)
        self.grants_of: collections.Counter[int] = collections.Counter()  # client id -> open grants
        self.early_claims: dict[int, tuple[int, float]] = {}  # token -> (claims, deadline)
        self._claims_swept = 0.0
        self.stopping = False
        self.started = time.time()
        self.counters: collections.Counter[str] = collections.Counter()
        self.requests: collections.Counter[str] = collections.Counter()  # requests served, by kind
        self.parent_pid = 0
        self.metrics: Any = None
        self._metrics_at = 0.0

    # -- plumbing ---------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "endpoint": self.endpoint, "events": self.events,
                "capacity": self.table.alloc.capacity, "token": self.token,
                "fd_path": self.fd_path, "memfd": self.region.name, "started": self.started}

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    def send(self, to: Conn | bytes, payload: bytes) -> None:
        """Send one payload to a client: over its Unix connection, or by ZeroMQ identity."""
        if isinstance(to, Conn):
            if to.unix:
                return self._send_unix(to, payload)
            to = to.identity
        try:
            self.router.send_multipart([to, payload], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # peer gone (ROUTER_MANDATORY) or its queue full
            log.warning("cannot send to client %r: %s", to, e)

    def _send_unix(self, conn: Conn, payload: bytes) -> None:
        if conn.sock is None or conn.dead:
            return
        data = frame(payload)
        if not conn.backlog:
            try:
                n = conn.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:  # the peer is gone; the poll loop sees the close and drops it
                return
            if n == len(data):
                return
            data = data[n:]
            self.poller.register(conn.sock.fileno(), zmq.POLLIN | zmq.POLLOUT)
        conn.backlog += data
        if len(conn.backlog) > MAX_BACKLOG:
            conn.dead = f"it stopped reading ({format_bytes(len(conn.backlog))} of messages queued)"

    def _flush_unix(self, conn: Conn) -> None:
        assert conn.sock is not None
        try:
            n = conn.sock.send(conn.backlog)
        except BlockingIOError:
            return
        except OSError:
            conn.backlog.clear()
            return
        del conn.backlog[:n]
        if not conn.backlog:
            self.poller.register(conn.sock.fileno(), zmq.POLLIN)

    def reply(self, to: Conn | bytes, rid: int, **fields: Any) -> None:
        payload = encode("ok", rid, **fields)
        if len(payload) > MAX_MESSAGE:  # a client cannot take it: say so instead
            return self.reply_error(to, rid, BrokerError(
                f"the reply of {len(payload)} bytes exceeds the {MAX_MESSAGE} byte limit; ask for less"))
        self.send(to, payload)

    def reply_error(self, to: Conn | bytes, rid: int, err: BaseException, late: bool = False) -> None:
        """``late``: the error of a message that gets no reply (``drop``, ``grant``, ``claim``);
        the client raises it at its next request instead of taking it as that request's answer."""
        code = type(err).__name__ if isinstance(err, BrokerError) else "BadRequest"
        extra = {"late": 1} if late else {}
        self.send(to, encode("error", rid, code=code, message=str(err), **extra))

    # -- the loop ---------------------------------------------------------------
    def serve(self) -> None:
        log.info("broker pid %d serving %s, arena %s (%s)", os.getpid(), self.endpoint,
                 format_bytes(self.table.alloc.capacity), self.region.name)
        while not self.stopping:
            if self.parent_pid and os.getppid() != self.parent_pid:
                log.error("parent process %d is gone; stopping", self.parent_pid)
                break
            timeout = 10 if (self.pending or any(s.batches for s in self.stages)) else 500
            for sock, ev in self.poller.poll(timeout):
                if sock is self.router:
                    self._drain_router()
                elif sock == self.listener.fileno():
                    self._accept()
                elif sock in self.unkeyed:
                    self._handshake(sock)
                else:
                    conn = self.by_fd.get(sock)
                    if conn is not None and ev & zmq.POLLOUT and conn.backlog:
                        self._flush_unix(conn)
                    if conn is not None and ev & (zmq.POLLIN | zmq.POLLERR):
                        self._read_conn(conn)
            self._tick()

    def _drain_router(self) -> None:
        for _ in range(1000):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            if len(frames) != 2:
                self.counters["bad_frames"] += 1
                if frames:
                    self.reply_error(frames[0], 0, BadRequest(f"expected 1 frame, got {len(frames) - 1}"))
                continue
            identity, payload = frames
            conn = self.conns.get(identity)
            if conn is not None and conn.unix:  # it talks over its Unix connection now
                self.counters["bad_messages"] += 1
                continue
            self._serve_one(identity, payload)

    def _serve_one(self, identity: bytes, payload: bytes) -> None:
        """Decode and handle one request; any error becomes the reply."""
        try:
            msg = decode(payload)
        except ProtocolError as e:
            self.counters["bad_messages"] += 1
            self.reply_error(self.conns.get(identity) or identity, 0, BadRequest(str(e)))
            return
        late = msg["op"] in NO_REPLY
        try:
            self.handle(identity, msg)
        except BrokerError as e:
            self.reply_error(self.conns.get(identity) or identity, msg["rid"], e, late)
        except Exception as e:  # a bug must not take the broker down; report it
            log.exception("error handling %s", msg.get("op"))
            self.reply_error(self.conns.get(identity) or identity, msg["rid"],
                             BrokerError(f"internal error: {e!r}"), late)

    def _accept(self) -> None:
        """Accept a descriptor request; its key is read when it arrives (never blocking the loop)."""
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        self.unkeyed[sock.fileno()] = (sock, time.monotonic() + 5.0)
        self.poller.register(sock.fileno(), zmq.POLLIN)

    def _handshake(self, fd: int) -> None:
        sock, _deadline = self.unkeyed.pop(fd)
        self.poller.unregister(fd)
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            _pid, uid, _gid = np.frombuffer(creds, dtype=np.int32)
            key, _, mode = sock.recv(64).decode(errors="replace").partition("+")
            conn = next((c for c in self.conns.values() if c.key == key and c.sock is None), None)
            if conn is None or uid != os.getuid():
                raise PermissionError("unknown key or other user")
            sock.settimeout(2.0)
            send_fd(sock, self.region.fd, json.dumps(
                {"capacity": self.table.alloc.capacity, "name": self.region.name}).encode())
            sock.setblocking(False)
        except (OSError, PermissionError) as e:
            log.warning("refused a descriptor request: %s", e)
            sock.close()
            return
        conn.sock = sock
        conn.unix = mode == "unix"
        self.by_fd[sock.fileno()] = conn
        self.poller.register(sock.fileno(), zmq.POLLIN)

    def _expire_unkeyed(self, now: float) -> None:
        for fd, (sock, deadline) in list(self.unkeyed.items()):
            if now > deadline:
                del self.unkeyed[fd]
                self.poller.unregister(fd)
                sock.close()
                log.warning("closed a descriptor request that sent no key within 5 s")

    def _read_conn(self, conn: Conn) -> None:
        """Requests from a Unix-connected client, or the close of any client's connection."""
        assert conn.sock is not None
        try:
            data = conn.sock.recv(1 << 18)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.drop(conn, "its connection closed (process exited)")
            return
        if not conn.unix:
            return  # a liveness-only connection: nothing is expected on it
        try:
            payloads = conn.frames.feed(data)
        except ProtocolError as e:
            self.counters["bad_messages"] += 1
            self.drop(conn, f"it sent a bad frame ({e})")
            return
        for payload in payloads:
            if conn.dead or self.conns.get(conn.identity) is not conn:
                return
            self._serve_one(conn.identity, payload)

    def drop(self, conn: Conn, why: str) -> None:
        """Forget a client: release its leases, re-queue its tasks, cancel its reservations."""
        log.info("client %s (pid %d) gone: %s; %d leases, %d tasks in flight", conn.name,
                 conn.pid, why, len(conn.leases), len(conn.tasks))
        if self.conns.get(conn.identity) is conn:
            del self.conns[conn.identity]
        conn.dead = conn.dead or why
        if conn.sock is not None:
            self.by_fd.pop(conn.sock.fileno(), None)
            self.poller.unregister(conn.sock.fileno())
            conn.sock.close()
        for rsv in list(conn.reservations.values()):
            self._cancel(rsv)
        for task in conn.tasks.values():
            st = self.stages[task.stage]
            st.inflight -= 1
            task.attempts += 1
            st.queue.appendleft(task)
            self.counters["requeued"] += 1
        for oid in conn.leases:
            obj = self.table.objects.get(oid)
            if obj is not None:
                self.table.decref(obj)
        conn.leases.clear()
        self.pending = [p for p in self.pending if p.conn is not conn]
        if conn.stage >= 0:
            self.counters["workers_lost"] += 1
        self._dispatch()

    def _tick(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self.conns.values() if c.dead]:
            self.drop(conn, conn.dead)
        if self.unkeyed:
            self._expire_unkeyed(now)
        if self.metrics is not None and now - self._metrics_at > 0.25:
            self.metrics.update(self.stats())
            self._metrics_at = now
        if self.pending:
            self._retry_pending(now)
        if self.grant_deadlines or self.early_claims:
            self._expire_grants(now)
        for s, st in enumerate(self.stages):
            for b in list(st.batches):
                if b.assigned == 0 or b.committed + len(b.holes) < b.assigned:
                    continue  # rows still being written
                # A closed batch (full, or cut off by a reservation of another shape) with no
                # open rows goes now, whatever closed it (a commit, a cancel, a shape change);
                # an open one waits for more rows until nothing upstream can add to it.
                if b.closed or (self._upstream_idle(s) and
                                (self.eof or now - b.opened >= st.batch_timeout)):
                    b.closed = True
                    self._batch_ready(s, b)
        self._dispatch()

    # -- requests ---------------------------------------------------------------
    def handle(self, identity: bytes, msg: dict[str, Any]) -> None:
        op, rid = msg["op"], msg["rid"]
        self.requests[op] += 1
        conn = self.conns.get(identity)
        if op == "hello":
            if conn is not None and conn.unix:
                raise BadRequest("hello: this client is already connected")
            return self._hello(identity, msg)
        if op == "ping":
            return self.reply(conn or identity, rid)
        if op == "stats":
            return self.reply(conn or identity, rid, stats=self.stats())
        if conn is None:
            raise BadRequest(f"{op}: say hello first (unknown client)")
        if conn.dead:
            return
        if conn.sock is None:  # leases are reclaimed when that connection closes: no lease without it
            raise BadRequest(f"{op}: fetch the arena's descriptor from {self.fd_path} first")
        getattr(self, f"_op_{op}", self._op_unknown)(conn, msg)

    def _op_unknown(self, conn: Conn, msg: dict[str, Any]) -> None:
        raise BadRequest(f"{msg['op']!r} is not a request")

    def _hello(self, identity: bytes, msg: dict[str, Any]) -> None:
        old = self.conns.get(identity)
        if old is not None:
            self.drop(old, "it said hello again")
        conn = Conn(self._next_cid, identity, msg["name"], msg["pid"], msg["role"],
                    secrets.token_hex(16))
        self._next_cid += 1
        self.conns[identity] = conn
        self.reply(identity, msg["rid"], cid=conn.cid, key=conn.key, fd_path=self.fd_path,
                   capacity=self.table.alloc.capacity, broker=self.token)

    def _op_alloc(self, conn: Conn, msg: dict[str, Any]) -> None:
        _dt, shape, nbytes = check_array_spec(msg["dtype"], msg["shape"])
        if nbytes != msg["nbytes"]:
            raise BadRequest(f"alloc: nbytes {msg['nbytes']} does not match {msg['dtype']}{list(shape)}")
        if not self._try_alloc(conn, msg):
            self._park(conn, msg, priority=0)

    def _op_alloc_many(self, conn: Conn, msg: dict[str, Any]) -> None:
        """Up to ``count`` blocks of ``nbytes`` for a client's pool of small arrays (at least one)."""
        nbytes, count = msg["nbytes"], msg["count"]
        if not 0 < nbytes <= POOL_BLOCK_MAX or not 0 < count <= 256 or msg["dtype"] != "|u1" \
                or msg["shape"] != [nbytes]:
            raise BadRequest(f"alloc_many: wants 1..256 blocks of 1..{POOL_BLOCK_MAX} bytes as |u1[nbytes]")
        if not self._try_alloc(conn, msg):
            self._park(conn, msg, priority=0)

    def _try_alloc(self, conn: Conn, msg: dict[str, Any]) -> bool:
        """Serve an ``alloc`` or ``alloc_many`` now if the arena has room; False if not."""
        if msg["op"] == "alloc":  # its dtype, shape and nbytes were checked when it arrived
            obj = self.table.new(msg["nbytes"], msg["dtype"], tuple(msg["shape"]))
            if obj is None:
                return False
            conn.leases.add(obj.oid)
            self.reply(conn, msg["rid"], handle=self.table.handle(obj))
            return True
        objs = []
        for _ in range(msg["count"]):
            obj = self.table.new(msg["nbytes"], "|u1", (msg["nbytes"],))
            if obj is None:
                break
            obj.pooled = True
            conn.leases.add(obj.oid)
            objs.append(obj)
        if objs:
            self.reply(conn, msg["rid"], handles=[self.table.handle(o) for o in objs])
        return bool(objs)

    def _op_acquire(self, conn: Conn, msg: dict[str, Any]) -> None:
        obj = self.table.get(msg["oid"], msg["gen"])
        if obj.oid not in conn.leases:
            conn.leases.add(obj.oid)
            obj.refs += 1
        self.reply(conn, msg["rid"], handle=self.table.handle(obj))

    def _op_acquire_many(self, conn: Conn, msg: dict[str, Any]) -> None:
        """``acquire`` for many handles in one round trip; a stale one fails the lot (none taken)."""
        refs = msg["refs"]
        if len(refs) > 1024:  # a handle of 32 dimensions is ~650 B: the reply stays under MAX_MESSAGE
            raise BadRequest("acquire_many: at most 1024 handles per request")
        if not all(isinstance(r, list) and len(r) == 2 for r in refs):
            raise BadRequest("acquire_many: refs must be [object id, generation] pairs")
        objs = [self.table.get(oid, gen) for oid, gen in refs]
        payload = encode("ok", msg["rid"], handles=[self.table.handle(o) for o in objs])
        if len(payload) > MAX_MESSAGE:  # checked before any lease is taken
            raise BadRequest(f"acquire_many: the reply would be {len(payload)} bytes; ask for fewer")
        for obj in objs:
            if obj.oid not in conn.leases:
                conn.leases.add(obj.oid)
                obj.refs += 1
        self.send(conn, payload)

    def _release_refs(self, conn: Conn, refs: list[Any]) -> int:
        """Drop this client's leases on ``refs``; the number that were not its (stale)."""
        stale = 0
        for ref in refs[:100_000]:
            oid = ref[0] if isinstance(ref, list) and len(ref) == 2 and type(ref[0]) is int else None
            obj = self.table.objects.get(oid) if oid in conn.leases else None
            if obj is None or obj.block.generation != ref[1]:
                stale += 1
                continue
            conn.leases.discard(oid)
            self.table.decref(obj)
        if self.pending:
            self._retry_pending(time.monotonic())
        return stale

    def _op_release(self, conn: Conn, msg: dict[str, Any]) -> None:
        self.reply(conn, msg["rid"], stale=self._release_refs(conn, msg["refs"]))

    def _op_drop(self, conn: Conn, msg: dict[str, Any]) -> None:
        stale = self._release_refs(conn, msg["refs"])
        if stale:
            self.counters["stale_drops"] += stale

    def _op_grant(self, conn: Conn, msg: dict[str, Any]) -> None:
        """Hold a lease for ``uses`` claims of ``token`` (or until ``ttl`` s pass). No reply.

        A grant outlives its client: that is the point (the receiver may
        claim after the granter released or died). The token's high bits are
        the granter's client id, so tokens of different clients never clash.
        """
        token, uses, ttl = msg["token"], msg["uses"], msg["ttl"]
        if token >> 32 != conn.cid or token in self.grants or not 0 < uses <= 1024 or \
                not (isinstance(ttl, (int, float)) and 0 < ttl <= 3600):
            raise BadRequest("grant: token must be (client id << 32 | n) and new, uses 1..1024, "
                             "ttl 0..3600 s")
        if self.grants_of[conn.cid] >= MAX_GRANTS:
            raise BadRequest(f"grant: this client has {MAX_GRANTS} grants nobody claimed yet; "
                             f"grant fewer or with a shorter ttl")
        obj = self.table.get(msg["oid"], msg["gen"])
        claimed, _ = self.early_claims.pop(token, (0, 0.0))
        if claimed >= uses:
            return  # every claim came before the grant and took its own lease
        obj.refs += 1
        deadline = time.monotonic() + ttl
        self.grants[token] = Grant(obj, uses - claimed, deadline, conn.cid)
        self.grants_of[conn.cid] += 1
        heap = self.grant_deadlines
        heapq.heappush(heap, (deadline, token))
        if len(heap) > 2 * len(self.grants) + 1024:  # entries of grants claimed early: drop them
            self.grant_deadlines = [(g.deadline, t) for t, g in self.grants.items()]
            heapq.heapify(self.grant_deadlines)

    def _op_claim(self, conn: Conn, msg: dict[str, Any]) -> None:
        """Take the lease a grant holds; no reply. A failure is sent as an error with rid 0."""
        token = msg["token"]
        grant = self.grants.get(token)
        if grant is not None and (grant.obj.oid, grant.obj.block.generation) == (msg["oid"], msg["gen"]):
            obj = grant.obj
            grant.uses -= 1
            last = grant.uses == 0  # the grant's own reference passes to this claim
            if last:
                self._close_grant(token)
            if obj.oid not in conn.leases:
                conn.leases.add(obj.oid)
                if not last:
                    obj.refs += 1
            elif last:
                self.table.decref(obj)
            return
        # The claim overtook its grant (they travel on different connections), or the grant is
        # used up: while the object lives (the granter's lease keeps it until the grant is in),
        # take a lease now and count the claim against a grant still to come.
        try:
            obj = self.table.get(msg["oid"], msg["gen"])
        except StaleHandle as e:
            raise StaleHandle(f"claim of a granted handle failed: {e}; the grant expired or was "
                              f"used up before this claim, and the array is gone") from None
        if obj.oid not in conn.leases:
            conn.leases.add(obj.oid)
            obj.refs += 1
        if 0 < token >> 32 < self._next_cid and len(self.early_claims) < 100_000:
            n, _ = self.early_claims.get(token, (0, 0.0))
            self.early_claims[token] = (n + 1, time.monotonic() + 60.0)

    def _close_grant(self, token: int) -> Grant:
        grant = self.grants.pop(token)
        self.grants_of[grant.cid] -= 1
        if not self.grants_of[grant.cid]:
            del self.grants_of[grant.cid]
        return grant

    def _expire_grants(self, now: float) -> None:
        heap = self.grant_deadlines
        while heap and heap[0][0] <= now:
            _deadline, token = heapq.heappop(heap)
            grant = self.grants.get(token)
            if grant is not None and grant.deadline <= now:
                self.table.decref(self._close_grant(token).obj)
                self.counters["grants_expired"] += 1
        if self.early_claims and now - self._claims_swept > 1.0:
            self._claims_swept = now
            for token in [t for t, (_n, d) in self.early_claims.items() if d <= now]:
                del self.early_claims[token]

    def _op_publish(self, conn: Conn, msg: dict[str, Any]) -> None:
        obj = self.table.get(msg["oid"], msg["gen"])
        if obj.dtype != msg["dtype"] or list(obj.shape) != msg["shape"]:
            _dt, shape, nbytes = check_array_spec(msg["dtype"], msg["shape"])
            if not obj.pooled or nbytes > obj.block.size or obj.oid not in conn.leases:
                raise BadRequest(f"publish: object {obj.oid} is {obj.dtype}{list(obj.shape)}, "
                                 f"not {msg['dtype']}{msg['shape']}")
            obj.dtype, obj.shape, obj.nbytes = msg["dtype"], shape, nbytes  # a pool block gets its type,
            obj.pooled = False  # once: what a published name resolves to does not change after
        old = self.table.names.get(msg["name"])
        obj.refs += 1
        self.table.names[msg["name"]] = obj
        if old is not None:
            self.table.decref(old)
        wire = self.table.handle(obj)
        self.pub.send_multipart([b"publish", encode("ok", 0, name=msg["name"], handle=wire)])
        self.reply(conn, msg["rid"])

    def _op_lookup(self, conn: Conn, msg: dict[str, Any]) -> None:
        obj = self.table.names.get(msg["name"])
        self.reply(conn, msg["rid"], handle=None if obj is None else self.table.handle(obj))

    def _op_shutdown(self, conn: Conn, msg: dict[str, Any]) -> None:
        self.reply(conn, msg["rid"])
        self.stopping = True

    # -- pipeline ---------------------------------------------------------------
    def configure(self, stages: list[dict[str, Any]], max_inflight: int) -> None:
        if self.stages:
            names = [s.name for s in self.stages[:-1]]
            if names != [s.get("name") for s in stages]:
                raise BadRequest(f"pipeline: this broker already runs stages {names}")
            self.max_inflight = max_inflight or self.max_inflight
            return
        out = []
        for i, s in enumerate(stages):
            if not isinstance(s, dict) or not isinstance(s.get("name"), str):
                raise BadRequest(f"pipeline: stages[{i}] must be a map with a name")
            batch, retries = s.get("batch", 0), s.get("retries", 0)
            if not isinstance(batch, int) or batch < 0 or not isinstance(retries, int):
                raise BadRequest(f"pipeline: stages[{i}].batch/retries must be non-negative integers")
            on_error = s.get("on_error", "fail")
            if on_error not in ("fail", "skip", "retry"):
                raise BadRequest(f"pipeline: stages[{i}].on_error must be fail, skip or retry")
            out.append(Stage(s["name"], batch if batch > 1 else 0, on_error, retries,
                             float(s.get("batch_timeout", 0.05))))
        out.append(Stage(SINK))
        self.stages = out
        self.max_inflight = max_inflight

    def _op_pipeline(self, conn: Conn, msg: dict[str, Any]) -> None:
        self.configure(msg["stages"], msg["max_inflight"])
        self.eof = False
        self.reply(conn, msg["rid"], stages=[s.name for s in self.stages])

    def _op_register(self, conn: Conn, msg: dict[str, Any]) -> None:
        names = [s.name for s in self.stages]
        if msg["stage"] not in names:
            raise BadRequest(f"register: no stage {msg['stage']!r}; this pipeline has {names[:-1]}")
        conn.stage = names.index(msg["stage"])
        conn.credits = max(1, min(msg["credits"], 1024))
        conn.device = msg["device"]
        self.reply(conn, msg["rid"], stage=conn.stage)
        self._dispatch()

    def _op_eof(self, conn: Conn, msg: dict[str, Any]) -> None:
        self.eof = True
        self.reply(conn, msg["rid"])

    def _op_reserve(self, conn: Conn, msg: dict[str, Any]) -> None:
        s = msg["stage"]
        if not 0 <= s < len(self.stages):
            raise BadRequest(f"reserve: stage {s} out of range (0..{len(self.stages) - 1})")
        items = msg["items"]
        if not items or len(items) > 65536 or not all(isinstance(i, int) for i in items):
            raise BadRequest("reserve: items must be a non-empty list of at most 65536 item ids")
        check_array_spec(msg["dtype"], msg["shape"])
        if not self._try_reserve(conn, msg):
            self._park(conn, msg, priority=-s - 1)

    def _source_gated(self, conn: Conn, msg: dict[str, Any]) -> bool:
        """The source may hold at most ``max_inflight`` items and half the arena."""
        if msg["stage"] != 0:  # only sources write into stage 0; workers write downstream
            return False
        n = len(msg["items"])
        if self.max_inflight and self.inflight_items and self.inflight_items + n > self.max_inflight:
            return True
        alloc = self.table.alloc
        # by what is used now, not counting this request: an item of more than half the arena
        # must still get in (the driver keeps its groups to 1/16 of the arena, so the source
        # overshoots half by little)
        return bool(self.inflight_items) and alloc.used * 2 > alloc.capacity

    def _try_reserve(self, conn: Conn, msg: dict[str, Any]) -> bool:
        if self._source_gated(conn, msg):
            return False
        s, items, dtype = msg["stage"], msg["items"], msg["dtype"]
        shape = tuple(msg["shape"])
        layout = _check_layout(msg.get("layout"), dtype, shape)
        st = self.stages[s]
        segs = self._segments_batched(st, items, shape, dtype, layout) if st.batch else \
            self._segments_plain(items, shape, dtype)
        if segs is None:
            return False
        for seg in segs:
            seg.obj.layout = layout
        rsv = Reservation(self._id(), s, segs)
        conn.reservations[rsv.rsv] = rsv
        st.reserved += len(items)
        if s == 0:
            self.inflight_items += len(items)
        wire = [[self.table.handle(g.obj), len(g.items)] for g in segs]
        self.reply(conn, msg["rid"], rsv=rsv.rsv, segments=wire)
        return True

    def _segments_plain(self, items: list[int], shape: tuple[int, ...], dtype: str) -> list[Segment] | None:
        full = (len(items), *shape)
        obj = self.table.new(np.dtype(dtype).itemsize * math.prod(full), dtype, full)
        return None if obj is None else [Segment(obj, list(items))]

    def _segments_batched(self, st: Stage, items: list[int], shape: tuple[int, ...],
                          dtype: str, layout: Any = None) -> list[Segment] | None:
        rowbytes = np.dtype(dtype).itemsize * math.prod(shape)
        fits = [b for b in st.batches
                if b.shape == shape and b.dtype == dtype and b.layout == layout and not b.closed]
        room = sum(len(b.holes) + b.size - b.assigned for b in fits)
        new: list[Batch] = []
        while room + len(new) * st.batch < len(items):
            full = (st.batch, *shape)
            obj = self.table.new(rowbytes * st.batch, dtype, full)
            if obj is None:
                for b in new:
                    self.table.decref(b.obj)
                return None
            obj.layout = layout
            new.append(Batch(obj, shape, dtype, st.batch, rowbytes, [None] * st.batch,
                             time.monotonic(), layout=layout))
        for b in st.batches:  # a reservation of another shape closes the open batches
            if b not in fits and not b.closed:
                b.closed = True
        st.batches.extend(new)
        segs, todo = [], list(items)
        for b in fits + new:
            while b.holes and todo:
                row = b.holes.pop()
                segs.append(self._rows(b, row, [todo.pop(0)]))
            n = min(b.size - b.assigned, len(todo))
            if n:
                segs.append(self._rows(b, b.assigned, todo[:n]))
                b.assigned += n
                del todo[:n]
        assert not todo
        return segs

    def _rows(self, b: Batch, row: int, items: list[int]) -> Segment:
        for i, item in enumerate(items):
            b.items[row + i] = item
        obj = self.table.view(b.obj, b.obj.offset + row * b.rowbytes, b.dtype, (len(items), *b.shape))
        return Segment(obj, items, b, row)

    @staticmethod
    def _take_reservation(conn: Conn, msg: dict[str, Any]) -> Reservation:
        rsv = conn.reservations.pop(msg["rsv"], None)
        if rsv is None:
            raise BadRequest(f"{msg['op']}: no open reservation {msg['rsv']}")
        return rsv

    def _op_commit(self, conn: Conn, msg: dict[str, Any]) -> None:
        self._commit(self._take_reservation(conn, msg))
        self.reply(conn, msg["rid"])
        self._dispatch()

    def _op_cancel(self, conn: Conn, msg: dict[str, Any]) -> None:
        """Give back an open reservation unwritten (its rows become holes of their batch)."""
        self._cancel(self._take_reservation(conn, msg))
        self.reply(conn, msg["rid"])
        if self.pending:
            self._retry_pending(time.monotonic())

    def _commit(self, rsv: Reservation) -> None:
        st = self.stages[rsv.stage]
        for seg in rsv.segments:
            st.reserved -= len(seg.items)
            if seg.batch is None:
                sink = rsv.stage == len(self.stages) - 1
                st.queue.extend(self._row_tasks(rsv.stage, seg.obj, seg.items,
                                                SINK_TASK_ITEMS if sink else TASK_ITEMS,
                                                SINK_TASK_BYTES if sink else TASK_BYTES))
            else:
                b = seg.batch
                b.committed += len(seg.items)
                if b.assigned == b.size:
                    b.closed = True
                if b.closed and b.committed + len(b.holes) == b.assigned:
                    self._batch_ready(rsv.stage, b)
            self.table.decref(seg.obj)

    def _row_tasks(self, s: int, obj: Obj, items: list[int], per_items: int, per_bytes: int) -> list[Task]:
        """Tasks for the rows of ``obj`` (one item each): a view per task, ``per_items`` rows at most."""
        rowshape = obj.shape[1:]
        rowbytes = obj.nbytes // max(1, len(items))
        per = max(1, min(per_items, per_bytes // max(1, rowbytes)))
        tasks = []
        for i in range(0, len(items), per):
            k = min(per, len(items) - i)
            view = self.table.view(obj, obj.offset + i * rowbytes, obj.dtype,
                                   rowshape if k == 1 else (k, *rowshape))
            view.layout = obj.layout
            tasks.append(Task(self._id(), s, items[i:i + k], view, k, each=k > 1))
        return tasks

    def _cancel(self, rsv: Reservation) -> None:
        st = self.stages[rsv.stage]
        for seg in rsv.segments:
            st.reserved -= len(seg.items)
            if rsv.stage == 0:  # a source's items that will not enter the pipeline after all
                self.inflight_items -= len(seg.items)
            if seg.batch is not None:
                for r in range(seg.row, seg.row + len(seg.items)):
                    seg.batch.items[r] = None
                    seg.batch.holes.append(r)
            self.table.decref(seg.obj)

    def _batch_ready(self, s: int, b: Batch) -> None:
        st = self.stages[s]
        st.batches.remove(b)
        valid = [r for r in range(b.assigned) if b.items[r] is not None]
        if not valid:
            self.table.decref(b.obj)
            return
        task = Task(self._id(), s, [b.items[r] for r in valid], b.obj, b.assigned,  # type: ignore[misc]
                    None if len(valid) == b.assigned else valid)
        st.queue.append(task)

    def _upstream_idle(self, s: int) -> bool:
        return all(not st.queue and not st.inflight and not st.reserved and not st.batches
                   for st in self.stages[:s])

    def _dispatch(self) -> None:
        if not self.stages:
            return
        workers = [c for c in self.conns.values() if c.stage >= 0 and c.credits > 0]
        for s, st in enumerate(self.stages):
            if not st.queue:
                continue
            pool = [c for c in workers if c.stage == s]
            while st.queue and pool:
                pool.sort(key=lambda c: (len(c.tasks), -c.credits))
                conn = pool[0]
                task = st.queue.popleft()
                conn.tasks[task.tid] = task
                conn.credits -= 1
                st.inflight += 1
                if not st.first:
                    st.first = time.monotonic()
                extra: dict[str, Any] = {"valid": task.valid} if task.valid is not None else {}
                if task.each:
                    extra["each"] = 1
                if task.obj.layout is not None:
                    extra["layout"] = task.obj.layout
                self.send(conn, encode("task", 0, task=task.tid, stage=s, items=task.items,
                                       handle=self.table.handle(task.obj), rows=task.rows, **extra))
                if conn.credits == 0:
                    pool.pop(0)

    def _finish(self, conn: Conn, msg: dict[str, Any]) -> Task:
        task = conn.tasks.pop(msg["task"], None)
        if task is None:
            raise BadRequest(f"{msg['op']}: task {msg['task']} is not assigned to this client")
        st = self.stages[task.stage]
        st.inflight -= 1
        conn.credits += max(0, min(msg["credit"], 1024))
        self.table.decref(task.obj)
        return task

    def _op_done(self, conn: Conn, msg: dict[str, Any]) -> None:
        if msg["task"] not in conn.tasks:  # check before touching the reservation
            raise BadRequest(f"done: task {msg['task']} is not assigned to this client")
        ids = [msg["rsv"]] if msg["rsv"] is not None else []
        more = msg.get("rsvs", [])
        if not isinstance(more, list) or len(more) > 1024 or not all(type(r) is int for r in more):
            raise BadRequest("done: rsvs must be a list of reservation ids")
        ids += more
        missing = [r for r in ids if r not in conn.reservations]
        if missing or len(set(ids)) != len(ids):
            raise BadRequest(f"done: no open reservation {missing[0] if missing else ids}")
        task = self._finish(conn, msg)
        for r in ids:
            self._commit(conn.reservations.pop(r))
        st = self.stages[task.stage]
        st.done += len(task.items)
        st.busy += float(msg["busy"])
        copied = msg.get("copied", 0)
        st.copied += copied if isinstance(copied, int) and copied > 0 else 0
        st.last = time.monotonic()
        conn.done += len(task.items)
        conn.busy += float(msg["busy"])
        if task.stage == len(self.stages) - 1:
            self.inflight_items -= len(task.items)
        self.reply(conn, msg["rid"])
        if self.pending:
            self._retry_pending(time.monotonic())
        self._dispatch()

    def _op_fail(self, conn: Conn, msg: dict[str, Any]) -> None:
        for rsv in list(conn.reservations.values()):
            self._cancel(rsv)
        conn.reservations.clear()
        task = conn.tasks.get(msg["task"])
        if task is None:
            raise BadRequest(f"fail: task {msg['task']} is not assigned to this client")
        st = self.stages[task.stage]
        if task.each:  # one of its items failed: the others go on one per task, as if never grouped
            singles = self._row_tasks(task.stage, task.obj, task.items, 1, 1)
            self._finish(conn, msg)
            self.counters["split"] += 1
            for t in reversed(singles):
                t.attempts = task.attempts
                if t.items[0] != msg.get("item"):
                    st.queue.appendleft(t)
                    continue
                t.attempts += 1  # the row that raised: this was one of its attempts
                if st.on_error == "retry" and t.attempts <= st.retries:
                    st.queue.appendleft(t)
                    self.counters["retried"] += 1
                else:
                    self._fail_items(st, t.items, msg, t.obj)
            self.reply(conn, msg["rid"])
            self._dispatch()
            return
        task.attempts += 1
        if st.on_error == "retry" and task.attempts <= st.retries:
            conn.tasks.pop(task.tid)
            st.inflight -= 1
            conn.credits += max(0, min(msg["credit"], 1024))
            st.queue.append(task)
            self.counters["retried"] += 1
        else:
            self._finish(conn, msg)
            self._fail_items(st, task.items, msg)
        self.reply(conn, msg["rid"])
        self._dispatch()

    def _fail_items(self, st: Stage, items: list[int], msg: dict[str, Any], obj: Obj | None = None) -> None:
        """Items a stage gave up on: counted, and reported to the driver (fatal unless skip)."""
        if obj is not None:
            self.table.decref(obj)
        st.failed += len(items)
        self.inflight_items -= len(items)
        fatal = st.on_error != "skip"
        self.counters["skipped" if not fatal else "failed"] += len(items)
        self._notify_failure(st.name, items, msg["error"], msg["trace"], fatal)

    def _notify_failure(self, stage: str, items: list[int], error: str, trace: str, fatal: bool) -> None:
        payload = encode("failure", 0, stage=stage, items=items, error=error, trace=trace, fatal=int(fatal))
        for c in self.conns.values():
            if c.stage == len(self.stages) - 1:
                self.send(c, payload)

    # -- waiting for space ------------------------------------------------------
    def _park(self, conn: Conn, msg: dict[str, Any], priority: int) -> None:
        timeout = msg.get("timeout")
        wait = DEFAULT_WAIT if timeout is None else float(timeout)
        if not math.isfinite(wait):
            raise BadRequest(f"{msg['op']}: timeout must be a finite number of seconds, got {timeout!r}")
        if wait <= 0:
            raise self._full_error(msg)
        p = Pending(priority, self._id(), time.monotonic() + wait, conn, msg)
        self.pending.append(p)
        self.pending.sort()

    def _full_error(self, msg: dict[str, Any]) -> ArenaFull:
        alloc = self.table.alloc
        what = f"{msg['op']} of {msg['dtype']}{msg['shape']}"
        if msg["op"] == "reserve" and msg["stage"] == 0 and self.max_inflight and \
                self.inflight_items + len(msg["items"]) > self.max_inflight:
            return ArenaFull(
                f"{what}: {self.inflight_items} items stayed in flight (max_inflight "
                f"{self.max_inflight}) until the timeout; the stages or the sink are not keeping up "
                f"(is a stage without workers? `shmbroker status`)")
        return ArenaFull(
            f"{what}: the arena stayed full "
            f"({format_bytes(alloc.used)} of {format_bytes(alloc.capacity)} used, largest free block "
            f"{format_bytes(alloc.largest_free)}) until the timeout; consumers are not releasing "
            f"fast enough: release handles you no longer need, lower max_inflight or raise capacity"
        )

    def _retry_pending(self, now: float) -> None:
        keep = []
        for p in self.pending:
            try:
                if p.msg["op"] in ("alloc", "alloc_many"):
                    done = self._try_alloc(p.conn, p.msg)
                else:
                    done = self._try_reserve(p.conn, p.msg)
            except BrokerError as e:
                self.reply_error(p.conn, p.msg["rid"], e)
                continue
            if not done and now >= p.deadline:
                self.reply_error(p.conn, p.msg["rid"], self._full_error(p.msg))
            elif not done:
                keep.append(p)
        self.pending = keep

    # -- stats ------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        alloc = self.table.alloc
        now = time.monotonic()
        stages = []
        for i, st in enumerate(self.stages):
            workers = [{"pid": c.pid, "name": c.name, "device": c.device, "done": c.done,
                        "busy": c.busy / max(1e-9, now - c.started)}
                       for c in self.conns.values() if c.stage == i]
            span = (st.last - st.first) if st.last > st.first else 0.0
            stages.append({"name": st.name, "batch": st.batch, "queue": len(st.queue),
                           "inflight": st.inflight, "done": st.done, "failed": st.failed,
                           "busy": st.busy, "copied": st.copied, "rate": st.done / span if span else 0.0,
                           "workers": workers})
        return {"capacity": alloc.capacity, "used": alloc.used, "peak": alloc.peak,
                "free": alloc.free_bytes, "largest_free": alloc.largest_free,
                "objects": len(self.table.objects), "blocks": alloc.blocks,
                "clients": len(self.conns), "names": len(self.table.names),
                "pending": len(self.pending), "grants": len(self.grants), "inflight_items": self.inflight_items,
                "stages": stages, "counters": dict(self.counters),
                "requests": dict(self.requests), "pid": os.getpid(),
                "uptime": time.time() - self.started, "memfd": self.region.name}

    def close(self) -> None:
        for conn in list(self.conns.values()):
            if conn.sock is not None:
                conn.sock.close()
        for sock, _ in self.unkeyed.values():
            sock.close()
        self.listener.close()
        self.router.close(0)
        self.pub.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        self.region.close()
        self.rundir.remove()


def _stop_on_signals(server: BrokerServer) -> dict[int, Any]:
    def stop(_sig: int, _frame: Any) -> None:
        server.stopping = True  # a flag only; the loop notices within its poll timeout

    return {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}


def run_broker(capacity: int, endpoint: str | None = None, events: str | None = None,
               stages: list[dict[str, Any]] | None = None, max_inflight: int = 0,
               announce: Any = None, parent_pid: int = 0, metrics_port: int | None = None,
               curve: dict[str, str] | None = None, hwm: int = 10_000) -> int:
    """Run a broker in this process until SIGTERM/SIGINT or a shutdown request."""
    swept = cleanup()
    if swept:
        log.info("removed %d runtime directories of brokers that are gone", len(swept))
    rundir = RunDir()
    try:
        server = BrokerServer(capacity, rundir, endpoint, events, hwm=hwm, curve=curve)
    except BaseException as e:
        rundir.remove()
        if announce:
            announce({"error": f"{type(e).__name__}: {e}"})
        raise
    server.parent_pid = parent_pid
    stop_metrics = None
    if metrics_port is not None:
        from .metrics import serve_metrics

        server.metrics, stop_metrics = serve_metrics(metrics_port)
        server.metrics.update(server.stats())
    previous = _stop_on_signals(server)
    try:
        if stages:
            server.configure(stages, max_inflight)
        rundir.write_info(server.info())
        if announce:
            announce(server.info())
        server.serve()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()
        if stop_metrics is not None:
            stop_metrics()
        log.info("broker pid %d stopped", os.getpid())
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m broker.server``: what ``Broker()`` starts; prints one JSON line when ready."""
    ap = argparse.ArgumentParser(prog="python -m broker.server")
    ap.add_argument("--capacity", type=int, required=True)
    ap.add_argument("--endpoint")
    ap.add_argument("--events")
    ap.add_argument("--stages", help="JSON list of stage maps")
    ap.add_argument("--max-inflight", type=int, default=0)
    ap.add_argument("--log-level", default="WARNING")
    ap.add_argument("--log-json", action="store_true")
    ap.add_argument("--hwm", type=int, default=10_000, help="ZeroMQ high-water mark per peer")
    ap.add_argument("--curve-secret", help="the broker's CURVE .key_secret file")
    ap.add_argument("--curve-authorized", help="directory of authorized client public keys")
    ap.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on 127.0.0.1:PORT")
    ap.add_argument("--parent-pid", type=int, default=0, help="stop when this process is gone")
    args = ap.parse_args(argv)
    from .logs import setup_logging

    setup_logging(args.log_level, args.log_json, role="broker")

    def announce(info: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(info) + "\n")
        sys.stdout.flush()

    try:
        return run_broker(args.capacity, args.endpoint, args.events,
                          json.loads(args.stages) if args.stages else None,
                          args.max_inflight, announce, args.parent_pid,
                          args.metrics_port,
                          {"secret": args.curve_secret, "authorized": args.curve_authorized}
                          if args.curve_secret else None, args.hwm)
    except (MemoryError, OSError, BrokerError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
