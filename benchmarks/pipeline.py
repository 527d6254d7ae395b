#!/usr/bin/env python
"""The same preprocessing and the same CPU "model" through a shmbroker pipeline, a torch DataLoader and SPDL.

One command::

    .venv/bin/python benchmarks/pipeline.py [--quick] [--sizes 4KiB,64KiB,1MiB,16MiB] [--seconds S]
                                            [--systems shmbroker,dataloader,spdl,queues] [--reps N]
                                            [--out benchmarks/results/pipeline.json]

Workload (identical in every system)
------------------------------------
* items: float32 ``[rows, 256]`` arrays of 4 KiB, 64 KiB, 1 MiB and 16 MiB (rows = 4, 64, 1024,
  16384); item ``i`` is ``pool[i % 4]``, four arrays made once per process
  (``benchmarks._bench_stages.pool``), so no system generates data in the
  timed loop and all start from an array already in memory.
* preprocess: ``workers.stages.normalize`` (standardize each item) with 2-way parallelism.
* model: ``x.reshape(-1, 256) @ W`` with a fixed seeded ``W [256, 64]``
  (``benchmarks._bench_stages.model_factory``) on batches of 16, under
  ``torch.inference_mode()``; its output is dropped (null sink).
* threads: ``torch.set_num_threads(1)`` everywhere (shmbroker: ``threads: 1`` on both
  stages; the driver does no torch math. DataLoader: the main process calls it, and
  DataLoader workers set 1 themselves. SPDL: its one process calls it, which holds for
  all its threads), so the 2 cores are shared by processes or threads, not by intra-op threads.

(a) shmbroker: driver (python source: the pool) -> ``preprocess`` (replicas 2, threads 1)
    -> ``model`` (batch 16, threads 1) -> null sink, via ``Pipeline.run()``.
(b) ``torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, persistent_workers=True)``
    (fork, prefetch_factor 2, pin_memory False); ``ds[i]`` = normalize(pool[i % 4]);
    the main process applies the model to each batch.
(c) SPDL (``pip install spdl``; skipped with the reason when not importable), one process:
    ``PipelineBuilder().add_source(range(n)).pipe(preprocess, concurrency=2).aggregate(16)
    .pipe(model).add_sink(3).build(num_threads=3)`` -- ``preprocess(i)`` =
    normalize(pool[i % 4]) as the DataLoader's dataset, ``model(batch)`` =
    the model on ``torch.stack(batch)`` (the DataLoader's default_collate stacks too), both
    under ``torch.inference_mode()``; 3 pool threads: two preprocessing tasks and the model at
    once, as the other systems' 2 + 1 processes. The pipeline is built before the clock; its
    start, the run and its stop are timed.

(d) hand-wired queues (system ``queues``): the same work on shmbroker's handle queues, wired by
    hand, no scheduler: the driver copies 16 items into a block of the arena and puts it into
    ``q0``; two preprocess processes normalize each row into a block of their own (``out=``) and put
    it into ``q1``; one model process runs the model on each block as a batch of 16 and puts the
    result into ``q2``; the driver drains ``q2`` (null sink), at most 64 items in flight. What a
    task path that never passes through the broker would cost (the broker only allocates).

Each (system, size) runs in its own child process (a fresh interpreter): start-up,
warm-up runs (32 items, then 64, 128, ... until one takes >= 1 s; its rate sizes
the item count so one timed run takes about ``--seconds``),
then ``--reps`` timed runs. items/s = items / wall time of the run; MB/s = items x
item bytes / s (input bytes). CPU per item per process: utime + stime of each process
of the system over the run / items (SPDL is one process: its threads are all in it).

Bytes copied per item
---------------------
shmbroker: measured (the driver's write into stage 0 + every stage's write of its
output into the arena; the Summary's ``copied_per_item``, which counts each run on
its own). DataLoader, counted analytically: default_collate
``torch.stack``s the 16 preprocessed items into a new shared-memory tensor
(1 x item bytes); the batch goes to the main process as a file descriptor (no copy);
the dataset reads the pool in place (no copy); the model's output stays in the main
process (no copy). So 1 x item bytes. SPDL, analytically: ``torch.stack`` of the batch
(1 x item bytes); everything else stays in the one process. None of the counts includes
compute outputs (normalize's and the matmul's result tensors), which all systems produce alike.

Memory: the parent samples the child's whole process tree (child + broker + workers,
or child + DataLoader workers) every 50 ms (stretched so the sampler never takes more
than 10% of a core: reading smaps_rollup of processes that map GiBs costs ~10-50 ms;
the JSON records the actual mean interval and the sampler's CPU), summing ``Pss:`` from
``/proc/PID/smaps_rollup`` (a page shared by k processes counts 1/k in each, so
once in total); the table shows the median over runs of each run's peak.
shmbroker's arena is a memfd that the broker ``posix_fallocate``s at start: all of
its capacity is RAM from the start, but PSS counts only pages some process has
mapped and touched. "footprint" adds that back: peak PSS - arena PSS at the end of
the run + arena capacity (the others: footprint = peak PSS). The arena is sized
``--capacity-items`` (64) items, min 128 MiB: with max_inflight 64 that is about what
the DataLoader holds in flight (2 workers x prefetch_factor 2 x 16 = 64 items).

Goals (issue 13), printed as met/MISSED lines: broker CPU <= 5 % of the pipeline's total;
>= 2x DataLoader items/s at 1 MiB and 16 MiB with <= 0.5x its CPU per item; >= 1.3x SPDL's
items/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._bench_util import (
    RESULTS,
    Foreign,
    PssSampler,
    cpu_seconds,
    fmt_bytes,
    fmt_rate,
    machine_info,
    mapping_pss,  # noqa: E402
    maybe_plot,
    parse_size,
    proc_name,
    pss_bytes,
    summarize,
    table,
    tree,
    write_json,
)

FEATURES = 256
BATCH = 16


def rows_for(nbytes: int) -> int:
    return max(1, nbytes // (4 * FEATURES))


def round16(n: float) -> int:
    return max(BATCH * 2, int(round(n / BATCH)) * BATCH)


def phase(name: str) -> None:
    print(f"PHASE {name}", flush=True)


def sized_count(run: Callable[[int], tuple[int, float]], target: float, out: dict[str, Any]) -> int:
    """Warm up (32 items: the workers start and register), then double the count until one run
    takes >= 1 s; returns the count for timed runs of about ``target`` s. ``run(k)`` runs ``k``
    items and returns (items delivered, wall seconds)."""
    phase("warmup")
    t = time.perf_counter()
    run(32)
    out["startup_and_first_32_s"] = time.perf_counter() - t
    w = 64
    while True:
        n, wall = run(w)
        if wall >= 1.0 or w >= 1 << 16:
            break
        w *= 2
    out["count"] = count = round16(target * n / wall)
    return count


def tree_cpu(root: int) -> dict[int, float]:
    return {p: cpu_seconds(p) for p in tree(root)}


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(after[p] - before.get(p, 0.0) for p in after)


# -- child: shmbroker ---------------------------------------------------------------
CAPACITY_ITEMS = 64  # arena capacity in items (min 128 MiB); --capacity-items


def capacity_for(nbytes: int, items: int | None = None) -> int:
    return max(128 * 2**20, (items or CAPACITY_ITEMS) * nbytes)


PIPELINE_YAML = """\
name: bench-{rows}
broker:
  capacity: {capacity}
  max_inflight: 64
  rings: {rings}
