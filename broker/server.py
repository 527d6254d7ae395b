"""The broker process: the handler tables that join the transport to the object table and the scheduler.

::

    Transport ──payload──▶ decode ──▶ handlers[kind](session, msg) ──▶ reply
                                       │            │
                                 ObjectTable    Scheduler ──outbox──▶ tasks, failures
                                 (leases,       (stages, batches,
                                  grants)        credits, retries)

Two tables map message kinds to handlers, as Dask distributed's scheduler
does: ``handlers`` answer with exactly one reply, ``stream_handlers``
(``drop``, ``grant``, ``claim``, ``commit``, ``cancel``, ``done``) answer
only when they refuse, with a ``late`` error the client raises at its next
request. ``hello``, ``ping`` and
``stats`` are served to anyone; everything else needs a client that said
hello and fetched the arena's descriptor, because its leases are tied to
that connection.

A request for arena space that cannot be served now is parked and retried
whenever memory is freed, downstream stages first, until its timeout
(``wait_timeout`` when it names none); then it gets ``ArenaFull``.

Liveness: each client holds a Unix-socket connection to the broker (the one
the arena's descriptor came through). The kernel closes it when the client
dies, however it dies; the broker then drops the client's leases and
re-queues the tasks it held (at-least-once; the driver de-duplicates). The
grants a client made are the one thing that outlives it, by design, until
claimed or until their ttl (at most an hour) passes.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import msgspec
import numpy as np

from .arena import SharedRegion, check_capacity
from .errors import ArenaFull, BadRequest, BrokerError, format_bytes
from .holds import fence_available
from .protocol import (
    MAX_MESSAGE,
    REDELIVER_MAX,
    RING_GROUP_MAX,
    RING_PREFIX,
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
    Error,
    Fail,
    Failure,
    Grant,
    HandleReply,
    HandlesReply,
    Hello,
    Lookup,
    Message,
    Ok,
    Ping,
    ProtocolError,
    Publish,
    Published,
    QueueInfo,
    QueueOpen,
    Register,
    Registered,
    Release,
    Released,
    Reserve,
    Shutdown,
    StageSettings,
    Stats,
    StatsReply,
    Task,
    Welcome,
    decode,
    encode,
    ring_name,
)
from .queue import queue_words, task_slot_words
from .queues import Queues
from .rundir import RunDir, cleanup
from .scheduler import Scheduler, ring_size
from .table import ObjectTable
from .transport import Link, Peer, Transport
from .waiting import Parked, Waiting

__all__ = ["BrokerServer", "run_broker", "main", "DEFAULT_WAIT"]

log = logging.getLogger("shmbroker.broker")

DEFAULT_WAIT = 60.0  # seconds a request may wait for arena space when it names no timeout
# Released blocks are freed in batches (``ObjectTable.reclaim``: two scans of the hold tables
# and a membarrier, 17-46 us for one block on the reference VM, more under load; about a fifth
# of the broker's CPU in a 4 KiB pipeline when it ran at every loop turn): once RECLAIM_BLOCKS
# of them wait, once the oldest has waited RECLAIM_AFTER s, or at once while a request waits for
# memory. Soon enough that allocations still land on blocks the processes have touched (a block
# new to a process costs page faults).
RECLAIM_BLOCKS, RECLAIM_AFTER = 8, 0.002
SOURCE_PRIORITY = -1  # a parked reservation of stage 0 (stage s parks at -s - 1; allocations at 0)


@dataclass(eq=False, slots=True)
class Session:
    """A client that said hello."""

    cid: int
    name: str
    pid: int
    role: str
    link: Link


class BrokerServer:
    """The broker process's state and loop. ``serve()`` runs until stopped."""

    def __init__(self, capacity: int, rundir: RunDir, endpoint: str | None = None,
                 events: str | None = None, hwm: int = 10_000, curve: dict[str, str] | None = None,
                 wait_timeout: float = DEFAULT_WAIT) -> None:
        check_capacity(capacity)
        self.rundir = rundir
        self.token = rundir.token
        self.wait_timeout = wait_timeout
        self.region = SharedRegion.create(capacity, self.token)
        try:
            self.transport = Transport(rundir, self.region, self.on_message, self.on_close,
                                       endpoint, events, hwm, curve)
        except BaseException:
            self.region.close()
            raise
        # holds in shared memory need the heavy barrier; without it clients take leases by message
        self.table = ObjectTable(self.region.capacity, self.token,
                                 buffer=self.region.buffer if fence_available() else None)
        self.scheduler = Scheduler(self.table, waiting=lambda: self.waiting.downstream())
        self.sessions: dict[int, Session] = {}
        self.address = np.frombuffer(self.region.buffer, dtype=np.uint8).ctypes.data
        self.queues = Queues(self.table.region, self.address)
        self.waiting = Waiting()
        self._next_cid = 1
        self.stopping = False
        self.started = time.time()
        self.parent_pid = 0
        self.metrics: Any = None
        self._metrics_at = 0.0
        self.counters: collections.Counter[str] = collections.Counter()
        self.requests: collections.Counter[str] = collections.Counter()  # requests served, by kind
        # kinds anyone may send (the peer may not have said hello)
        self.open_handlers: dict[type[Message], Callable[[Peer, Any], Message | None]] = {
            Hello: self.hello, Ping: lambda _p, m: Ok(rid=m.rid),
            Stats: lambda _p, m: StatsReply(rid=m.rid, stats=self.stats())}
        # request -> exactly one reply (None: parked, answered later)
        self.handlers: dict[type[Message], Callable[[Session, Any], Message | None]] = {
            Alloc: self.alloc, AllocMany: self.alloc_many, Acquire: self.acquire,
            AcquireMany: self.acquire_many, Release: self.release, Publish: self.publish,
            Lookup: self.lookup, ConfigurePipeline: self.configure_pipeline, Register: self.register,
            Reserve: self.reserve, Fail: self.fail, Eof: self.eof, Shutdown: self.shutdown,
            QueueOpen: self.queue_open}
        # no reply unless refused (a ``late`` error)
        self.stream_handlers: dict[type[Message], Callable[[Session, Any], None]] = {
            Drop: self.drop, Grant: self.grant, Claim: self.claim, Commit: self.commit,
            Cancel: self.cancel, Done: self.done, Failure: self.failure}

    @property
    def endpoint(self) -> str:
        return self.transport.endpoint

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "endpoint": self.transport.endpoint, "events": self.transport.events,
                "capacity": self.table.alloc.capacity, "token": self.token,
                "fd_path": self.transport.fd_path, "memfd": self.region.name, "started": self.started}

    # -- messages in and out ----------------------------------------------------------------------
    def on_message(self, peer: Peer, payload: bytes) -> None:
        """Decode and handle one request; any error becomes the reply."""
        try:
            msg = decode(payload)
        except ProtocolError as e:
            self.counters["bad_messages"] += 1
            return self.reply(peer, Error(code="BadRequest", message=str(e)))
        kind = type(msg)
        self.requests[msg.kind] += 1
        late = kind in self.stream_handlers
        used, inflight = self.table.alloc.used, self.scheduler.inflight_items
        try:
            answer = self._handle(peer, kind, msg)
        except BrokerError as e:
            answer = self._error(msg.rid, e, late)
        except Exception as e:  # a bug must not take the broker down; report it
            log.exception("error handling %s", msg.kind)
            answer = self._error(msg.rid, BrokerError(f"internal error: {e!r}"), late)
        if answer is not None:
            self.reply(peer, answer)
        self.flush_outbox()
        self.maybe_reclaim()
        if self.waiting.count and (self.table.alloc.used < used or
                                   self.scheduler.inflight_items < inflight):
            self.retry_waiting()  # memory was freed, or the source's gate opened

    def _handle(self, peer: Peer, kind: type[Message], msg: Message) -> Message | None:
        open_handler = self.open_handlers.get(kind)
        if open_handler is not None:
            return open_handler(peer, msg)
        if not isinstance(peer, Link):
            raise BadRequest(f"{msg.kind}: say hello first (unknown client)")
        session = self.sessions.get(peer.cid)
        if session is None or peer.dead:
            return None  # a client being dropped: what it still sent is moot
        if peer.sock is None:  # leases are reclaimed when that connection closes: no lease without it
            raise BadRequest(f"{msg.kind}: fetch the arena's descriptor from "
                             f"{self.transport.fd_path} first")
        handler = self.handlers.get(kind)
        if handler is not None:
            return handler(session, msg)
        stream = self.stream_handlers.get(kind)
        if stream is None:
            raise BadRequest(f"{msg.kind!r} is not a request")
        stream(session, msg)
        return None

    @staticmethod
    def _error(rid: int, err: BrokerError, late: bool = False) -> Error:
        """``late``: the error of a message that gets no reply; the client raises it at its
        next request instead of taking it as that request's answer."""
        return Error(rid=rid, code=type(err).__name__, message=str(err), late=late)

    def reply(self, to: Peer | Session, msg: Message) -> None:
        payload = encode(msg)
        if len(payload) > MAX_MESSAGE:  # a client cannot take it: say so instead
            payload = encode(self._error(msg.rid, BrokerError(
                f"the reply of {len(payload)} bytes exceeds the {MAX_MESSAGE} byte limit; ask for less")))
        self.transport.send(to.link if isinstance(to, Session) else to, payload)

    def flush_outbox(self) -> None:
        outbox = self.scheduler.outbox
        if not outbox:
            return
        self.scheduler.outbox = []
        for cid, msg in outbox:
            session = self.sessions.get(cid)
            if session is not None:
                self.transport.send(session.link, encode(msg))

    def on_close(self, link: Link, why: str) -> None:
        """Forget a client: release its leases, re-queue its tasks, cancel its reservations."""
        session = self.sessions.pop(link.cid, None)
        self.transport.forget(link, why)
        if session is None:
            return
        slot = self.table.slots.get(session.cid)
        if slot is not None:  # before its slot is closed (and may be reused)
            self._given_back(self.queues.gone(slot), session.pid)
        leases = self.table.drop_client(session.cid)
        tasks = self.scheduler.drop(session.cid)
        self.waiting.forget(session)
        log.info("client %s (pid %d) gone: %s; %d leases, %d tasks in flight", session.name,
                 session.pid, why, leases, tasks)
        self.flush_outbox()
        if self.waiting.count:
            self.retry_waiting()

    def maybe_reclaim(self, now: float | None = None) -> int:
        """Free released blocks if enough wait, the oldest waited long enough, or memory is
        waited for (RECLAIM_BLOCKS); returns how many were freed."""
        table = self.table
        if not table.retiring:
            return 0
        if len(table.retiring) >= RECLAIM_BLOCKS or self._memory_waited() or \
                (now if now is not None else time.monotonic()) - table.retiring_since >= RECLAIM_AFTER:
            self.counters["reclaims"] += 1
            return table.reclaim()
        return 0

    def _memory_waited(self) -> bool:
        """Whether a worker's reservation or an allocation waits for memory. The source's
        reservations (priority -1) are left to the timer: held back by ``max_inflight`` they wait
        for items to leave, which freeing blocks does not bring, and by the half-arena rule a few
        ms more cost nothing (two groups are in flight)."""
        return any(priority != SOURCE_PRIORITY for priority in self.waiting.queues)

    # -- waiting for space ------------------------------------------------------------------------
    def park(self, session: Session, msg: Any, priority: int, attempt: Callable[[], Message | None],
             error: Callable[[], ArenaFull], memory: bool = True) -> Message | None:
        """Answer now if freeing the retiring blocks makes room; else wait for room.
        ``memory=False``: the request waits for something else (the source's ``max_inflight``),
        which freeing blocks does not bring."""
        if memory and self.table.reclaim():
            answer = attempt()
            if answer is not None:
                return answer
        wait = self.wait_timeout if msg.timeout is None else msg.timeout
        if not math.isfinite(wait):
            raise BadRequest(f"{msg.kind}: timeout must be a finite number of seconds, got {msg.timeout!r}")
        if wait <= 0:
            raise error()
        self.waiting.add(priority, Parked(time.monotonic() + wait, session, msg, attempt, error))
        return None

    def _answer_parked(self, p: Parked, answer: Message | BrokerError) -> None:
        if isinstance(answer, BrokerError):
            answer = self._error(p.msg.rid, answer)
        self.reply(p.session, answer)

    def retry_waiting(self, expired_only: bool = False) -> None:
        self.waiting.sweep(time.monotonic(), self._answer_parked, expired_only)
        self.flush_outbox()

    def _alloc_full(self, what: str) -> ArenaFull:
        st = self.table.stats()
        return ArenaFull(
            f"{what}: the arena stayed full ({format_bytes(st['used'])} of "
            f"{format_bytes(st['capacity'] - st['control'])} used, largest free block "
            f"{format_bytes(st['largest_free'])}) until the timeout; consumers are not releasing "
            f"fast enough: release handles you no longer need, lower max_inflight or raise capacity")

    # -- the object table ---------------------------------------------------------------------------
    def hello(self, peer: Peer, msg: Hello) -> Message:
        identity = peer.identity if isinstance(peer, Link) else peer
        old = self.transport.links.get(identity)
        if old is not None:
            if old.unix:
                raise BadRequest("hello: this client is already connected")
            self.on_close(old, "it said hello again")
        cid = self._next_cid
        self._next_cid += 1
        link = self.transport.new_link(identity, cid)
        self.sessions[cid] = Session(cid, msg.name, msg.pid, msg.role, link)
        slot = self.table.add_client(cid, msg.pid)
        return Welcome(rid=msg.rid, cid=cid, key=link.key, fd_path=self.transport.fd_path,
                       capacity=self.table.alloc.capacity, broker=self.token, slot=slot)

    def alloc(self, s: Session, msg: Alloc) -> Message | None:
        def attempt() -> Message | None:
            h = self.table.alloc_for(s.cid, msg.nbytes, msg.dtype, msg.shape)
            return None if h is None else HandleReply(rid=msg.rid, handle=h)

        answer = attempt()
        if answer is None:
            answer = self.park(s, msg, 0, attempt, lambda: self._alloc_full(f"alloc of {msg.dtype}{msg.shape}"))
        return answer

    def alloc_many(self, s: Session, msg: AllocMany) -> Message | None:
        def attempt() -> Message | None:
            hs = self.table.alloc_many(s.cid, msg.nbytes, msg.count)
            return HandlesReply(rid=msg.rid, handles=hs) if hs else None

        answer = attempt()
        if answer is None:
            answer = self.park(s, msg, 0, attempt,
                               lambda: self._alloc_full(f"alloc_many of {msg.nbytes} B blocks"))
        return answer

    def acquire(self, s: Session, msg: Acquire) -> Message:
        return HandleReply(rid=msg.rid, handle=self.table.acquire(s.cid, msg.oid, msg.gen))

    def acquire_many(self, s: Session, msg: AcquireMany) -> Message:
        return HandlesReply(rid=msg.rid, handles=self.table.acquire_many(s.cid, msg.refs))

    def release(self, s: Session, msg: Release) -> Message:
        return Released(rid=msg.rid, stale=self.table.release(s.cid, msg.refs))

    def drop(self, s: Session, msg: Drop) -> None:
        stale = self.table.release(s.cid, msg.refs)
        if stale:
            self.counters["stale_drops"] += stale

    def grant(self, s: Session, msg: Grant) -> None:
        if not self.table.grant(s.cid, msg.oid, msg.gen, msg.token, msg.uses, msg.ttl):
            raise BadRequest(f"grant: this client has more than {self.table.grants_of[s.cid] - 1} "
                             f"grants nobody claimed yet (this one was kept all the same); grant "
                             f"fewer, or with a shorter ttl")

    def claim(self, s: Session, msg: Claim) -> None:
        self.table.claim(s.cid, msg.oid, msg.gen, msg.token)

    def publish(self, s: Session, msg: Publish) -> Message:
        handle = self.table.publish(s.cid, msg.name, msg.oid, msg.gen, msg.dtype, msg.shape)
        self.transport.publish(b"publish", encode(Published(name=msg.name, handle=handle)))
        return Ok(rid=msg.rid)

    def lookup(self, s: Session, msg: Lookup) -> Message:
        return HandleReply(rid=msg.rid, handle=self.table.lookup(msg.name))

    def queue_open(self, s: Session, msg: QueueOpen) -> Message:
        """The named queue's ring, made on first use (it lives as long as the broker)."""
        if msg.name.startswith(RING_PREFIX) and msg.name not in self.queues.by_name:
            raise BadRequest(f"queue: names that start with {RING_PREFIX!r} are a pipeline's stage queues "
                             f"(this broker's tasks {'travel in rings' if self.scheduler.rings else 'are messages'})")
        q = self.queues.open(msg.name, msg.maxsize, msg.redeliver,
                             lambda n: self._new_block(n, f"queue {msg.name!r} of {msg.maxsize} slots"))
        return QueueInfo(rid=msg.rid, offset=q.offset, maxsize=q.maxsize, slot_words=q.slot_words)

    def _new_block(self, nbytes: int, what: str) -> int:
        """The data offset of a new block of ``nbytes`` that lives as long as the broker."""
        obj = self.table.new(nbytes, "|u1", (nbytes,))
        if obj is None and self.table.reclaim():
            obj = self.table.new(nbytes, "|u1", (nbytes,))
        if obj is None:
            raise self._alloc_full(what)
        return obj.offset

    def shutdown(self, s: Session, msg: Shutdown) -> Message:
        self.stopping = True
        return Ok(rid=msg.rid)

    # -- the pipeline -------------------------------------------------------------------------------
    def configure(self, stages: list[StageSettings], max_inflight: int, pipeline: str = "",
                  rings: bool = False) -> list[str]:
        # the stages' queues with tasks in rings (and the sink's), made once and checked first:
        # a pipeline refused for them is not half set up
        size = ring_size(max_inflight)
        slot = task_slot_words(max(RING_GROUP_MAX, *(s.batch for s in stages)))
        if rings and not self.scheduler.stages:
            need = (len(stages) + 1) * queue_words(size, 1, slot) * 8
            if need > self.table.alloc.capacity // 8:
                raise BadRequest(f"pipeline: the stages' queues of tasks in rings would take "
                                 f"{format_bytes(need)}, more than 1/8 of the "
                                 f"{format_bytes(self.table.alloc.capacity)} arena (max_inflight "
                                 f"{max_inflight} slots each); lower max_inflight or the batch, or raise "
                                 f"capacity")
        names = self.scheduler.configure(stages, max_inflight, pipeline, rings)
        if self.scheduler.rings and ring_name(0) not in self.queues.by_name:
            for s, st in enumerate(self.scheduler.stages):
                # a task holds at most a group (the largest batch, or RING_GROUP_MAX items) and its
                # results; a task whose workers died comes back, the one that gets it after
                # retries + 1 deaths reports its items failed (``workers.rings``), the queue drops
                # it only if that one dies too
                redeliver = min(REDELIVER_MAX, st.retries + 1) if s < len(stages) else 0
                self.queues.open(ring_name(s), size, redeliver, lambda n: self._new_block(n, "a stage's queue"),
                                 slot)
        return names

    def configure_pipeline(self, s: Session, msg: ConfigurePipeline) -> Message:
        return Configured(rid=msg.rid, stages=self.configure(msg.stages, msg.max_inflight, msg.pipeline,
                                                             msg.rings))

    def register(self, s: Session, msg: Register) -> Message:
        stage = self.scheduler.register(s.cid, s.pid, s.name, msg.stage, msg.credits, msg.device,
                                        msg.pinned, msg.pipeline)
        return Registered(rid=msg.rid, stage=stage, rings=self.scheduler.rings)

    def failure(self, s: Session, msg: Failure) -> None:
        """A worker of a pipeline whose tasks travel in rings gave up on items (it says whether
        the run must stop); the driver is told."""
        self.scheduler.reported(s.cid, msg)

    def _given_back(self, given: list[tuple[str, int, list[bytes]]], pid: int) -> None:
        """What the queues gave back after a client died (``Queues.gone``): for a stage's queue,
        the tasks re-queued are counted, and those dropped after their workers died holding them
        too often fail their items (reported to the driver; never lost without a word)."""
        for name, moved, dropped in given:
            stage = self.scheduler.ring_stage(name)
            if stage is None:
                continue
            self.scheduler.ring_requeued(stage, moved, pid)
            for data in dropped:
                try:
                    task = msgspec.msgpack.decode(data, type=Task)
                except (msgspec.DecodeError, msgspec.ValidationError) as e:
                    log.error("queue %r: a dropped task that does not decode: %s", name, e)
                    continue
                self.scheduler.ring_dropped(stage, task.items, pid)

    def reserve(self, s: Session, msg: Reserve) -> Message | None:
        self.scheduler.check_reserve(msg)
        answer: Message | None = self.scheduler.reserve(s.cid, msg)
        if answer is None:
            answer = self.park(s, msg, -msg.stage - 1, lambda: self.scheduler.reserve(s.cid, msg),
                               lambda: self.scheduler.full_error(msg),
                               memory=not self.scheduler.inflight_gated(msg))
        return answer

    def commit(self, s: Session, msg: Commit) -> None:
        self.scheduler.commit(s.cid, msg.rsv)

    def cancel(self, s: Session, msg: Cancel) -> None:
        self.scheduler.cancel(s.cid, msg.rsv)

    def done(self, s: Session, msg: Done) -> None:
        self.scheduler.done(s.cid, msg)

    def fail(self, s: Session, msg: Fail) -> Message:
        self.scheduler.fail(s.cid, msg)
        return Ok(rid=msg.rid)

    def eof(self, s: Session, msg: Eof) -> Message:
        self.scheduler.set_eof()
        return Ok(rid=msg.rid)

    # -- the loop -----------------------------------------------------------------------------------
    def serve(self) -> None:
        log.info("broker pid %d serving %s, arena %s (%s)", os.getpid(), self.endpoint,
                 format_bytes(self.table.alloc.capacity), self.region.name)
        while not self.stopping:
            if self.parent_pid and os.getppid() != self.parent_pid:
                log.error("parent process %d is gone; stopping", self.parent_pid)
                break
            busy = self.waiting.count or self.scheduler.batches_open or self.table.retiring or \
                self.queues.later
            self.transport.poll(10 if busy else 500)
            self.tick()

    def tick(self) -> None:
        now = time.monotonic()
        if self.metrics is not None and now - self._metrics_at > 0.25:
            self.metrics.update(self.stats())
            self._metrics_at = now
        if self.waiting.count:
            self.retry_waiting(expired_only=True)  # the others were tried when memory was freed
        due = self.table.next_deadline
        if due is not None and due <= now:
            self.table.expire(now)
        if self.maybe_reclaim(now) and self.waiting.count:
            self.retry_waiting()
        if self.scheduler.batches_open:
            self.scheduler.tick(now)
        if self.queues.later:
            self._given_back(self.queues.retry(), 0)
        self.flush_outbox()

    def stats(self) -> dict[str, Any]:
        self.table.reclaim()  # "used" counts what is really in use
        counters = self.table.counters + self.scheduler.counters + self.counters
        counters["bad_messages"] += self.transport.bad_frames
        return {**self.table.stats(), "clients": len(self.sessions), "pending": self.waiting.count,
                "inflight_items": self.scheduler.inflight_items,
                "stages": self.scheduler.stats(self.queues.counters if self.scheduler.rings else None),
                "counters": dict(counters), "requests": dict(self.requests), "pid": os.getpid(),
                "sizes": {**self.table.sizes(), **self.scheduler.sizes(), "pending": self.waiting.count,
                          "sessions": len(self.sessions)},
                "uptime": time.time() - self.started, "memfd": self.region.name}

    def close(self) -> None:
        self.transport.close()
        self.region.close()
        self.rundir.remove()


