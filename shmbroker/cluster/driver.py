"""``ClusterPipeline``: ``Pipeline.run()`` and ``map()`` on a Ray cluster, one broker per node.

The driver (this process) plans the nodes (``plan.py``), starts one
``NodeAgent`` per node that has work (pinned to it), and then moves only
references: each source group is ``ray.put`` once and its reference sent to
the agent of a node that has stage-0 workers (the least loaded, at most
``max_inflight`` items in flight per node); the agent reads it zero-copy
from its node's object store and writes it into its arena. Agents answer
polls with references to finished rows: results, read here and delivered as
on one host (``Seen`` drops duplicates), or items whose next stage has no
worker on their node, whose reference the driver hands to a node that has
that stage (the bytes go from node to node; counted as moved).

The driver always knows which node holds each item in flight and keeps its
source reference until its result is delivered, so when a node dies (its
agent's actor dies, with the node or alone) its items are sent again to
another node; the run fails only when a stage has no node left.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import msgspec
import numpy as np

from broker.errors import (
    ArenaFull,
    BrokerError,
    BrokerTimeout,
    ConfigError,
    StageFailed,
    WorkerDied,
    error_from_wire,
)
from broker.protocol import Failure
from broker.rows import unpack

from ..driver import Interrupted, Pipeline, _DriveState
from ..plan import search_path
from ..summary import Summary
from . import import_ray
from .agent import AgentSetup, NodeAgent
from .plan import NodeInfo, NodePlan, plan_cluster, stage_modules
from .status import NAMESPACE, remove_run_file, write_run_file

__all__ = ["ClusterPipeline"]

log = logging.getLogger("shmbroker.cluster")

POLL = 0.1  # s an agent's poll waits for something to report
EPOCH = 40  # item ids on the nodes: run number << EPOCH | index (a late result of a past run is dropped)
_COUNTERS = ("done", "failed", "busy", "copied")


@dataclass(eq=False)
class _Flight:
    """An item in flight: its source group's reference and row, the node that holds it now."""

    ref: Any
    pos: int
    node: str
    nbytes: int
    hop: int = 0  # bumped at each (re)submission and hand-off: a stale failure is recognised


@dataclass(eq=False)
class _Run:
    epoch: int
    flights: dict[int, _Flight] = field(default_factory=dict)
    load: collections.Counter[str] = field(default_factory=collections.Counter)
    pending: dict[Any, tuple[str, str, list[int], list[int]]] = field(default_factory=dict)
    polls: dict[str, Any] = field(default_factory=dict)  # the pipeline's, shared by its runs: a poll a
    # run left unanswered may carry the next run's first results


