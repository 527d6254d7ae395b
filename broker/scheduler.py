"""The pipeline scheduler: stages, reservations, in-place batches, tasks, credits, retries, failures. No I/O.

How an item moves (every arrow is a handle; bytes move only where noted)::

    driver ──reserve(stage 0)──▶ a slot (or rows of a batch slot) is allocated
    driver writes the item into the slot           (copy 1: the source's write)
    driver ──commit──▶ Task(stage 0) ──▶ stage 0's queue
                                   │  dispatch to a worker with credit > 0
                                   ▼
    worker: view → torch.from_numpy → .to(device) → fn → reserve(stage 1)
    worker writes the result into the slot          (copy 2: the stage's write)
    worker ──done(task, rsvs)──▶ the input is released, the output committed
                                   ▼
                   queue[1] ... queue[S] (S = the sink) ──▶ driver ──done──▶ freed

A reservation for a batched stage gets rows of a ``[N, ...]`` batch slot, so
a batch is collated in place; it is dispatched when its N rows are committed,
or as a partial batch once nothing upstream can add to it.

The scheduler is driven by plain calls (one per message kind) and puts what
must be sent into ``outbox`` as ``(client id, message)``; the server sends
them. Tests drive it without sockets (``tests/test_scheduler.py``).

Attempts: a task carries how often its items were given out. A stage
failure (``on_error: retry``) and the death of the worker holding the task
each count one; past ``retries + 1`` attempts the items fail, fatally unless
the stage skips failures. A write that found no arena space in time
(``fail`` with ``arena``) is backpressure: the task goes back to the front of
its queue, no attempt is counted, and the driver is told the run is stuck.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec

from .errors import ArenaFull, BadRequest, BrokerError, format_bytes
from .protocol import (
    RING_PREFIX,
    Done,
    Fail,
    Failure,
    Layout,
    Message,
    OutSpec,
    Reserve,
    Reserved,
    StageSettings,
    Task,
    ring_name,
)
from .table import Obj, ObjectTable, array_nbytes

__all__ = ["Scheduler", "SINK", "ring_name", "ring_size"]

SINK = "__sink__"

# Small items of a stage that takes one item at a time travel several per task message (the worker
# calls the stage on each row, reserves their outputs with one request and reports them with one
# ``done``). How many (``_rows_per_task``): as many as the stage does in about TASK_SECONDS (its
# measured time per item; TASK_ITEMS_FIRST until it has finished a task), at most TASK_ITEMS, and
# at most TASK_BYTES and 1/TASK_ARENA_PART of the arena of input or of output (its last reported
# size). A slow stage gets one item per task, so items spread over its workers; a fast one 16, so
# the broker's two messages per task are paid once per 16 items. The sink (the driver) gets up to
# SINK_TASK_ITEMS and SINK_TASK_BYTES (and 1/TASK_ARENA_PART of the arena) per task. An eighth of
# the arena (a sixteenth until 2026-12-04): 1 MiB items in the 128 MiB arena of the benchmark then
# travel 16 per task instead of 8, and the broker's CPU per item fell by about a fifth (2 runs each
# way). Sink tasks of up to 16 MiB (4 MiB until then): the 4 MiB results of 16 MiB items go 4 per
# task, done messages per item 2.26 -> 1.40 (counted), the broker's CPU per item 1.30 -> 1.05 ms
# (one run each way).
TASK_ITEMS, TASK_BYTES, TASK_ITEMS_FIRST, TASK_SECONDS = 16, 16 << 20, 4, 0.02
SINK_TASK_ITEMS, SINK_TASK_BYTES = 16, 16 << 20
TASK_ARENA_PART = 8
RING_SLACK = 16  # stage queue slots beyond max_inflight + 1: room for tasks a killed worker left twice
KEPT_FAILURES = 10_000  # failure reports held for a driver that has not connected yet


def ring_size(max_inflight: int) -> int:
    """Slots of each stage's queue with tasks in rings: every task holds at least one of the at
    most ``max_inflight`` items in flight, so a put never waits for room a task in flight holds,
    and RING_SLACK more: a worker killed after it put its results on and before it released its
    input leaves that task in two queues at once (its items counted done downstream), and a put
    into a full queue then waits until its stage takes one."""
    return max_inflight + 1 + RING_SLACK


@dataclass(eq=False, slots=True)
class _Task:
    tid: int
    stage: int
    items: list[int]
    obj: Obj
    rows: int
    valid: list[int] | None = None
    attempts: int = 0
    each: bool = False  # rows of items for a stage that takes one at a time
    batched: bool = False  # rows of a batch slot
    out: int = 0  # the reservation made ahead for its outputs, while it is out with a worker


@dataclass(eq=False)
class _Batch:
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
    layout: Layout | None = None


@dataclass(eq=False, slots=True)
class _Segment:
    obj: Obj
    items: list[int]
    batch: _Batch | None = None
    row: int = 0


@dataclass(eq=False, slots=True)
class _Reservation:
    rsv: int
    stage: int
    segments: list[_Segment]


@dataclass(eq=False)
class _Stage:
    name: str
    batch: int = 0
    on_error: str = "fail"
    retries: int = 2
    batch_timeout: float = 0.05
    queue: collections.deque[_Task] = field(default_factory=collections.deque)
    batches: list[_Batch] = field(default_factory=list)
    inflight: int = 0
    reserved: int = 0
    done: int = 0
    failed: int = 0
    busy: float = 0.0
    copied: int = 0
    first: float = 0.0
    last: float = 0.0
    out_bytes: int = 0  # an item's result, as the stage's workers last said (``Done.next_out``)


@dataclass(eq=False)
class _Member:
    """A client as the scheduler sees it: reservations it holds; for a worker, its stage and tasks."""

    cid: int
    pid: int = 0
    name: str = ""
    stage: int = -1
    credits: int = 0
    device: str = ""
    pinned: bool = False
    tasks: dict[int, _Task] = field(default_factory=dict)
    reservations: dict[int, _Reservation] = field(default_factory=dict)
    next_out: OutSpec | None = None  # what the worker said its next task's items will need
    done: int = 0
    busy: float = 0.0
    started: float = 0.0


class Scheduler:
    """Stage queues and the tasks in flight of one broker's pipeline."""

    def __init__(self, table: ObjectTable, clock: Callable[[], float] = time.monotonic,
                 waiting: Callable[[], int] = lambda: 0) -> None:
        self.table = table
        self.clock = clock
        self.waiting = waiting  # how many workers' reservations the server holds until there is room
        self.stages: list[_Stage] = []
        self.members: dict[int, _Member] = {}
        self.max_inflight = 0
        self.pipeline = ""  # which pipeline this is, if the one who configured it said
        self.rings = False  # tasks travel in the stages' queues in the arena (see ``reported``)
        self.ring_deaths: dict[int, int] = {}  # stage -> the pid of its last worker that died holding tasks
        self.inflight_items = 0
        self.eof = False
        self.outbox: list[tuple[int, Message]] = []
        self.kept_failures: collections.deque[Failure] = collections.deque(maxlen=KEPT_FAILURES)
        self.counters: collections.Counter[str] = collections.Counter()
        self._next_id = 1

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    def member(self, cid: int) -> _Member:
        m = self.members.get(cid)
        if m is None:
            m = self.members[cid] = _Member(cid, started=self.clock())
        return m

    # -- set-up ---------------------------------------------------------------------------------
    def configure(self, stages: list[StageSettings], max_inflight: int, pipeline: str = "",
                  rings: bool = False) -> list[str]:
        """Set the stages (once; a broker runs one pipeline), or check a driver's list matches."""
        self._check_pipeline("pipeline", pipeline)
        if self.stages and rings != self.rings:
            raise BadRequest(f"pipeline: this broker's tasks travel {'in rings' if self.rings else 'as messages'}"
                             f", not {'in rings' if rings else 'as messages'} (broker.rings of its config)")
        if rings and not max_inflight:
            raise BadRequest("pipeline: tasks in rings need max_inflight (the rings' size follows it)")
        self.pipeline = self.pipeline or pipeline
        if self.stages:
            names = [s.name for s in self.stages[:-1]]
            if names != [s.name for s in stages]:
                raise BadRequest(f"pipeline: this broker already runs stages {names}, "
                                 f"not {[s.name for s in stages]}")
            self.max_inflight = max_inflight or self.max_inflight
        else:
            if SINK in [s.name for s in stages]:
                raise BadRequest(f"pipeline: {SINK!r} is the sink's name, not a stage's")
            self.stages = [_Stage(s.name, s.batch if s.batch > 1 else 0, s.on_error, s.retries,
                                  s.batch_timeout) for s in stages]
            self.stages.append(_Stage(SINK))
            self.max_inflight = max_inflight
            self.rings = rings
        self.eof = False
        return [s.name for s in self.stages]

    def register(self, cid: int, pid: int, name: str, stage: str, credits: int, device: str,
                 pinned: bool, pipeline: str = "") -> int:
        self._check_pipeline("register", pipeline)
        names = [s.name for s in self.stages]
        if stage not in names:
            raise BadRequest(f"register: no stage {stage!r}; this pipeline has {names[:-1]}")
        m = self.member(cid)
        m.pid, m.name, m.stage, m.credits, m.device, m.pinned = pid, name, names.index(stage), \
            credits, device, pinned
        if m.stage == len(self.stages) - 1:
            while self.kept_failures:  # reports made while no driver was connected
                self.outbox.append((cid, self.kept_failures.popleft()))
        self.dispatch()
        return m.stage

    def _check_pipeline(self, what: str, pipeline: str) -> None:
        """A client that says which pipeline it belongs to must belong to this broker's."""
        if pipeline and self.pipeline and pipeline != self.pipeline:
            raise BadRequest(f"{what}: this broker runs pipeline {self.pipeline!r} (stages "
                             f"{[s.name for s in self.stages[:-1]]}), not {pipeline!r} (another "
                             f"pipeline, or other stage code, args, dtypes or batch sizes); use the "
                             f"config this broker was started with, or the endpoint of the right broker")

    def set_eof(self) -> None:
        self.eof = True

    # -- reservations -------------------------------------------------------------------------------
    def check_reserve(self, msg: Reserve) -> None:
        """What makes a reservation invalid whatever the arena holds (raised at once)."""
        if not 0 <= msg.stage < len(self.stages):
            raise BadRequest(f"reserve: stage {msg.stage} out of range (0..{len(self.stages) - 1})")
        array_nbytes(msg.dtype, msg.shape)
        if msg.layout is not None and (msg.dtype != "|u1" or len(msg.shape) != 1):
            raise BadRequest("reserve: a slot with a layout is a row of bytes (dtype |u1, one dimension)")

    def inflight_gated(self, msg: Reserve) -> bool:
        """The source's reservation waits for items to leave the pipeline (``max_inflight``),
        not for memory."""
        return msg.stage == 0 and bool(self.max_inflight and self.inflight_items) and \
            self.inflight_items + len(msg.items) > self.max_inflight

    def source_gated(self, msg: Reserve) -> bool:
        """The source may hold at most ``max_inflight`` items and half the arena."""
        if msg.stage != 0:  # only sources write into stage 0; workers write downstream
            return False
        if self.inflight_gated(msg):
            return True
        alloc = self.table.alloc
        # by what is used now, not counting this request: an item of more than half the arena
        # must still get in (the driver keeps its groups to 1/8 of the arena, so the source
        # overshoots half by little)
        return bool(self.inflight_items) and alloc.used * 2 > alloc.capacity

    def reserve(self, cid: int, msg: Reserve) -> Reserved | None:
        """Slots for ``msg.items``; None while the arena (or the source's gate) has no room."""
        if self.source_gated(msg):
            return None
        st = self.stages[msg.stage]
        shape = tuple(msg.shape)
        segs = self._segments_batched(st, msg.items, shape, msg.dtype, msg.layout) if st.batch else \
            self._segments_plain(msg.items, shape, msg.dtype, msg.layout)
        if segs is None:
            return None
        rsv = _Reservation(self._id(), msg.stage, segs)
        self.member(cid).reservations[rsv.rsv] = rsv
        st.reserved += len(msg.items)
        if msg.stage == 0:
            self.inflight_items += len(msg.items)
        return Reserved(rid=msg.rid, rsv=rsv.rsv,
                        segments=[(self.table.handle(g.obj), len(g.items)) for g in segs])

    def full_error(self, msg: Reserve) -> ArenaFull:
        alloc = self.table.alloc
        what = f"reserve of {len(msg.items)} x {msg.dtype}{msg.shape}"
        if msg.stage == 0 and self.max_inflight and \
                self.inflight_items + len(msg.items) > self.max_inflight:
            return ArenaFull(
                f"{what}: {self.inflight_items} items stayed in flight (max_inflight "
                f"{self.max_inflight}) until the timeout; the stages or the sink are not keeping up "
                f"(is a stage without workers? `shmbroker status`)")
        if msg.stage == 0 and self.inflight_items and alloc.used * 2 > alloc.capacity:
            return ArenaFull(
                f"{what}: the source may fill at most half the arena, and items in the pipeline "
                f"held {format_bytes(alloc.used)} of {format_bytes(alloc.capacity)} until the "
                f"timeout; the stages or the sink are not keeping up (`shmbroker status`): raise "
                f"capacity or wait_timeout, or lower max_inflight")
        return ArenaFull(
            f"{what}: the arena stayed full "
            f"({format_bytes(alloc.used)} of {format_bytes(alloc.capacity)} used, largest free block "
            f"{format_bytes(alloc.largest_free)}) until the timeout; consumers are not releasing "
            f"fast enough: release handles you no longer need, lower max_inflight or raise capacity")

    def _segments_plain(self, items: list[int], shape: tuple[int, ...], dtype: str,
                        layout: Layout | None) -> list[_Segment] | None:
        full = (len(items), *shape)
        obj = self.table.new(array_nbytes(dtype, full), dtype, full)
        if obj is None:
            return None
        obj.layout = layout
        return [_Segment(obj, list(items))]

    def _segments_batched(self, st: _Stage, items: list[int], shape: tuple[int, ...],
                          dtype: str, layout: Layout | None) -> list[_Segment] | None:
        rowbytes = array_nbytes(dtype, shape)
        fits = [b for b in st.batches
                if b.shape == shape and b.dtype == dtype and b.layout == layout and not b.closed]
        room = sum(len(b.holes) + b.size - b.assigned for b in fits)
        new: list[_Batch] = []
        while room + len(new) * st.batch < len(items):
            obj = self.table.new(rowbytes * st.batch, dtype, (st.batch, *shape))
            if obj is None:
                for b in new:
                    self.table.decref(b.obj)
                return None
            obj.layout = layout
            new.append(_Batch(obj, shape, dtype, st.batch, rowbytes, [None] * st.batch,
                              self.clock(), layout=layout))
        for b in st.batches:  # a reservation of another shape closes the open batches
            if b not in fits and not b.closed:
                b.closed = True
        st.batches.extend(new)
        segs, todo = [], collections.deque(items)
        for b in fits + new:
            while b.holes and todo:
                segs.append(self._rows(b, b.holes.pop(), [todo.popleft()]))
            n = min(b.size - b.assigned, len(todo))
            if n:
                segs.append(self._rows(b, b.assigned, [todo.popleft() for _ in range(n)]))
                b.assigned += n
        assert not todo
        return segs

    def _rows(self, b: _Batch, row: int, items: list[int]) -> _Segment:
        for i, item in enumerate(items):
            b.items[row + i] = item
        obj = self.table.view(b.obj, b.obj.offset + row * b.rowbytes, b.dtype, (len(items), *b.shape))
        return _Segment(obj, items, b, row)

    def _take(self, cid: int, rsv: int, op: str) -> _Reservation:
        r = self.member(cid).reservations.pop(rsv, None)
        if r is None:
            raise BadRequest(f"{op}: no open reservation {rsv}")
        return r

    def commit(self, cid: int, rsv: int) -> None:
        self._commit(self._take(cid, rsv, "commit"))
        self.dispatch()

    def cancel(self, cid: int, rsv: int) -> None:
        """Give back an open reservation unwritten (its rows become holes of their batch)."""
        self._cancel(self._take(cid, rsv, "cancel"))

    def _commit(self, rsv: _Reservation) -> None:
        st = self.stages[rsv.stage]
        sink = rsv.stage == len(self.stages) - 1
        for seg in rsv.segments:
            st.reserved -= len(seg.items)
            if seg.batch is None:
                rowbytes = seg.obj.nbytes // max(1, len(seg.items))
                st.queue.extend(self._row_tasks(rsv.stage, seg.obj, seg.items,
                                                self._rows_per_task(rsv.stage, rowbytes, sink)))
            else:
                b = seg.batch
                b.committed += len(seg.items)
                if b.assigned == b.size:
                    b.closed = True
                if b.closed and b.committed + len(b.holes) == b.assigned:
                    self._batch_ready(rsv.stage, b)
            self.table.decref(seg.obj)

    def _cancel(self, rsv: _Reservation) -> None:
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

    def _rows_per_task(self, s: int, rowbytes: int, sink: bool) -> int:
        """How many one-item rows of ``rowbytes`` a task of stage ``s`` carries (see TASK_ITEMS)."""
        room = self.table.alloc.capacity // TASK_ARENA_PART
        if sink:
            return max(1, min(SINK_TASK_ITEMS, min(SINK_TASK_BYTES, room) // max(1, rowbytes)))
        st = self.stages[s]
        items = TASK_ITEMS_FIRST if not st.done or st.busy <= 0 else int(TASK_SECONDS * st.done / st.busy)
        return max(1, min(TASK_ITEMS, items, min(TASK_BYTES, room) // max(1, rowbytes, st.out_bytes)))

    def _row_tasks(self, s: int, obj: Obj, items: list[int], per: int, attempts: int = 0) -> list[_Task]:
        """Tasks for the rows of ``obj`` (one item each): a view per task, ``per`` rows at most."""
        rowshape = obj.shape[1:]
        rowbytes = obj.nbytes // max(1, len(items))
        tasks = []
        for i in range(0, len(items), per):
            k = min(per, len(items) - i)
            view = self.table.view(obj, obj.offset + i * rowbytes, obj.dtype,
                                   rowshape if k == 1 else (k, *rowshape))
            tasks.append(_Task(self._id(), s, items[i:i + k], view, k, attempts=attempts, each=k > 1))
        return tasks

    def _batch_ready(self, s: int, b: _Batch) -> None:
        st = self.stages[s]
        st.batches.remove(b)
        valid = [r for r in range(b.assigned) if b.items[r] is not None]
        if not valid:
            self.table.decref(b.obj)
            return
        st.queue.append(_Task(self._id(), s, [b.items[r] for r in valid], b.obj,  # type: ignore[misc]
                              b.assigned, None if len(valid) == b.assigned else valid, batched=True))

    # -- dispatch -----------------------------------------------------------------------------------
    def _upstream_idle(self, s: int) -> bool:
        return all(not st.queue and not st.inflight and not st.reserved and not st.batches
                   for st in self.stages[:s])

    def tick(self, now: float) -> None:
        """Send batches that can take no more rows: closed, or open with nothing upstream."""
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
        self.dispatch()

    @property
    def batches_open(self) -> bool:
        return any(st.batches for st in self.stages)

    def dispatch(self) -> None:
        """Give queued tasks to the stage's workers that have credit, least loaded first."""
        if not self.stages:
            return
        ready = [m for m in self.members.values() if m.stage >= 0 and m.credits > 0]
        for s, st in enumerate(self.stages):
            if not st.queue:
                continue
            pool = [m for m in ready if m.stage == s]
            while st.queue and pool:
                pool.sort(key=lambda m: (len(m.tasks), -m.credits))
                m = pool[0]
                task = st.queue.popleft()
                m.tasks[task.tid] = task
                m.credits -= 1
                st.inflight += 1
                if not st.first:
                    st.first = self.clock()
                out = self._reserve_ahead(m, s, task.items)
                task.out = out.rsv if out is not None else 0
                self.outbox.append((m.cid, Task(
                    task=task.tid, stage=s, items=task.items, handle=self.table.handle(task.obj),
                    rows=task.rows, valid=task.valid, batched=task.batched, each=task.each, layout=task.obj.layout,
                    attempts=task.attempts, out=out, out_spec=m.next_out if out is not None else None)))
                if m.credits == 0:
                    pool.pop(0)

    def _reserve_ahead(self, m: _Member, s: int, items: list[int]) -> Reserved | None:
        """The output slots a task's items will likely need (as its worker said after its last
        task), reserved now and sent with the task; None if unknown or no room (the worker
        then reserves them itself, and waits for room)."""
        spec = m.next_out
        if spec is None or s + 1 >= len(self.stages) or self.waiting():
            return None  # nothing known, nothing to reserve, or a worker waits for room to write
        # This worker's tasks that came without their slots will reserve them: reserving for a
        # later task first could take the room they wait for, while that task waits for them.
        item = array_nbytes(spec.dtype, spec.shape)
        owed = sum(len(t.items) for t in m.tasks.values() if not t.out and t.stage == s) - len(items)
        alloc = self.table.alloc
        if owed > 0 and alloc.capacity - alloc.used < (owed + len(items)) * item:
            return None
        msg = Reserve(stage=s + 1, items=items, shape=spec.shape, dtype=spec.dtype, layout=spec.layout)
        try:
            return self.reserve(m.cid, msg)
        except BrokerError:  # an odd guess (too large now, say): the worker will ask
            m.next_out = None
            return None

    # -- results ------------------------------------------------------------------------------------
    def _finish(self, m: _Member, tid: int, credit: int, op: str) -> _Task:
        task = m.tasks.pop(tid, None)
        if task is None:
            raise BadRequest(f"{op}: task {tid} is not assigned to this client")
        self.stages[task.stage].inflight -= 1
        m.credits += credit
        self.table.decref(task.obj)
        return task

    def done(self, cid: int, msg: Done) -> None:
        m = self.member(cid)
        if msg.task not in m.tasks:  # checked before touching the reservations
            raise BadRequest(f"done: task {msg.task} is not assigned to this client")
        missing = [r for r in msg.rsvs if r not in m.reservations]
        if missing or len(set(msg.rsvs)) != len(msg.rsvs):
            raise BadRequest(f"done: no open reservation {missing[0] if missing else msg.rsvs}")
        if not msg.rsvs and m.tasks[msg.task].stage != len(self.stages) - 1:
            raise BadRequest(f"done: task {msg.task} of stage {self.stages[m.tasks[msg.task].stage].name!r} "
                             f"names no reservation for its outputs (only the sink's tasks have none)")
        task = self._finish(m, msg.task, msg.credit, "done")
        for r in msg.rsvs:
            self._commit(m.reservations.pop(r))
        if msg.next_out is not None:
            try:
                self.check_reserve(Reserve(stage=task.stage + 1, items=[0], shape=msg.next_out.shape,
                                           dtype=msg.next_out.dtype, layout=msg.next_out.layout))
                m.next_out = msg.next_out
                self.stages[task.stage].out_bytes = array_nbytes(msg.next_out.dtype, msg.next_out.shape)
            except BadRequest:
                m.next_out = None
        st = self.stages[task.stage]
        st.done += len(task.items)
        st.busy += msg.busy
        st.copied += msg.copied
        st.last = self.clock()
        m.done += len(task.items)
        m.busy += msg.busy
        if task.stage == len(self.stages) - 1:
            self.inflight_items -= len(task.items)
        self.dispatch()

    def fail(self, cid: int, msg: Fail) -> None:
        m = self.member(cid)
        task = m.tasks.get(msg.task)
        if task is None:
            raise BadRequest(f"fail: task {msg.task} is not assigned to this client")
        others = {t.out for t in m.tasks.values() if t is not task}  # slots of tasks still to come
        for r in [r for r in m.reservations if r not in others]:
            self._cancel(m.reservations.pop(r))
        task.out = 0
        st = self.stages[task.stage]
        if msg.arena:  # backpressure: the work is redone later, the stage is not to blame
            self._requeue(m, task, msg.credit)
            self.counters["arena_waits"] += 1
            self._report(Failure(stage=st.name, items=task.items, error=msg.error, trace=msg.trace,
                                 fatal=True, code="ArenaFull"))
        elif task.each:  # one of its items failed: the others go on one per task, as if never grouped
            singles = self._row_tasks(task.stage, task.obj, task.items, 1, task.attempts)
            self._finish(m, msg.task, msg.credit, "fail")  # after the views are taken: it may free
            self.counters["split"] += 1
            for t in reversed(singles):
                if t.items[0] == msg.item:  # the row that raised: this was one of its attempts
                    self._attempt_failed(st, t, msg.error, msg.trace)
                else:
                    st.queue.appendleft(t)
        else:
            m.tasks.pop(task.tid)
            st.inflight -= 1
            m.credits += msg.credit
            self._attempt_failed(st, task, msg.error, msg.trace)
        self.dispatch()

    def _requeue(self, m: _Member, task: _Task, credit: int) -> None:
        m.tasks.pop(task.tid)
        self.stages[task.stage].inflight -= 1
        m.credits += credit
        self.stages[task.stage].queue.appendleft(task)

    def _attempt_failed(self, st: _Stage, task: _Task, error: str, trace: str,
                        code: str = "StageFailed", pid: int = 0) -> None:
        """One more attempt of ``task`` failed: queue it again while it has attempts left
        (a stage's error only with ``on_error: retry``; a worker's death always)."""
        task.attempts += 1
        died = code == "WorkerDied"
        if (st.on_error == "retry" or died) and task.attempts <= st.retries:
            if died:
                st.queue.appendleft(task)  # it was taken before anything queued now
            else:
                st.queue.append(task)
            self.counters["retried"] += 1
            return
        st.failed += len(task.items)
        self.inflight_items -= len(task.items)
        fatal = st.on_error != "skip"
        self.counters["failed" if fatal else "skipped"] += len(task.items)
        self.table.decref(task.obj)
        self._report(Failure(stage=st.name, items=task.items, error=error, trace=trace,
                             fatal=fatal, code=code, worker_pid=pid))

    def _report(self, failure: Failure) -> None:
        """To the sink's clients (the driver); kept until one registers if none is there yet."""
        sinks = [m.cid for m in self.members.values() if m.stage == len(self.stages) - 1]
        if not sinks:
            self.kept_failures.append(failure)
        for cid in sinks:
            self.outbox.append((cid, failure))

    # -- tasks in rings -----------------------------------------------------------------------------
    # With ``rings`` the tasks never pass through here: the driver puts groups into stage 0's
    # queue in the arena, each worker takes from its stage's queue and puts its results into the
    # next one, the driver takes the sink's. What is left to the broker is to referee: a worker's
    # failure reports go to the driver (``reported``), and a task whose workers died holding it
    # ``retries + 1`` times is dropped by its queue and failed here (``ring_dropped``).
    def ring_stage(self, name: str) -> int | None:
        """The stage whose queue is ``name`` (None: not a stage's)."""
        if not (self.rings and name.startswith(RING_PREFIX)):
            return None
        s = int(name[len(RING_PREFIX):])
        return s if 0 <= s < len(self.stages) - 1 else None

    def ring_requeued(self, s: int, moved: int, pid: int) -> None:
        """A dead worker's tasks went back to stage ``s``'s queue (``pid``: that worker)."""
        self.counters["requeued"] += moved
        if pid:
            self.ring_deaths[s] = pid

    def reported(self, cid: int, failure: Failure) -> None:
        """A worker's report of items it gave up on (``tasks: rings``), passed to the driver."""
        names = [st.name for st in self.stages[:-1]]
        if failure.stage not in names:
            raise BadRequest(f"failure: no stage {failure.stage!r}; this pipeline has {names}")
        s = names.index(failure.stage)
        m = self.members.get(cid)
        if not self.rings or m is None or m.stage != s:
            raise BadRequest(f"failure: only a worker of stage {failure.stage!r} reports its failures, "
                             f"and only when tasks travel in rings (else its fail message does)")
        st = self.stages[s]
        if failure.code == "WorkerDied" and not failure.worker_pid:  # the worker that died last
            failure = msgspec.structs.replace(failure, worker_pid=self.ring_deaths.get(s, 0))
        st.failed += len(failure.items)
        self.counters["failed" if failure.fatal else "skipped"] += len(failure.items)
        if failure.code == "ArenaFull":
            self.counters["arena_waits"] += 1
        self._report(failure)

    def ring_dropped(self, s: int, items: list[int], pid: int) -> None:
        """Items whose workers all died holding them (``retries + 1`` deliveries): failed."""
        st = self.stages[s]
        fatal = st.on_error != "skip"
        st.failed += len(items)
        self.counters["failed" if fatal else "skipped"] += len(items)
        self._report(Failure(stage=st.name, items=items, fatal=fatal, code="WorkerDied", worker_pid=pid,
                             error=f"the worker processing it died (attempt {st.retries + 1} of "
                                   f"{st.retries + 1}; its task's other items failed with it)"))

    # -- clients that leave -------------------------------------------------------------------------
    def drop(self, cid: int) -> int:
        """A client is gone: cancel its reservations, re-queue its tasks. Returns tasks re-queued.

        A re-queued task counts the death as one of its attempts (a stage that
        crashes its worker on some item must not crash-loop forever); a grouped
        task goes back one item per task, so an item that kills its worker
        fails alone.
        """
        m = self.members.pop(cid, None)
        if m is None:
            return 0
        for rsv in m.reservations.values():
            self._cancel(rsv)
        for task in m.tasks.values():
            st = self.stages[task.stage]
            st.inflight -= 1
            self.counters["requeued"] += 1
            error = (f"worker {m.name or cid} (pid {m.pid}) died while processing it "
                     f"(attempt {task.attempts + 1} of {st.retries + 1})")
            task.out = 0  # cancelled with the worker's other reservations above
            parts = [task]
            if task.each:
                parts = self._row_tasks(task.stage, task.obj, task.items, 1, task.attempts)
                self.table.decref(task.obj)
            for t in reversed(parts):  # each goes to the front: keep the items' order
                self._attempt_failed(st, t, error, "", code="WorkerDied", pid=m.pid)
        if m.stage >= 0:
            self.counters["workers_lost"] += 1
        self.dispatch()
        return len(m.tasks)

    # -- reporting ----------------------------------------------------------------------------------
    def sizes(self) -> dict[str, int]:
        """How many entries each of the scheduler's structures holds (each bounded by live state)."""
        return {"queued": sum(len(st.queue) for st in self.stages),
                "batches": sum(len(st.batches) for st in self.stages),
                "tasks": sum(len(m.tasks) for m in self.members.values()),
                "reservations": sum(len(m.reservations) for m in self.members.values()),
                "members": len(self.members), "kept_failures": len(self.kept_failures)}

    def stats(self, rings: Callable[[str], dict[str, Any]] | None = None) -> list[dict[str, object]]:
        """Each stage's counters; ``rings``: a stage queue's counters by name, for a pipeline
        whose tasks travel in rings (the workers count there)."""
        now = self.clock()
        out: list[dict[str, object]] = []
        for i, st in enumerate(self.stages):
            if rings is not None:
                c = rings(ring_name(i))
                # (a worker's own counts are not kept with tasks in rings: None, shown as "-")
                workers: list[dict[str, Any]] = [
                    {"pid": m.pid, "name": m.name, "device": m.device, "pinned": m.pinned, "done": None,
                     "busy": None} for m in self.members.values() if m.stage == i]
                out.append({"name": st.name, "batch": st.batch, "queue": c["queue"], "inflight": c["pending"],
                            "done": c["done"], "failed": st.failed, "busy": c["busy"], "copied": c["copied"],
                            "rate": c["done"] / c["span"] if c["span"] else 0.0, "workers": workers})
                continue
            workers = [{"pid": m.pid, "name": m.name, "device": m.device, "pinned": m.pinned,
                        "done": m.done, "busy": m.busy / max(1e-9, now - m.started)}
                       for m in self.members.values() if m.stage == i]
            span = (st.last - st.first) if st.last > st.first else 0.0
            out.append({"name": st.name, "batch": st.batch, "queue": len(st.queue),
                        "inflight": st.inflight, "done": st.done, "failed": st.failed,
                        "busy": st.busy, "copied": st.copied,
                        "rate": st.done / span if span else 0.0, "workers": workers})
        return out

