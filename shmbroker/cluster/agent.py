"""The node agent (one Ray actor per node that has work) and the worker actor.

A ``NodeAgent`` is pinned to its node. It starts the node's broker
(``broker.process.Broker``: the node's one arena, an ipc endpoint in the
node's runtime directory), starts the node's workers as ``WorkerActor``\\ s
pinned to the same node, restarts the ones that die, and is the node's
gateway to the driver::

    driver ── accept(stage, ids, rows) ─▶ reserve(stage) / rows / commit   (the one copy in)
                                          ... the node's stages, as on one host ...
    driver ◀─ poll() ─ ("out", next stage, ids, ref) ◀── sink task of its broker
                       ray.put of the rows: results (next stage = the end) or items
                       whose next stage has no worker here (the driver hands the ref
                       to a node that has it, whose agent accepts it)

The broker's ``Client`` is not thread-safe, so one thread (the pump) owns it;
the actor's methods run on Ray's threads (a threaded actor) and hand it
commands. A sink task is given back (``done``) only after its rows are in
Ray's object store. The node's broker and workers die with the agent: the
broker stops when its parent (the agent's process) is gone, and worker actors
are owned by the agent, so Ray kills them with it.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import queue
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec
import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from broker.client import SINK, Client
from broker.errors import BrokerError, BrokerGone
from broker.process import Broker
from broker.protocol import Error, Failure, Layout, Reserved, StageSettings, Task
from workers.spec import StageSpec

from ..supervisor import MAX_RESTARTS, RESTART_WINDOW
from .plan import NodePlan

__all__ = ["AgentSetup", "NodeAgent", "WorkerActor", "raw_rows", "node_device"]

log = logging.getLogger("shmbroker.cluster.agent")

SINK_CREDITS = 64  # sink tasks the agent holds while the driver has not polled them
PUMP_WAIT = 0.005  # s the pump waits for a broker message before looking at its commands
SUPERVISE_EVERY = 0.25  # s between looks at the worker actors
NOSET_CUDA = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}  # workers keep the plan's cuda:N


@dataclass
class AgentSetup:
    """What the driver tells an agent: the config's parts it needs and this node's plan."""

    plan: NodePlan
    broker_stages: list[StageSettings]  # the stages that have workers on this node, in order
    specs: dict[int, StageSpec]  # config stage index -> the spec of its workers on this node
    capacity: int
    max_inflight: int
    wait_timeout: float
    pipeline: str
    runtime_env: dict[str, Any]
    require_gpu: bool = False
    log_level: str = "WARNING"
    log_json: bool = False
    stage_names: list[str] = field(default_factory=list)


def raw_rows(client: Client, task: Task) -> list[np.ndarray]:
    """A task's rows as stored (a layout's rows as bytes): ``Client.task_rows`` without unpacking."""
    view = client.view(task.handle)
    if not (task.batched or task.each):
        return [view]
    rows = task.valid if task.valid is not None else range(len(task.items))
    return [view[r] for r in rows]


def node_device(planned: str, require_gpu: bool, stage: str, node: str) -> tuple[str, str]:
    """The device a worker planned for ``planned`` uses on this node, and a warning ("" if none):
    a node that advertises GPUs to Ray while torch sees none there runs the stage on its CPU."""
    if not planned.startswith("cuda"):
        return planned, ""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        why = (f"node {node[:8]} advertises GPUs to Ray but torch there sees no CUDA device "
               f"(torch.cuda.is_available() is False)")
        if require_gpu:
            raise BrokerError(f"stage {stage!r}: {why}, and a GPU was required (--require-gpu); install "
                              f"a CUDA build of torch on that node or start it without --num-gpus")
        return "cpu", f"stage {stage!r}: {why}; running it on the CPU there"
    index = int(planned.partition(":")[2] or 0)
    if index >= count:
        raise BrokerError(f"stage {stage!r}: node {node[:8]} advertises more GPUs to Ray than torch "
                          f"sees there ({count}); {planned} does not exist")
    return planned, ""


class WorkerActor:
    """One worker process of a stage on a node: ``setup`` (node id, device), then ``run`` the
    worker loop (``workers.runtime.worker_main``) against the node's broker until killed."""

    def setup(self, planned: str, require_gpu: bool, stage: str) -> tuple[str, str, int]:
        node = ray.get_runtime_context().get_node_id()
        os.environ["SHMBROKER_NODE_ID"] = node  # before the stage is loaded
        self.device, warning = node_device(planned, require_gpu, stage, node)
        return self.device, warning, os.getpid()

    def run(self, endpoint: str, spec: StageSpec, log_level: str, log_json: bool) -> int:
        from workers.runtime import worker_main

        return worker_main(endpoint, spec, self.device, log_level, log_json)


