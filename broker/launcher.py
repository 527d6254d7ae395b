"""Start a broker and the workers a config names, drive a source to a sink, supervise, summarize.

``Pipeline`` is the Python face of ``shmbroker run``::

    with Pipeline.from_yaml("configs/demo.yaml") as p:
        summary = p.run()                 # source -> stages -> sink
    with Pipeline.from_yaml("cfg.yaml") as p:
        for out in p.map(arrays):         # in input order
            ...

The driver (this process) is the source and the sink: it reserves a slot for
each item in stage 0 (waiting while ``max_inflight`` items are in flight or
half the arena is taken: backpressure), writes the item once, and receives
finished items from the broker as tasks of the sink stage. It de-duplicates
by item index, so a re-run after a worker's death delivers each item once.
"""

from __future__ import annotations

import collections
import glob
import inspect
import json
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator

import numpy as np

from .arena import field_views, format_bytes
from .client import Broker, Client, array_spec
from .config import (
    NpySink,
    NpySource,
    PipelineConfig,
    PythonSink,
    PythonSource,
    SyntheticSource,
    load_config,
    resolve,
)
from .errors import BrokerError, BrokerTimeout, ItemTooLarge, StageFailed, error_from_wire
from .protocol import Handle

__all__ = ["Pipeline", "Summary", "source_items"]

log = logging.getLogger("shmbroker.launcher")

MAX_RESTARTS = 5  # deaths of one worker within RESTART_WINDOW before the run fails
RESTART_WINDOW = 60.0
# Workers are forked from a server process that has imported torch once ("forkserver"), so
# they share its pages: ~20 MiB of private memory each instead of ~180 MiB for a process that
# imports torch itself ("spawn"), and they start in milliseconds. SHMBROKER_START_METHOD=spawn
# restores fully independent interpreters.
START_METHOD = os.environ.get("SHMBROKER_START_METHOD", "forkserver")
FORKSERVER_PRELOAD = ["torch", "workers.runtime", "workers.stages"]
FEED_ITEMS = 16  # items of one shape the driver reserves and commits with one request each
FEED_BYTES = 4 << 20  # ... and at most this many bytes of them
FEED_WAIT = 0.005  # s the driver waits for the source to fill a group before sending it


def source_items(cfg: PipelineConfig) -> tuple[Iterator[tuple[int, np.ndarray]], int | None]:
    """The items of the config's source as ``(index, array)``, and their count if known."""
    src = cfg.source
    if isinstance(src, SyntheticSource):
        def synthetic() -> Iterator[tuple[int, np.ndarray]]:
            rng = np.random.default_rng(src.seed)
            dt = np.dtype(src.dtype)
            for i in range(src.count):
                if dt.kind == "f":
                    yield i, rng.standard_normal(src.shape).astype(dt, copy=False)
                else:
                    yield i, rng.integers(0, 100, src.shape).astype(dt)
        return synthetic(), src.count
    if isinstance(src, NpySource):
        files = sorted(glob.glob(src.path))
        if not files:
            raise BrokerError(f"source.path {src.path!r} matches no files")
        return ((i, np.load(f, mmap_mode="r")) for i, f in enumerate(files)), len(files)
    assert isinstance(src, PythonSource)
    gen = resolve(src.fn)(**src.args)
    return ((i, np.asarray(a)) for i, a in enumerate(gen)), None


@dataclass
class Summary:
    """What a run did; ``render()`` draws it as a table."""

    name: str
    items: int
    skipped: list[int]
    duplicates: int
    seconds: float
    bytes_in: int
    stages: list[dict[str, Any]]
    arena_peak: int
    capacity: int
    restarts: dict[str, int]
    copied_per_item: float
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds else 0.0

    def render(self) -> Any:
        from rich.table import Table

        t = Table(title=f"{self.name}: {self.items} items in {self.seconds:.2f} s "
                        f"({self.items_per_s:.1f} items/s, "
                        f"{self.bytes_in / max(self.seconds, 1e-9) / 1e6:.1f} MB/s in)")
        for col in ("stage", "device", "workers", "items", "items/s", "busy s", "restarts", "copied/item"):
            t.add_column(col, justify="left" if col in ("stage", "device") else "right")
        for st in self.stages:
            t.add_row(st["name"], st["device"], str(st["workers"]), str(st["done"]),
                      f"{st['rate']:.1f}", f"{st['busy']:.2f}", str(self.restarts.get(st["name"], 0)),
                      format_bytes(int(st["copied"] / max(1, st["done"]))))
        t.caption = (f"arena peak {format_bytes(self.arena_peak)} of {format_bytes(self.capacity)}; "
                     f"bytes copied per item {format_bytes(int(self.copied_per_item))} "
                     f"(source write + stage writes); skipped {len(self.skipped)}, "
                     f"duplicates dropped {self.duplicates}")
        return t


