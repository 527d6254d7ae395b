"""What ``shmbroker status`` shows of a cluster (``doctor``'s cluster checks are in ``shmbroker.doctor``).

A cluster run's driver writes ``cluster.<pid>.json`` into the runtime base
directory (``broker.rundir.base_dir()``) while it runs: the Ray address and
the names of its node agents (named actors in the ``shmbroker`` namespace).
``status`` finds it (or is given ``--cluster ADDRESS``, and then lists the
agents Ray knows), connects to Ray and asks each agent for its node's broker
statistics and workers. ``doctor`` with a ``cluster:`` config checks that Ray
is installed and reachable and that each node can hold the arena and its
workers (``plan.plan_cluster``'s checks).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from broker.errors import BrokerError
from broker.rundir import base_dir

from . import import_ray

__all__ = ["NAMESPACE", "write_run_file", "remove_run_file", "stale_run_files", "live_run", "cluster_stats", "render_cluster"]

NAMESPACE = "shmbroker"  # the Ray namespace of the node agents (named actors)
AGENT_PREFIX = "shmbroker-agent:"


def write_run_file(address: str, agents: list[str], nodes: list[str]) -> Path:
    """Record a live cluster run where ``status`` looks (removed by ``remove_run_file``)."""
    base = base_dir()
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = base / f"cluster.{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "address": address, "namespace": NAMESPACE,
                               "agents": agents, "nodes": nodes}))
    os.replace(tmp, path)
    return path


def remove_run_file(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_run_files(dry_run: bool = False) -> list[Path]:
    """Remove (or only list) the run files of cluster runs whose driver is gone (``kill -9``)."""
    base = base_dir()
    stale = []
    for path in sorted(base.glob("cluster.*.json")) if base.is_dir() else []:
        try:
            pid = int(json.loads(path.read_text()).get("pid", 0))
        except (OSError, ValueError):
            pid = 0
        if not _alive(pid):
            stale.append(path)
            if not dry_run:
                path.unlink(missing_ok=True)
    return stale


def live_run() -> dict[str, Any] | None:
    """The live cluster run recorded on this host (the newest), or None."""
    base = base_dir()
    runs = []
    for path in sorted(base.glob("cluster.*.json")) if base.is_dir() else []:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _alive(int(info.get("pid", 0))):
            runs.append(info)
    return runs[-1] if runs else None


def cluster_stats(address: str | None, agents: list[str] | None = None) -> list[dict[str, Any]]:
    """Each node agent's statistics (``NodeAgent.stats``): those named, else every agent Ray knows."""
    ray = import_ray()
    owned = not ray.is_initialized()
    if owned:
        try:
            ray.init(address=address or "auto", configure_logging=False, logging_level="ERROR",
                     log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise BrokerError(f"cannot connect to the Ray cluster at {address or 'auto'}: {e}") from None
    try:
        if agents is None:
            agents = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                            if a["namespace"] == NAMESPACE and a["name"].startswith(AGENT_PREFIX))
        if not agents:
            raise BrokerError(f"no shmbroker cluster run is live on the Ray cluster at {address or 'auto'}")
        out = []
        for name in agents:
            try:
                out.append(ray.get(ray.get_actor(name, namespace=NAMESPACE).stats.remote(), timeout=10))
            except (ValueError, ray.exceptions.RayError) as e:
                out.append({"node": name.rpartition(":")[2], "error": f"{type(e).__name__}: {e}"})
        return out
    finally:
        if owned:
            ray.shutdown()


def render_cluster(nodes: list[dict[str, Any]]) -> Any:
    """One block per node: its arena, stages and workers (``summary.render_status``'s tables)."""
    from rich.console import Group
    from rich.table import Table

    from ..summary import render_status

    parts: list[Any] = []
    for st in nodes:
        if "error" in st:
            t = Table(title=f"node {st['node']}: no answer")
            t.add_column("error")
            t.add_row(st["error"])
            parts.append(t)
            continue
        parts.append(f"[bold]node {st['node'][:8]}[/] on {st['host']} (agent pid {st['pid']}, broker pid "
                     f"{st['broker_pid']}): stages {', '.join(st['stages'])}")
        parts.append(render_status(st["broker"]))
    return Group(*parts)
