#!/usr/bin/env python
"""A CPU-bound stage with replicas=1 vs replicas=2 on this 2-core machine: items/s and the ratio.

One command::

    .venv/bin/python benchmarks/scaling.py [--quick] [--ms 5] [--items N] [--reps N]
                                           [--out benchmarks/results/scaling.json]

The stage (``benchmarks._bench_stages.busy_factory``) runs ``iters`` chained
``tanh([128,128] @ [128,128])`` per item with ``torch.set_num_threads(1)``;
``iters`` is calibrated in this process at start so one call takes ``--ms``
(default 5 ms) on an idle core. Items are float32[16] (64 B), so moving them
costs nothing: what is left is the stage, the broker and the driver.

Two pipelines (synthetic source -> ``busy`` -> null sink; threads 1, credits 2)
are started once, with 1 and with 2 replicas, warmed up, and then run in
interleaved rounds (R1, R2, raw1, raw2 per round) so both see the same machine
noise. ``ratio`` is computed per round (R2 / R1 items/s) and the median ratio
is reported.

Every run records how many cores processes outside this benchmark's tree used
meanwhile (``/proc/stat`` non-idle time minus our processes' CPU time: the
machine is shared). A round where any run saw others (plus hypervisor steal) use more than 0.15 cores
is "disturbed"; the ratio is also reported over undisturbed rounds only.

Control ("raw"): the same function in 1 and in 2 plain ``spawn`` processes
with no broker, each processing its share of the items from a local loop. Its
ratio is what this machine gives two CPU-bound processes right now; the
pipeline cannot beat it, and (pipeline ratio / raw ratio) is the broker's cost.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._bench_util import (
    RESULTS,
    Foreign,
    cpu_seconds,
    fmt_rate,
    machine_info,
    maybe_plot,
    summarize,  # noqa: E402
    table,
    write_json,
)

TARGET_RATIO = 1.7
BUSY_ROUND = 0.15  # a round is "disturbed" if others took more than this many cores during any of its runs

YAML = """\
name: scaling-r{replicas}
broker:
  capacity: 64MiB
  max_inflight: 64
source: {{type: synthetic, count: 16, shape: [16], dtype: float32}}
stages:
  - name: busy
    factory: benchmarks._bench_stages:busy_factory
    args: {{iters: {iters}}}
    device: cpu
    replicas: {replicas}
    threads: 1
    credits: 2