def _stop_on_signals(server: BrokerServer) -> dict[int, Any]:
    def stop(_sig: int, _frame: Any) -> None:
        server.stopping = True  # a flag only; the loop notices within its poll timeout

    return {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}


def run_broker(capacity: int, endpoint: str | None = None, events: str | None = None,
               stages: list[StageSettings] | None = None, max_inflight: int = 0,
               announce: Any = None, parent_pid: int = 0, metrics_port: int | None = None,
               curve: dict[str, str] | None = None, hwm: int = 10_000,
               wait_timeout: float = DEFAULT_WAIT, pipeline: str = "", rings: bool = False) -> int:
    """Run a broker in this process until SIGTERM/SIGINT or a shutdown request."""
    swept = cleanup()
    if swept:
        log.info("removed %d runtime directories of brokers that are gone", len(swept))
    rundir = RunDir()
    try:
        server = BrokerServer(capacity, rundir, endpoint, events, hwm=hwm, curve=curve,
                              wait_timeout=wait_timeout)
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
    refused: BrokerError | None = None
    try:
        if stages:
            try:
                server.configure(stages, max_inflight, pipeline, rings)
            except BrokerError as e:  # the one who started this broker is told why (once the
                refused = e  # runtime directory is gone: it stops this process when told)
                raise
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
        if refused is not None and announce:
            announce({"error": f"{type(refused).__name__}: {refused}"})
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m broker.server``: what ``Broker()`` starts; prints one JSON line when ready."""
    ap = argparse.ArgumentParser(prog="python -m broker.server")
    ap.add_argument("--capacity", type=int, required=True)
    ap.add_argument("--endpoint")
    ap.add_argument("--events")
    ap.add_argument("--stages", help="JSON list of stage settings (name, batch, on_error, ...)")
    ap.add_argument("--max-inflight", type=int, default=0)
    ap.add_argument("--pipeline", default="", help="which pipeline the stages are (name@config-hash)")
    ap.add_argument("--rings", action="store_true", help="the stages' tasks travel in queues in the arena")
    ap.add_argument("--wait-timeout", type=float, default=DEFAULT_WAIT,
                    help="seconds a request waits for arena space when it names no timeout")
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
        stages = msgspec.json.decode(args.stages, type=list[StageSettings]) if args.stages else None
        return run_broker(args.capacity, args.endpoint, args.events, stages, args.max_inflight,
                          announce, args.parent_pid, args.metrics_port,
                          {"secret": args.curve_secret, "authorized": args.curve_authorized}
                          if args.curve_secret else None, args.hwm, args.wait_timeout, args.pipeline,
                          args.rings)
    except (MemoryError, OSError, BrokerError, msgspec.ValidationError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
