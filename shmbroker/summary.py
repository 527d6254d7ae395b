"""What a run reports (the summary table of items, stages, copies and the arena, a live progress line)
and what ``shmbroker status`` shows of a broker."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from broker.errors import format_bytes

__all__ = ["Summary", "Progress"]


@dataclass
class Summary:
    """What a run did; ``render()`` draws it as a table."""

    name: str
    items: int
    skipped: list[int]
    duplicates: int
    seconds: float
    bytes_in: int
    stages: list[dict[str, Any]]
    arena_peak: int
    capacity: int
    restarts: dict[str, int]
    copied_per_item: float
    failures: list[dict[str, Any]] = field(default_factory=list)
    resumed: int = 0  # items an earlier run had settled (left out of this one)
    interrupted: str = ""  # why the run stopped before the end of its source ("" if it did not)
    failures_file: str = ""  # where skipped items are recorded
    nodes: list[dict[str, Any]] = field(default_factory=list)  # a cluster run's nodes (docs/cluster.md)
    moved: dict[str, Any] = field(default_factory=dict)  # ... and what crossed between them

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds else 0.0

    def render(self) -> Any:
        from rich.table import Table

        head = f"{self.interrupted.upper()}, output incomplete: " if self.interrupted else ""
        t = Table(title=f"{head}{self.name}: {self.items} items in {self.seconds:.2f} s "
                        f"({self.items_per_s:.1f} items/s, "
                        f"{self.bytes_in / max(self.seconds, 1e-9) / 1e6:.1f} MB/s in)")
        for col in ("stage", "device", "workers", "items", "items/s", "busy s", "restarts", "copied/item"):
            t.add_column(col, justify="left" if col in ("stage", "device") else "right")
        for st in self.stages:
            t.add_row(st["name"], st["device"], str(st["workers"]), str(st["done"]),
                      f"{st['rate']:.1f}", f"{st['busy']:.2f}", str(self.restarts.get(st["name"], 0)),
                      format_bytes(int(st["copied"] / max(1, st["done"]))))
        t.caption = (f"arena peak {format_bytes(self.arena_peak)} of {format_bytes(self.capacity)}; "
                     f"bytes copied per item {format_bytes(int(self.copied_per_item))} "
                     f"(source write + stage writes); skipped {len(self.skipped)}"
                     f"{f' (in {self.failures_file})' if self.skipped and self.failures_file else ''}, "
                     f"duplicates dropped {self.duplicates}")
        if self.resumed:
            t.caption += f"; resumed: {self.resumed} item(s) were done before"
        if self.nodes:
            t.caption += (f"; cluster: {len(self.nodes)} node(s), arena peak per node; moved between "
                          f"nodes: {self.moved.get('items', 0)} item(s), "
                          f"{format_bytes(int(self.moved.get('bytes', 0)))}")
            if self.moved.get("lost_nodes"):
                t.caption += f"; nodes lost: {', '.join(n[:8] for n in self.moved['lost_nodes'])}"
        unpinned = {st["name"]: st["unpinned"] for st in self.stages if st.get("unpinned")}
        if unpinned:
            t.caption += "; NOT PINNED (host-device copies staged): " + ", ".join(
                f"{n} worker(s) of {name}" for name, n in unpinned.items()) + "; see `ulimit -l`"
        return t




class Progress:
    """A live progress line on a terminal (rich); nothing otherwise."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self.bar: Any = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]items"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("items", total=total, rate="")
            self.t0 = time.perf_counter()

    def update(self, done: int, nbytes: int, queues: str) -> None:
        if self.bar is not None:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, completed=done,
                            rate=f"{done / dt:.1f} items/s {nbytes / dt / 1e6:.1f} MB/s queues {queues}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def render_status(st: dict[str, Any]) -> Any:
    """What ``shmbroker status`` shows of one broker (``Client.stats()``): its arena, stages, workers."""
    from rich.console import Group
    from rich.table import Table

    head = Table(title=f"broker pid {st['pid']} up {st['uptime']:.0f} s ({st['memfd']})")
    for col in ("capacity", "used", "peak", "objects", "clients", "in flight", "pending"):
        head.add_column(col, justify="right")
    head.add_row(format_bytes(st["capacity"]), format_bytes(st["used"]), format_bytes(st["peak"]),
                 str(st["objects"]), str(st["clients"]), str(st["inflight_items"]), str(st["pending"]))
    stages = Table(title="stages")
    for col in ("stage", "batch", "queue", "in flight", "done", "failed", "items/s", "workers"):
        stages.add_column(col, justify="left" if col == "stage" else "right")
    workers = Table(title="workers")
    for col in ("stage", "pid", "device", "pinned", "done", "busy %"):
        workers.add_column(col, justify="left" if col in ("stage", "device", "pinned") else "right")
    for s in st["stages"]:
        stages.add_row(s["name"], str(s["batch"] or "-"), str(s["queue"]), str(s["inflight"]),
                       str(s["done"]), str(s["failed"]), f"{s['rate']:.1f}", str(len(s["workers"])))
        for w in s["workers"]:
            pinned = "yes" if w["pinned"] else ("NO" if w["device"].startswith("cuda") else "-")
            workers.add_row(s["name"], str(w["pid"]), w["device"], pinned,
                            "-" if w["done"] is None else str(w["done"]),  # None: tasks in rings
                            "-" if w["busy"] is None else f"{100 * w['busy']:.0f}")
    return Group(head, stages, workers)
