#!/usr/bin/env python
"""Where the time of a shmbroker hand-off and of ``Client.put`` goes (the evidence for NOTES.md).

    .venv/bin/python benchmarks/breakdown.py [--reps 200]

Hand-off: the consumer stamps each step with ``time.perf_counter`` (CLOCK_MONOTONIC,
comparable across processes): Pipe recv + unpickle of the Handle, ``Client.get``
(the acquire round trip), ``to_tensor``, touching one element. Three variants:

* ``fresh``: a new ``put`` right before each send, as in handoff.py;
* ``same``:  one ``put`` per size, the same Handle re-sent (no big copy just before);
* ``fresh+settle``: a new ``put``, then 20 ms idle before the send.

Idle-wake: the same few µs of work (``to_tensor`` + touch) timed right after sleeping
1 ms and 20 ms, iteration by iteration. Round-trip CPU: wall time and CPU time
(user+sys, all threads, from /proc) of the client and the broker per ``ping`` and
per ``get``/``release`` in a warm loop.

Put: the alloc round trip alone (``Client.alloc`` + release), ``np.copyto`` into the
arena view of a held block, into a private array (NumPy asks for transparent huge
pages above 4 MiB) and into a private array with ``MADV_NOHUGEPAGE``.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.handoff import _child_init, filled, size_label  # noqa: E402

pc = time.perf_counter
MiB = 2**20


def consumer(endpoint: str, data: Any, ctrl: Any) -> None:
    _child_init()
    import torch

    from broker import Client
    from workers.bridge import to_tensor

    torch.set_num_threads(1)
    with Client(endpoint, role="breakdown-consumer") as c:
        ctrl.send("ready")
        while True:
            item = data.recv()
            t_recv = pc()
            if item is None:
                break
            t0, h = item
            arr = c.get(h)
            t_get = pc()
            t = to_tensor(arr)
            t_tensor = pc()
            float(t.view(-1)[0])
            t_touch = pc()
            del t, arr
            c.release(h)
            ping = c.ping()  # a plain round trip to the broker, right after, for comparison
            ctrl.send((t_recv - t0, t_get - t_recv, t_tensor - t_get, t_touch - t_tensor, t_touch - t0, ping))


def p50(xs: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(xs) * 1e6, 50))


def p99(xs: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(xs) * 1e6, 99))


def handoff_breakdown(client: Any, endpoint: str, sizes: list[int], reps: int) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    r, w = ctx.Pipe(duplex=False)
    ctrl, child = ctx.Pipe()
    proc = ctx.Process(target=consumer, args=(endpoint, r, child), daemon=True)
    proc.start()
    r.close()
    child.close()
    try:
        assert ctrl.recv() == "ready"
        print(f"{'variant':<14}{'size':>8} | {'pipe+unpickle':>13} {'get(acquire)':>12} {'to_tensor':>9} "
              f"{'touch':>7} | {'total p50':>9} {'p99':>8} | {'ping p50':>8}   (µs, p50 unless said)")
        for variant in ("fresh", "same", "fresh+settle"):
            for n in sizes:
                src = filled(n)
                held = client.put(src) if variant == "same" else None
                rows = []
                k = max(3, reps // 10) + reps
                for i in range(k):
                    h = held if held is not None else client.put(src)
                    time.sleep(0.020 if variant == "fresh+settle" else 0.001)
                    w.send((pc(), h))
                    row = ctrl.recv()
                    if held is None:
                        client.release(h)
                    if i >= k - reps:
                        rows.append(row)
                if held is not None:
                    client.release(held)
                cols = list(zip(*rows, strict=True))
                print(f"{variant:<14}{size_label(n):>8} | {p50(cols[0]):13.1f} {p50(cols[1]):12.1f} "
                      f"{p50(cols[2]):9.1f} {p50(cols[3]):7.1f} | {p50(cols[4]):9.1f} {p99(cols[4]):8.1f} | "
                      f"{p50(cols[5]):8.1f}", flush=True)
        w.send(None)
        proc.join(5)
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join()


def private(n: int, huge: bool) -> np.ndarray:
    if huge:
        a = np.empty(n // 4, np.float32)  # NumPy madvises MADV_HUGEPAGE for large arrays
    else:
        m = mmap.mmap(-1, n)
        m.madvise(mmap.MADV_NOHUGEPAGE)
        a = np.frombuffer(m, np.float32)
    a.fill(1.0)
    return a


def put_breakdown(client: Any, sizes: list[int], reps: int) -> None:
    print(f"\n{'size':>8} | {'put':>9} {'alloc RTT':>9} {'copy->arena':>11} {'copy->THP':>9} "
          f"{'copy->4K':>9} | arena GB/s  THP GB/s  4K GB/s   (µs p50)")
    for n in sizes:
        src = filled(n)
        h, view = client.alloc(src.shape, src.dtype)
        view.fill(1.0)
        dst_thp, dst_4k = private(n, True), private(n, False)
        t_put: list[float] = []
        t_alloc: list[float] = []
        t_arena: list[float] = []
        t_thp: list[float] = []
        t_4k: list[float] = []
        r = max(5, reps // 5) if n > 16 * MiB else reps
        for i in range(r + 3):
            t = pc()
            h2 = client.put(src)
            a = pc() - t
            client.release(h2)
            t = pc()
            h3, _v = client.alloc(src.shape, src.dtype)
            b = pc() - t
            del _v
            client.release(h3)
            t = pc()
            np.copyto(view, src)
            c = pc() - t
            t = pc()
            np.copyto(dst_thp, src)
            d = pc() - t
            t = pc()
            np.copyto(dst_4k, src)
            e = pc() - t
            if i >= 3:
                for lst, v in zip((t_put, t_alloc, t_arena, t_thp, t_4k), (a, b, c, d, e), strict=True):
                    lst.append(v)
        del view
        client.release(h)
        gbs = [n / (p50(x) * 1e-6) / 1e9 for x in (t_arena, t_thp, t_4k)]
        print(f"{size_label(n):>8} | {p50(t_put):9.1f} {p50(t_alloc):9.1f} {p50(t_arena):11.1f} "
              f"{p50(t_thp):9.1f} {p50(t_4k):9.1f} | {gbs[0]:9.2f} {gbs[1]:9.2f} {gbs[2]:8.2f}", flush=True)


def idle_wake() -> None:
    from workers.bridge import to_tensor

    a = np.ones(1024, np.float32)
    print("\nidle-wake: to_tensor + touch, µs p50 per iteration after a sleep")
    for gap in (0.001, 0.020):
        rows = []
        for _ in range(40):
            time.sleep(gap)
            r = []
            for _ in range(8):
                t0 = pc()
                float(to_tensor(a).view(-1)[0])
                r.append((pc() - t0) * 1e6)
            rows.append(r)
        print(f"  after {gap * 1e3:4.0f} ms idle: " + " ".join(f"{x:6.1f}" for x in np.median(rows, axis=0)))


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rtt_cpu(client: Any, broker_pid: int, endpoint: str, n: int = 5000) -> None:
    from broker import Client

    print("\nround trips in a warm loop (no idle): wall and CPU time per round trip, µs")
    with Client(endpoint, role="breakdown-rtt") as other:
        h = client.put(np.ones(1024, np.float32))

        def get_release() -> None:
            other.get(h)
            other.release(h)

        cases = (("ping", 1, other.ping), ("get+release", 2, get_release))
        for name, rts, fn in cases:
            for _ in range(300):
                fn()
            c0, b0, t0 = _cpu_s(os.getpid()), _cpu_s(broker_pid), pc()
            for _ in range(n):
                fn()
            k = n * rts
            print(f"  {name:<12} wall {(pc() - t0) / k * 1e6:6.1f}  client CPU "
                  f"{(_cpu_s(os.getpid()) - c0) / k * 1e6:6.1f}  broker CPU {(_cpu_s(broker_pid) - b0) / k * 1e6:6.1f}")
        client.release(h)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--sizes", default="4KiB,1MiB,16MiB,128MiB")
    ap.add_argument("--only", choices=("handoff", "put", "idle", "rtt"), default=None)
    args = ap.parse_args()
    from benchmarks.handoff import parse_size

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    from broker import Broker, Client

    with Broker(capacity=512 * MiB) as b, Client(b.endpoint, role="breakdown") as c:
        if args.only in (None, "handoff"):
            handoff_breakdown(c, b.endpoint, sizes, args.reps)
        if args.only in (None, "put"):
            put_breakdown(c, sizes, args.reps)
        if args.only in (None, "rtt"):
            rtt_cpu(c, b.pid, b.endpoint)
    if args.only in (None, "idle"):
        idle_wake()
    return 0


if __name__ == "__main__":
    sys.exit(main())
