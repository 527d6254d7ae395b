"""``Pipeline``: start a broker and the workers a config names, feed the source, collect the sink.

``Pipeline`` is the Python face of ``shmbroker run``::

    with Pipeline.from_yaml("configs/demo.yaml") as p:
        summary = p.run()                 # source -> stages -> sink
    with Pipeline.from_yaml("cfg.yaml") as p:
        for out in p.map(arrays):         # in input order
            ...

The driver (this process) is the source and the sink, through the public
client operations: it reserves slots in stage 0 for groups of items of one
shape (``reserve_nowait``, two groups in flight; the broker holds it back
while ``max_inflight`` items are in flight or half the arena is taken:
backpressure), writes each item once, commits, and receives finished items
as tasks of the sink stage. It de-duplicates by item index, so a re-run
after a worker's death delivers each item once.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator

import msgspec
import numpy as np

from broker.client import SINK, Client
from broker.errors import (
    ArenaFull,
    BrokerError,
    BrokerTimeout,
    ConfigError,
    ItemTooLarge,
    StageFailed,
    WorkerDied,
    error_from_wire,
    format_bytes,
)
from broker.process import Broker
from broker.protocol import RING_GROUP_MAX, Error, Failure, Handle, Reserved, Task
from broker.queue import TaskQueue
from broker.scheduler import TASK_ARENA_PART, TASK_ITEMS_FIRST, TASK_SECONDS

from .config import NpySink, PipelineConfig, load_config
from .io import make_sink, source_items
from .output import RunOutput
from .plan import check_imports, cuda_count, plan_devices, search_path
from .summary import Progress, Summary
from .supervisor import Supervisor, WorkerProc, describe_exit, refuse_unguarded_main

__all__ = ["Pipeline", "Summary", "Skipped", "Interrupted"]

log = logging.getLogger("shmbroker.driver")

FEED_ITEMS = 16  # items of one shape the driver reserves and commits with one request each
FEED_BYTES = 32 << 20  # ... and at most this many bytes of them (16 MiB items go two per group:
# the broker's CPU per item 1.05 ms in one run before, 0.85-0.95 in three after; 16 MiB until
# 2026-12-04)
FEED_WAIT = 0.005  # s the driver waits for the source to fill a group before sending it
_COUNTERS = ("done", "failed", "busy", "copied")


class Seen:
    """Item indices delivered or skipped: a low-water mark and the indices above it.

    Sources number items 0, 1, 2, ...; as delivery catches up the mark moves
    and the set empties, so memory stays bounded by the items out of order,
    never by the length of the run.
    """

    def __init__(self) -> None:
        self.mark = 0  # every index below it is in
        self.above: set[int] = set()
        self.count = 0

    def __contains__(self, idx: int) -> bool:
        return idx < self.mark or idx in self.above

    def add(self, idx: int) -> None:
        if idx in self:
            return
        self.count += 1
        self.above.add(idx)
        while self.mark in self.above:
            self.above.discard(self.mark)
            self.mark += 1


class Interrupted(BrokerError):
    """The run stopped early because ``Pipeline.request_stop`` was called (a signal);
    ``summary`` says how far it got, ``signum`` which signal it was."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.summary: Summary | None = None
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


@dataclass(frozen=True)
class Skipped:
    """What ``map(..., on_skip="marker")`` yields in place of an item a stage skipped
    (``on_error: skip``): the item's ``index`` in the input, the ``stage`` and its ``error``."""

    index: int
    stage: str
    error: str


@dataclass
class _DriveState:
    submitted: int = 0
    seen: Seen = field(default_factory=Seen)  # delivered or skipped
    delivered: int = 0
    skipped: set[int] = field(default_factory=set)
    why: dict[int, tuple[str, str]] = field(default_factory=dict)  # skipped item -> (stage, error)
    record: Path | None = None  # the failures file skipped items are recorded in (run only)
    duplicates: int = 0
    bytes_in: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    stats_at: float = 0.0
    supervised_at: float = 0.0
    base: dict[str, dict[str, float]] = field(default_factory=dict)
    queues: str = ""


