"""Nothing grows per item: 200,000 small items through a pipeline leave every structure as small as its live state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from broker import Pipeline

N = 200_000


@pytest.mark.timeout(240)
def test_two_hundred_thousand_small_items_leave_every_structure_bounded(tmp_path: Path) -> None:
    cfg = tmp_path / "many.yaml"
    cfg.write_text(yaml.safe_dump({
        "broker": {"capacity": "16MiB", "max_inflight": 256},
        "source": {"type": "synthetic", "count": N, "shape": [2], "dtype": "float32"},
        "stages": [{"name": "add", "fn": "workers.stages:scale", "args": {"factor": 1.0}}],
    }))
    seen = np.zeros(N, dtype=np.uint8)
    sizes_midway: list[dict[str, int]] = []

    with Pipeline.from_yaml(cfg) as p:
        def sink(idx: int, arr: np.ndarray) -> None:
            seen[idx] += 1
            if idx == N // 2:
                assert p.client is not None
                sizes_midway.append(p.client.stats()["sizes"])

        summary = p.run(sink=sink)
        assert p.client is not None
        end = p.client.stats()["sizes"]
        state = p.state
    assert summary.items == N and (seen == 1).all()
    # the driver: delivered indices are a low-water mark and the few above it
    assert state is not None and state.seen.mark == N and not state.seen.above
    # the broker, midway and at the end: bounded by what is in flight, never by N
    mid = sizes_midway[0]
    for key in ("objects", "blocks", "free_blocks", "leases", "grant_heap", "early_claims",
                "queued", "tasks", "reservations", "pending", "kept_failures"):
        assert mid[key] <= 600, (key, mid)
        assert end[key] <= 64, (key, end)


def test_a_worker_remembers_output_specs_of_at_most_64_input_shapes() -> None:
    from workers.compute import KNOWN_SPECS, Compute, OutSpec

    c = Compute.__new__(Compute)  # only its memory of output specs is exercised here
    import collections

    c.out_specs = collections.OrderedDict()
    for n in range(1000):  # a stage fed 1,000 different input shapes
        c._remember(((n,), "<f4", True), OutSpec((n,), "<f4"))
    assert len(c.out_specs) == KNOWN_SPECS == 64
    assert c._known(((999,), "<f4", True)) == OutSpec((999,), "<f4")  # the newest are kept
    assert c._known(((0,), "<f4", True)) is None


def test_parked_requests_are_served_downstream_first_then_in_arrival_order() -> None:
    """The waiting list keeps one queue per priority: a park costs O(1), never a re-sort."""
    from broker.errors import ArenaFull
    from broker.protocol import Ok
    from broker.waiting import Parked, Waiting

    w = Waiting()
    order: list[str] = []
    room = {"free": 0}

    def parked(name: str) -> Parked:
        def attempt() -> Ok | None:
            if room["free"] <= 0:
                return None
            room["free"] -= 1
            return Ok()
        return Parked(1e9, None, Ok(), attempt, lambda: ArenaFull(name))  # type: ignore[arg-type]

    for prio, name in [(0, "alloc-a"), (-2, "stage1-a"), (0, "alloc-b"), (-1, "stage0-a"), (-2, "stage1-b")]:
        p = parked(name)
        p.msg = Ok(rid=len(order))
        w.add(prio, p)
        order.append(name)
    assert w.count == 5
    served: list[str] = []
    room["free"] = 3
    w.sweep(0.0, lambda p, answer: served.append(order[p.msg.rid]))
    assert served == ["stage1-a", "stage1-b", "stage0-a"] and w.count == 2
    w.sweep(2e9, lambda p, answer: served.append(f"{order[p.msg.rid]}:{type(answer).__name__}"))
    assert served[3:] == ["alloc-a:ArenaFull", "alloc-b:ArenaFull"] and w.count == 0