source:
  type: python
  fn: benchmarks._bench_stages:pool_source
  args: {{count: 32, rows: {rows}}}
stages:
  - name: preprocess
    fn: workers.stages:normalize
    device: cpu
    replicas: 2
    threads: 1
  - name: model
    factory: benchmarks._bench_stages:model_factory
    device: {device}
    replicas: 1
    batch: {batch}
    threads: 1
sink:
  type: "null"
"""


def child_shmbroker(nbytes: int, target: float, reps: int, cap_items: int | None = None,
                    device: str = "cpu", rings: bool = False) -> dict[str, Any]:
    # The driver computes nothing, so it does not import torch (the stages set their own threads)
    from benchmarks._bench_stages import pool
    from broker import Pipeline

    rows = rows_for(nbytes)
    pool(rows)  # the source's arrays exist before the clock starts
    tmp = tempfile.mkdtemp(prefix="shmb-pipe-")
    path = Path(tmp) / "bench.yaml"
    cap = capacity_for(nbytes, cap_items)
    path.write_text(PIPELINE_YAML.format(rows=rows, capacity=cap, batch=BATCH, device=device,
                                         rings="true" if rings else "false"))
    out: dict[str, Any] = {"system": "rings" if rings else "shmbroker", "capacity": cap, "runs": []}
    me = os.getpid()
    with Pipeline.from_yaml(path) as p:
        src = p.cfg.source

        def one(count: int) -> tuple[Any, float, float, dict[str, float]]:
            src.args["count"] = count  # type: ignore[union-attr]
            c0 = tree_cpu(me)
            t = time.perf_counter()
            s = p.run()
            wall = time.perf_counter() - t
            c1 = tree_cpu(me)
            roles = {"driver": c1.get(me, 0) - c0.get(me, 0),
                     "broker": c1.get(p.broker.pid, 0) - c0.get(p.broker.pid, 0)}
            for w in p.workers:
                if w.proc is not None and w.proc.pid in c1:
                    key = w.spec.name
                    roles[key] = roles.get(key, 0.0) + c1[w.proc.pid] - c0.get(w.proc.pid, 0.0)
            roles["total"] = cpu_delta(c0, c1)
            return s, wall, s.copied_per_item, roles

        def sized(k: int) -> tuple[int, float]:
            s, wall, _, _ = one(k)
            return s.items, wall

        count = sized_count(sized, target, out)
        for r in range(reps):
            phase(f"rep{r}")
            s, wall, copied, roles = one(count)
            arena = sum(mapping_pss(pid, "shmbroker-") for pid in tree(me))
            phase(f"after{r}")
            out["runs"].append({
                "items": s.items, "seconds": wall, "summary_seconds": s.seconds,
                "items_s": s.items / wall, "mb_s": s.items * nbytes / wall / 1e6,
                "copied_per_item": copied, "summary_copied_per_item": s.copied_per_item,
                "arena_peak": s.arena_peak, "arena_pss_end": arena, "skipped": len(s.skipped),
                "duplicates": s.duplicates, "cpu_s": roles,
                "stage_rates": {st["name"]: st["rate"] for st in s.stages}})
    return out


# -- child: DataLoader ------------------------------------------------------------------
class PoolDataset:
    """``ds[i] = normalize(pool[i % 4])``: the same arrays and preprocessing as the shmbroker source/stage."""

    def __init__(self, rows: int, n: int) -> None:
        self.rows = rows
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        import torch

        from benchmarks._bench_stages import pool
        from workers.stages import normalize

        items = pool(self.rows)
        with torch.no_grad():
            return normalize(torch.from_numpy(items[i % len(items)]))


def child_dataloader(nbytes: int, target: float, reps: int, cap_items: int | None = None,
                     device: str = "cpu") -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    from benchmarks._bench_stages import model_factory, pool

    torch.set_num_threads(1)
    rows = rows_for(nbytes)
    pool(rows)  # made before the workers fork: shared copy-on-write, like a dataset in memory

    ds = PoolDataset(rows, 32)
    cuda = device == "cuda"  # the GPU variant: pinned batches, copied with non_blocking=True
    loader = DataLoader(ds, batch_size=BATCH, num_workers=2, persistent_workers=True, shuffle=False,
                        pin_memory=cuda)
    model = model_factory(device=device)
    me = os.getpid()
    out: dict[str, Any] = {"system": "dataloader", "runs": [],
                           "settings": {"batch_size": BATCH, "num_workers": 2, "persistent_workers": True,
                                        "prefetch_factor": loader.prefetch_factor,
                                        "multiprocessing_context": str(loader.multiprocessing_context
                                                                       or "default (fork)"),
                                        "pin_memory": loader.pin_memory,
                                        "sharing_strategy": torch.multiprocessing.get_sharing_strategy()}}

    def one(count: int) -> tuple[int, float, dict[str, float]]:
        ds.n = count
        c0 = tree_cpu(me)
        n = 0
        t = time.perf_counter()
        with torch.inference_mode():
            for batch in loader:
                y = model(batch.to(device, non_blocking=True) if cuda else batch)
                n += y.shape[0]
            if cuda:
                torch.cuda.synchronize()
        wall = time.perf_counter() - t
        c1 = tree_cpu(me)
        roles = {"main (model)": c1.get(me, 0) - c0.get(me, 0), "total": cpu_delta(c0, c1)}
        roles["workers (preprocess+collate)"] = roles["total"] - roles["main (model)"]
        return n, wall, roles

    count = sized_count(lambda k: one(k)[:2], target, out)
    for r in range(reps):
        phase(f"rep{r}")
        n, wall, roles = one(count)
        phase(f"after{r}")
        out["runs"].append({"items": n, "seconds": wall, "items_s": n / wall, "mb_s": n * nbytes / wall / 1e6,
                            "copied_per_item": float(nbytes), "cpu_s": roles})
    return out


# -- child: SPDL ----------------------------------------------------------------------------
SPDL_THREADS = 3  # the pipeline's pool: 2 preprocessing tasks + the model at once (2 + 1 processes elsewhere)


def spdl_skip_reason() -> str | None:
    """Why the SPDL system cannot run here, or None."""
    try:
        from spdl.pipeline import PipelineBuilder  # noqa: F401
    except ImportError as e:
        return f"not importable ({e}); install the bench extra: .venv/bin/pip install -e '.[bench]'"
    return None


def child_spdl(nbytes: int, target: float, reps: int, cap_items: int | None = None,
               device: str = "cpu") -> dict[str, Any]:
    from importlib.metadata import version

    import torch
    from spdl.pipeline import PipelineBuilder

    from benchmarks._bench_stages import model_factory, pool
    from workers.stages import normalize

    torch.set_num_threads(1)  # intra-op threads of the process: every SPDL thread runs with 1
    rows = rows_for(nbytes)
    items = pool(rows)
    model = model_factory(device=device)
    cuda = device == "cuda"

    def preprocess(i: int) -> Any:  # the DataLoader's ds[i]
        with torch.inference_mode():  # thread-local: set in the thread that computes
            return normalize(torch.from_numpy(items[i % len(items)]))

    def run_model(batch: list[Any]) -> Any:
        with torch.inference_mode():
            x = torch.stack(batch)  # as the DataLoader's default_collate
            return model(x.to(device, non_blocking=True) if cuda else x)

    def build(count: int) -> Any:
        return (PipelineBuilder()
                .add_source(range(count))
                .pipe(preprocess, concurrency=2)
                .aggregate(BATCH)
                .pipe(run_model)
                .add_sink(3)
                .build(num_threads=SPDL_THREADS))

    me = os.getpid()
    out: dict[str, Any] = {"system": "spdl", "runs": [],
                           "settings": {"spdl": version("spdl"), "num_threads": SPDL_THREADS,
                                        "preprocess_concurrency": 2, "aggregate": BATCH, "sink_buffer": 3}}

    def one(count: int) -> tuple[int, float, dict[str, float]]:
        pipeline = build(count)  # before the clock: the other systems' workers exist already too
        c0 = tree_cpu(me)
        n = 0
        t = time.perf_counter()
        with pipeline.auto_stop():
            for y in pipeline.get_iterator(timeout=600):
                n += y.shape[0]
            if cuda:
                torch.cuda.synchronize()
        wall = time.perf_counter() - t
        c1 = tree_cpu(me)
        roles = {"spdl (one process, all threads)": c1.get(me, 0) - c0.get(me, 0), "total": cpu_delta(c0, c1)}
        return n, wall, roles

    count = sized_count(lambda k: one(k)[:2], target, out)
    for r in range(reps):
        phase(f"rep{r}")
        n, wall, roles = one(count)
        phase(f"after{r}")
        if n != count:
            raise RuntimeError(f"spdl: {n} items came out of {count}")
        out["runs"].append({"items": n, "seconds": wall, "items_s": n / wall, "mb_s": n * nbytes / wall / 1e6,
                            "copied_per_item": float(nbytes), "cpu_s": roles})
    return out


def child_queues(nbytes: int, target: float, reps: int, cap_items: int | None = None,
                 device: str = "cpu") -> dict[str, Any]:
    """The same work wired by hand on shmbroker's handle queues: no scheduler, no broker message
    per task (what a broker-less task path would give). The driver allocates a group of BATCH
    items in the arena, copies them in and puts it into ``q0``; two preprocess processes take
    groups, normalize each row into a block of their own (``out=``) and put it into ``q1``; the
    model process takes each group as a batch and puts its result into ``q2``, which the driver
    drains (the null sink). At most ``max_inflight`` (64) items in flight, as in the Pipeline."""
    import multiprocessing as mp

    import numpy as np

    from benchmarks._bench_stages import pool, queue_stage
    from broker import Broker, Client

    if device != "cpu":
        raise SystemExit("queues: CPU only")
    rows = rows_for(nbytes)
    items = pool(rows)
    # inputs and the preprocessed copies of up to 64 items at once, and the model's outputs
    cap = max(128 * 2**20, (cap_items or CAPACITY_ITEMS) * nbytes * 5 // 2)
    out: dict[str, Any] = {"system": "queues", "capacity": cap, "runs": []}
    me = os.getpid()
    ctx = mp.get_context("spawn")
    with Broker(cap) as b, Client(b.endpoint, role="driver") as c:
        qsize = 64 // BATCH + 2
        q0, q2 = c.queue("q0", maxsize=qsize), c.queue("q2", maxsize=qsize)
        c.queue("q1", maxsize=qsize)
        procs = [ctx.Process(target=queue_stage, args=(b.endpoint, "q0", "q1", qsize, "preprocess")) for _ in range(2)]
        procs.append(ctx.Process(target=queue_stage, args=(b.endpoint, "q1", "q2", qsize, "model")))
        for p in procs:
            p.start()

        def one(count: int) -> tuple[float, dict[str, float]]:
            c0 = tree_cpu(me)
            t = time.perf_counter()
            sent = got = 0
            while got < count:
                while sent < count and sent - got + BATCH <= 64:
                    k = min(BATCH, count - sent)
                    h, block = c.alloc((k, rows, FEATURES), "float32")
                    for j in range(k):
                        block[j] = items[(sent + j) % len(items)]
                    q0.put(h)
                    sent += k
                h = q2.get(timeout=600)
                got += h.shape[0]
                c.release(h)
            wall = time.perf_counter() - t
            c1 = tree_cpu(me)
            pre = [p.pid for p in procs[:2]]
            roles = {"driver": c1.get(me, 0) - c0.get(me, 0), "broker": c1.get(b.pid, 0) - c0.get(b.pid, 0),
                     "preprocess": sum(c1.get(p, 0) - c0.get(p, 0) for p in pre),
                     "model": c1.get(procs[2].pid, 0) - c0.get(procs[2].pid, 0), "total": cpu_delta(c0, c1)}
            return wall, roles

        count = sized_count(lambda k: (k, one(k)[0]), target, out)
        for r in range(reps):
            phase(f"rep{r}")
            wall, roles = one(count)
            arena = sum(mapping_pss(pid, "shmbroker-") for pid in tree(me))
            phase(f"after{r}")
            out["runs"].append({"items": count, "seconds": wall, "items_s": count / wall,
                                "mb_s": count * nbytes / wall / 1e6, "copied_per_item": float(nbytes),
                                "arena_pss_end": arena, "cpu_s": roles})
        stop = np.zeros((0, rows, FEATURES), np.float32)
        for _ in range(2):
            q0.put(stop, timeout=10)
        for p in procs[:2]:
            p.join(30)
        c.queue("q1", maxsize=qsize).put(stop, timeout=10)
        procs[2].join(30)
        for p in procs:
            if p.is_alive():
                p.terminate()
    return out


def child_rings(nbytes: int, target: float, reps: int, cap_items: int | None = None,
                device: str = "cpu") -> dict[str, Any]:
    """System ``rings``: the same Pipeline with ``broker.rings: true`` (tasks in the arena's queues)."""
    return child_shmbroker(nbytes, target, reps, cap_items, device, rings=True)


CHILDREN = {"shmbroker": child_shmbroker, "rings": child_rings, "dataloader": child_dataloader,
            "spdl": child_spdl, "queues": child_queues}


def child_main(system: str, nbytes: int, target: float, reps: int, cap_items: int | None,
               device: str = "cpu") -> int:
    fn = CHILDREN[system]
    res = fn(nbytes, target, reps, cap_items, device)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


# -- parent ------------------------------------------------------------------------------
def run_child(system: str, nbytes: int, target: float, reps: int, cap_items: int,
              pss_interval: float = 0.05, pss_max_duty: float = 0.1, device: str = "cpu") -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", system, "--size", str(nbytes), "--seconds", str(target),
           "--reps", str(reps), "--capacity-items", str(cap_items), "--device", device]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=str(Path(__file__).parent.parent))
    sampler = PssSampler(proc.pid, pss_interval, pss_max_duty)
    sampler.start()
    result: dict[str, Any] | None = None
    assert proc.stdout is not None
    breakdown: list[dict[str, Any]] = []
    foreign: dict[str, dict[str, float]] = {}
    fg = Foreign(os.getpid())
    for line in proc.stdout:
        if line.startswith("PHASE "):
            sampler.phase = line.split()[1]
            if sampler.phase.startswith("rep"):
                fg.start()
            elif sampler.phase.startswith("after"):
                foreign[sampler.phase[5:]] = fg.stop()
            if sampler.phase == "after0":  # what each process holds, once, right after the first run
                breakdown = [{"pid": p, "cmd": proc_name(p), "pss": pss_bytes(p)} for p in tree(proc.pid)]
        elif line.startswith("RESULT "):
            result = json.loads(line[7:])
        else:
            sys.stdout.write(line)
    code = proc.wait()
    sampler.stop()
    if result is None or code != 0:
        raise RuntimeError(f"{system} {fmt_bytes(nbytes)}: child exited with {code} and no result")
    for r, run in enumerate(result["runs"]):
        run["peak_pss"] = sampler.peaks.get(f"rep{r}", 0)
        run.update(foreign.get(str(r), {}))
        run["procs"] = sampler.procs.get(f"rep{r}", 0)
        if system in ("shmbroker", "rings", "queues"):
            run["footprint"] = run["peak_pss"] - run["arena_pss_end"] + result["capacity"]
        else:
            run["footprint"] = run["peak_pss"]
    result["pss_by_process_after_run0"] = breakdown
    result["pss_samples"] = sampler.samples
    result["pss_mean_interval_s"] = sampler.mean_interval
    result["sampler_cpu_s"] = sampler.cpu
    result["pss_peak_warmup"] = sampler.peaks.get("warmup", 0)
    return result