class ClusterPipeline(Pipeline):
    """A pipeline whose stages run on the nodes of a Ray cluster (see the module docstring)."""

    def __init__(self, cfg: Any, **kw: Any) -> None:
        super().__init__(cfg, **kw)
        self.ray: Any = None
        self.own_ray = False
        self.plans: dict[str, NodePlan] = {}
        self.agents: dict[str, Any] = {}
        self.agent_names: dict[str, str] = {}
        self.alive: set[str] = set()
        self.lost: dict[str, str] = {}  # node -> why it is gone
        self.started: list[dict[str, Any]] = []
        self.moved_bytes = 0
        self.moved_items = 0
        self.received_bytes = 0
        self._epoch = 0
        self._polls: dict[str, Any] = {}  # node -> its agent's outstanding poll
        self._run_file: Path | None = None

    # -- lifetime -------------------------------------------------------------------------------------
    def plan(self) -> list[NodePlan]:  # type: ignore[override]
        nodes = [NodeInfo.from_ray(n) for n in self.ray.nodes() if n.get("Alive")]
        return plan_cluster(self.cfg, nodes, self.require_gpu, warn=self._warn)

    def start(self) -> ClusterPipeline:
        assert self.cfg.cluster is not None
        env = dict(self.cfg.cluster.runtime_env)
        modules = stage_modules(self.cfg, search_path(self.path))
        if modules:
            env["py_modules"] = [*env.get("py_modules", []), *modules]
        env = self._connect(env)
        plans = self.plan()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token = f"{os.getpid()}-{os.urandom(3).hex()}"
        for p in plans:
            nid = p.node.node_id
            self.plans[nid] = p
            self.agent_names[nid] = f"shmbroker-agent:{token}:{p.node.short}"
            self.agents[nid] = self.ray.remote(NodeAgent).options(
                num_cpus=0, max_concurrency=32, max_restarts=0, name=self.agent_names[nid],
                namespace=NAMESPACE, scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False),
            ).remote(self._setup(p, env))
        self.alive = set(self.agents)
        timeout = self.cfg.cluster.start_timeout
        infos = self._get([a.info.remote() for a in self.agents.values()], timeout, "the node agents")
        workers = self._get([a.start_workers.remote(timeout) for a in self.agents.values()], timeout + 10,
                            "the workers")
        for info, ws in zip(infos, workers, strict=True):
            for w in ws:
                if w["warning"] and w["warning"] not in self.warnings:
                    self._warn(w["warning"])
            self.started.append({**info, "workers": ws})
        self._run_file = write_run_file(self._address(), list(self.agent_names.values()),
                                        [i["node"] for i in infos])
        return self

    def _connect(self, env: dict[str, Any]) -> dict[str, Any]:
        """Connect to Ray (the caller's connection if it made one); returns the runtime_env the
        actors need on top of the job's: the stage code travels as the job's runtime_env when
        this process connects, else it is uploaded here (as ``ray.init`` would) for the actors."""
        ray = self.ray = import_ray()
        assert self.cfg.cluster is not None
        if ray.is_initialized():  # the caller's connection (ray.init before the pipeline): use it
            return _upload(env) if env else {}
        address = self.cfg.cluster.address
        try:
            ray.init(address=address, runtime_env=env or None, log_to_driver=self.log_level in ("DEBUG", "INFO"),
                     configure_logging=False, logging_level=self.log_level)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise BrokerError(f"cluster.address {address}: cannot connect to a Ray cluster ({e}); start "
                              f"one (`ray start --head`, docs/cluster.md), or give its address: --set "
                              f"cluster.address=HOST:6379 (or ray://HOST:10001)") from None
        self.own_ray = True
        return {}

    def _address(self) -> str:
        assert self.cfg.cluster is not None
        addr = self.cfg.cluster.address
        return addr if addr.startswith("ray://") else str(self.ray.get_runtime_context().gcs_address)

    def _setup(self, p: NodePlan, env: dict[str, Any]) -> AgentSetup:
        cfg = self.cfg
        return AgentSetup(plan=p, broker_stages=p.broker_stages(cfg), specs={s: p.spec(cfg, s) for s in p.stages},
                          capacity=int(cfg.broker.capacity), max_inflight=cfg.broker.max_inflight,
                          wait_timeout=cfg.broker.wait_timeout, pipeline=cfg.pipeline_id(),
                          runtime_env=env, require_gpu=self.require_gpu, log_level=self.log_level,
                          log_json=self.log_json, stage_names=[s.name for s in cfg.stages])

    def _get(self, refs: list[Any], timeout: float, what: str) -> list[Any]:
        ray = self.ray
        try:
            return list(ray.get(refs, timeout=timeout))
        except ray.exceptions.GetTimeoutError:
            raise BrokerTimeout(f"{what} did not start within {timeout:g} s on the nodes; see `ray status` "
                                f"(free resources) and raise cluster.start_timeout if the stage code is slow "
                                f"to import") from None
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
            if isinstance(cause, BrokerError):
                raise cause from None
            raise BrokerError(f"{what} failed to start: {cause}") from None

    @property
    def restarts(self) -> dict[str, int]:
        return dict(self._restarts) if hasattr(self, "_restarts") else {}

    def close(self) -> None:
        if self.ray is None:
            return
        ray, agents = self.ray, [a for n, a in self.agents.items() if n in self.alive]
        if agents:
            try:
                ray.get([a.stop.remote() for a in agents], timeout=30)
            except Exception as e:  # a node that went away meanwhile: nothing to stop there
                log.info("stopping the node agents: %s", e)
        for a in self.agents.values():
            ray.kill(a, no_restart=True)
        self.agents.clear()
        self.alive.clear()
        self._polls.clear()
        remove_run_file(self._run_file)
        self._run_file = None
        if self.own_ray:
            ray.shutdown()
            self.own_ray = False
        self.ray = None

    # -- driving --------------------------------------------------------------------------------------
    def _drive(self, items: Iterator[tuple[int, np.ndarray]],
               state: _DriveState) -> Iterator[tuple[int, Any, int]]:
        if self._unfinished:
            raise BrokerError("a previous run() or map() of this Pipeline stopped before its end "
                              "(items of it are still in flight); start a new Pipeline")
        self._unfinished = True
        self.state = state
        self._epoch += 1
        run = _Run(self._epoch, polls=self._polls)
        self.moved_items = self.moved_bytes = self.received_bytes = 0  # this run's
        groups = self._groups(items)
        held: list[tuple[int, np.ndarray]] | None = None
        exhausted = False
        stall = max(self.cfg.broker.wait_timeout, 60.0) * 2
        last_progress = time.monotonic()
        while True:
            if self.stop_signal:
                raise Interrupted(self.stop_signal)
            while not exhausted:
                group = held if held is not None else next(groups, None)
                if group is None:
                    exhausted = True
                elif self._feed(group, run, state):
                    held = None
                    continue
                else:
                    held = group
                break
            if exhausted and not run.flights and state.seen.count >= state.submitted:
                self._unfinished = False
                return
            for nid in self.alive - set(run.polls):
                run.polls[nid] = self.agents[nid].poll.remote(POLL)
            progressed = False
            for kind, nid, payload in self._ready(run):
                progressed = progressed or kind != "poll" or bool(payload)
                if kind == "poll":
                    yield from self._events(nid, payload, run, state)
            if progressed:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > stall:
                raise BrokerTimeout(f"no progress for {stall:.0f} s; in flight per node: "
                                    f"{dict(run.load)}; `shmbroker status` shows the nodes")

    def _ready(self, run: _Run) -> Iterator[tuple[str, str, Any]]:
        """The calls that finished: ``("poll", node, events)`` for polls; hand-offs and feeds that
        failed are dealt with here (a lost node's items go elsewhere)."""
        ray = self.ray
        waiting = list(run.polls.values()) + list(run.pending)
        if not waiting:
            return
        ready, _ = ray.wait(waiting, num_returns=1, timeout=0.2)
        if ready:
            ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)
        polls = {ref: nid for nid, ref in run.polls.items()}
        for ref in ready:
            if ref in polls:
                nid = polls[ref]
                del run.polls[nid]
                try:
                    yield "poll", nid, ray.get(ref)
                except ray.exceptions.RayActorError as e:  # died, or unreachable (never restarted)
                    self._node_lost(nid, f"its agent died ({type(e).__name__})", run)
            else:
                kind, nid, ids, hops = run.pending.pop(ref)
                try:
                    ray.get(ref)
                    yield kind, nid, None
                except ray.exceptions.RayActorError as e:
                    self._node_lost(nid, f"its agent died ({type(e).__name__})", run)
                except ray.exceptions.RayTaskError as e:
                    self._write_failed(e, nid, ids, hops, run)
                except ray.exceptions.ObjectLostError:
                    self._resubmit([i for i, h in zip(ids, hops, strict=True) if self._current(run, i, h)], run)

    def _write_failed(self, e: Any, nid: str, ids: list[int], hops: list[int], run: _Run) -> None:
        """An agent could not write items: their bytes were lost with the node that sent them
        (send them again from the source), or its broker refused (the run fails, as on one host)."""
        cause = getattr(e, "cause", None)
        if not isinstance(cause, self.ray.exceptions.ObjectLostError):
            code, _, message = str(cause).partition(": ")
            raise (error_from_wire(code, message) if code in ("ArenaFull", "ItemTooLarge") else
                   BrokerError(f"node {nid[:8]} could not take items: {cause or e}"))
        self._resubmit([i for i, h in zip(ids, hops, strict=True) if self._current(run, i, h)], run)

    @staticmethod
    def _current(run: _Run, idx: int, hop: int) -> bool:
        f = run.flights.get(idx)
        return f is not None and f.hop == hop

    def _pick(self, stage: int, run: _Run, budget: int | None) -> str | None:
        """The alive node with workers of ``stage`` that has the fewest items per such worker
        (and, for the source, room for ``budget`` more within ``max_inflight``)."""
        best, best_load = None, float("inf")
        for nid in self.alive:
            p = self.plans[nid]
            if stage not in p.stages:
                continue
            if budget is not None and run.load[nid] + budget > self.cfg.broker.max_inflight:
                continue
            workers = sum(1 for w in p.workers if w.stage == stage)
            load = run.load[nid] / max(1, workers)
            if load < best_load:
                best, best_load = nid, load
        return best

    def _feed(self, group: list[tuple[int, np.ndarray]], run: _Run, state: _DriveState) -> bool:
        """Send a source group to a stage-0 node; False while none has room."""
        if not any(0 in self.plans[n].stages for n in self.alive):
            raise BrokerError(self._none_left(0))
        fewest = min(sum(1 for n in self.alive if s in self.plans[n].stages) for s in range(len(self.cfg.stages)))
        if len(run.flights) + len(group) > self.cfg.broker.max_inflight * max(1, fewest):
            return False  # the narrowest stage's nodes hold at most max_inflight each, on average
        nid = self._pick(0, run, len(group))
        if nid is None:
            return False
        arrays = [np.asarray(a) for _, a in group]
        ref = self.ray.put(arrays)
        ids = [i for i, _ in group]
        for pos, (idx, arr) in enumerate(zip(ids, arrays, strict=True)):
            run.flights[idx] = _Flight(ref, pos, "", arr.nbytes)
            state.bytes_in += arr.nbytes
        state.submitted += len(group)
        self._send(run, nid, 0, ids, ref)
        return True

    def _send(self, run: _Run, nid: str, stage: int, ids: list[int], ref: Any,
              layout: Any = None, positions: list[int] | None = None) -> None:
        hops = []
        for idx in ids:
            f = run.flights[idx]
            if f.node:
                run.load[f.node] -= 1
            f.node, f.hop = nid, f.hop + 1
            run.load[nid] += 1
            hops.append(f.hop)
        wire = [run.epoch << EPOCH | i for i in ids]
        call = self.agents[nid].accept.remote(stage, wire, ref, layout, positions)
        run.pending[call] = ("accept", nid, ids, hops)

    def _resubmit(self, ids: list[int], run: _Run) -> None:
        """Send items again from their source references (their node was lost)."""
        by_ref: dict[int, tuple[Any, list[int], list[int]]] = {}
        for idx in ids:
            f = run.flights[idx]
            entry = by_ref.setdefault(id(f.ref), (f.ref, [], []))
            entry[1].append(idx)
            entry[2].append(f.pos)
        for ref, group, positions in by_ref.values():
            nid = self._pick(0, run, None)
            if nid is None:
                raise BrokerError(self._none_left(0))
            log.info("sending %d item(s) again to node %s", len(group), nid[:8])
            self._send(run, nid, 0, group, ref, None, positions)

    def _node_lost(self, nid: str, why: str, run: _Run) -> None:
        if nid not in self.alive:
            return
        self.alive.discard(nid)
        self.lost[nid] = why
        self.ray.kill(self.agents[nid], no_restart=True)  # an agent only unreachable: out of the run too
        run.polls.pop(nid, None)
        self._warn(f"node {nid[:8]} is gone ({why}); its {run.load[nid]} item(s) in flight go to other nodes")
        for s in range(len(self.cfg.stages)):
            if not any(s in self.plans[n].stages for n in self.alive):
                raise BrokerError(self._none_left(s))
        self._resubmit([i for i, f in run.flights.items() if f.node == nid], run)

    def _none_left(self, stage: int) -> str:
        gone = ", ".join(f"{n[:8]} ({why})" for n, why in self.lost.items()) or "none"
        return (f"stage {self.cfg.stages[stage].name!r} has no worker left anywhere in the cluster; "
                f"nodes lost: {gone}; the run cannot finish: restart the lost nodes and run again "
                f"(an npy sink's run continues with --resume)")

    def _events(self, nid: str, events: list[tuple[Any, ...]], run: _Run,
                state: _DriveState) -> Iterator[tuple[int, Any, int]]:
        for event in events:
            if event[0] == "out":
                yield from self._out(nid, event, run, state)
            elif event[0] == "failure":
                self._failure(event[1], run, state)
            elif event[0] == "fatal":
                raise BrokerError(event[1])

    def _out(self, nid: str, event: tuple[Any, ...], run: _Run,
             state: _DriveState) -> Iterator[tuple[int, Any, int]]:
        _, nxt, wire, ref, layout, sizes = event
        mine = [(k, w & ((1 << EPOCH) - 1)) for k, w in enumerate(wire) if w >> EPOCH == run.epoch]
        if nxt < len(self.cfg.stages):  # a hand-off: the bytes go from node to node
            ids = [i for _, i in mine if i in run.flights and run.flights[i].node == nid]
            if not ids:
                return
            target = self._pick(nxt, run, None)
            if target is None:
                raise BrokerError(self._none_left(nxt))
            positions = [k for k, i in mine if i in ids]
            self._send(run, target, nxt, ids, ref, layout, positions)
            self.moved_items += len(ids)
            self.moved_bytes += sum(sizes[k] for k in positions)
            return
        try:
            rows = self.ray.get(ref)
        except self.ray.exceptions.ObjectLostError:
            return  # the node died with them: its items are sent again when its death is seen
        self.received_bytes += sum(sizes)
        for k, idx in mine:
            f = run.flights.pop(idx, None)
            if f is not None:
                run.load[f.node] -= 1
            if idx in state.seen:
                state.duplicates += 1
                continue
            state.seen.add(idx)
            state.delivered += 1
            yield idx, unpack(rows[k], layout), -1

    def _failure(self, msg: Failure, run: _Run, state: _DriveState) -> None:
        items = [w & ((1 << EPOCH) - 1) for w in msg.items if w >> EPOCH == run.epoch]
        if not items:
            return
        for idx in items:
            f = run.flights.pop(idx, None)
            if f is not None:
                run.load[f.node] -= 1
        msg = msgspec.structs.replace(msg, items=items)
        if msg.fatal and msg.code == "WorkerDied":
            raise WorkerDied(f"stage {msg.stage!r} gave up on item(s) {items[:20]}: {msg.error}; its "
                             f"worker actors died each time; raise the stage's retries if they die for "
                             f"reasons of their own")
        if msg.fatal and msg.code == "ArenaFull":
            raise ArenaFull(msg.error)
        if msg.fatal:
            raise StageFailed(f"stage {msg.stage!r} failed on item(s) {items}: {msg.error}\n"
                              f"--- worker traceback ---\n{msg.trace}")
        self._on_failure(msg, state)

    def _give_back(self) -> None:
        return  # results are the driver's own copies (Ray objects): nothing to give back

    def _done(self, task: int) -> None:
        return

    # -- what the run did -----------------------------------------------------------------------------
    def node_stats(self) -> list[dict[str, Any]]:
        """Each live node's agent statistics (``NodeAgent.stats``)."""
        nids = sorted(self.alive)
        out = []
        for nid, ref in zip(nids, [self.agents[n].stats.remote() for n in nids], strict=True):
            try:
                out.append(self.ray.get(ref, timeout=30))
            except self.ray.exceptions.RayError as e:
                log.info("node %s gave no statistics: %s", nid[:8], e)
        return out

    def _baseline(self) -> dict[str, dict[str, float]]:
        return {f"{st['node']}/{s['name']}": {k: s[k] for k in _COUNTERS}
                for st in self.node_stats() for s in st["broker"]["stages"][:-1]}

    def _summary(self, state: _DriveState, seconds: float, resumed: int = 0, interrupted: str = "") -> Summary:
        nodes = self.node_stats()
        self._restarts: collections.Counter[str] = collections.Counter()
        per: dict[str, dict[str, Any]] = {s.name: {"name": s.name, "done": 0, "failed": 0, "busy": 0.0,
                                                  "copied": 0, "rate": 0.0, "workers": 0, "device": set(),
                                                  "unpinned": 0, "queue": 0, "inflight": 0}
                                         for s in self.cfg.stages}
        for st in nodes:
            self._restarts.update(st["restarts"])
            for s in st["broker"]["stages"][:-1]:
                agg, base = per[s["name"]], state.base.get(f"{st['node']}/{s['name']}", {})
                for k in _COUNTERS:
                    agg[k] += s[k] - base.get(k, 0)
                agg["rate"] += s["rate"]
                agg["workers"] += len(s["workers"])
                agg["device"] |= {w["device"] for w in s["workers"]}
        stages = [{**a, "device": ",".join(sorted(a["device"]))} for a in per.values()]
        copied = state.bytes_in + sum(s["copied"] for s in stages)
        peak = max((st["broker"]["peak"] for st in nodes), default=0)
        summary = Summary(self.cfg.name, state.delivered, sorted(state.skipped), state.duplicates, seconds,
                          state.bytes_in, stages, peak, int(self.cfg.broker.capacity), self.restarts,
                          copied / max(1, state.delivered), state.failures, resumed, interrupted,
                          str(state.record) if state.record else "")
        summary.nodes = [{"node": st["node"], "host": st["host"], "stages": st["stages"],
                          "workers": [{k: w[k] for k in ("name", "stage", "device", "pid", "num_gpus")}
                                      for w in st["workers"]],
                          "peak": st["broker"]["peak"]} for st in nodes]
        summary.moved = {"items": self.moved_items, "bytes": self.moved_bytes, "lost_nodes": sorted(self.lost)}
        return summary


def _upload(env: dict[str, Any]) -> dict[str, Any]:
    """Local ``py_modules``/``working_dir`` of ``env`` uploaded to the cluster (what ``ray.init``
    does for a job's runtime_env), so actors of a job that did not name them can use them."""
    import tempfile

    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = upload_py_modules_if_needed(env, include_gitignore=True, scratch_dir=tmp, logger=log)
            env = upload_working_dir_if_needed(env, include_gitignore=True, scratch_dir=tmp, logger=log)
    except Exception as e:  # Ray Client, another Ray version: the caller can name them itself
        raise ConfigError(f"cluster: cannot upload the stage code {env.get('py_modules')} to the cluster "
                          f"({type(e).__name__}: {e}); pass runtime_env={{'py_modules': [...]}} to your "
                          f"ray.init, or let the pipeline connect (do not call ray.init first)") from None
    env.pop("excludes", None)
    return env
