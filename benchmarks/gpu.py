#!/usr/bin/env python
"""Host<->GPU bandwidth from the arena: pinned (cudaHostRegister, as GPU workers do) vs pageable.

One command (needs a CUDA device; without one it says so, writes the reason, and exits 0)::

    .venv/bin/python benchmarks/gpu.py [--sizes 1MiB,16MiB,128MiB] [--reps 20]
                                       [--out benchmarks/results/gpu.json]

For each size, interleaved rep by rep, p50 over ``--reps``:

* H2D pageable: ``torch.from_numpy(arena view).to("cuda", non_blocking=True)`` + sync,
  before the arena is registered (the driver copies through a staging buffer).
* H2D pinned: the same after ``workers.devices.Device.pin`` registered the whole
  arena once (what a GPU worker does at start): a direct DMA.
* D2H into the slot: ``workers.bridge.write_into(arena view, cuda tensor, non_blocking=True)``
  + sync, pinned (how a GPU stage's result lands in the next stage's slot).
* ref: a ``torch.empty(..., pin_memory=True)`` tensor's H2D (what a DataLoader with
  ``pin_memory=True`` hands to ``.to(device, non_blocking=True)``).

The pipeline-level GPU comparison (a CUDA model stage vs a DataLoader with
``pin_memory=True``) is ``benchmarks/pipeline.py --device cuda``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._bench_util import RESULTS, fmt_bytes, machine_info, parse_size, table, write_json  # noqa: E402


def p50_us(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def measure(sizes: list[int], reps: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from broker import Broker, Client
    from workers.bridge import to_tensor, write_into
    from workers.devices import Device

    dev = torch.device("cuda")
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(dev), "sizes": {}}
    with Broker(capacity=2 * max(sizes) + (64 << 20)) as b, Client(b.endpoint) as c:
        assert c.region is not None
        for n in sizes:
            h = c.put(np.full(n // 4, 0.5, np.float32))
            view = c.get(h)
            gpu = torch.empty(n // 4, dtype=torch.float32, device=dev)
            ref = torch.empty(n // 4, dtype=torch.float32, pin_memory=True)

            def h2d(view: Any = view) -> None:
                to_tensor(view).to(dev, non_blocking=True)
                torch.cuda.synchronize()

            def d2h(view: Any = view, gpu: Any = gpu) -> None:
                write_into(view, gpu, non_blocking=True)
                torch.cuda.synchronize()

            def h2d_ref(ref: Any = ref) -> None:
                ref.to(dev, non_blocking=True)
                torch.cuda.synchronize()

            for f in (h2d, h2d_ref):
                f()  # warm-up: CUDA context, allocator
            pageable = p50_us(h2d, reps)
            device = Device("cuda")
            pinned_ok = device.pin(c.region.buffer)
            pinned = p50_us(h2d, reps)
            down = p50_us(d2h, reps)
            reference = p50_us(h2d_ref, reps)
            device.unpin()
            gbs = {k: n / (v * 1e-6) / 1e9 for k, v in
                   (("h2d_pageable", pageable), ("h2d_pinned", pinned), ("d2h_pinned", down),
                    ("h2d_torch_pinned", reference))}
            out["sizes"][str(n)] = {"p50_us": {"h2d_pageable": pageable, "h2d_pinned": pinned,
                                               "d2h_pinned": down, "h2d_torch_pinned": reference},
                                    "GBps": gbs, "arena_registered": pinned_ok}
            c.release(h)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1MiB,16MiB,128MiB")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    args = ap.parse_args()
    import torch

    data: dict[str, Any] = {"machine": machine_info(with_torch=True)}
    if not torch.cuda.is_available():
        data["skipped"] = "no CUDA device: torch.cuda.is_available() is False on this host"
        print(f"skipped: {data['skipped']}")
        write_json(args.out, data)
        return 0
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    data["results"] = res = measure(sizes, args.reps)
    rows = []
    for n in sizes:
        r = res["sizes"][str(n)]
        rows.append([fmt_bytes(n)] + [f"{r['p50_us'][k]:,.0f} us ({r['GBps'][k]:.1f} GB/s)"
                                      for k in ("h2d_pageable", "h2d_pinned", "d2h_pinned", "h2d_torch_pinned")])
    data["table"] = table(["size", "H2D pageable arena", "H2D pinned arena", "D2H into pinned slot",
                           "ref: H2D torch pinned tensor"], rows,
                          title=f"host<->GPU from the arena, p50 of {args.reps}, {res['device']}")
    print(data["table"])
    write_json(args.out, data)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
