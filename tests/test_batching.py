"""Batch slots in the broker: closed batches go out however they were closed; early-stopped runs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from broker import Broker, BrokerError, Client, Pipeline
from broker.protocol import Task

STAGES = [{"name": "a"}, {"name": "b", "batch": 4, "batch_timeout": 600}]


def reserve(c: Client, items: list[int], shape: list[int]) -> int:
    return c.reserve(1, items, shape, "<f4", timeout=1.0).rsv


def next_task(w: Client, timeout: float = 5.0) -> Task:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = w.next_message(0.1)
        if isinstance(msg, Task):
            return msg
    pytest.fail("the batch was never dispatched")


def test_a_batch_cut_off_by_another_shape_is_dispatched() -> None:
    with Broker(capacity=8 * 2**20, stages=STAGES) as b, Client(b.endpoint) as src, \
            Client(b.endpoint) as w:
        w.register("b", credits=4, device="cpu")
        src.commit(reserve(src, [1, 2], [3]))
        src.commit(reserve(src, [3], [5]))  # another shape closes the first batch
        task = next_task(w)  # the long batch_timeout means only the closing can send it
        assert task.items == [1, 2] and task.rows == 2 and task.batched


def test_a_closed_batch_whose_last_rows_are_cancelled_is_dispatched() -> None:
    with Broker(capacity=8 * 2**20, stages=STAGES) as b, Client(b.endpoint) as a, \
            Client(b.endpoint) as w:
        w.register("b", credits=4, device="cpu")
        rsv_a = reserve(a, [10, 11], [3])
        with Client(b.endpoint) as dying:
            reserve(dying, [12, 13], [3])  # fills the batch: it is closed with rows 2-3 open
            a.commit(rsv_a)
        # `dying` is gone: its rows become holes; the batch goes out with A's rows only
        task = next_task(w)
        assert task.items == [10, 11] and task.valid == [0, 1]


def test_a_map_stopped_early_refuses_reuse_instead_of_mixing_runs(tmp_path: Path) -> None:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({
        "source": {"type": "synthetic", "count": 1, "shape": [2]},
        "stages": [{"name": "s", "fn": "stage_helpers:slow", "args": {"seconds": 0.01}}],
    }))
    with Pipeline.from_yaml(cfg) as p:
        for i, out in enumerate(p.map(np.full((2,), float(k)) for k in range(50))):
            assert out[0] == i + 1
            if i == 3:
                break
        with pytest.raises(BrokerError, match="stopped before its end"):
            list(p.map([np.zeros(2)]))
