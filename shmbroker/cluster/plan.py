"""Planning a cluster run: which node runs which stages with which workers, and what each node's broker is told.

Pure (no Ray here): the driver turns ``ray.nodes()`` into ``NodeInfo`` and
calls ``plan_cluster``; tests call it with any nodes they like.

* A GPU stage (``device`` cuda, cuda:N or auto) runs on the nodes that
  advertise GPUs to Ray; on each, ``devices`` and ``replicas_per_device``
  mean what they mean on one host (``plan.plan_devices`` with that node's GPU
  count), and each worker asks Ray for its share of its GPU (``num_gpus``).
  With no GPU in the whole cluster it falls back to the CPU as on one host.
* A CPU stage runs ``replicas`` workers on every node that has Ray CPUs.
* Each worker actor asks for ``cluster.worker_cpus`` CPUs; a node whose
  workers do not fit its CPUs is an error that says so, with the numbers.
* A node's broker runs the stages that have workers there, in order. A
  worker whose next stage has no worker on its node writes its result into
  the node's sink (the node agent), which hands it to a node that has that
  stage: ``NodePlan.spec`` sets the worker's output stage accordingly.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from broker.errors import ConfigError, format_bytes
from broker.protocol import StageSettings
from workers.spec import StageSpec

from ..config import PipelineConfig
from ..plan import plan_devices

__all__ = ["NodeInfo", "WorkerPlan", "NodePlan", "plan_cluster", "stage_modules", "OWN_PACKAGES"]

OWN_PACKAGES = ("broker", "workers", "shmbroker")  # installed on every node, never shipped


@dataclass(frozen=True)
class NodeInfo:
    """A live Ray node as the plan needs it (from ``ray.nodes()``)."""

    node_id: str
    address: str
    cpus: float
    gpus: int
    memory: int  # bytes of Ray's ``memory`` resource
    head: bool = False

    @classmethod
    def from_ray(cls, entry: dict[str, Any]) -> NodeInfo:
        res = entry.get("Resources", {})
        return cls(entry["NodeID"], entry.get("NodeManagerAddress", "?"), float(res.get("CPU", 0)),
                   int(res.get("GPU", 0)), int(res.get("memory", 0)),
                   "node:__internal_head__" in res)

    @property
    def short(self) -> str:
        return self.node_id[:8]


@dataclass(frozen=True)
class WorkerPlan:
    """One worker actor: its stage (index in the config), planned device and Ray resources."""

    stage: int
    device: str
    num_cpus: float
    num_gpus: float
    name: str


@dataclass
class NodePlan:
    """What one node runs: its stages (config indices, in order) and its workers."""

    node: NodeInfo
    stages: list[int] = field(default_factory=list)
    workers: list[WorkerPlan] = field(default_factory=list)

    def broker_stages(self, cfg: PipelineConfig) -> list[StageSettings]:
        """The node's broker runs only the stages that have workers here."""
        return [cfg.stages[s].to_broker() for s in self.stages]

    def spec(self, cfg: PipelineConfig, stage: int) -> StageSpec:
        """The worker spec of ``stage`` on this node: stage code found through Ray's runtime_env
        (no search path of the driver's host), outputs written into the node's next stage when
        it runs here, else into the node's sink (the agent hands them on)."""
        spec = cfg.worker_spec(stage, ())
        here = self.stages.index(stage)
        if stage + 1 in self.stages:
            return dataclasses.replace(spec, index=here)
        return dataclasses.replace(spec, index=len(self.stages) - 1, next_batch=1, next_name="")

    def next_missing(self, stage: int) -> int:
        """The first stage after ``stage`` with no worker on this node (``len(stages)``: the end)."""
        nxt = stage + 1
        while nxt in self.stages:
            nxt += 1
        return nxt


def plan_cluster(cfg: PipelineConfig, nodes: list[NodeInfo], require_gpu: bool = False,
                 warn: Callable[[str], None] | None = None) -> list[NodePlan]:
    """One ``NodePlan`` per node that gets work; ``ConfigError`` with the fix when a stage has
    no node or a node cannot hold its part."""
    if not nodes:
        raise ConfigError("cluster: Ray reports no live node; start the cluster first (docs/cluster.md)")
    assert cfg.cluster is not None
    gpu_nodes = [n for n in nodes if n.gpus > 0]
    plans = {n.node_id: NodePlan(n) for n in nodes}
    for i, st in enumerate(cfg.stages):
        gpu_stage = st.device != "cpu" and bool(gpu_nodes)
        cpu_devices = [] if gpu_stage else _cpu_devices(st, require_gpu, warn)
        for n in gpu_nodes if gpu_stage else [n for n in nodes if n.cpus > 0]:
            devices = plan_devices(st, n.gpus, require_gpu) if gpu_stage else cpu_devices
            share = {d: 1 / devices.count(d) for d in devices}
            for j, dev in enumerate(devices):
                plans[n.node_id].workers.append(WorkerPlan(
                    i, dev, cfg.cluster.worker_cpus, share[dev] if dev.startswith("cuda") else 0.0,
                    f"{st.name}:{n.short}:{j}"))
            if devices:
                plans[n.node_id].stages.append(i)
        if not any(i in p.stages for p in plans.values()):
            raise ConfigError(_no_node(cfg, i, nodes))
    out = [p for p in plans.values() if p.workers]
    for p in out:
        _check_fits(cfg, p)
    return out