sink: {{type: "null"}}
"""


def raw_proc(iters: int, conn: Any) -> None:
    import torch

    from benchmarks._bench_stages import busy_factory

    torch.set_num_threads(1)
    fn = busy_factory(iters)
    x = torch.zeros(16)
    for _ in range(20):
        fn(x)
    conn.send(os.getpid())
    while True:
        msg = conn.recv()
        if msg is None:
            return
        n, start_at = msg
        while time.monotonic() < start_at:
            time.sleep(0.001)
        t0 = time.monotonic()
        with torch.inference_mode():
            for _ in range(n):
                fn(x)
        conn.send((t0, time.monotonic()))


def run_raw(conns: list[Any], items: int) -> float:
    start_at = time.monotonic() + 0.02
    share = [items // len(conns) + (1 if i < items % len(conns) else 0) for i in range(len(conns))]
    for c, n in zip(conns, share, strict=True):
        c.send((n, start_at))
    res = [c.recv() for c in conns]
    return items / (max(r[1] for r in res) - min(r[0] for r in res))


def run_pipeline(p: Any, items: int) -> dict[str, Any]:
    p.cfg.source.count = items
    st0 = p.client.stats()["stages"][0]
    pids = {"driver": os.getpid(), "broker": p.broker.pid}
    c0 = {k: cpu_seconds(v) for k, v in pids.items()}
    w0 = {w.proc.pid: cpu_seconds(w.proc.pid) for w in p.workers if w.proc is not None}
    t = time.perf_counter()
    s = p.run()
    wall = time.perf_counter() - t
    st1 = p.client.stats()["stages"][0]
    c1 = {k: cpu_seconds(v) for k, v in pids.items()}
    w1 = {pid: cpu_seconds(pid) for pid in w0}
    assert s.items == items, (s.items, items)
    done = st1["done"] - st0["done"]
    return {"items": s.items, "seconds": wall, "items_s": s.items / wall,
            "busy_ms_per_item": (st1["busy"] - st0["busy"]) / max(1, done) * 1e3,
            "driver_cpu_ms_per_item": (c1["driver"] - c0["driver"]) / items * 1e3,
            "broker_cpu_ms_per_item": (c1["broker"] - c0["broker"]) / items * 1e3,
            "workers_cpu_ms_per_item": sum(w1[k] - w0[k] for k in w0) / items * 1e3}


def calibrate(ms: float) -> tuple[int, float]:
    import torch

    from benchmarks._bench_stages import busy_seconds_per_item

    torch.set_num_threads(1)
    per = busy_seconds_per_item(10) / 10
    iters = max(1, round(ms / 1e3 / per))
    for _ in range(3):
        got = busy_seconds_per_item(iters)
        iters = max(1, round(iters * ms / 1e3 / got))
    return iters, busy_seconds_per_item(iters) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer items per run (~1.5 s at 1 replica)")
    ap.add_argument("--ms", type=float, default=5.0, help="target stage time per item, ms")
    ap.add_argument("--items", type=int, default=None, help="items per run (default ~4 s at 1 replica)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "scaling.json")
    args = ap.parse_args()
    reps = max(3, args.reps)
    machine = machine_info(with_torch=True)
    t_start = time.monotonic()
    iters, ms = calibrate(args.ms)
    if args.quick and args.reps == 5:
        reps = 3
    items = args.items or int((1.5 if args.quick else 4.0) / (ms / 1e3)) // 16 * 16
    print(f"stage: {iters} x tanh([128,128] @ [128,128]) = {ms:.2f} ms per item (1 thread, idle core); "
          f"{items} items per run, {reps} interleaved rounds", flush=True)

    from broker import Pipeline

    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="shmb-scaling-")
    pipes: dict[int, Any] = {}
    raw: dict[int, list[Any]] = {1: [], 2: []}
    procs = []
    runs: dict[str, list[dict[str, Any]]] = {"pipeline-1": [], "pipeline-2": [], "raw-1": [], "raw-2": []}
    try:
        for r in (1, 2):
            path = Path(tmp) / f"r{r}.yaml"
            path.write_text(YAML.format(replicas=r, iters=iters))
            pipes[r] = Pipeline.from_yaml(path).__enter__()
        for r in (1, 2):
            for _ in range(r):
                mine, theirs = ctx.Pipe()
                pr = ctx.Process(target=raw_proc, args=(iters, theirs), daemon=True)
                pr.start()
                procs.append(pr)
                raw[r].append(mine)
        for r in (1, 2):
            for c in raw[r]:
                c.recv()
        # warm-up: workers start and register during the first run
        for r in (1, 2):
            run_pipeline(pipes[r], 32)
            run_pipeline(pipes[r], max(32, items // 8 // 16 * 16))
            run_raw(raw[r], max(16, items // 8))
        for rnd in range(reps):
            for name in ("pipeline-1", "pipeline-2", "raw-1", "raw-2"):
                kind, r = name.split("-")
                fg = Foreign().start()
                if kind == "pipeline":
                    res = run_pipeline(pipes[int(r)], items)
                else:
                    rate = run_raw(raw[int(r)], items)
                    res = {"items": items, "items_s": rate, "seconds": items / rate}
                res.update(fg.stop())
                runs[name].append(res)
            print(f"  round {rnd + 1}/{reps}: " + ", ".join(f"{k} {v[-1]['items_s']:.1f}/s" for k, v in runs.items())
                  + "; others used " + "/".join(f"{v[-1]['foreign_cores']:.2f}" for v in runs.values()) + " cores, steal "
                  + "/".join(f"{v[-1]['steal_cores']:.2f}" for v in runs.values()),
                  flush=True)
    finally:
        for p in pipes.values():
            p.close()
        for r in (1, 2):
            for c in raw[r]:
                try:
                    c.send(None)
                except OSError:
                    pass
        for pr in procs:
            pr.join(3)
            if pr.exitcode is None:
                pr.terminate()
        shutil.rmtree(tmp, ignore_errors=True)

    stats = {k: summarize([x["items_s"] for x in v]) for k, v in runs.items()}
    ratio_p = [b["items_s"] / a["items_s"] for a, b in zip(runs["pipeline-1"], runs["pipeline-2"], strict=True)]
    ratio_r = [b["items_s"] / a["items_s"] for a, b in zip(runs["raw-1"], runs["raw-2"], strict=True)]
    rp, rr = summarize(ratio_p), summarize(ratio_r)
    clean = [i for i in range(reps)
             if all(runs[k][i]["foreign_cores"] + runs[k][i]["steal_cores"] < BUSY_ROUND for k in runs)]
    rp_clean = summarize([ratio_p[i] for i in clean]) if clean else None
    rr_clean = summarize([ratio_r[i] for i in clean]) if clean else None
    ideal = 1e3 / ms
    rows = []
    for name in ("pipeline-1", "pipeline-2", "raw-1", "raw-2"):
        kind, r = name.split("-")
        s = stats[name]
        extra = ["", "", ""]
        if kind == "pipeline":
            v = runs[name]
            extra = [f"{statistics.median(x['busy_ms_per_item'] for x in v):.2f}",
                     f"{statistics.median(x['driver_cpu_ms_per_item'] for x in v):.3f}",
                     f"{statistics.median(x['broker_cpu_ms_per_item'] for x in v):.3f}"]
        fc = statistics.median(x["foreign_cores"] for x in runs[name])
        rows.append([f"{'shmbroker pipeline' if kind == 'pipeline' else 'raw processes (control)'}", r,
                     fmt_rate(s, 1), f"{s['spread_pct']:.0f}%", f"{s['median'] / (ideal * int(r)) * 100:.0f}%", *extra,
                     f"{fc:.2f}"])
    text = table(["mode", "replicas", "items/s median (min-max)", "spread", "of ideal", "stage busy ms/item",
                  "driver CPU ms/item", "broker CPU ms/item", "others' cores"], rows,
                 title=f"CPU-bound stage, {ms:.2f} ms/item on an idle core (ideal {ideal:.0f} items/s per replica), "
                       f"{items} items/run, {reps} rounds")
    verdict = "MET" if rp["median"] >= TARGET_RATIO else "MISSED"
    summary = (f"ratio replicas 2/1: pipeline {rp['median']:.2f}x (per-round {', '.join(f'{x:.2f}' for x in ratio_p)}); "
               f"raw processes {rr['median']:.2f}x (per-round {', '.join(f'{x:.2f}' for x in ratio_r)}); "
               f"pipeline/raw {rp['median'] / rr['median']:.2f}; target >= {TARGET_RATIO}x: {verdict}")
    if rp_clean is not None and rr_clean is not None:
        summary += (f"\nundisturbed rounds only ({len(clean)} of {reps}: others < {BUSY_ROUND} cores in every run): "
                    f"pipeline {rp_clean['median']:.2f}x, raw {rr_clean['median']:.2f}x")
    else:
        summary += f"\nno round was undisturbed (others >= {BUSY_ROUND} cores in some run of every round)"
    print()
    print(text)
    print(summary)
    data = {"machine": machine,
            "config": {"ms_target": args.ms, "iters": iters, "ms_per_item_calibrated": ms, "items": items,
                       "reps": reps, "quick": args.quick, "argv": sys.argv[1:], "torch_threads": 1},
            "runs": runs, "stats": stats, "ratio_pipeline": rp, "ratio_raw": rr, "target_ratio": TARGET_RATIO,
            "undisturbed_rounds": clean, "ratio_pipeline_undisturbed": rp_clean, "ratio_raw_undisturbed": rr_clean,
            "verdict": verdict, "table": text, "summary": summary, "elapsed_s": time.monotonic() - t_start}
    write_json(args.out, data)
    print(f"\nwrote {args.out}")

    def draw(plt: Any) -> None:
        fig, ax = plt.subplots(figsize=(7, 4))
        names = list(runs)
        med = [stats[n]["median"] for n in names]
        lo = [stats[n]["median"] - stats[n]["min"] for n in names]
        hi = [stats[n]["max"] - stats[n]["median"] for n in names]
        ax.bar(names, med, yerr=[lo, hi], capsize=3, color=["tab:blue", "tab:blue", "tab:gray", "tab:gray"])
        ax.axhline(ideal, color="k", ls=":", lw=1, label="ideal, 1 replica")
        ax.axhline(stats["pipeline-1"]["median"] * TARGET_RATIO, color="tab:red", ls="--", lw=1,
                   label=f"target: {TARGET_RATIO}x pipeline-1")
        ax.set_ylabel("items/s")
        ax.set_title(f"replicas 1 vs 2: pipeline {rp['median']:.2f}x, raw {rr['median']:.2f}x")
        ax.legend()

    maybe_plot(args.out.with_suffix(".png"), draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
