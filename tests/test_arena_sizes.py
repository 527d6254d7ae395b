"""Arena sizing: what can never fit is said at once, with the sizes and the fix; every wait for
arena space, a stage's write included, lasts broker.wait_timeout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from broker import ArenaFull, ItemTooLarge, Pipeline

MiB = 2**20


def config(tmp_path: Path, stages: list[dict], item_mib: float, capacity: str = "16MiB",
           wait: float = 60, count: int = 4) -> Path:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({
        "broker": {"capacity": capacity, "wait_timeout": wait},
        "source": {"type": "synthetic", "count": count, "shape": [int(item_mib * MiB) // 4], "dtype": "float32"},
        "stages": stages}))
    return cfg


def run_expecting(cfg: Path, error: type[Exception]) -> str:
    t0 = time.monotonic()
    with Pipeline.from_yaml(cfg) as p, pytest.raises(error) as err:
        p.run(sink=lambda i, a: None)
    assert time.monotonic() - t0 < 20, "said only after waiting"  # wait_timeout is 60 s
    text = str(err.value)
    for blame in ("not keeping up", "not releasing"):
        assert blame not in text, text
    return text


def scale(name: str, **extra: object) -> dict:
    return {"name": name, "fn": "workers.stages:scale", "args": {"factor": 2.0}, **extra}


def test_an_input_and_its_result_that_can_never_fit_together(tmp_path: Path) -> None:
    text = run_expecting(config(tmp_path, [scale("twice")], 10), ArenaFull)
    assert "the result of stage 'twice' (10.0 MiB (float32[2621440])) and its input (10.0 MiB" in text
    assert "can never fit the 16.0 MiB arena" in text and "raise broker.capacity to more than 20.0 MiB" in text


def test_a_batch_that_needs_more_than_the_arena_in_one_block(tmp_path: Path) -> None:
    text = run_expecting(config(tmp_path, [scale("pre"), scale("infer", batch=4)], 5), ArenaFull)
    assert "stage 'infer' collates batches of 4 items in one block: 4 x 5.0 MiB (float32[1310720]) = 20.0 MiB" in text
    assert "lower stages.infer.batch to at most 2, or raise broker.capacity" in text
    assert "[4, " not in text  # no shape the user never made


def test_a_first_stage_batch_that_needs_more_than_the_arena(tmp_path: Path) -> None:
    text = run_expecting(config(tmp_path, [scale("infer", batch=4)], 5), ItemTooLarge)
    assert "4 x 5.0 MiB (float32[1310720]) = 20.0 MiB, more than the 16.0 MiB arena" in text
    assert "lower stages.infer.batch to at most 3" in text and "[4, " not in text


@pytest.mark.parametrize("wait", [1, 10])
def test_wait_timeout_governs_a_stage_write(tmp_path: Path, wait: float) -> None:
    """The sink stalls 4 s holding a 3 MiB result of a 6 MiB arena; the next result (3 MiB) waits
    for room for broker.wait_timeout: with 1 s it gives up (not after a built-in 60 s), as
    backpressure that stops the run naming the stage; with 10 s it gets the room and the run ends."""
    cfg = config(tmp_path, [{"name": "grow", "fn": "stage_helpers:grow", "on_error": "skip"}], 1,
                 capacity="6MiB", wait=wait, count=2)
    got: list[int] = []

    def sink(i: int, a: object) -> None:
        if not got:
            time.sleep(4)
        got.append(i)

    with Pipeline.from_yaml(cfg) as p:
        if wait == 1:
            with pytest.raises(ArenaFull, match="stage 'grow' could not write its result"):
                p.run(sink=sink)
        else:
            assert p.run(sink=sink).items == 2 and sorted(got) == [0, 1]


@pytest.mark.parametrize("rings", [False, True], ids=["messages", "rings"])
def test_a_stage_whose_results_grow_gets_fewer_items_per_task_and_fits_a_small_arena(
        tmp_path: Path, rings: bool) -> None:
    """64 KiB inputs that become 2 MiB results, many of them, on a 16 MiB arena: tasks of many small
    items would need more than the arena for their outputs at once; once the stage's workers have
    said how large a result is (with rings: counted in the stage's queue), its tasks (groups)
    carry fewer items, and every item comes through."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({
        "broker": {"capacity": "16MiB", "max_inflight": 32, "rings": rings},
        "source": {"type": "synthetic", "count": 48, "shape": [(64 << 10) // 4], "dtype": "float32"},
        "stages": [{"name": "grow", "fn": "stage_helpers:grow", "args": {"times": 32}}]}))
    sizes: list[int] = []
    with Pipeline.from_yaml(cfg) as p:
        summary = p.run(sink=lambda i, a: sizes.append(a.nbytes))
    assert summary.items == 48 and sizes == [2 * MiB] * 48