def _cpu_devices(st: Any, require_gpu: bool, warn: Callable[[str], None] | None) -> list[str]:
    """A CPU stage's workers on each node; a GPU stage's when no node has a GPU (as on one host
    without CUDA: the CPU with one warning, unless ``require_gpu``)."""
    if st.device != "cpu" and require_gpu:
        raise ConfigError(f"stages[{st.name}].device: {st.device} would run on the CPU: no node of the "
                          f"cluster advertises a GPU to Ray (ray start --num-gpus N) and a GPU was "
                          f"required (--require-gpu)")
    if st.device not in ("cpu", "auto") and warn is not None:
        warn(f"stage {st.name!r} asks for {st.device} but no node of the cluster has a GPU; running it "
             f"on the CPU (pass --require-gpu to fail instead)")
    return plan_devices(st.model_copy(update={"device": "cpu"}), 0)


def _no_node(cfg: PipelineConfig, i: int, nodes: list[NodeInfo]) -> str:
    st = cfg.stages[i]
    have = ", ".join(f"{n.short} ({n.cpus:g} CPU, {n.gpus} GPU)" for n in nodes)
    if st.replicas == 0 and not st.replicas_per_device:
        return f"stages[{st.name}].replicas: 0 leaves the stage with no worker on any node"
    return (f"stages[{st.name}]: no node can run it: the cluster's nodes are {have}; start a node "
            f"with CPUs (ray start --num-cpus N) for a CPU stage")


def _check_fits(cfg: PipelineConfig, p: NodePlan) -> None:
    n = p.node
    cpus = sum(w.num_cpus for w in p.workers)
    if cpus > n.cpus + 1e-9:
        per = ", ".join(f"{cfg.stages[s].name}: {sum(1 for w in p.workers if w.stage == s)}" for s in p.stages)
        raise ConfigError(
            f"cluster: node {n.short} ({n.address}) has {n.cpus:g} Ray CPUs, but this pipeline puts "
            f"{len(p.workers)} workers there ({per}) asking {cfg.cluster.worker_cpus if cfg.cluster else 1:g} "
            f"CPU each ({cpus:g} in all); lower the stages' replicas, set cluster.worker_cpus to at most "
            f"{n.cpus / len(p.workers):.2g}, or start the node with more CPUs (ray start --num-cpus)")
    cap = int(cfg.broker.capacity)
    if n.memory and cap > n.memory:
        raise ConfigError(
            f"broker.capacity: the arena of {format_bytes(cap)} is more than node {n.short} "
            f"({n.address}) offers ({format_bytes(n.memory)} of Ray's memory resource); lower "
            f"broker.capacity to at most {format_bytes(n.memory)}")


# -- stage code for the nodes ----------------------------------------------------------------------
def _installed_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return sorted(os.path.realpath(d) for d in dirs)


def stage_modules(cfg: PipelineConfig, search_path: tuple[str, ...]) -> list[str]:
    """Files or package directories of the stages' top-level modules that the nodes cannot be
    expected to have: found on this host outside the installed packages and the standard library
    (next to the config, in the working directory, on ``PYTHONPATH``). They travel to the nodes
    as Ray ``py_modules``; installed packages (and this project) are expected on every node."""
    installed = _installed_dirs()
    out: list[str] = []
    for st in cfg.stages:
        top = (st.fn or st.factory or "").partition(":")[0].split(".")[0]
        if not top or top in OWN_PACKAGES or top in sys.builtin_module_names:
            continue
        where = _find(top, search_path)
        if where is None or any(os.path.realpath(where).startswith(d + os.sep) for d in installed):
            continue  # not found here (check_imports says so) or an installed package
        if where not in out:
            out.append(where)
    return out


def _find(top: str, search_path: tuple[str, ...]) -> str | None:
    """Where ``top`` would be imported from (``sys.path``, then the search path): a ``.py`` file or
    a package directory; None for built-in, frozen or unknown modules."""
    for paths in ([p or os.getcwd() for p in sys.path], list(search_path)):
        spec = importlib.machinery.PathFinder.find_spec(top, paths)
        if spec is None:
            continue
        if spec.submodule_search_locations:  # a package (or a namespace package)
            return str(Path(list(spec.submodule_search_locations)[0]))
        if spec.origin and spec.origin.endswith(".py"):
            return spec.origin
        return None  # an extension module: installed with its package
    return None