def ratio_lines(results: dict[str, Any], sizes: list[int]) -> tuple[list[list[str]], dict[str, Any]]:
    """shmbroker / each peer, per size: items/s and CPU per item (medians), and the broker's share
    of all CPU. Returns table rows and the same numbers for the JSON."""
    rows: list[list[str]] = []
    out: dict[str, Any] = {}
    for nbytes in sizes:
        for system in ("shmbroker", "rings"):
            _ratios_of(system, results, nbytes, rows, out)
        q = results.get(f"queues/{nbytes}")
        if q:
            qs = summarize([r["cpu_s"]["broker"] / r["cpu_s"]["total"] for r in q["runs"] if r["cpu_s"]["total"] > 0])
            out.setdefault("queues", {})[str(nbytes)] = qs["median"]
            rows.append(["hand-wired queues: broker's share of all CPU", fmt_bytes(nbytes), "",
                         f"{100 * qs['median']:.1f}% ({q['stats']['cpu_ms_per_item']['broker']['median']:.3f} ms/item)"])
    return rows, out


def _ratios_of(system: str, results: dict[str, Any], nbytes: int, rows: list[list[str]],
               out: dict[str, Any]) -> None:
    """``ratio_lines`` for one of our systems (``shmbroker``: tasks as messages; ``rings``)."""
    label = "shmbroker" if system == "shmbroker" else "shmbroker rings"
    a = results.get(f"{system}/{nbytes}")
    if a:
        ours = out.setdefault(system, {})[str(nbytes)] = {}
        runs = a["runs"]
        share = summarize([r["cpu_s"]["broker"] / r["cpu_s"]["total"] for r in runs if r["cpu_s"]["total"] > 0])
        ours["broker_share_of_cpu"] = share["median"]
        ours["broker_cpu_ms_per_item"] = a["stats"]["cpu_ms_per_item"]["broker"]["median"]
        for peer, name in (("dataloader", "DataLoader"), ("spdl", "SPDL"), ("queues", "hand-wired queues")):
            b = results.get(f"{peer}/{nbytes}")
            if not b:
                continue
            rate = a["stats"]["items_s"]["median"] / b["stats"]["items_s"]["median"]
            cpu = (a["stats"]["cpu_ms_per_item"]["total"]["median"]
                   / b["stats"]["cpu_ms_per_item"]["total"]["median"])
            ours[peer] = {"items_s_ratio": rate, "cpu_per_item_ratio": cpu}
            rows.append([f"{label}/{name}", fmt_bytes(nbytes), f"{rate:.2f}x", f"{cpu:.2f}x"])
        rows.append([f"{label}: broker's share of all CPU", fmt_bytes(nbytes), "",
                     f"{100 * share['median']:.1f}% ({ours['broker_cpu_ms_per_item']:.3f} ms/item)"])


