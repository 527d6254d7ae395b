#!/usr/bin/env python
"""Peak memory of a long pipeline run, all processes together, and whether it grows per item.

One command::

    .venv/bin/python benchmarks/memory.py [--items 10000] [--config configs/demo.yaml]
                                          [--out benchmarks/results/memory.json]

Runs ``shmbroker run CONFIG --set source.count=ITEMS --set sink={type: null}``
as a child process, once with workers forked from a fork server that has
imported torch (the default) and once with ``SHMBROKER_START_METHOD=spawn``
(every worker imports torch itself), and samples the PSS of the whole process
tree (driver, broker, fork server, workers; shared pages count once) every
~0.1 s. Reports the peak, the peak minus the arena's capacity (the target is
at most 300 MB over the arena), the per-process split at the peak, and the
growth between the second fifth and the last fifth of the run (median PSS of
each window; a leak of even 100 bytes per item would show as ~1 MB here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._bench_util import (  # noqa: E402
    RESULTS,
    fmt_bytes,
    machine_info,
    maybe_plot,
    proc_name,
    pss_bytes,
    table,
    tree,
    write_json,
)

TARGET_OVER_ARENA = 300e6


def run_once(config: Path, items: int, method: str, interval: float) -> dict[str, Any]:
    env = dict(os.environ, SHMBROKER_START_METHOD=method)
    cmd = [str(Path(sys.executable).parent / "shmbroker"), "run", str(config), "--json",
           "--set", f"source.count={items}", "--set", "sink={type: \"null\"}"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    samples: list[tuple[float, int, dict[str, int]]] = []
    while proc.poll() is None:
        pids = [p for p in tree(proc.pid)]
        per = {f"{p} {proc_name(p)[:60]}": pss_bytes(p) for p in pids}
        samples.append((time.monotonic() - t0, sum(per.values()), per))
        time.sleep(interval)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{err.decode()[-2000:]}")
    summary = json.loads(out)
    # the run proper: from the first sample with every process up to the end
    n_procs = max(len(s[2]) for s in samples)
    start = next(i for i, s in enumerate(samples) if len(s[2]) == n_procs)
    run = [s for s in samples[start:] if len(s[2]) == n_procs]  # until the first process exits
    k = max(1, len(run) // 5)
    early = statistics.median(s[1] for s in run[k:2 * k])
    late = statistics.median(s[1] for s in run[-k:])
    peak = max(samples, key=lambda s: s[1])
    capacity = int(summary["capacity"])
    return {"method": method, "items": items, "seconds": samples[-1][0], "samples": len(samples),
            "capacity": capacity, "peak_pss": peak[1], "over_arena": peak[1] - capacity,
            "peak_by_process": peak[2], "early_median": early, "late_median": late,
            "growth": late - early, "items_s": summary["items"] / summary["seconds"],
            "series": [(round(t, 3), v) for t, v, _ in samples]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    args = ap.parse_args()
    results = [run_once(args.config, args.items, m, args.interval) for m in ("forkserver", "spawn")]
    rows = []
    for r in results:
        rows.append([r["method"], f"{r['items']:,}", f"{r['seconds']:.1f}", fmt_bytes(r["capacity"]),
                     fmt_bytes(r["peak_pss"]), fmt_bytes(r["over_arena"]),
                     "met" if r["over_arena"] <= TARGET_OVER_ARENA else "MISSED",
                     f"{r['growth'] / 2**20:+.1f} MiB", r["samples"]])
    text = table(["workers started by", "items", "wall s", "arena", "peak PSS (all processes)",
                  "peak - arena", "<= 300 MB", "growth 2nd->last fifth", "samples"], rows,
                 title=f"memory of a {args.items:,}-item run of {args.config.name} (sink null)")
    print(text)
    for r in results:
        print(f"\nat the peak ({r['method']}):")
        for name, v in sorted(r["peak_by_process"].items(), key=lambda kv: -kv[1]):
            print(f"  {fmt_bytes(v):>10}  {name}")
    data = {"machine": machine_info(with_torch=True), "config": vars(args) | {"config": str(args.config),
                                                                             "out": str(args.out)},
            "target_over_arena_bytes": TARGET_OVER_ARENA, "results": results, "table": text}
    write_json(args.out, data)
    print(f"\nwrote {args.out}")

    def draw(plt: Any) -> None:
        fig, ax = plt.subplots(figsize=(8, 4))
        for r in results:
            ts, vs = zip(*r["series"], strict=True)
            ax.plot(ts, [v / 2**20 for v in vs], label=f"{r['method']} (peak {fmt_bytes(r['peak_pss'])})")
        cap = results[0]["capacity"]
        ax.axhline((cap + TARGET_OVER_ARENA) / 2**20, color="tab:red", ls="--",
                   label="arena + 300 MB (target)")
        ax.set_xlabel("s since start")
        ax.set_ylabel("PSS of all processes, MiB")
        ax.set_title(f"{args.items:,}-item run of {args.config.name}")
        ax.legend()

    maybe_plot(args.out.with_suffix(".png"), draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
