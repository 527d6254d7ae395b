"""Preflight checks of the host (or of a cluster's nodes) against a pipeline config, each with the exact fix (``shmbroker doctor``)."""

from __future__ import annotations

import os
import resource
import shutil
import socket
import stat
from dataclasses import dataclass
from typing import Any

from broker.arena import host_memory_limit
from broker.errors import ConfigError, format_bytes
from broker.rundir import base_dir

from .config import PipelineConfig

__all__ = ["Check", "run_checks"]


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


def _memory(cfg: PipelineConfig | None) -> Check:
    limit, where = host_memory_limit()
    if cfg is None:
        return Check("memory", "ok", f"{format_bytes(limit)} available ({where})")
    cap = int(cfg.broker.capacity)
    if cap > limit:
        return Check("memory", "fail", f"arena {format_bytes(cap)} > {format_bytes(limit)} available ({where})",
                     f"lower broker.capacity to at most {format_bytes(limit)} "
                     f"(--set broker.capacity=...) or raise the container's memory limit")
    if cap > 0.8 * limit:
        return Check("memory", "warn", f"arena {format_bytes(cap)} is over 80% of the "
                     f"{format_bytes(limit)} available ({where})", "leave room for the workers' own memory")
    return Check("memory", "ok", f"arena {format_bytes(cap)} of {format_bytes(limit)} available ({where})")


def _nofile(cfg: PipelineConfig | None) -> Check:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    procs = sum(max(s.replicas, 1) for s in cfg.stages) if cfg else 8
    need = 64 + 4 * (procs + 1)  # the broker holds ~2 descriptors per client
    if soft < need:
        return Check("open files", "fail", f"ulimit -n is {soft}; this pipeline needs about {need}",
                     f"ulimit -n {min(max(need, 4096), hard)}  (or docker run --ulimit nofile={need})")
    return Check("open files", "ok", f"ulimit -n {soft} (needs about {need})")


def _rundir() -> Check:
    base = base_dir()
    if not base.exists():
        parent = base.parent
        if os.access(parent, os.W_OK):
            return Check("runtime dir", "ok", f"{base} will be created (mode 0700)")
        return Check("runtime dir", "fail", f"cannot create {base}: {parent} is not writable",
                     "export SHMBROKER_RUNTIME_DIR=<a directory you own>")
    st = base.stat()
    if st.st_uid != os.getuid():
        return Check("runtime dir", "fail", f"{base} belongs to uid {st.st_uid}, not {os.getuid()}",
                     f"rm -r {base}  (or export SHMBROKER_RUNTIME_DIR=<a directory you own>)")
    if stat.S_IMODE(st.st_mode) & 0o077:
        return Check("runtime dir", "warn", f"{base} has mode {oct(stat.S_IMODE(st.st_mode))}",
                     f"chmod 700 {base}  (the broker also tightens it at start)")
    return Check("runtime dir", "ok", f"{base} (mode 0700, yours)")


def _gpus(cfg: PipelineConfig | None, require_gpu: bool) -> list[Check]:
    if cfg is None or all(s.device == "cpu" for s in cfg.stages):
        return [Check("cuda", "ok", "no GPU stages")]
    from .plan import cuda_count, plan_devices

    count = cuda_count()
    out = []
    for st in cfg.stages:
        notes: list[str] = []
        try:
            devs = plan_devices(st, count, require_gpu, warn=notes.append)
        except ConfigError as e:
            out.append(Check(f"devices of {st.name}", "fail", str(e),
                             "change the stage's device/devices, or run on a host with those GPUs"))
            continue
        if notes:
            out.append(Check(f"devices of {st.name}", "warn", notes[0],
                             "install a CUDA build of torch / run with GPUs, or set device: cpu"))
        elif st.device != "cpu":
            out.append(Check(f"devices of {st.name}", "ok", ", ".join(devs)))
    if count:
        soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        cap = int(cfg.broker.capacity)
        if soft != resource.RLIM_INFINITY and soft < cap:
            out.append(Check("locked memory", "warn", f"ulimit -l is {format_bytes(soft)}, the arena is "
                             f"{format_bytes(cap)}: pinning may fail and copies become staged",
                             "ulimit -l unlimited  (docker: --ulimit memlock=-1)"))
    return out


def _endpoint(cfg: PipelineConfig | None) -> Check:
    ep = cfg.broker.endpoint if cfg else None
    if not ep:
        return Check("endpoint", "ok", "ipc socket in a new runtime directory")
    if ep.startswith("tcp://"):
        host, _, port = ep[6:].rpartition(":")
        with socket.socket(socket.AF_INET6 if host.startswith("[") else socket.AF_INET) as s:
            try:
                s.bind((host.strip("[]"), int(port)))
            except OSError as e:
                return Check("endpoint", "fail", f"{ep} cannot be bound: {e.strerror}",
                             "stop what holds the port (`ss -ltnp`) or pick another port")
        return Check("endpoint", "ok", f"{ep} is free")
    path = ep[6:]
    if os.path.exists(path):
        return Check("endpoint", "fail", f"{path} already exists",
                     "another broker may use it: `shmbroker status`, else `shmbroker cleanup` / rm it")
    return Check("endpoint", "ok", f"{ep} is free")


