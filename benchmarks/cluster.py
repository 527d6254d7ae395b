"""The same pipeline on 1 Ray node and on 2 simulated nodes, and Ray Data on the same clusters as the peer.

Usage::

    python benchmarks/cluster.py [--quick] [--items N] [--rows R] [--no-ray-data] [--out FILE]

The pipeline: a source of float32 ``[R, 256]`` items (``R=64``: 64 KiB),
``pre`` (normalize each row, CPU), ``model`` (``x @ W``, ``[256, 64]``,
batches of 16). Scenarios, each on a fresh ``ray.cluster_utils.Cluster``
whose nodes all run on this machine (127.0.0.1, 300 MB object store each):

* ``1 node``: one node with 2 CPUs.
* ``2 nodes, both stages on each``: two nodes with 2 CPUs each; items stay on
  their node (nothing moves between nodes).
* ``2 nodes, model on node 2``: node 2 advertises a (fake) GPU and the model
  asks for ``device: cuda`` (run on the CPU fallback): items fed to node 1
  cross to node 2 through Ray (bytes moved are counted).

The peer is Ray Data on the same cluster: ``from_numpy`` of the same items,
``map_batches`` with the same two functions (``ActorPoolStrategy``, as many
actors per stage as shmbroker has workers, the model's asking for the GPU in
the third scenario), iterated to the end in the driver. Its time includes
starting its actors; shmbroker's start (agents, workers, and a warm-up of 32
items) is reported apart and its items/s are over the run alone, so both
totals are printed too.

What a simulated cluster on a 2-core machine can and cannot show: every
"node" shares the same 2 cores and memory, and "between nodes" is loopback
through Ray's object manager, so two nodes cannot be faster than one here,
and network bandwidth, latency and per-node memory bandwidth are not
measured. It shows the overheads: what planning, agents, hand-offs and Ray
object transfers cost per item, that items stay on their node when they can,
and the bytes that cross when they cannot.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # nodes and driver on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from benchmarks._bench_util import RESULTS, fmt_bytes, machine_info, table, write_json  # noqa: E402

STORE = 300 * 2**20
SCENARIOS = {
    "1 node": [],
    "2 nodes, both stages on each": [{"num_cpus": 2}],
    "2 nodes, model on node 2": [{"num_cpus": 2, "num_gpus": 1}],
}


def config(path: Path, items: int, rows: int, gpu: bool) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "cluster-bench",
        "broker": {"capacity": "256MiB", "max_inflight": 64},
        "source": {"type": "python", "fn": "benchmarks._bench_stages:pool_source",
                   "args": {"count": items, "rows": rows}},
        "stages": [{"name": "pre", "fn": "benchmarks._bench_stages:row_normalize", "replicas": 1},
                   {"name": "model", "factory": "benchmarks._bench_stages:model_factory", "batch": 16,
                    "device": "cuda" if gpu else "cpu", "replicas": 1}],
        "sink": {"type": "null"},
        "cluster": {"engine": "ray"}}))
    return path


def run_shmbroker(cfg: Path) -> dict[str, Any]:
    from benchmarks._bench_stages import pool
    from shmbroker.driver import Pipeline

    t0 = time.perf_counter()
    with Pipeline.from_yaml(cfg) as p:
        for _ in p.map(pool(64)[:2] * 16):  # warm up: every worker has had items, Ray has the code
            pass
        started = time.perf_counter() - t0
        s = p.run()
    return {"start_s": started, "run_s": s.seconds, "items": s.items, "items_s": s.items_per_s,
            "total_s": time.perf_counter() - t0, "moved_items": s.moved["items"],
            "moved_bytes": s.moved["bytes"], "workers": {st["name"]: st["workers"] for st in s.stages}}


def run_ray_data(items: int, rows: int, workers: dict[str, int], gpu: bool) -> dict[str, Any]:
    import ray.data

    from benchmarks._bench_stages import model_factory, pool, row_normalize

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False

    class Pre:
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            import torch

            return {"data": row_normalize(torch.from_numpy(batch["data"])).numpy()}

    class Model:
        def __init__(self) -> None:
            self.fn = model_factory()

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            import torch

            return {"data": self.fn(torch.from_numpy(batch["data"])).numpy()}

    data = [np.stack([pool(rows)[i % 4] for i in range(k, min(k + 64, items))]) for k in range(0, items, 64)]
    t0 = time.perf_counter()
    ds = ray.data.from_numpy(data)  # blocks of 64 items
    ds = ds.map_batches(Pre, compute=ray.data.ActorPoolStrategy(size=workers["pre"]), batch_size=16,
                        batch_format="numpy", num_cpus=0.5)
    ds = ds.map_batches(Model, compute=ray.data.ActorPoolStrategy(size=workers["model"]), batch_size=16,
                        batch_format="numpy", num_cpus=0.5, num_gpus=1 if gpu else 0)
    n, first, first_n = 0, 0.0, 0
    for b in ds.iter_batches(batch_size=64, batch_format="numpy"):
        n += len(b["data"])
        if not first:
            first, first_n = time.perf_counter() - t0, n
    total = time.perf_counter() - t0
    return {"items": n, "total_s": total, "items_s": n / total, "first_s": first,
            "steady_items_s": (n - first_n) / max(total - first, 1e-9)}


def scenario(name: str, extra: list[dict[str, Any]], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                                      "object_store_memory": STORE, "include_dashboard": False})
    try:
        for kw in extra:
            c.add_node(node_ip_address="127.0.0.1", object_store_memory=STORE, **kw)
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False, configure_logging=False, logging_level="ERROR")
        gpu = any(kw.get("num_gpus") for kw in extra)
        out: dict[str, Any] = {"nodes": 1 + len(extra)}
        out["shmbroker"] = run_shmbroker(config(tmp / "p.yaml", args.items, args.rows, gpu))
        if not args.no_ray_data:
            out["ray_data"] = _guard(lambda: run_ray_data(args.items, args.rows, out["shmbroker"]["workers"], gpu))
        return out
    finally:
        ray.shutdown()
        c.shutdown()


def _guard(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except ImportError as e:
        return {"skipped": f"Ray Data is not importable ({e}): pip install 'ray[data]'"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="600 items instead of 3000")
    ap.add_argument("--items", type=int, help="items per run (default 3000, --quick 600)")
    ap.add_argument("--rows", type=int, default=64, help="rows of 256 float32 per item (64: 64 KiB)")
    ap.add_argument("--no-ray-data", action="store_true", help="skip the Ray Data peer")
    ap.add_argument("--out", type=Path, default=RESULTS / "cluster.json")
    args = ap.parse_args()
    args.items = args.items or (600 if args.quick else 3000)
    import tempfile

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in SCENARIOS.items():
            results[name] = scenario(name, extra, args, Path(tmp))
    rows = []
    for name, r in results.items():
        s, d = r["shmbroker"], r.get("ray_data", {})
        ray_data = [d["skipped"], "-"] if "skipped" in d else \
            [f"{d['steady_items_s']:.0f}", f"{d['first_s']:.1f} + {d['total_s'] - d['first_s']:.1f}"] if d else \
            ["-", "-"]
        rows.append([name, f"{s['items_s']:.0f}", f"{s['start_s']:.1f} + {s['run_s']:.1f}",
                     f"{s['moved_items']} / {fmt_bytes(s['moved_bytes'])}", *ray_data])
    item = args.rows * 256 * 4
    print(table(["scenario", "shmbroker items/s", "start + run s", "moved items / bytes",
                 "Ray Data items/s", "first result + rest s"], rows,
                title=f"{args.items} items of {fmt_bytes(item)}, {when}"))
    print("\nitems/s: shmbroker over its run (after start and a warm-up), Ray Data from its first result\n"
          "to its last (its actors start within the first result's time).")
    print("All nodes share this machine's cores and memory, and 'between nodes' is loopback through\n"
          "Ray's object manager: 2 nodes cannot beat 1 here, and network costs are not measured. What it\n"
          "shows: per-item overheads, items kept on their node, and the bytes that cross when they must.")
    write_json(args.out, {"when": when, "items": args.items, "item_bytes": item, "results": results,
                          "machine": machine_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