@dataclass(eq=False)
class _Slot:
    """A planned worker and the actor that runs it now."""

    plan: Any  # WorkerPlan
    actor: Any = None
    run: Any = None  # the ObjectRef of its run() call
    pid: int = 0
    device: str = ""
    deaths: list[float] = field(default_factory=list)
    restart_at: float = 0.0
    last_error: str = ""
    setup: Any = None  # the ObjectRef of its setup() call, until its answer is read


@dataclass(eq=False)
class _Write:
    stage: int
    ids: list[int]
    rows: list[np.ndarray]
    done: Future[None]


class NodeAgent:
    """The node's broker, workers and gateway; see the module docstring."""

    def __init__(self, setup: AgentSetup) -> None:
        self.setup = setup
        self.plan = setup.plan
        self.node_id = ray.get_runtime_context().get_node_id()
        self.index = {s: b for b, s in enumerate(self.plan.stages)}  # config stage -> broker stage
        self.broker = Broker(setup.capacity, stages=setup.broker_stages,
                             max_inflight=setup.max_inflight, wait_timeout=setup.wait_timeout,
                             log_level=setup.log_level, pipeline=setup.pipeline)
        self.client = Client(self.broker.endpoint, role="agent", name=f"agent:{self.node_id[:8]}")
        self.client.register(SINK, credits=SINK_CREDITS, pipeline=setup.pipeline)
        self.commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.cond = threading.Condition()
        self.outs: list[tuple[Task, list[tuple[int, np.ndarray, int]]]] = []
        self.events: list[tuple[Any, ...]] = []
        self.entry: dict[int, int] = {}  # item id -> the stage it entered this node at
        self.writes: dict[int, _Write] = {}  # reserve request id -> what to write when reserved
        self.slots = [_Slot(w) for w in self.plan.workers]
        self.restarts: collections.Counter[str] = collections.Counter()
        self.stopping = False
        self.supervising = False  # from the end of start_workers on
        self.pump = threading.Thread(target=self._pump, name="shmbroker-agent-pump", daemon=True)
        self.pump.start()

    # -- called by the driver (Ray threads) ---------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"node": self.node_id, "host": socket.gethostname(), "pid": os.getpid(),
                "broker_pid": self.broker.pid, "endpoint": self.broker.endpoint,
                "stages": [self.setup.stage_names[s] for s in self.plan.stages]}

    def start_workers(self, timeout: float) -> list[dict[str, Any]]:
        """Start every planned worker; wait until each has chosen its device (``BrokerError`` naming
        the workers Ray could not place within ``timeout`` s, with the resources they ask)."""
        setups = [self._start(slot) for slot in self.slots]
        ready, pending = ray.wait(setups, num_returns=len(setups), timeout=timeout)
        if pending:
            late = [s.plan for s, r in zip(self.slots, setups, strict=True) if r in pending]
            raise BrokerError(
                f"node {self.node_id[:8]}: {len(late)} worker(s) did not start within {timeout:g} s: "
                + ", ".join(f"{w.name} (num_cpus={w.num_cpus:g}, num_gpus={w.num_gpus:g})" for w in late)
                + "; Ray has not the resources free on that node (`ray status`), or the stage code "
                  "takes that long to import: raise cluster.start_timeout")
        out = []
        for slot, ref in zip(self.slots, setups, strict=True):
            slot.device, warning, slot.pid = ray.get(ref)
            slot.setup = None
            out.append({"name": slot.plan.name, "stage": slot.plan.stage, "device": slot.device,
                        "planned": slot.plan.device, "num_gpus": slot.plan.num_gpus,
                        "pid": slot.pid, "warning": warning})
        self._wait_registered(timeout)
        self.supervising = True
        return out

    def _wait_registered(self, timeout: float) -> None:
        """Until every worker has loaded its stage and registered with the broker (a worker that
        ends first, say its stage code does not import here, is an error with its reason)."""
        want = collections.Counter(self.setup.stage_names[w.stage] for w in self.plan.workers)
        deadline = time.monotonic() + timeout
        while True:
            st = self._broker_stats()
            have = {s["name"]: len(s["workers"]) for s in st["stages"]}
            if all(have.get(name, 0) >= n for name, n in want.items()):
                return
            runs = [s.run for s in self.slots]
            ended = ray.wait(runs, num_returns=len(runs), timeout=0)[0]
            if ended:
                slot = next(s for s in self.slots if s.run in ended)
                raise BrokerError(f"node {self.node_id[:8]}: worker {slot.plan.name} ended while starting: "
                                  f"{_ending(slot.run)}")
            if time.monotonic() > deadline:
                raise BrokerError(f"node {self.node_id[:8]}: workers registered {have}, not {dict(want)}, "
                                  f"within {timeout:g} s; raise cluster.start_timeout")
            time.sleep(0.05)

    def _broker_stats(self) -> dict[str, Any]:
        done: Future[dict[str, Any]] = Future()
        self.commands.put(lambda: done.set_result(self.client.stats()))
        return done.result(timeout=10)

    def accept(self, stage: int, ids: list[int], rows: list[np.ndarray], layout: Layout | None = None,
               positions: list[int] | None = None) -> int:
        """Write items into ``stage`` (a config index) of this node's arena: reserve, the one copy,
        commit. Returns the bytes written once they are committed (raises what the broker said)."""
        if positions is not None:
            rows = [rows[p] for p in positions]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for k, row in enumerate(rows):
            groups.setdefault((row.shape, row.dtype.str), []).append(k)
        futures = []
        for members in groups.values():
            done: Future[None] = Future()
            write = _Write(stage, [ids[k] for k in members], [rows[k] for k in members], done)
            self.commands.put(functools.partial(self._reserve, write, layout))
            futures.append(done)
        for f in futures:
            f.result()
        return sum(r.nbytes for r in rows)

    def poll(self, timeout: float) -> list[tuple[Any, ...]]:
        """What happened since the last poll: ``("out", next_stage, ids, ref, layout, sizes)`` per
        group of finished rows (their sink tasks are given back once the rows are in Ray's object
        store), ``("failure", Failure)``, ``("fatal", message)``."""
        with self.cond:
            if not self.outs and not self.events:
                self.cond.wait(timeout)
            outs, self.outs = self.outs, []
            events, self.events = self.events, []
        groups: dict[tuple[int, bytes], tuple[list[int], list[np.ndarray], Layout | None]] = {}
        for task, rows in outs:
            key = msgspec.json.encode(task.layout)
            for item, row, nxt in rows:
                ids, arrays, _ = groups.setdefault((nxt, key), ([], [], task.layout))
                ids.append(item)
                arrays.append(row)
        for (nxt, _), (ids, arrays, layout) in groups.items():
            events.append(("out", nxt, ids, ray.put(arrays), layout, [a.nbytes for a in arrays]))
        for task, _ in outs:  # the rows are copied into Ray's store: the slots may go
            self.commands.put(functools.partial(self.client.done, task))
        return events

    def stats(self) -> dict[str, Any]:
        """The node's broker statistics, its workers and restarts (for status and the summary)."""
        st = self._broker_stats()
        workers = [{"name": s.plan.name, "stage": self.setup.stage_names[s.plan.stage], "pid": s.pid,
                    "device": s.device, "planned": s.plan.device, "num_gpus": s.plan.num_gpus,
                    "deaths": len(s.deaths)} for s in self.slots]
        return {**self.info(), "broker": st, "workers": workers, "restarts": dict(self.restarts)}

    def stop(self) -> None:
        """Stop the workers, the pump, the broker (its runtime directory goes with it)."""
        self.stopping = True
        for slot in self.slots:
            if slot.actor is not None:
                ray.kill(slot.actor, no_restart=True)
        runs = [s.run for s in self.slots if s.run is not None]
        if runs:  # gone before their broker, so none of them reports it gone
            ray.wait(runs, num_returns=len(runs), timeout=10)
        self.pump.join(10)
        self.client.close()
        self.broker.close()

    # -- the pump: the one thread that talks to the broker ------------------------------------------
    def _pump(self) -> None:
        supervised = 0.0
        while not self.stopping:
            try:
                while True:
                    try:
                        self.commands.get_nowait()()
                    except queue.Empty:
                        break
                msg = self.client.next_message(PUMP_WAIT)
                while msg is not None:
                    self._handle(msg)
                    msg = self.client.next_message(0)
                if self.supervising and time.monotonic() - supervised > SUPERVISE_EVERY:
                    supervised = time.monotonic()
                    self._supervise()
            except BrokerGone as e:  # the node's broker died: this node is out, as if it had died
                if self.stopping:
                    return
                log.error("node %s: its broker is gone (%s); the agent exits", self.node_id[:8], e)
                os._exit(70)  # Ray reports the actor dead; the driver sends its items elsewhere
            except Exception as e:  # a bug: the driver must hear of it
                if self.stopping:
                    return
                log.exception("node agent pump failed")
                self._event(("fatal", f"node {self.node_id[:8]}: the agent stopped: {type(e).__name__}: {e}"))
                return

    def _event(self, event: tuple[Any, ...]) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def _handle(self, msg: Any) -> None:
        if isinstance(msg, Task):
            rows = []
            for item, row in zip(msg.items, raw_rows(self.client, msg), strict=True):
                entered = self.entry.pop(item, self.plan.stages[0])
                rows.append((item, row, self.plan.next_missing(entered)))
            with self.cond:
                self.outs.append((msg, rows))
                self.cond.notify_all()
        elif isinstance(msg, Failure):
            for item in msg.items:
                self.entry.pop(item, None)
            self._event(("failure", msg))
        elif isinstance(msg, Reserved) and msg.rid in self.writes:
            self._written(self.writes.pop(msg.rid), msg)
        elif isinstance(msg, Error) and msg.rid in self.writes:
            self.writes.pop(msg.rid).done.set_exception(BrokerError(f"{msg.code}: {msg.message}"))
        elif isinstance(msg, Error):
            self._event(("fatal", f"node {self.node_id[:8]}: the broker said {msg.code}: {msg.message}"))

    def _reserve(self, w: _Write, layout: Layout | None) -> None:
        first = w.rows[0]
        try:
            rid = self.client.reserve_nowait(self.index[w.stage], w.ids, first.shape, first.dtype,
                                             timeout=self.setup.wait_timeout, layout=layout)
        except Exception as e:
            w.done.set_exception(e)
            return
        self.writes[rid] = w

    def _written(self, w: _Write, reserved: Reserved) -> None:
        for row, item in zip(self.client.rows(reserved), w.rows, strict=True):
            np.copyto(row, item, casting="no" if item.dtype.isnative else "equiv")
        for item_id in w.ids:
            self.entry[item_id] = w.stage
        self.client.commit(reserved)
        w.done.set_result(None)

    # -- the workers ----------------------------------------------------------------------------------
    def _start(self, slot: _Slot) -> Any:
        w = slot.plan
        env = dict(self.setup.runtime_env)
        env["env_vars"] = {**NOSET_CUDA, **env.get("env_vars", {})}
        slot.actor = ray.remote(WorkerActor).options(
            num_cpus=w.num_cpus, num_gpus=w.num_gpus, runtime_env=env, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.node_id, soft=False)).remote()
        name = self.setup.stage_names[w.stage]
        setup = slot.setup = slot.actor.setup.remote(w.device, self.setup.require_gpu, name)
        slot.run = slot.actor.run.remote(self.broker.endpoint, self.setup.specs[w.stage],
                                         self.setup.log_level, self.setup.log_json)
        return setup

    def _supervise(self) -> None:
        """Restart worker actors that ended (a death: the broker has re-queued their tasks), with
        back-off; ``MAX_RESTARTS`` deaths of one within ``RESTART_WINDOW`` s is fatal."""
        now = time.monotonic()
        running = [s.run for s in self.slots if s.run is not None]
        ended = set(ray.wait(running, num_returns=len(running), timeout=0)[0]) if running else set()
        for slot in self.slots:
            if slot.setup is not None and ray.wait([slot.setup], timeout=0)[0]:
                try:
                    slot.device, _warning, slot.pid = ray.get(slot.setup)
                except Exception:  # its run() ends with the same error: seen below
                    pass
                slot.setup = None
            if slot.run is not None and slot.run in ended:
                slot.last_error = _ending(slot.run)
                slot.run = None
                slot.deaths = [t for t in slot.deaths if now - t < RESTART_WINDOW] + [now]
                name = self.setup.stage_names[slot.plan.stage]
                if len(slot.deaths) > MAX_RESTARTS:
                    self._event(("fatal", f"worker {slot.plan.name} of stage {name!r} on node "
                                          f"{self.node_id[:8]} ended {len(slot.deaths)} times within "
                                          f"{RESTART_WINDOW:.0f} s, last: {slot.last_error}; giving up"))
                    slot.restart_at = float("inf")
                    continue
                log.warning("worker %s ended (%s); restarting", slot.plan.name, slot.last_error)
                slot.restart_at = now + min(0.1 * 2 ** (len(slot.deaths) - 1), 5.0)
                self.restarts[name] += 1
            elif slot.run is None and slot.actor is not None and now >= slot.restart_at:
                ray.kill(slot.actor, no_restart=True)
                self._start(slot)


def _ending(ref: Any) -> str:
    """How a worker actor's ``run`` ended: its exit code, or the error (a dead actor, a traceback)."""
    try:
        return f"exit code {ray.get(ref, timeout=1)}"
    except Exception as e:  # ActorDiedError, RayTaskError, ...
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[-1] if text else ''}"[:500]