@dataclass(eq=False)
class WorkerProc:
    stage: int
    name: str
    device: str
    proc: multiprocessing.process.BaseProcess | None = None
    restarts: int = 0
    restart_at: float = 0.0
    deaths: list[float] = field(default_factory=list)


def _worker_entry(env: dict[str, str], *args: Any) -> None:
    """A worker process's target, importable without torch (the driver only pickles its name).

    A forked worker inherits the fork server's environment, taken when the server started;
    ``env`` is the driver's at the time of this spawn (as a spawned process would see it).
    """
    adopt_environment(env)
    from workers.runtime import worker_process

    worker_process(*args)


def adopt_environment(env: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)


def worker_context(method: str) -> Any:
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"SHMBROKER_START_METHOD must be forkserver or spawn, not {method!r}")
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        # Takes effect when this process's fork server starts (with its first worker). CUDA is
        # not initialised by importing torch, so forked workers may still use their GPU.
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    return ctx


class Pipeline:
    """A broker, its workers and a driver for one pipeline config. A context manager."""

    def __init__(self, cfg: PipelineConfig, *, path: str | None = None, require_gpu: bool = False,
                 log_level: str = "WARNING", log_json: bool = False, progress: bool = False,
                 sink_credits: int = 16) -> None:
        self.cfg = cfg
        self.path = path
        self.require_gpu = require_gpu
        self.log_level = log_level
        self.log_json = log_json
        self.progress = progress
        self.sink_credits = sink_credits
        self.broker: Broker | None = None
        self.client: Client | None = None
        self.workers: list[WorkerProc] = []
        self.restarts: collections.Counter[str] = collections.Counter()
        self.warnings: list[str] = []
        self._ctx = worker_context(START_METHOD)
        self._unfinished = False
        self._rows_left: dict[int, int] = {}  # sink task -> rows not yet finished with

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Iterable[str] = (), **kw: Any) -> Pipeline:
        return cls(load_config(path, list(overrides)), path=str(path), **kw)

    # -- lifetime ---------------------------------------------------------------
    def plan(self) -> list[WorkerProc]:
        """One ``WorkerProc`` per (stage, device, replica), CUDA fallback decided here."""
        from workers.devices import cuda_count, plan_devices

        count = cuda_count() if any(s.device != "cpu" for s in self.cfg.stages) else 0
        out = []
        for i, st in enumerate(self.cfg.stages):
            for j, dev in enumerate(plan_devices(st, count, self.require_gpu, warn=self._warn)):
                out.append(WorkerProc(i, f"worker:{st.name}:{j}", dev))
        return out

    def _warn(self, text: str) -> None:
        self.warnings.append(text)
        log.warning("%s", text)

    def start(self) -> Pipeline:
        cfg = self.cfg
        self.workers = self.plan()
        self.broker = Broker(int(cfg.broker.capacity), endpoint=cfg.broker.endpoint,
                             stages=[s.to_broker() for s in cfg.stages],
                             max_inflight=cfg.broker.max_inflight, log_level=self.log_level,
                             metrics_port=cfg.broker.metrics_port, hwm=cfg.broker.hwm,
                             curve=cfg.broker.curve.broker_args() if cfg.broker.curve else None)
        for w in self.workers:
            self._spawn(w)
        self.client = Client(self.broker.endpoint, role="driver", name=f"driver:{cfg.name}",
                             curve=self._curve())
        self.client._request("register", stage="__sink__", credits=self.sink_credits, device="host")
        return self

    def _curve(self) -> tuple[str, str] | None:
        curve = self.cfg.broker.curve
        return curve.client_args() if curve else None

    def _spawn(self, w: WorkerProc) -> None:
        assert self.broker is not None
        st = self.cfg.stages[w.stage]
        w.proc = self._ctx.Process(
            target=_worker_entry, name=w.name, daemon=True,
            args=(dict(os.environ), self.broker.endpoint, st.model_dump(), w.stage, w.device, self.log_level, self.log_json,
                  self._curve()))
        w.proc.start()

    def supervise(self) -> None:
        """Restart workers that exited, with back-off; fail once one dies ``MAX_RESTARTS``
        times within ``RESTART_WINDOW`` seconds (a crash loop, not bad luck over hours)."""
        now = time.monotonic()
        for w in self.workers:
            if w.proc is None or w.proc.exitcode is None:
                continue
            if w.restart_at == 0.0:
                code = w.proc.exitcode
                w.deaths = [t for t in w.deaths if now - t < RESTART_WINDOW] + [now]
                if len(w.deaths) > MAX_RESTARTS:
                    raise BrokerError(
                        f"worker {w.name} on {w.device} exited {len(w.deaths)} times within "
                        f"{RESTART_WINDOW:.0f} s, last with code {code} (a signal if negative: -9 is "
                        f"SIGKILL, often the OOM killer); giving up; see its log above")
                w.restart_at = now + min(0.1 * 2 ** (len(w.deaths) - 1), 5.0)
                log.warning("worker %s exited with code %s; restarting", w.name, code)
                self.restarts[self.cfg.stages[w.stage].name] += 1
            elif now >= w.restart_at:
                w.restarts += 1
                w.restart_at = 0.0
                self._spawn(w)

    def close(self) -> None:
        started = [w for w in self.workers if w.proc is not None and w.proc.pid is not None]
        for w in started:
            if w.proc.exitcode is None:  # type: ignore[union-attr]
                w.proc.terminate()  # type: ignore[union-attr]
        for w in started:
            if w.proc is not None:
                w.proc.join(5)
                if w.proc.exitcode is None:
                    w.proc.kill()
                    w.proc.join()
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

    # -- driving ----------------------------------------------------------------
    def _drive(self, items: Iterator[tuple[int, np.ndarray]], total: int | None,
               state: _DriveState) -> Iterator[tuple[int, np.ndarray, int]]:
        """Feed ``items`` into stage 0; yield ``(index, view, task)`` as the sink receives them.

        The caller sends ``done`` for the task when it has finished with the view.
        """
        c = self.client
        assert c is not None
        if self._unfinished:
            raise BrokerError("a previous run() or map() of this Pipeline stopped before its end "
                              "(items of it are still in flight); start a new Pipeline")
        self._unfinished = True  # cleared only when this run drains completely
        cap, wait = int(self.cfg.broker.capacity), self.cfg.broker.wait_timeout
        # Items of one shape go in with one reserve and one commit per group: at most FEED_ITEMS
        # items (a quarter of max_inflight), FEED_BYTES, and what the source gives within FEED_WAIT.
        group_max = FEED_ITEMS if not self.cfg.broker.max_inflight else \
            max(1, min(FEED_ITEMS, self.cfg.broker.max_inflight // 4))
        # a group is one block, freed with its last item: keep it a small part of the arena
        group_bytes = min(FEED_BYTES, cap // 16)
        outstanding: dict[int, Any] = {}
        reserving = 0
        exhausted = eof_sent = False
        carry: tuple[int, np.ndarray] | None = None  # an item of another shape than its group's
        last_progress = time.monotonic()
        while True:
            while not exhausted and reserving < 2:
                group: list[tuple[int, np.ndarray]] = []
                nbytes, started = 0, time.monotonic()
                while len(group) < group_max and (not group or time.monotonic() - started < FEED_WAIT):
                    if carry is not None:
                        (idx, arr), carry = carry, None
                    else:
                        try:
                            idx, arr = next(items)
                        except StopIteration:
                            exhausted = True
                            break
                    if arr.nbytes > cap:
                        raise ItemTooLarge(f"item {idx} of {format_bytes(arr.nbytes)} ({arr.dtype}"
                                           f"{list(arr.shape)}) is larger than the arena "
                                           f"({format_bytes(cap)})")
                    if group and (arr.shape != group[0][1].shape or arr.dtype != group[0][1].dtype
                                  or nbytes + arr.nbytes > group_bytes):
                        carry = (idx, arr)
                        break
                    group.append((idx, arr))
                    nbytes += arr.nbytes
                if not group:
                    break
                first = group[0][1]
                rid = c.send("reserve", stage=0, items=[i for i, _ in group], shape=list(first.shape),
                             dtype=array_spec(first.dtype).str, timeout=wait)
                outstanding[rid] = ("reserve", group)
                reserving += 1
                state.submitted += len(group)
            if exhausted and not eof_sent and not reserving:
                outstanding[c.send("eof", items=state.submitted)] = ("eof",)
                eof_sent = True
            if exhausted and not outstanding and state.finished >= state.submitted:
                self._unfinished = False
                return
            if self.progress and time.monotonic() - state.stats_at > 1.0:
                state.stats_at = time.monotonic()
                outstanding[c.send("stats")] = ("stats",)
            msg = c.inbox.popleft() if c.inbox else c.recv(0.2)
            if time.monotonic() - state.supervised_at > 0.1:
                state.supervised_at = time.monotonic()
                self.supervise()
            if msg is None:
                if time.monotonic() - last_progress > max(wait, 60.0) * 2:
                    raise BrokerTimeout(f"no progress for {max(wait, 60.0) * 2:.0f} s; "
                                        f"stage state: {self._stage_state()}")
                continue
            last_progress = time.monotonic()
            op = msg["op"]
            if op == "task":
                task, ids = msg["task"], msg["items"]
                view = c.view(Handle.from_wire(msg["handle"]))
                rows = [view[j] for j in range(len(ids))] if msg.get("each") else [view]
                self._rows_left[task] = len(ids)  # its `done` goes when the last row is finished
                for idx, row in zip(ids, rows, strict=True):
                    if idx in state.delivered or idx in state.skipped:
                        state.duplicates += 1
                        self._done(task)
                        continue
                    state.delivered.add(idx)
                    yield idx, _result(row, msg.get("layout")), task
            elif op == "failure":
                self._on_failure(msg, state)
            elif msg["rid"] in outstanding:
                kind = outstanding.pop(msg["rid"])
                if op == "error":
                    raise error_from_wire(msg["code"], msg["message"])
                if kind[0] == "stats":
                    state.queues = " ".join(f"{st['name']}:{st['queue'] + st['inflight']}"
                                            for st in msg["stats"]["stages"][:-1])
                elif kind[0] == "reserve":
                    reserving -= 1
                    self._write_items(kind[1], msg, state)
                    outstanding[c.send("commit", rsv=msg["rsv"])] = ("commit",)
            elif op == "error":
                raise error_from_wire(msg["code"], msg["message"])

    def _write_items(self, group: list[tuple[int, np.ndarray]], reply: dict[str, Any],
                     state: _DriveState) -> None:
        """Copy a group's items into the rows the broker reserved for them (in item order)."""
        assert self.client is not None
        arrays = iter(arr for _, arr in group)
        for wire, n in reply["segments"]:
            slot = self.client.view(Handle.from_wire(wire))
            for row in range(n):
                arr = next(arrays)
                np.copyto(slot[row], arr, casting="no" if arr.dtype.isnative else "equiv")
            state.bytes_in += slot.nbytes

    def _on_failure(self, msg: dict[str, Any], state: _DriveState) -> None:
        if msg["fatal"]:
            raise StageFailed(f"stage {msg['stage']!r} failed on item(s) {msg['items']}: {msg['error']}\n"
                              f"--- worker traceback ---\n{msg['trace']}")
        log.warning("stage %s skipped item(s) %s: %s", msg["stage"], msg["items"], msg["error"])
        for i in msg["items"]:
            state.skipped.add(i)
        record = {"stage": msg["stage"], "items": msg["items"], "error": msg["error"], "trace": msg["trace"]}
        state.failures.append(record)
        path = self.failures_path()
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
        self.client.send("done", task=task, rsv=None, credit=1, busy=0.0)

    def run(self, sink: Callable[[int, np.ndarray], None] | None = None) -> Summary:
        """Drive the config's source through the stages to its sink; return the summary."""
        items, total = source_items(self.cfg)
        write = sink or _make_sink(self.cfg, total)
        assert self.client is not None
        state = _DriveState(base=_baseline(self.client))
        t0 = time.perf_counter()
        bar = _Progress(total, self.progress)
        try:
            for idx, view, task in self._drive(items, total, state):
                write(idx, view)
                self._done(task)
                bar.update(len(state.delivered), state.bytes_in, state.queues)
        finally:
            bar.close()
        return self._summary(state, time.perf_counter() - t0)

    def map(self, arrays: Iterable[Any], copy: bool = True) -> Iterator[np.ndarray]:
        """Feed arrays through the stages; yield results in input order.

        With ``copy=True`` (default) each result is the caller's own array. With
        ``copy=False`` it is a view of the arena, valid only until the next
        iteration (its slot is then released and reused).
        """
        assert self.client is not None
        state = _DriveState(base=_baseline(self.client))
        items = ((i, np.asarray(a)) for i, a in enumerate(arrays))
        ready: dict[int, tuple[np.ndarray, int]] = {}
        try:
            yield from self._ordered(self._drive(items, None, state), ready, state, copy)
        finally:
            # a caller that stopped early: give back every sink task not finished with, including
            # the rows of many-row tasks that were never yielded
            assert self.client is not None
            for t in list(self._rows_left):
                self.client.send("done", task=t, rsv=None, credit=1, busy=0.0)
            self._rows_left.clear()
        self.last_summary = self._summary(state, 0.0)

    def _ordered(self, delivered: Iterator[tuple[int, np.ndarray, int]],
                 ready: dict[int, tuple[np.ndarray, int]], state: _DriveState,
                 copy: bool) -> Iterator[np.ndarray]:
        nxt = 0
        for idx, view, task in delivered:
            if copy:
                ready[idx] = (_copy(view), -1)
                self._done(task)
            else:
                ready[idx] = (view, task)
            nxt = yield from self._in_order(ready, state, nxt)
        # results that waited for an earlier item which turned out skipped after they came
        yield from self._in_order(ready, state, nxt)

    def _in_order(self, ready: dict[int, tuple[np.ndarray, int]], state: _DriveState,
                  nxt: int) -> Generator[np.ndarray, None, int]:
        """Yield the results from index ``nxt`` on while they are there; returns the next index."""
        while True:
            while nxt in state.skipped:
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

    def _summary(self, state: _DriveState, seconds: float) -> Summary:
        assert self.client is not None and self.broker is not None
        # let the last dones land before reading the stage counters
        self.client._request("ping")
        stats = self.client.stats()
        stages = []
        for i, st in enumerate(stats["stages"][:-1]):
            devices = sorted({w.device for w in self.workers if w.stage == i})
            base = state.base.get(st["name"], {})  # this run's share of the broker's lifetime counters
            run = {k: st[k] - base.get(k, 0) for k in _COUNTERS}
            stages.append({**st, **run, "device": ",".join(devices), "workers": len(st["workers"])})
        copied = state.bytes_in + sum(s["copied"] for s in stages)
        n = max(1, len(state.delivered))
        return Summary(self.cfg.name, len(state.delivered), sorted(state.skipped), state.duplicates,
                       seconds, state.bytes_in, stages, stats["peak"], stats["capacity"],
                       dict(self.restarts), copied / n, state.failures)


_COUNTERS = ("done", "failed", "busy", "copied")


def _baseline(client: Client) -> dict[str, dict[str, float]]:
    return {st["name"]: {k: st[k] for k in _COUNTERS} for st in client.stats()["stages"]}


@dataclass
class _DriveState:
    submitted: int = 0
    delivered: set[int] = field(default_factory=set)
    skipped: set[int] = field(default_factory=set)
    duplicates: int = 0
    bytes_in: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    stats_at: float = 0.0
    supervised_at: float = 0.0
    base: dict[str, dict[str, float]] = field(default_factory=dict)
    queues: str = ""

    @property
    def finished(self) -> int:
        return len(self.delivered) + len(self.skipped)


def _result(view: np.ndarray, layout: dict[str, Any] | None) -> Any:
    """What the sink receives: the item's array, or the tuple/dict of arrays a stage returned."""
    if layout is None:
        return view
    views = field_views(view, layout["fields"])
    if layout["kind"] == "dict":
        return {f[0]: v for f, v in zip(layout["fields"], views, strict=True)}
    return tuple(views)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: v.copy() for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(v.copy() for v in value)
    return value.copy()


def _make_sink(cfg: PipelineConfig, total: int | None) -> Callable[[int, np.ndarray], None]:
    sink = cfg.sink
    if isinstance(sink, NpySink):
        out = Path(sink.path)
        out.mkdir(parents=True, exist_ok=True)
        digits = max(6, len(str(max(0, (total or 1) - 1))))

        def write_npy(idx: int, arr: Any) -> None:
            fields = not isinstance(arr, np.ndarray)  # a tuple or dict result: one .npz per item
            final = out / f"{idx:0{digits}d}.{'npz' if fields else 'npy'}"
            tmp = out / f".{final.name}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                if isinstance(arr, dict):
                    np.savez(f, **arr)
                elif fields:
                    np.savez(f, *arr)
                else:
                    np.save(f, arr)
            os.replace(tmp, final)  # atomic: a reader never sees half a file

        return write_npy
    if isinstance(sink, PythonSink):
        fn = resolve(sink.fn)
        takes_index = len(inspect.signature(fn).parameters) - len(sink.args) >= 2
        if takes_index:
            return lambda i, a: fn(a, i, **sink.args)
        return lambda i, a: fn(a, **sink.args)
    return lambda i, a: None


class _Progress:
    """A live progress line on a terminal (rich); nothing otherwise."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self.bar: Any = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]items"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("items", total=total, rate="")
            self.t0 = time.perf_counter()

    def update(self, done: int, nbytes: int, queues: str) -> None:
        if self.bar is not None:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, completed=done,
                            rate=f"{done / dt:.1f} items/s {nbytes / dt / 1e6:.1f} MB/s queues {queues}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