class Pipeline:
    """A broker, its workers and a driver for one pipeline config. A context manager.

    A config with a ``cluster:`` block makes a ``ClusterPipeline`` (``shmbroker/cluster/``):
    the same run and map on a Ray cluster, one broker per node.
    """

    def __new__(cls, cfg: PipelineConfig, *args: Any, **kw: Any) -> Pipeline:
        if cls is Pipeline and cfg.cluster is not None:
            from .cluster import import_ray

            import_ray()  # without Ray: the error says how to install it
            from .cluster.driver import ClusterPipeline

            cls = ClusterPipeline
        return super().__new__(cls)

    def __init__(self, cfg: PipelineConfig, *, path: str | None = None, require_gpu: bool = False,
                 log_level: str = "WARNING", log_json: bool = False, progress: bool = False,
                 sink_credits: int = 16) -> None:
        refuse_unguarded_main()  # in a worker that runs an unguarded main script again: stop there
        self.cfg = cfg
        self.path = path
        self.require_gpu = require_gpu
        self.log_level = log_level
        self.log_json = log_json
        self.progress = progress
        self.sink_credits = sink_credits
        self.broker: Broker | None = None
        self.client: Client | None = None
        self.supervisor: Supervisor | None = None
        self.workers: list[WorkerProc] = []
        self.warnings: list[str] = []
        self._unfinished = False
        self._rows_left: dict[int, int] = {}  # sink task -> rows not yet finished with
        self._rings: tuple[TaskQueue, TaskQueue, list[TaskQueue]] | None = None  # broker.rings: ``_open_rings``
        self._ring_held: dict[int, Handle] = {}  # a sink group's id (below 0) -> its block
        self._ring_ids = 0
        self.state: _DriveState | None = None
        self.stop_signal = 0  # set by request_stop (a signal handler)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Iterable[str] = (), **kw: Any) -> Pipeline:
        cfg = load_config(path, list(overrides))
        check_imports(cfg, path)
        return cls(cfg, path=str(path), **kw)

    # -- lifetime -----------------------------------------------------------------------------------
    def plan(self) -> list[WorkerProc]:
        """One ``WorkerProc`` per (stage, device, replica), CUDA fallback decided here."""
        count = cuda_count() if any(s.device != "cpu" for s in self.cfg.stages) else 0
        where = search_path(self.path)
        out = []
        for i, st in enumerate(self.cfg.stages):
            for j, dev in enumerate(plan_devices(st, count, self.require_gpu, warn=self._warn)):
                out.append(WorkerProc(self.cfg.worker_spec(i, where), f"worker:{st.name}:{j}", dev))
        return out

    def _warn(self, text: str) -> None:
        self.warnings.append(text)
        log.warning("%s", text)

    def start(self) -> Pipeline:
        cfg = self.cfg
        self.workers = self.plan()
        curve = cfg.broker.curve
        self.broker = Broker(int(cfg.broker.capacity), endpoint=cfg.broker.endpoint,
                             stages=[s.to_broker() for s in cfg.stages],
                             max_inflight=cfg.broker.max_inflight, wait_timeout=cfg.broker.wait_timeout,
                             log_level=self.log_level, metrics_port=cfg.broker.metrics_port,
                             hwm=cfg.broker.hwm, curve=curve.broker_args() if curve else None,
                             pipeline=cfg.pipeline_id(), rings=cfg.broker.rings)
        self.supervisor = Supervisor(self.broker.endpoint, self.workers, self.log_level, self.log_json,
                                     curve.client_args() if curve else None)
        self.supervisor.start()
        self.client = Client(self.broker.endpoint, role="driver", name=f"driver:{cfg.name}",
                             curve=curve.client_args() if curve else None)
        self.client.register(SINK, credits=self.sink_credits, pipeline=cfg.pipeline_id())
        return self

    @property
    def restarts(self) -> dict[str, int]:
        return dict(self.supervisor.restarts) if self.supervisor else {}

    def close(self) -> None:
        if self.supervisor is not None:
            self.supervisor.close()
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.broker is not None:
            self.broker.close()
            self.broker = None

    def __enter__(self) -> Pipeline:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- feeding ------------------------------------------------------------------------------------
    def _groups(self, items: Iterator[tuple[int, np.ndarray]]) -> Iterator[list[tuple[int, np.ndarray]]]:
        """The source's items in groups of one shape: at most ``FEED_ITEMS`` (a quarter of
        max_inflight), ``FEED_BYTES`` and 1/TASK_ARENA_PART of the arena (a group is one block, freed with its
        last item), and what the source gives within ``FEED_WAIT``. With tasks in rings a group
        travels whole: the largest stage's batch, or without a batched stage as many items as
        the slowest stage does in about TASK_SECONDS (TASK_ITEMS_FIRST until it has done some),
        as far as 1/TASK_ARENA_PART of the arena allows for the results of every stage (a
        batched stage collates smaller groups itself, a copy)."""
        cap = int(self.cfg.broker.capacity)
        inflight = self.cfg.broker.max_inflight
        group_max = max(1, min(FEED_ITEMS, inflight // 4)) if inflight else FEED_ITEMS
        group_bytes = min(FEED_BYTES, cap // TASK_ARENA_PART)
        rings = self.client is not None and self.client.rings
        batch = max(s.batch for s in self.cfg.stages)
        if rings:
            group_max, group_bytes = min(batch if batch > 1 else group_max, inflight), cap // TASK_ARENA_PART
        most = group_max
        group: list[tuple[int, np.ndarray]] = []
        nbytes, started = 0, time.monotonic()
        for idx, arr in items:
            self._check_size(idx, arr, cap)
            if group and (arr.shape != group[0][1].shape or arr.dtype != group[0][1].dtype
                          or nbytes + arr.nbytes > group_bytes or time.monotonic() - started >= FEED_WAIT):
                yield group
                group, nbytes = [], 0
            if not group:
                started = time.monotonic()
                if rings:
                    group_max = max(1, min(most, self._ring_group_items(batch > 1, arr.nbytes)))
            group.append((idx, arr))
            nbytes += arr.nbytes
            if len(group) >= group_max:
                yield group
                group, nbytes = [], 0
        if group:
            yield group

    def _ring_group_items(self, batched: bool, item_bytes: int) -> int:
        """How many items of ``item_bytes`` fit 1/TASK_ARENA_PART of the arena with the results
        of every stage and, in a pipeline without a batched stage, the slowest stage does in
        about TASK_SECONDS, by the counters each stage's workers keep in its queue (read from
        shared memory, no message)."""
        if self._rings is None:
            return FEED_ITEMS
        room = int(self.cfg.broker.capacity) // TASK_ARENA_PART
        most = min(RING_GROUP_MAX,  # (what a stage queue's slot holds, with the largest batch)
                   room // max(1, item_bytes, *self._ring_results(item_bytes)))
        if not batched:  # (groups of a batch: collating smaller ones is a copy)
            for q in self._rings[2]:
                c = q.counters()
                per_item = c["busy"] / c["done"] if c["done"] else 0.0
                most = min(most, int(TASK_SECONDS / per_item) if per_item > 0 else TASK_ITEMS_FIRST)
        return most

    def _ring_results(self, item_bytes: int) -> list[int]:
        """Each stage's result for an item of ``item_bytes``, by the ratio of its results' bytes
        to its inputs' so far (counted in its queue; 1 until it has done some): a stage's
        result size per item over its life would lag behind a source whose items grow."""
        assert self._rings is not None
        out, size = [], float(item_bytes)
        for q in self._rings[2]:
            c = q.counters()
            size *= c["out"] / c["in"] if c["in"] else 1.0
            out.append(int(size))
        return out

    def _ring_bytes(self, item_bytes: int) -> int:
        """What an item in flight may hold of the arena with tasks in rings: its input and each
        stage's result (``_ring_results``). A block freed by its reader waits in the pool of the
        process that wrote it, to be its next block, so an item may hold one block per stage
        however far it has gone; the driver keeps its items in flight to 3/4 of the arena by
        this."""
        return item_bytes + sum(self._ring_results(item_bytes))

    def _check_size(self, idx: int, arr: np.ndarray, cap: int) -> None:
        """``ItemTooLarge`` at once for an item that can never be placed in stage 0 (called per
        item: the message is made only for an item that does not fit; making it for every item
        was two fifths of the driver's CPU in a 4 KiB pipeline)."""
        first = self.cfg.stages[0]
        if arr.nbytes <= cap and (first.batch <= 1 or first.batch * arr.nbytes <= cap):
            return
        what = f"{format_bytes(arr.nbytes)} ({arr.dtype}{list(arr.shape)})"
        if arr.nbytes > cap:
            raise ItemTooLarge(f"item {idx} of {what} is larger than the arena ({format_bytes(cap)}); "
                               f"raise broker.capacity")
        if first.batch > 1 and first.batch * arr.nbytes > cap:
            most = cap // max(arr.nbytes, 1)
            raise ItemTooLarge(
                f"stage {first.name!r} collates batches of {first.batch} items in one block: "
                f"{first.batch} x {what} = {format_bytes(first.batch * arr.nbytes)}, more than the "
                f"{format_bytes(cap)} arena; lower stages.{first.name}.batch to at most {most}, or "
                f"raise broker.capacity to more than {format_bytes(first.batch * arr.nbytes)}")

    def _write_items(self, group: list[tuple[int, np.ndarray]], reserved: Reserved,
                     state: _DriveState) -> None:
        """Copy a group's items into the rows the broker reserved for them (in item order)."""
        assert self.client is not None
        for row, (_, arr) in zip(self.client.rows(reserved), group, strict=True):
            np.copyto(row, arr, casting="no" if arr.dtype.isnative else "equiv")
            state.bytes_in += row.nbytes

    # -- driving ------------------------------------------------------------------------------------
    def _drive(self, items: Iterator[tuple[int, np.ndarray]],
               state: _DriveState) -> Iterator[tuple[int, Any, int]]:
        """Feed ``items`` into stage 0; yield ``(index, result, task)`` as the sink receives them.

        The caller calls ``_done(task)`` when it has finished with the result (a view).
        """
        c = self.client
        assert c is not None
        if self._unfinished:
            raise BrokerError("a previous run() or map() of this Pipeline stopped before its end "
                              "(items of it are still in flight); start a new Pipeline")
        self._unfinished = True  # cleared only when this run drains completely
        self.state = state  # the last run's bookkeeping (tests check it stays bounded)
        groups = self._groups(items)
        if c.rings:
            yield from self._drive_rings(groups, state)
            return
        outstanding: dict[int, Any] = {}  # request id -> the group reserved, or None
        reserving = 0
        exhausted = eof_sent = False
        stall = max(self.cfg.broker.wait_timeout, 60.0) * 2
        last_progress = time.monotonic()
        while True:
            if self.stop_signal:
                raise Interrupted(self.stop_signal)
            while not exhausted and reserving < 2:
                group = next(groups, None)
                if group is None:
                    exhausted = True
                    break
                first = group[0][1]
                rid = c.reserve_nowait(0, [i for i, _ in group], first.shape, first.dtype,
                                       timeout=self.cfg.broker.wait_timeout)
                outstanding[rid] = group
                reserving += 1
                state.submitted += len(group)
            if exhausted and not eof_sent and not reserving:
                c.eof(state.submitted)
                eof_sent = True
            if exhausted and not outstanding and state.seen.count >= state.submitted:
                self._unfinished = False
                c.flush()  # the last sink tasks' dones
                return
            self._progress(state)
            msg = c.next_message(0.2)
            if self.stop_signal:  # before supervising: workers stopped by the same Ctrl-C stay stopped
                raise Interrupted(self.stop_signal)
            self._supervise(state)
            if msg is None:
                if time.monotonic() - last_progress > stall:
                    raise BrokerTimeout(f"no progress for {stall:.0f} s; stage state: {self._stage_state()}")
                continue
            last_progress = time.monotonic()
            if isinstance(msg, Task):
                yield from self._received(msg, state)
            elif isinstance(msg, Failure):
                self._on_failure(msg, state)
            elif msg.rid in outstanding:
                group = outstanding.pop(msg.rid)
                if isinstance(msg, Error):
                    raise error_from_wire(msg.code, msg.message)
                if isinstance(msg, Reserved):
                    reserving -= 1
                    self._write_items(group, msg, state)
                    c.commit(msg, defer=True)  # with the next reserve, or before the next wait
            elif isinstance(msg, Error):
                raise error_from_wire(msg.code, msg.message)

    def _supervise(self, state: _DriveState) -> None:
        """Restart dead workers (and stop a crash loop), at most every 0.1 s."""
        if time.monotonic() - state.supervised_at > 0.1:
            state.supervised_at = time.monotonic()
            assert self.supervisor is not None
            self.supervisor.supervise()

    def _progress(self, state: _DriveState) -> None:
        """The progress line's queues (items waiting or in flight per stage), once a second."""
        if self.progress and time.monotonic() - state.stats_at > 1.0:
            assert self.client is not None
            state.stats_at = time.monotonic()
            state.queues = " ".join(f"{st['name']}:{st['queue'] + st['inflight']}"
                                    for st in self.client.stats()["stages"][:-1])

    def _drive_rings(self, groups: Iterator[list[tuple[int, np.ndarray]]],
                     state: _DriveState) -> Iterator[tuple[int, Any, int]]:
        """``_drive`` when tasks travel in rings: each group is copied into a block of this
        process's own and put into stage 0's queue, while at most ``max_inflight`` items (and
        half the arena of them) are in flight; finished groups come from the sink's queue.
        Failures still come from the broker, as messages."""
        c = self.client
        assert c is not None
        first, sink, _ = self._open_rings()
        batched = self.cfg.stages[0].batch > 1
        cap, most = int(self.cfg.broker.capacity), self.cfg.broker.max_inflight
        stall = max(self.cfg.broker.wait_timeout, 60.0) * 2
        last_progress = time.monotonic()
        group: list[tuple[int, np.ndarray]] | None = None
        item_bytes = 0
        exhausted = False
        while True:
            if self.stop_signal:
                raise Interrupted(self.stop_signal)
            while not exhausted:
                if group is None:
                    group = next(groups, None)
                    if group is None:
                        exhausted = True
                        break
                    item_bytes = group[0][1].nbytes
                flying = state.submitted - state.seen.count
                if flying and (flying + len(group) > most or
                               (flying + len(group)) * self._ring_bytes(item_bytes) > cap * 3 // 4):
                    break
                self._put_group(first, group, batched, state)
                group = None
            if exhausted and state.seen.count >= state.submitted:
                self._unfinished = False
                c.trim_pool()  # its blocks go back to the arena between runs (as the workers' when idle)
                return
            msg = c.next_message(0)
            while msg is not None:  # failure reports (and a refusal of something this process sent)
                if isinstance(msg, Failure):
                    self._on_failure(msg, state)
                elif isinstance(msg, Error):
                    raise error_from_wire(msg.code, msg.message)
                msg = c.next_message(0)
            self._supervise(state)
            self._progress(state)
            try:
                task = sink.get(timeout=0.05)
            except BrokerTimeout:
                if time.monotonic() - last_progress > stall:
                    raise BrokerTimeout(f"no progress for {stall:.0f} s; stage state: {self._stage_state()}") \
                        from None
                continue
            last_progress = time.monotonic()
            self._ring_ids -= 1  # ids of their own (below 0), so _done knows it is a block to release
            self._ring_held[self._ring_ids] = task.handle
            yield from self._received(msgspec.structs.replace(task, task=self._ring_ids), state)

    def _open_rings(self) -> tuple[TaskQueue, TaskQueue, list[TaskQueue]]:
        """Stage 0's queue, the sink's, and every stage's (for their counters)."""
        if self._rings is None:
            assert self.client is not None
            stages = [self.client.task_queue(s) for s in range(len(self.cfg.stages))]
            self._rings = (stages[0], self.client.task_queue(len(self.cfg.stages)), stages)
        return self._rings

    def _put_group(self, queue: TaskQueue, group: list[tuple[int, np.ndarray]], batched: bool,
                   state: _DriveState) -> None:
        """Copy a group into a new block and put it into stage 0's queue (tasks in rings)."""
        assert self.client is not None
        arr = group[0][1]
        handle, block = self.client.alloc((len(group), *arr.shape), arr.dtype,
                                          timeout=self.cfg.broker.wait_timeout)
        for row, (_, a) in zip(block, group, strict=True):
            np.copyto(row, a, casting="no" if a.dtype.isnative else "equiv")
        state.bytes_in += block.nbytes
        queue.put(Task(task=0, stage=0, items=[i for i, _ in group], handle=handle, rows=len(group),
                       batched=batched, each=not batched))
        state.submitted += len(group)

    def _received(self, task: Task, state: _DriveState) -> Iterator[tuple[int, Any, int]]:
        assert self.client is not None
        self._rows_left[task.task] = len(task.items)  # its `done` goes when the last row is finished
        for idx, result in zip(task.items, self.client.task_rows(task), strict=True):
            if idx in state.seen:
                state.duplicates += 1
                self._done(task.task)
                continue
            state.seen.add(idx)
            state.delivered += 1
            yield idx, result, task.task

    def _on_failure(self, msg: Failure, state: _DriveState) -> None:
        if msg.fatal:
            if msg.code == "ArenaFull":
                raise ArenaFull(msg.error)
            if msg.code == "WorkerDied":
                code = self.supervisor.exit_code(msg.worker_pid) if self.supervisor else None
                raise WorkerDied(f"stage {msg.stage!r} gave up on item(s) {msg.items[:20]}: "
                                 f"{msg.error}, with {describe_exit(code)}; raise the stage's "
                                 f"retries if its workers die for reasons of their own")
            raise StageFailed(f"stage {msg.stage!r} failed on item(s) {msg.items}: {msg.error}\n"
                              f"--- worker traceback ---\n{msg.trace}")
        path = state.record
        new = [i for i in msg.items if i not in state.seen]  # a re-run of a delivered item: not skipped
        if not new:
            return
        log.warning("stage %r skipped item%s %s: %s%s", msg.stage, "s" if len(new) > 1 else "",
                    ", ".join(map(str, new)), msg.error, f" (recorded in {path})" if path else "")
        for i in new:
            state.seen.add(i)
            state.skipped.add(i)
            state.why[i] = (msg.stage, msg.error)
        record = {"stage": msg.stage, "items": new, "error": msg.error, "trace": msg.trace}
        state.failures.append(record)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:  # one JSON line per failure, written as it happens
                f.write(json.dumps(record) + "\n")

    def failures_path(self) -> Path | None:
        """Where skipped items are recorded: ``failures:`` of the config, else beside an npy sink."""
        if self.cfg.failures:
            return Path(self.cfg.failures)
        if isinstance(self.cfg.sink, NpySink):
            return Path(self.cfg.sink.path) / "failures.jsonl"
        return None

    def _stage_state(self) -> str:
        assert self.client is not None
        try:
            st = self.client.stats()
        except BrokerError as e:
            return f"(stats unavailable: {e})"
        return ", ".join(f"{s['name']}: queue {s['queue']} inflight {s['inflight']} workers "
                         f"{len(s['workers'])}" for s in st["stages"])

    def _done(self, task: int) -> None:
        """One row of a sink task is finished with; the task's ``done`` goes with its last row."""
        assert self.client is not None
        left = self._rows_left.pop(task, 1) - 1
        if left > 0:
            self._rows_left[task] = left
            return
        held = self._ring_held.pop(task, None)
        if held is not None:  # a group from the sink's queue (tasks in rings): its block goes
            self.client.release(held)
            return
        self.client.done(task, defer=True)  # with the next reserve, or before the next wait

    # -- the two ways to run ------------------------------------------------------------------------
    def run(self, sink: Callable[[int, Any], None] | None = None, *, resume: bool = False,
            overwrite: bool = False, output: RunOutput | None = None) -> Summary:
        """Drive the config's source through the stages to its sink; return the summary.

        With the config's npy sink the run holds its output directory
        (``shmbroker/output.py``): it starts only into an empty directory, unless
        ``resume`` (continue the run recorded there: the items already done are
        left out) or ``overwrite`` (remove this project's files there first).
        ``output``: the directory, opened already (``open_output``; ``shmbroker
        run`` does so before it starts anything). A run stopped by
        ``request_stop`` raises ``Interrupted``; the directory's manifest then
        says the output is incomplete, and ``resume`` continues it.
        """
        out = output if output is not None else self.open_output(resume, overwrite, sink is not None)
        try:
            return self._run(sink, out)
        finally:
            if out is not None and output is None:
                out.close()

    def open_output(self, resume: bool = False, overwrite: bool = False,
                    own_sink: bool = False) -> RunOutput | None:
        """Lock and prepare the npy sink's directory for a run (None for other sinks)."""
        if isinstance(self.cfg.sink, NpySink) and not own_sink:
            return RunOutput.open(self.cfg, resume=resume, overwrite=overwrite, failures=self.failures_path())
        if resume:
            raise ConfigError(f"resume needs the config's npy sink (its directory records what is done); "
                              f"this run's sink is {'a function of yours' if own_sink else self.cfg.sink.type}")
        return None

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop the run soon (call from a signal handler: it only sets a flag); ``run``/``map``
        then raise ``Interrupted``, and leaving the ``with`` block stops the workers and broker."""
        self.stop_signal = signum

    def _run(self, sink: Callable[[int, Any], None] | None, out: RunOutput | None) -> Summary:
        where = search_path(self.path)
        done = out.done if out is not None else set()
        items, total = source_items(self.cfg, done, where)
        write = sink or make_sink(self.cfg, total, where)
        record = out.failures if out is not None else Path(self.cfg.failures) if self.cfg.failures else None
        if out is None and record is not None:
            record.unlink(missing_ok=True)  # the failures file belongs to one run
        state = _DriveState(base=self._baseline(), record=record)
        if out is not None:
            out.begin(total)
        t0 = time.perf_counter()
        bar = Progress(None if total is None else total - len(done), self.progress)
        try:
            for idx, view, task in self._drive(items, state):
                write(idx, view)
                self._done(task)
                bar.update(state.delivered, state.bytes_in, state.queues)
        except BaseException as e:
            if isinstance(e, Interrupted):
                e.summary = self._summary(state, time.perf_counter() - t0, len(done), str(e))
            if out is not None:
                out.stopped(str(e) if isinstance(e, Interrupted) else
                            f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            raise
        finally:
            bar.close()
        summary = self._summary(state, time.perf_counter() - t0, len(done))
        if out is not None:
            out.finish(len(summary.skipped))
        return summary

    def map(self, arrays: Iterable[Any], copy: bool = True, on_skip: str = "raise") -> Iterator[Any]:
        """Feed arrays through the stages; yield one result per array, in input order.

        With ``copy=True`` (default) each result is the caller's own array. With
        ``copy=False`` it is a view of the arena, valid only until the next
        iteration (its slot is then released and reused).

        An item a stage skipped (``on_error: skip``) is never silently left out:
        with ``on_skip="raise"`` (default) ``StageFailed`` is raised when the
        results reach it (those before it have been yielded); with
        ``on_skip="marker"`` a ``Skipped(index, stage, error)`` takes its place.
        """
        if on_skip not in ("raise", "marker"):
            raise ValueError(f"on_skip must be 'raise' or 'marker', not {on_skip!r}")
        state = _DriveState(base=self._baseline())
        items = ((i, np.asarray(a)) for i, a in enumerate(arrays))
        try:
            yield from self._ordered(self._drive(items, state), state, copy, on_skip)
        finally:
            self._give_back()
        self.last_summary = self._summary(state, 0.0)

    def _ordered(self, delivered: Iterator[tuple[int, Any, int]], state: _DriveState,
                 copy: bool, on_skip: str) -> Iterator[Any]:
        ready: dict[int, tuple[Any, int]] = {}
        nxt = 0
        for idx, view, task in delivered:
            if copy:
                ready[idx] = (_copy(view), -1)
                self._done(task)
            else:
                ready[idx] = (view, task)
            nxt = yield from self._in_order(ready, state, nxt, on_skip)
        # results that waited for an earlier item which turned out skipped after they came
        yield from self._in_order(ready, state, nxt, on_skip)

    def _in_order(self, ready: dict[int, tuple[Any, int]], state: _DriveState,
                  nxt: int, on_skip: str) -> Generator[Any, None, int]:
        """Yield the results from index ``nxt`` on while they are there; returns the next index."""
        while True:
            while nxt in state.skipped:
                stage, error = state.why.pop(nxt)
                if on_skip == "raise":
                    raise StageFailed(f"stage {stage!r} skipped item {nxt} (on_error: skip): {error}; "
                                      f"map(..., on_skip='marker') yields a Skipped marker in its "
                                      f"place instead")
                yield Skipped(nxt, stage, error)
                nxt += 1
            if nxt not in ready:
                return nxt
            out, t = ready.pop(nxt)
            nxt += 1
            try:
                yield out
            finally:
                if t >= 0:
                    self._done(t)

    def _give_back(self) -> None:
        """A caller that stopped early: give back every sink task not finished with, including
        the rows of many-row tasks that were never yielded."""
        if self._rows_left:
            assert self.client is not None
            for t in list(self._rows_left):
                held = self._ring_held.pop(t, None)
                if held is not None:
                    self.client.release(held)
                else:
                    self.client.done(t)
            self._rows_left.clear()

    def _baseline(self) -> dict[str, dict[str, float]]:
        """The stage counters before a run (a run's summary counts what it added)."""
        assert self.client is not None
        return _baseline(self.client)

    def _summary(self, state: _DriveState, seconds: float, resumed: int = 0, interrupted: str = "") -> Summary:
        assert self.client is not None and self.broker is not None
        self.client.ping()  # let the last dones land before reading the stage counters
        stats = self.client.stats()
        stages = []
        for i, st in enumerate(stats["stages"][:-1]):
            devices = sorted({w.device for w in self.workers if w.spec.index == i})
            base = state.base.get(st["name"], {})  # this run's share of the broker's lifetime counters
            run = {k: st[k] - base.get(k, 0) for k in _COUNTERS}
            pinned = [w["pinned"] for w in st["workers"]]
            stages.append({**st, **run, "device": ",".join(devices), "workers": len(st["workers"]),
                           "unpinned": sum(1 for p in pinned if not p) if any(
                               d.startswith("cuda") for d in devices) else 0})
        copied = state.bytes_in + sum(s["copied"] for s in stages)
        n = max(1, state.delivered)
        return Summary(self.cfg.name, state.delivered, sorted(state.skipped), state.duplicates,
                       seconds, state.bytes_in, stages, stats["peak"], stats["capacity"],
                       self.restarts, copied / n, state.failures, resumed, interrupted,
                       str(state.record) if state.record else "")


def _baseline(client: Client) -> dict[str, dict[str, float]]:
    return {st["name"]: {k: st[k] for k in _COUNTERS} for st in client.stats()["stages"]}


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: v.copy() for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(v.copy() for v in value)
    return value.copy()