def goal_lines(ratios: dict[str, Any], sizes: list[int], skipped: dict[str, str],
               system: str = "shmbroker") -> list[str]:
    """Issue 13's pipeline goals for one of our systems (``ratio_lines``' numbers of it), met/MISSED."""
    def missing(peer: str) -> str:
        return f"{peer} skipped: {skipped[peer]}" if peer in skipped else f"{peer} not run (--systems)"

    how = "tasks as messages" if system == "shmbroker" else "broker.rings: true"
    out = [f"pipeline goals of issue 13, {system} ({how}; medians of this run; the machine is noisy: "
           f"one run is indicative):"]
    have = [n for n in sizes if str(n) in ratios]
    if not have:
        return out + [f"  not checked: {system} not run (--systems)"]
    shares = [(n, ratios[str(n)]["broker_share_of_cpu"]) for n in have]
    ok = all(s <= 0.05 for _, s in shares)
    out.append(f"  broker CPU <= 5 % of the pipeline's total at every size: {'met' if ok else 'MISSED'} ("
               + ", ".join(f"{fmt_bytes(n)} {100 * s:.1f} %" for n, s in shares) + ")")
    big = [n for n in have if n in (1 << 20, 16 << 20)]
    dl = [n for n in big if "dataloader" in ratios[str(n)]]
    if not big:
        out.append("  >= 2x DataLoader at 1 MiB and 16 MiB: not checked (neither size was run)")
    elif not dl:
        out.append(f"  >= 2x DataLoader at 1 MiB and 16 MiB: not checked ({missing('dataloader')})")
    else:
        r = [(n, ratios[str(n)]["dataloader"]) for n in dl]
        part = "" if len(dl) == 2 else " (only " + ", ".join(fmt_bytes(n) for n in dl) + " run)"
        ok = all(x["items_s_ratio"] >= 2.0 for _, x in r)
        out.append(f"  >= 2x DataLoader items/s at 1 MiB and 16 MiB{part}: {'met' if ok else 'MISSED'} ("
                   + ", ".join(f"{fmt_bytes(n)} {x['items_s_ratio']:.2f}x" for n, x in r) + ")")
        ok = all(x["cpu_per_item_ratio"] <= 0.5 for _, x in r)
        out.append(f"  <= 0.5x DataLoader's CPU per item at 1 MiB and 16 MiB{part}: {'met' if ok else 'MISSED'} ("
                   + ", ".join(f"{fmt_bytes(n)} {x['cpu_per_item_ratio']:.2f}x" for n, x in r) + ")")
    sp = [n for n in have if "spdl" in ratios[str(n)]]
    if not sp:
        out.append(f"  >= 1.3x SPDL items/s: not checked ({missing('spdl')})")
    else:
        r = [(n, ratios[str(n)]["spdl"]) for n in sp]
        ok = all(x["items_s_ratio"] >= 1.3 for _, x in r)
        out.append(f"  >= 1.3x SPDL items/s at every size: {'met' if ok else 'MISSED'} ("
                   + ", ".join(f"{fmt_bytes(n)} {x['items_s_ratio']:.2f}x (CPU/item {x['cpu_per_item_ratio']:.2f}x)"
                               for n, x in r) + ")")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="runs of ~1.5 s instead of ~5 s")
    ap.add_argument("--sizes", default="4KiB,64KiB,1MiB,16MiB")
    ap.add_argument("--systems", default="shmbroker,dataloader,spdl,queues")
    ap.add_argument("--seconds", type=float, default=None, help="target seconds per timed run (default 5)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--capacity-items", type=int, default=CAPACITY_ITEMS,
                    help="shmbroker arena capacity = this many items (min 128 MiB)")
    ap.add_argument("--pss-interval", type=float, default=0.05, help="seconds between PSS samples")
    ap.add_argument("--pss-max-duty", type=float, default=0.1,
                    help="stretch the interval so sampling takes at most this share of one core (1 = never)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the model stage runs; cuda: DataLoader with pin_memory=True as the peer")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default results/pipeline.json, or pipeline_cuda.json)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    target = args.seconds or (1.5 if args.quick else 5.0)
    reps = max(3, args.reps)
    if args.out is None:
        args.out = RESULTS / ("pipeline_cuda.json" if args.device == "cuda" else "pipeline.json")
    if args.child:
        return child_main(args.child, args.size, target, reps, args.capacity_items, args.device)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            why = "--device cuda needs a CUDA device; torch.cuda.is_available() is False on this host"
            print(f"skipped: {why}")
            write_json(args.out, {"machine": machine_info(with_torch=True), "skipped": why})
            return 0

    machine = machine_info(with_torch=True)
    t_start = time.monotonic()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in CHILDREN]
    if unknown:
        ap.error(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(CHILDREN)}")
    skipped: dict[str, str] = {}
    if "spdl" in systems:
        why = spdl_skip_reason()
        if why:
            skipped["spdl"] = why
            systems.remove("spdl")
            print(f"spdl: skipped, {why}", flush=True)
        else:
            from importlib.metadata import version

            machine["spdl"] = version("spdl")
    results: dict[str, dict[str, Any]] = {}
    for nbytes in sizes:
        for system in systems:
            print(f"{system} {fmt_bytes(nbytes)} ...", flush=True)
            res = run_child(system, nbytes, target, reps, args.capacity_items, args.pss_interval,
                            args.pss_max_duty, args.device)
            runs = res["runs"]
            res["stats"] = {k: summarize([r[k] for r in runs]) for k in
                            ("items_s", "mb_s", "copied_per_item", "peak_pss", "footprint", "seconds",
                             "foreign_cores", "steal_cores")}
            res["stats"]["cpu_ms_per_item"] = {
                role: summarize([r["cpu_s"][role] / r["items"] * 1e3 for r in runs]) for role in runs[0]["cpu_s"]}
            results[f"{system}/{nbytes}"] = res
            print(f"  {res['stats']['items_s']['median']:.1f} items/s (count {res['count']}, "
                  f"peak PSS {fmt_bytes(res['stats']['peak_pss']['median'])})", flush=True)

    rows = []
    for nbytes in sizes:
        for system in systems:
            res = results[f"{system}/{nbytes}"]
            st = res["stats"]
            cpu = st["cpu_ms_per_item"]
            rows.append([f"{system}", fmt_bytes(nbytes), str(res["count"]), fmt_rate(st["items_s"], 1),
                         f"{st['items_s']['spread_pct']:.0f}%", f"{st['mb_s']['median']:.0f}",
                         f"{fmt_bytes(st['copied_per_item']['median'])} ({st['copied_per_item']['median'] / nbytes:.2f}x)",
                         fmt_bytes(st["peak_pss"]["median"]), fmt_bytes(st["footprint"]["median"]),
                         f"{cpu['total']['median']:.3f}",
                         f"{st['foreign_cores']['median'] + st['steal_cores']['median']:.2f}"])
    hdr = ["system", "item", "items/run", "items/s median (min-max)", "spread", "MB/s", "copied/item",
           "peak PSS", "footprint", "CPU ms/item", "others' cores"]
    title = (f"preprocess(normalize, 2-way) -> model(x.reshape(-1,256) @ W, batch 16), "
             f"{reps} runs of ~{target:g} s each, torch threads 1")
    text = table(hdr, rows, title=title)
    for name, why in skipped.items():
        text += f"\n{name}: skipped, {why}"
    print()
    print(text)
    cpu_rows = []
    for key, res in results.items():
        system, nbytes = key.split("/")
        for role, s in res["stats"]["cpu_ms_per_item"].items():
            cpu_rows.append([system, fmt_bytes(int(nbytes)), role, f"{s['median']:.3f}"])
    cpu_text = table(["system", "item", "process", "CPU ms/item (median)"], cpu_rows,
                     title="CPU per item per process (utime+stime of each process over each run / items)")
    print()
    print(cpu_text)
    r_rows, ratios = ratio_lines(results, sizes)
    ratio_text = table(["ratio (medians)", "item", "items/s", "CPU per item"], r_rows,
                       title="shmbroker against its peers (> 1x items/s and < 1x CPU per item favour shmbroker)")
    if r_rows:
        print()
        print(ratio_text)
    goals = [line for system in ("shmbroker", "rings") if system == "shmbroker" or system in systems
             for line in goal_lines(ratios.get(system, {}), sizes, skipped, system)]
    print()
    print("\n".join(goals))
    data = {"machine": machine,
            "config": {"sizes": sizes, "systems": systems, "target_seconds": target, "reps": reps,
                       "quick": args.quick, "batch": BATCH, "features": FEATURES, "out_features": 64,
                       "torch_threads": 1, "spdl_num_threads": SPDL_THREADS, "argv": sys.argv[1:],
                       "capacity_items": args.capacity_items, "pss_interval_s": args.pss_interval,
                       "pss_max_duty": args.pss_max_duty,
                       "shmbroker_capacity": {str(n): capacity_for(n, args.capacity_items) for n in sizes}},
            "systems_skipped": skipped, "results": results, "ratios": ratios, "goals": goals,
            "table": text, "cpu_table": cpu_text, "ratio_table": ratio_text,
            "elapsed_s": time.monotonic() - t_start}
    write_json(args.out, data)
    print(f"\nwrote {args.out}")

    def draw(plt: Any) -> None:
        import numpy as np

        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        x = np.arange(len(sizes))
        width = 0.8 / max(1, len(systems))
        for i, system in enumerate(systems):
            for ax, key, scale, label in ((axes[0], "items_s", 1, "items/s"), (axes[1], "mb_s", 1, "MB/s"),
                                          (axes[2], "peak_pss", 2**-20, "peak PSS (MiB)")):
                med = [results[f"{system}/{n}"]["stats"][key]["median"] * scale for n in sizes]
                lo = [m - results[f"{system}/{n}"]["stats"][key]["min"] * scale for m, n in zip(med, sizes, strict=True)]
                hi = [results[f"{system}/{n}"]["stats"][key]["max"] * scale - m for m, n in zip(med, sizes, strict=True)]
                ax.bar(x + (i - (len(systems) - 1) / 2) * width, med, width, yerr=[lo, hi], capsize=3, label=system)
                ax.set_xticks(x, [fmt_bytes(n) for n in sizes])
                ax.set_ylabel(label)
                ax.set_yscale("log")
        axes[0].legend()
        fig.suptitle(f"shmbroker pipeline vs {' and '.join(s for s in systems if s != 'shmbroker')}, "
                     f"2 cores ({machine['date'][:10]})")

    if systems:
        maybe_plot(args.out.with_suffix(".png"), draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