def _devshm() -> Check:
    try:
        total = shutil.disk_usage("/dev/shm").total
    except OSError:
        return Check("/dev/shm", "ok", "absent: not needed (the arena is a memfd)")
    return Check("/dev/shm", "ok", f"{format_bytes(total)}: not used (the arena is a memfd, "
                 f"so Docker's 64 MiB default does not matter)")


SHMEM_THP = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"


def _pages() -> Check:
    """Whether the arena (a memfd: the kernel's shmem) gets 2 MiB pages or 4 KiB ones."""
    try:
        with open(SHMEM_THP) as f:
            text = f.read()
    except OSError:
        return Check("arena pages", "ok", "4 KiB (this kernel offers no transparent huge pages for shmem)")
    mode = text[text.find("[") + 1: text.find("]")] if "[" in text else text.strip()
    if mode in ("always", "within_size", "force"):
        return Check("arena pages", "ok", f"2 MiB where they fit ({SHMEM_THP}: {mode})")
    return Check("arena pages", "warn",
                 f"4 KiB ({SHMEM_THP}: {mode}): copies of 1 MiB and more into the arena run up to "
                 f"2x slower, and each 4 KiB page a process touches first costs a fault",
                 f"echo within_size | sudo tee {SHMEM_THP}  (the host's setting, for memfds and tmpfs; "
                 f"brokers started after it get 2 MiB pages)")


def run_checks(cfg: PipelineConfig | None, require_gpu: bool = False, cluster: bool = True) -> list[Check]:
    """The checks of this host against ``cfg``; with a ``cluster:`` block, of the cluster's nodes
    instead (``cluster``: connect to Ray to check them; ``run`` leaves that to its start)."""
    if cfg is not None and cfg.cluster is not None:
        return [_nofile(cfg), _rundir(), *(cluster_checks(cfg, require_gpu) if cluster else [])]
    return [_memory(cfg), _nofile(cfg), _rundir(), *_gpus(cfg, require_gpu), _endpoint(cfg), _devshm(),
            _pages()]


def render(checks: list[Check]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="shmbroker doctor")
    for col in ("check", "status", "detail", "fix"):
        t.add_column(col)
    colour = {"ok": "green", "warn": "yellow", "fail": "bold red"}
    for c in checks:
        t.add_row(escape(c.name), f"[{colour[c.status]}]{c.status}[/]", escape(c.detail), escape(c.fix))
    return t


def cluster_checks(cfg: PipelineConfig, require_gpu: bool = False) -> list[Check]:
    """``doctor``'s checks of a cluster config: Ray installed and reachable, each node's part."""
    from .cluster import import_ray
    from .cluster.plan import NodeInfo, plan_cluster

    assert cfg.cluster is not None
    try:
        ray = import_ray()
    except ConfigError as e:
        return [Check("ray", "fail", str(e).split(";")[0], "pip install 'shmbroker[ray]'")]
    checks = [Check("ray", "ok", f"Ray {ray.__version__} installed")]
    owned = not ray.is_initialized()
    try:
        if owned:
            ray.init(address=cfg.cluster.address, configure_logging=False, logging_level="ERROR",
                     log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        return [*checks, Check("ray cluster", "fail", f"{cfg.cluster.address}: {e}",
                               "start the cluster (ray start --head; docs/cluster.md) or fix cluster.address")]
    try:
        nodes = [NodeInfo.from_ray(n) for n in ray.nodes() if n.get("Alive")]
        checks.append(Check("ray cluster", "ok", f"{cfg.cluster.address}: {len(nodes)} live node(s)"))
        cap = int(cfg.broker.capacity)
        for n in nodes:
            status = "ok" if cap <= n.memory else "fail"
            checks.append(Check(f"node {n.short} memory", status,
                                f"{n.address}: arena {format_bytes(cap)} of {format_bytes(n.memory)} "
                                f"(Ray's memory resource); {n.cpus:g} CPU, {n.gpus} GPU",
                                "" if status == "ok" else "lower broker.capacity or give the node more memory"))
        notes: list[str] = []
        try:
            plans = plan_cluster(cfg, nodes, require_gpu, warn=notes.append)
            checks.append(Check("placement", "warn" if notes else "ok", "; ".join(
                [f"{p.node.short}: {', '.join(cfg.stages[s].name for s in p.stages)}" for p in plans] + notes),
                "install a CUDA build of torch / start nodes with GPUs, or set device: cpu" if notes else ""))
        except ConfigError as e:
            checks.append(Check("placement", "fail", str(e), "see the detail"))
        return checks
    finally:
        if owned:
            ray.shutdown()
