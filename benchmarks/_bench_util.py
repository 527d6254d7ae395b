"""Shared helpers for benchmarks/rate.py, pipeline.py and scaling.py.

Statistics (median and spread of repeated runs), machine information for the
JSON files, a plain-text table printer, process-tree memory accounting (PSS
from ``/proc/PID/smaps_rollup``) with a sampling thread, per-process CPU
time from ``/proc/PID/stat``, and an optional matplotlib plot.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from broker.errors import format_bytes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- statistics ---------------------------------------------------------------------
def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and spread ((max - min) / median, in %) of repeated runs."""
    vals = [float(v) for v in values]
    med = statistics.median(vals)
    return {"median": med, "min": min(vals), "max": max(vals),
            "spread_pct": (max(vals) - min(vals)) / med * 100 if med else 0.0, "runs": vals}


def fmt_rate(s: dict[str, Any], digits: int = 0) -> str:
    """``median (min–max)``."""
    f = f"{{:,.{digits}f}}"
    return f"{f.format(s['median'])} ({f.format(s['min'])}-{f.format(s['max'])})"


def fmt_bytes(n: float) -> str:
    return format_bytes(int(n))


def parse_size(text: str) -> int:
    text = text.strip()
    units = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "K": 2**10, "M": 2**20, "G": 2**30, "B": 1}
    for u in sorted(units, key=len, reverse=True):
        if text.endswith(u):
            return int(float(text[: -len(u)]) * units[u])
    return int(text)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> str:
    """A plain-text table (copyable into Markdown as a code block)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    out = []
    if title:
        out.append(title)
    out.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))))
    out.append("  ".join("-" * w for w in widths))
    for r in rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(out)


# -- machine ------------------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def machine_info(with_torch: bool = True) -> dict[str, Any]:
    import msgpack
    import numpy as np
    import zmq

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem_total = None
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem_total = int(line.split()[1]) * 1024
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "mem_total": mem_total,
        "loadavg_at_start": os.getloadavg(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "thp_enabled": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "thp_shmem_enabled": _read("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
    }
    if with_torch:
        import torch

        info["torch"] = torch.__version__
        info["torch_sharing_strategy"] = torch.multiprocessing.get_sharing_strategy()
    return info


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data.setdefault("machine", {})["loadavg_at_end"] = os.getloadavg()
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def maybe_plot(path: Path, draw: Callable[[Any], None]) -> bool:
    """Call ``draw(plt)`` and save to ``path``; skip quietly if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return False
    try:
        draw(plt)
        plt.tight_layout()
        plt.savefig(path, dpi=110)
    finally:
        plt.close("all")
    print(f"wrote {path}")
    return True


# -- processes ------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        text = _read(f"/proc/{pid}/task/{tid}/children")
        if text:
            out.extend(int(x) for x in text.split())
    return out


def tree(root: int) -> list[int]:
    """``root`` and all its descendants (alive now)."""
    seen, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo.extend(children(pid))
    return seen


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process (shared pages divided among their mappers)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mapping_pss(pid: int, needle: str) -> int:
    """PSS of the mappings of ``pid`` whose path contains ``needle`` (full smaps: slower)."""
    total, hit = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                first = line.split(maxsplit=1)[0]
                if "-" in first and not first.endswith(":"):
                    hit = needle in line
                elif hit and line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        pass
    return total


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread kind of one process: ``main`` (the Python thread), ``zmq-io``
    (ZeroMQ's I/O threads), ``other`` (everything else, e.g. OpenMP or the reaper)."""
    out = {"main": 0.0, "zmq-io": 0.0, "other": 0.0}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        text = _read(f"/proc/{pid}/task/{tid}/stat")
        if not text:
            continue
        comm = text[text.index("(") + 1: text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        secs = (int(fields[11]) + int(fields[12])) / CLK_TCK
        kind = "main" if tid == str(pid) else "zmq-io" if comm.startswith("ZMQbg/IO") else "other"
        out[kind] += secs
    return out


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


class Foreign:
    """CPU used on this machine by processes outside our process tree during an interval.

    ``start()`` then ``stop()``: ``cores`` = (all non-idle CPU time in /proc/stat -
    CPU time of ``tree(root)``) / wall seconds, i.e. how many cores others took on
    average (kernel threads and interrupts included); ``steal`` = cores the
    hypervisor gave to other guests. Processes of ours that exit during the interval
    are not counted as ours, so keep the tree alive across it.
    """

    def __init__(self, root: int | None = None) -> None:
        self.root = root or os.getpid()
        self.cores = 0.0
        self.steal = 0.0

    @staticmethod
    def _stat() -> tuple[float, float]:
        fields = [int(x) for x in (_read("/proc/stat") or "cpu 0").splitlines()[0].split()[1:]]
        fields += [0] * (8 - len(fields))
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK

    def _ours(self) -> float:
        return sum(cpu_seconds(p) for p in tree(self.root))

    def start(self) -> Foreign:
        self._t = time.monotonic()
        self._busy, self._steal = self._stat()
        self._mine = self._ours()
        return self

    def stop(self) -> dict[str, float]:
        wall = max(1e-9, time.monotonic() - self._t)
        busy, steal = self._stat()
        mine = self._ours() - self._mine
        self.cores = max(0.0, (busy - self._busy) - mine) / wall
        self.steal = (steal - self._steal) / wall
        return {"foreign_cores": self.cores, "steal_cores": self.steal, "our_cores": mine / wall}


def proc_name(pid: int) -> str:
    text = _read(f"/proc/{pid}/cmdline") or ""
    return " ".join(text.split("\0"))[:80]


class PssSampler(threading.Thread):
    """Sum PSS over a process tree every ``interval`` s; keep the peak per phase label.

    ``phase`` may be changed at any time by the owner (``sampler.phase = "rep1"``).
    Reading ``smaps_rollup`` walks the page tables, which costs ~10-50 ms per
    sample once processes map GiBs; to keep this thread from stealing more than
    ``max_duty`` of a core from the processes it measures, the wait after a
    sample is stretched to ``cost * (1 - max_duty) / max_duty`` when that is
    longer than ``interval``. ``cpu``, ``samples`` and ``mean_interval`` say what
    it cost and how often it actually sampled.
    """

    def __init__(self, root: int, interval: float = 0.05, max_duty: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.interval = interval
        self.max_duty = max_duty
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self.procs: dict[str, int] = {}
        self.samples = 0
        self.cpu = 0.0
        self.mean_interval = 0.0
        self._stop_evt = threading.Event()

    def run(self) -> None:
        t0, w0 = time.thread_time(), time.monotonic()
        while not self._stop_evt.is_set():
            c = time.thread_time()
            pids = tree(self.root)
            total = sum(pss_bytes(p) for p in pids)
            cost = time.thread_time() - c
            ph = self.phase
            if total > self.peaks.get(ph, 0):
                self.peaks[ph] = total
                self.procs[ph] = len(pids)
            self.samples += 1
            self.cpu = time.thread_time() - t0
            self.mean_interval = (time.monotonic() - w0) / self.samples
            self._stop_evt.wait(max(self.interval, cost * (1 - self.max_duty) / self.max_duty))

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(5)


def process_lines(pid: int) -> list[str]:
    return [f"{p}: {proc_name(p)}" for p in tree(pid)]
