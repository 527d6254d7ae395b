"""The pipeline scheduler driven with plain calls and a fake clock: reservations, batches, credits, retries, failures."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

import broker.scheduler as sched_mod
from broker.errors import ArenaFull, BadRequest
from broker.protocol import (
    Done,
    Fail,
    Failure,
    Layout,
    Message,
    OutSpec,
    Reserve,
    Reserved,
    StageSettings,
    Task,
)
from broker.scheduler import (
    SINK,
    TASK_ARENA_PART,
    TASK_BYTES,
    TASK_ITEMS,
    TASK_ITEMS_FIRST,
    TASK_SECONDS,
    Scheduler,
)
from broker.table import ObjectTable

SRC, W0, W1, W2, DRV = 1, 10, 11, 12, 99  # client ids: the source, workers, the driver (sink)
ROW = 16  # bytes of one <f4[4] row


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Run:
    """A scheduler over a table of its own, with helpers for the calls a server would make."""

    def __init__(self, stages: list[dict[str, Any]], capacity: int = 1 << 20, max_inflight: int = 0) -> None:
        self.clock = FakeClock()
        self.table = ObjectTable(capacity, "tok", clock=self.clock)
        self.s = Scheduler(self.table, clock=self.clock)
        self.names = self.s.configure([StageSettings(**st) for st in stages], max_inflight)
        self.sink = len(self.names) - 1

    def msg(self, stage: int, items: Iterable[int], shape: Iterable[int] = (4,), dtype: str = "<f4",
            layout: Layout | None = None) -> Reserve:
        return Reserve(stage=stage, items=list(items), shape=list(shape), dtype=dtype, layout=layout)

    def reserve(self, cid: int, stage: int, items: Iterable[int], shape: Iterable[int] = (4,),
                dtype: str = "<f4", layout: Layout | None = None) -> Reserved | None:
        m = self.msg(stage, items, shape, dtype, layout)
        self.s.check_reserve(m)
        return self.s.reserve(cid, m)

    def put(self, stage: int, items: Iterable[int], shape: Iterable[int] = (4,), cid: int = SRC) -> Reserved:
        r = self.reserve(cid, stage, items, shape)
        assert r is not None
        self.s.commit(cid, r.rsv)
        return r

    def register(self, cid: int, stage: str, credits: int = 4, pid: int = 0) -> int:
        return self.s.register(cid, pid or 5000 + cid, f"w{cid}", stage, credits, "cpu", False)

    def take(self, kind: type[Message], cid: int | None = None) -> list[Any]:
        """Remove and return the outbox's messages of ``kind`` (to ``cid``)."""
        got = [m for c, m in self.s.outbox if isinstance(m, kind) and (cid is None or c == cid)]
        self.s.outbox = [(c, m) for c, m in self.s.outbox
                         if not (isinstance(m, kind) and (cid is None or c == cid))]
        return got

    def tasks(self, cid: int) -> list[Task]:
        return self.take(Task, cid)

    def failures(self, cid: int = DRV) -> list[Failure]:
        return self.take(Failure, cid)

    def stage(self, name: str) -> dict[str, Any]:
        return next(st for st in self.s.stats() if st["name"] == name)

    def live(self, task: Task) -> bool:
        obj = self.table.objects.get(task.handle.oid)
        return obj is not None and obj.block.generation == task.handle.generation


def fail(run: Run, cid: int, task: Task, *, item: int | None = None, arena: bool = False,
         credit: int = 1) -> None:
    run.s.fail(cid, Fail(task=task.task, error="boom", trace="tb", item=item, arena=arena, credit=credit))


# -- set-up -----------------------------------------------------------------------------------------
def test_configure_appends_the_sink_and_accepts_the_same_stages_again() -> None:
    run = Run([{"name": "a"}, {"name": "b", "batch": 4}], max_inflight=8)
    assert run.names == ["a", "b", SINK]
    assert [st.batch for st in run.s.stages] == [0, 4, 0]
    assert run.s.configure([StageSettings(name="a"), StageSettings(name="b", batch=4)], 0) == ["a", "b", SINK]
    assert run.s.max_inflight == 8  # 0 keeps what was set
    run.s.configure([StageSettings(name="a"), StageSettings(name="b")], 3)
    assert run.s.max_inflight == 3
    assert run.s.stages[1].batch == 4  # the first configuration's settings stay
    with pytest.raises(BadRequest, match="already runs stages"):
        run.s.configure([StageSettings(name="a"), StageSettings(name="c")], 0)
    with pytest.raises(BadRequest, match="already runs stages"):
        run.s.configure([StageSettings(name="a")], 0)
    assert [st.name for st in run.s.stages] == ["a", "b", SINK]


def test_configure_resets_eof_and_batch_one_is_unbatched() -> None:
    run = Run([{"name": "a", "batch": 1}])
    assert run.s.stages[0].batch == 0
    run.s.set_eof()
    run.s.configure([StageSettings(name="a")], 0)
    assert run.s.eof is False


def test_a_stage_may_not_be_named_like_the_sink() -> None:
    s = Scheduler(ObjectTable(1 << 20, "tok"))
    with pytest.raises(BadRequest, match="sink"):
        s.configure([StageSettings(name="a"), StageSettings(name=SINK)], 0)
    assert s.stages == []


def test_register_names_a_stage_of_the_pipeline() -> None:
    run = Run([{"name": "a"}, {"name": "b"}])
    assert run.register(W0, "b") == 1
    assert run.register(DRV, SINK) == 2
    with pytest.raises(BadRequest, match="no stage 'c'"):
        run.register(W1, "c")
    assert W1 not in run.s.members


def test_check_reserve_refuses_bad_requests() -> None:
    run = Run([{"name": "a"}])
    layout = Layout(kind="tuple", fields=[(0, "<f4", [4], 0)])
    with pytest.raises(BadRequest, match="out of range"):
        run.s.check_reserve(run.msg(2, [1]))
    with pytest.raises(BadRequest, match="unknown dtype"):
        run.s.check_reserve(run.msg(0, [1], dtype="nope"))
    with pytest.raises(BadRequest, match="layout"):
        run.s.check_reserve(run.msg(0, [1], (64,), "<f4", layout))
    with pytest.raises(BadRequest, match="layout"):
        run.s.check_reserve(run.msg(0, [1], (8, 8), "|u1", layout))
    run.s.check_reserve(run.msg(0, [1], (64,), "|u1", layout))
    run.s.check_reserve(run.msg(1, [1]))  # the sink is a stage one may reserve in


# -- reserve, commit, dispatch ----------------------------------------------------------------------
def test_a_committed_item_goes_only_to_a_worker_of_its_stage() -> None:
    run = Run([{"name": "a"}, {"name": "b"}])
    run.register(W1, "b")
    run.register(DRV, SINK)
    r = run.put(0, [7])
    (handle, rows), = r.segments
    assert rows == 1 and handle.shape == (1, 4) and handle.dtype == "<f4"
    assert run.s.outbox == []  # nobody works on stage "a" yet
    assert run.stage("a")["queue"] == 1
    run.register(W0, "a", credits=1)
    (task,) = run.tasks(W0)
    assert run.s.outbox == []
    assert (task.stage, task.items, task.rows, task.each, task.batched, task.attempts, task.valid) == \
        (0, [7], 1, False, False, 0, None)
    assert (task.handle.shape, task.handle.offset, task.handle.nbytes) == ((4,), handle.offset, ROW)
    assert run.live(task)
    assert run.s.members[W0].credits == 0
    assert run.stage("a")["queue"] == 0 and run.stage("a")["inflight"] == 1


def test_reserve_is_refused_nothing_before_commit_and_only_for_its_client() -> None:
    run = Run([{"name": "a"}])
    run.register(W0, "a")
    r = run.reserve(SRC, 0, [1, 2])
    assert r is not None
    assert run.s.outbox == [] and run.stage("a")["queue"] == 0
    assert run.s.stages[0].reserved == 2 and run.s.inflight_items == 2
    with pytest.raises(BadRequest, match="no open reservation"):
        run.s.commit(W0, r.rsv)  # another client's reservation
    with pytest.raises(BadRequest, match="no open reservation"):
        run.s.cancel(SRC, r.rsv + 1000)
    run.s.commit(SRC, r.rsv)
    with pytest.raises(BadRequest, match="no open reservation"):
        run.s.commit(SRC, r.rsv)  # once
    assert run.s.stages[0].reserved == 0
    assert [t.items for t in run.tasks(W0)] == [[1, 2]]


def test_cancel_gives_the_slot_back() -> None:
    run = Run([{"name": "a"}])
    r = run.reserve(SRC, 0, [1, 2, 3])
    assert r is not None and run.table.alloc.used > 0
    run.s.cancel(SRC, r.rsv)
    assert run.table.alloc.used == 0 and not run.table.objects
    assert run.s.inflight_items == 0 and run.s.stages[0].reserved == 0
    assert not run.s.stages[0].queue


def test_credits_bound_the_tasks_in_flight() -> None:
    run = Run([{"name": "a"}])
    run.register(W0, "a", credits=2)
    for i in range(5):
        run.put(0, [i])
    first = run.tasks(W0)
    assert [t.items for t in first] == [[0], [1]]
    assert run.stage("a")["queue"] == 3 and run.stage("a")["inflight"] == 2
    run.s.done(W0, Done(task=first[0].task, rsvs=[run.reserve(W0, 1, first[0].items).rsv]))
    assert [t.items for t in run.tasks(W0)] == [[2]]
    run.s.done(W0, Done(task=first[1].task, rsvs=[run.reserve(W0, 1, first[1].items).rsv],
                        credit=0))  # a worker that wants no more for now
    assert run.tasks(W0) == []
    assert run.s.members[W0].credits == 0 and run.stage("a")["queue"] == 2


def test_tasks_go_to_the_least_loaded_worker() -> None:
    run = Run([{"name": "a"}])
    run.register(W0, "a", credits=3)
    run.register(W1, "a", credits=3)
    for i in range(4):
        run.put(0, [i])
    assert len(run.tasks(W0)) == 2 and len(run.tasks(W1)) == 2


def _done_all(run: Run, cid: int, busy_per_item: float, next_out: OutSpec | None = None) -> None:
    """The worker finishes every task it was given, ``busy_per_item`` s per item (outputs to the sink)."""
    for t in run.tasks(cid):
        out = run.reserve(cid, 1, t.items)
        assert out is not None
        run.s.done(cid, Done(task=t.task, rsvs=[out.rsv], busy=busy_per_item * len(t.items), next_out=next_out))
    run.take(Task)


def test_small_items_travel_a_few_per_task_then_as_many_as_the_stage_does_in_its_time() -> None:
    """First tasks carry TASK_ITEMS_FIRST rows; once the stage's time per item is known, a fast stage
    gets up to TASK_ITEMS per task, a slow one a single item (its items spread over its workers)."""
    run = Run([{"name": "a"}], capacity=4 * TASK_BYTES)
    run.register(DRV, SINK, credits=1000)
    run.register(W0, "a", credits=1000)
    n = TASK_ITEMS_FIRST + 2  # one full first task and the two left over
    r = run.put(0, range(n))
    base = r.segments[0][0].offset
    t1, t2 = run.tasks(W0)
    assert (t1.items, t1.rows, t1.each, t1.handle.shape, t1.handle.offset) == \
        (list(range(TASK_ITEMS_FIRST)), TASK_ITEMS_FIRST, True, (TASK_ITEMS_FIRST, 4), base)
    assert (t2.items, t2.rows, t2.each, t2.handle.shape) == ([n - 2, n - 1], 2, True, (2, 4))
    for t in (t1, t2):
        out = run.reserve(W0, 1, t.items)
        assert out is not None
        run.s.done(W0, Done(task=t.task, rsvs=[out.rsv], busy=1e-5 * len(t.items)))  # fast: 10 µs each
    run.take(Task)
    run.put(0, range(100, 100 + TASK_ITEMS + 1))
    assert [len(t.items) for t in run.tasks(W0)] == [TASK_ITEMS, 1]

    slow = Run([{"name": "a"}], capacity=4 * TASK_BYTES)
    slow.register(DRV, SINK, credits=1000)
    slow.register(W0, "a", credits=1000)
    slow.put(0, range(TASK_ITEMS_FIRST))
    _done_all(slow, W0, busy_per_item=TASK_SECONDS * 2)  # longer than a task should take
    slow.put(0, range(10, 16))
    assert [len(t.items) for t in slow.tasks(W0)] == [1] * 6


def test_rows_per_task_are_bounded_by_the_input_the_known_output_and_the_arena() -> None:
    """A stage whose results are much larger than its inputs gets fewer rows per task once its
    workers said so, so that a task's outputs (reserved as one block) fit a small arena."""
    cap = 16 << 20
    run = Run([{"name": "a"}, {"name": "b"}], capacity=cap)
    run.register(DRV, SINK, credits=1000)
    run.register(W0, "a", credits=1000)
    run.register(W1, "b", credits=1000)
    row = 64 << 10
    run.put(0, range(TASK_ITEMS_FIRST), shape=(row // 4,))
    big = OutSpec(shape=[(1 << 20) // 4], dtype="<f4")  # 1 MiB results from 64 KiB inputs
    for t in run.tasks(W0):
        out = run.reserve(W0, 1, t.items, shape=big.shape)
        assert out is not None
        run.s.done(W0, Done(task=t.task, rsvs=[out.rsv], busy=1e-6, next_out=big))
    run.take(Task)
    run.put(0, range(100, 116), shape=(row // 4,))
    got = [len(t.items) for t in run.tasks(W0)]
    assert sum(got) == 16 and max(got) == (cap // TASK_ARENA_PART) // (1 << 20)  # 1 MiB of results per task
    big_in = TASK_BYTES // 8 + 1  # float32: more than half TASK_BYTES, so one per task
    roomy = Run([{"name": "a"}], capacity=4 * TASK_BYTES)
    roomy.register(W0, "a", credits=16)
    r = roomy.put(0, [10, 11], shape=(big_in,))
    base = r.segments[0][0].offset
    assert [(t.items, t.each, t.handle.shape, t.handle.offset - base) for t in roomy.tasks(W0)] == \
        [([10], False, (big_in,), 0), ([11], False, (big_in,), 4 * big_in)]


def test_done_is_checked_before_it_changes_anything() -> None:
    run = Run([{"name": "a"}, {"name": "b"}])
    run.register(W0, "a", credits=1)
    run.put(0, [1])
    (task,) = run.tasks(W0)
    out = run.reserve(W0, 1, [1])
    assert out is not None
    with pytest.raises(BadRequest, match="not assigned"):
        run.s.done(W1, Done(task=task.task))
    with pytest.raises(BadRequest, match="no open reservation"):
        run.s.done(W0, Done(task=task.task, rsvs=[out.rsv, out.rsv + 1000]))
    with pytest.raises(BadRequest, match="no open reservation"):
        run.s.done(W0, Done(task=task.task, rsvs=[out.rsv, out.rsv]))
    assert task.task in run.s.members[W0].tasks and out.rsv in run.s.members[W0].reservations
    assert run.stage("a")["inflight"] == 1 and run.live(task)
    run.s.done(W0, Done(task=task.task, rsvs=[out.rsv], busy=0.25, copied=16))
    assert not run.live(task)
    assert run.stage("b")["queue"] == 1
    with pytest.raises(BadRequest, match="not assigned"):
        run.s.done(W0, Done(task=task.task))


def process(run: Run, cid: int, stage: int, shape: tuple[int, ...]) -> int:
    """Finish every task sent to ``cid``, writing outputs of ``shape`` to stage ``stage + 1``."""
    n = 0
    for task in run.tasks(cid):
        rsvs = []
        if stage + 1 < len(run.names):
            r = run.reserve(cid, stage + 1, task.items, shape)
            assert r is not None
            rsvs = [r.rsv]
        run.s.done(cid, Done(task=task.task, rsvs=rsvs, busy=0.5))
        n += 1
    return n


def test_a_run_through_every_stage_to_the_sink_leaves_the_table_as_it_was() -> None:
    run = Run([{"name": "a"}, {"name": "b", "batch": 2}], max_inflight=100)
    run.register(W0, "a", credits=2)
    run.register(W1, "b", credits=2)
    run.register(DRV, SINK, credits=16)
    run.put(0, range(5))
    run.put(0, [5])
    assert run.s.inflight_items == 6
    sunk: list[int] = []
    for _ in range(20):
        for task in run.take(Task, DRV):
            assert task.stage == 2
            sunk.extend(task.items)
            run.s.done(DRV, Done(task=task.task))
        if not process(run, W0, 0, (3,)) + process(run, W1, 1, (2,)) and not run.s.outbox:
            break
    assert sorted(sunk) == [0, 1, 2, 3, 4, 5]
    assert [(st["name"], st["done"], st["queue"], st["inflight"], st["failed"]) for st in run.s.stats()] == \
        [("a", 6, 0, 0, 0), ("b", 6, 0, 0, 0), (SINK, 6, 0, 0, 0)]
    assert run.s.inflight_items == 0
    s = run.table.stats()
    assert (s["used"], s["objects"], s["blocks"]) == (0, 0, 0)
    assert not any(st.batches or st.reserved for st in run.s.stages)


def test_the_sink_receives_many_items_per_task() -> None:
    run = Run([{"name": "a"}])
    run.register(DRV, SINK, credits=4)
    run.put(1, range(20), cid=W0)  # a worker's output of 20 items
    t1, t2 = run.tasks(DRV)
    assert (t1.items, t1.rows, t1.each) == (list(range(16)), 16, True)
    assert (t2.items, t2.rows) == ([16, 17, 18, 19], 4)


# -- batches ----------------------------------------------------------------------------------------
BATCHED = [{"name": "a"}, {"name": "b", "batch": 4, "batch_timeout": 0.5}]


def test_rows_of_one_batch_are_dispatched_when_full() -> None:
    run = Run(BATCHED)
    run.register(W1, "b")
    r1 = run.reserve(W0, 1, [1, 2])
    r2 = run.reserve(W0, 1, [3, 4])
    assert r1 is not None and r2 is not None
    (h1, n1), = r1.segments
    (h2, n2), = r2.segments
    assert (n1, n2, h1.shape, h2.shape) == (2, 2, (2, 4), (2, 4))
    assert h2.offset == h1.offset + 2 * ROW
    assert run.table.alloc.blocks == 1  # one batch slot
    run.s.commit(W0, r2.rsv)
    run.s.commit(W0, r1.rsv)  # commits in any order; dispatched on the last, no tick needed
    (task,) = run.tasks(W1)
    assert (task.stage, task.items, task.rows, task.batched, task.valid, task.each) == \
        (1, [1, 2, 3, 4], 4, True, None, False)
    assert (task.handle.shape, task.handle.offset) == ((4, 4), h1.offset)
    assert run.s.stages[1].batches == []


def test_a_full_batch_waits_for_its_last_row_to_be_written() -> None:
    run = Run(BATCHED)
    run.register(W1, "b")
    r1 = run.reserve(W0, 1, [1, 2, 3])
    r2 = run.reserve(W0, 1, [4])
    assert r1 is not None and r2 is not None
    run.s.commit(W0, r2.rsv)
    run.s.tick(run.clock.t + 10.0)
    assert run.tasks(W1) == []  # rows 0..2 are still being written
    run.s.commit(W0, r1.rsv)
    assert [t.items for t in run.tasks(W1)] == [[1, 2, 3, 4]]


def test_a_reservation_may_span_two_batches() -> None:
    run = Run(BATCHED)
    run.register(W1, "b")
    r1 = run.reserve(W0, 1, [1, 2, 3])
    r2 = run.reserve(W0, 1, [4, 5, 6])
    assert r1 is not None and r2 is not None
    (ha, na), (hb, nb) = r2.segments
    assert (na, nb) == (1, 2)
    assert ha.offset == r1.segments[0][0].offset + 3 * ROW
    assert hb.shape == (2, 4) and hb.offset != ha.offset
    run.s.commit(W0, r1.rsv)
    run.s.commit(W0, r2.rsv)
    (task,) = run.tasks(W1)  # the first batch is full; the second holds two of four rows
    assert task.items == [1, 2, 3, 4]
    assert len(run.s.stages[1].batches) == 1


def test_a_reservation_of_another_shape_closes_the_open_batch() -> None:
    run = Run(BATCHED)
    run.register(W1, "b")
    run.put(1, [1, 2], cid=W0)
    run.s.tick(run.clock.t)
    assert run.tasks(W1) == []  # open, and its batch_timeout has not passed
    other = run.reserve(W0, 1, [3], shape=(5,))
    assert other is not None
    run.s.tick(run.clock.t)  # no time passed: the closed batch goes because it is closed
    (task,) = run.tasks(W1)
    assert (task.items, task.rows, task.handle.shape) == ([1, 2], 2, (4, 4))
    assert len(run.s.stages[1].batches) == 1 and run.s.stages[1].batches[0].shape == (5,)
    run.s.commit(W0, other.rsv)
    run.s.tick(run.clock.t)
    assert run.tasks(W1) == []  # the new batch is open


def test_a_partial_batch_goes_after_batch_timeout_when_upstream_is_idle() -> None:
    run = Run(BATCHED)
    run.register(W1, "b")
    t0 = run.clock.t
    run.put(1, [1], cid=W0)
    run.s.tick(t0 + 0.49)
    assert run.tasks(W1) == []
    run.s.tick(t0 + 0.5)
    (task,) = run.tasks(W1)
    assert (task.items, task.rows, task.batched, task.handle.shape) == ([1], 1, True, (4, 4))
    assert not run.s.batches_open


def test_a_partial_batch_waits_while_upstream_can_add_to_it() -> None:
    run = Run(BATCHED)
    run.register(W1, "b")
    t0 = run.clock.t
    run.put(1, [1], cid=W0)
    run.put(0, [2])  # queued in "a": may still become a row of the batch
    run.s.tick(t0 + 100.0)
    assert run.tasks(W1) == []
    run.register(W0, "a")
    (up,) = run.tasks(W0)
    run.s.tick(t0 + 100.0)
    assert run.tasks(W1) == []  # in flight in "a"
    out = run.reserve(W0, 1, [2])
    assert out is not None
    run.s.done(W0, Done(task=up.task, rsvs=[out.rsv]))
    run.s.tick(t0 + 100.0)
    (task,) = run.tasks(W1)
    assert task.items == [1, 2] and task.rows == 2


def test_at_eof_a_partial_batch_goes_at_once() -> None:
    run = Run(BATCHED)
    run.register(W1, "b")
    run.put(1, [1, 2, 3], cid=W0)
    run.s.set_eof()
    run.s.tick(run.clock.t)
    (task,) = run.tasks(W1)
    assert (task.items, task.rows) == ([1, 2, 3], 3)


def test_cancelled_rows_become_holes() -> None:
    run = Run(BATCHED)
    run.register(W1, "b")
    r1, r2, r3 = (run.reserve(W0, 1, [i]) for i in (1, 2, 3))
    assert r1 is not None and r2 is not None and r3 is not None
    run.s.cancel(W0, r2.rsv)
    run.s.commit(W0, r1.rsv)
    run.s.commit(W0, r3.rsv)
    run.s.set_eof()
    run.s.tick(run.clock.t)
    (task,) = run.tasks(W1)
    assert (task.items, task.rows, task.valid, task.batched) == ([1, 3], 3, [0, 2], True)


def test_a_hole_is_filled_by_the_next_reservation() -> None:
    run = Run(BATCHED)
    run.register(W1, "b")
    r1, r2 = run.reserve(W0, 1, [1, 2]), run.reserve(W0, 1, [3])
    assert r1 is not None and r2 is not None
    run.s.cancel(W0, r1.rsv)
    r3 = run.reserve(W0, 1, [4, 5, 6])
    assert r3 is not None
    base = r1.segments[0][0].offset
    assert sorted(h.offset - base for h, _n in r3.segments) == [0, ROW, 3 * ROW]
    assert run.table.alloc.blocks == 1
    run.s.commit(W0, r2.rsv)
    run.s.commit(W0, r3.rsv)
    (task,) = run.tasks(W1)
    assert task.valid is None and task.rows == 4
    assert sorted(task.items) == [3, 4, 5, 6]


def test_a_full_batch_whose_last_rows_are_cancelled_goes_at_the_next_tick() -> None:
    run = Run(BATCHED)
    run.register(W1, "b")
    mine = run.reserve(W0, 1, [1, 2])
    theirs = run.reserve(W2, 1, [3, 4])  # another worker of "a", whose task is about to fail
    assert mine is not None and theirs is not None
    run.s.commit(W0, mine.rsv)  # the batch is full: closed, but rows 2..3 are still open
    assert run.tasks(W1) == []
    run.s.cancel(W2, theirs.rsv)
    assert run.tasks(W1) == []  # a cancel sends nothing by itself
    run.s.tick(run.clock.t)  # closed and complete: goes whatever time it is
    (task,) = run.tasks(W1)
    assert (task.items, task.rows, task.valid) == ([1, 2], 4, [0, 1])


def test_a_layout_travels_with_the_slot_and_separates_batches() -> None:
    run = Run(BATCHED)
    run.register(W1, "b")
    run.register(DRV, SINK)
    lay1 = Layout(kind="tuple", fields=[(0, "<f4", [4], 0), (1, "<i8", [], 64)])
    lay2 = Layout(kind="dict", fields=[("x", "<f4", [4], 0), ("y", "<i8", [], 64)])
    r1 = run.reserve(W0, 1, [1], shape=(128,), dtype="|u1", layout=lay1)
    assert r1 is not None
    run.s.commit(W0, r1.rsv)
    r2 = run.reserve(W0, 1, [2], shape=(128,), dtype="|u1", layout=lay2)  # closes the first batch
    assert r2 is not None and len(run.s.stages[1].batches) == 2
    run.s.commit(W0, r2.rsv)
    run.s.tick(run.clock.t)
    (task,) = run.tasks(W1)
    assert (task.items, task.layout, task.handle.shape) == ([1], lay1, (4, 128))
    run.put(2, [5], shape=(128,), cid=W1)
    r3 = run.reserve(W1, 2, [6], shape=(128,), dtype="|u1", layout=lay2)
    assert r3 is not None
    run.s.commit(W1, r3.rsv)
    got = run.tasks(DRV)
    assert [(t.items, t.layout) for t in got] == [([5], None), ([6], lay2)]


def test_a_batch_whose_rows_were_all_cancelled_is_freed_without_a_task() -> None:
    run = Run(BATCHED)
    run.register(W1, "b")
    r = run.reserve(W0, 1, [1, 2])
    assert r is not None
    run.s.cancel(W0, r.rsv)
    run.s.tick(run.clock.t + 1.0)
    assert run.tasks(W1) == []
    assert run.table.alloc.used == 0 and not run.table.objects and not run.s.batches_open


def test_a_batched_reservation_that_does_not_fit_leaves_nothing_behind() -> None:
    run = Run([{"name": "a"}, {"name": "b", "batch": 4}], capacity=16 * 4096)
    assert run.reserve(W0, 1, range(6), shape=(2048,)) is not None  # 2 batch slots of 32 KiB: all
    run2 = Run([{"name": "a"}, {"name": "b", "batch": 4}], capacity=16 * 4096)
    assert run2.reserve(W0, 1, range(9), shape=(2048,)) is None  # a third slot does not fit
    assert run2.table.alloc.used == 0 and not run2.table.objects and not run2.s.batches_open
    assert run2.s.stages[1].reserved == 0
    assert W0 not in run2.s.members or not run2.s.members[W0].reservations


# -- the source's gate -------------------------------------------------------------------------------
def test_the_source_is_gated_by_max_inflight() -> None:
    run = Run([{"name": "a"}], max_inflight=3)
    first = run.reserve(SRC, 0, [1, 2])
    assert first is not None
    assert run.reserve(SRC, 0, [3, 4]) is None
    err = run.s.full_error(run.msg(0, [3, 4]))
    assert isinstance(err, ArenaFull) and "max_inflight 3" in str(err)
    assert run.reserve(SRC, 0, [3]) is not None
    assert run.s.inflight_items == 3
    assert run.reserve(W0, 1, range(10)) is not None  # downstream is never gated
    run.s.cancel(SRC, first.rsv)
    assert run.s.inflight_items == 1
    assert run.reserve(SRC, 0, [4, 5]) is not None


def test_a_first_reservation_larger_than_max_inflight_still_gets_in() -> None:
    run = Run([{"name": "a"}], max_inflight=2)
    assert run.reserve(SRC, 0, range(5)) is not None
    assert run.reserve(SRC, 0, [9]) is None


def test_items_leave_the_gate_at_the_sink() -> None:
    run = Run([{"name": "a"}], max_inflight=2)
    run.register(W0, "a")
    run.register(DRV, SINK)
    run.put(0, [1, 2])
    assert run.reserve(SRC, 0, [3]) is None
    process(run, W0, 0, (4,))
    assert run.reserve(SRC, 0, [3]) is None  # at the sink, not out yet
    (task,) = run.tasks(DRV)
    run.s.done(DRV, Done(task=task.task))
    assert run.s.inflight_items == 0
    assert run.reserve(SRC, 0, [3]) is not None


def test_the_source_is_gated_by_half_the_arena_and_downstream_is_not() -> None:
    run = Run([{"name": "a"}], capacity=64 << 10)
    q = 16 << 10  # a quarter of the arena
    got = [run.reserve(SRC, 0, [i], shape=(q,), dtype="|u1") for i in range(3)]
    assert all(r is not None for r in got) and run.table.alloc.used == 3 * q  # at most half used before
    assert run.reserve(SRC, 0, [3], shape=(q,), dtype="|u1") is None  # 3/4 used: gated
    err = run.s.full_error(run.msg(0, [3], (q,), "|u1"))
    assert isinstance(err, ArenaFull) and "48.0 KiB of 64.0 KiB" in str(err)
    assert run.reserve(W0, 1, [0], shape=(q,), dtype="|u1") is not None  # downstream is not gated
    assert run.table.alloc.used == 4 * q
    assert run.reserve(W0, 1, [1], shape=(64,), dtype="|u1") is None  # but the arena is full
    for r in got[:2]:
        assert r is not None
        run.s.cancel(SRC, r.rsv)
    assert run.reserve(SRC, 0, [3], shape=(q,), dtype="|u1") is not None  # half used: open again


def test_the_first_source_reservation_gets_in_however_full_the_arena() -> None:
    run = Run([{"name": "a"}], capacity=64 << 10)
    assert run.table.new(48 << 10, "|u1", (48 << 10,)) is not None  # someone else's array
    assert run.reserve(SRC, 0, [0], shape=(1024,), dtype="|u1") is not None
    assert run.reserve(SRC, 0, [1], shape=(1024,), dtype="|u1") is None


# -- failures --------------------------------------------------------------------------------------------
def one_task(stage: dict[str, Any], credits: int = 1, items: Iterable[int] = (1,)) -> tuple[Run, Task]:
    run = Run([stage])
    run.register(DRV, SINK)
    run.register(W0, "a", credits=credits)
    run.put(0, items)
    (task,) = run.tasks(W0)
    return run, task


def test_fail_with_on_error_fail_reports_a_fatal_failure() -> None:
    run, task = one_task({"name": "a", "on_error": "fail"})
    fail(run, W0, task)
    (f,) = run.failures()
    assert (f.stage, f.items, f.error, f.trace, f.fatal, f.code, f.worker_pid) == \
        ("a", [1], "boom", "tb", True, "StageFailed", 0)
    assert run.stage("a")["failed"] == 1 and run.stage("a")["inflight"] == 0
    assert run.s.counters["failed"] == 1
    assert run.s.inflight_items == 0 and run.table.alloc.used == 0
    assert run.s.members[W0].credits == 1 and run.tasks(W0) == []
    with pytest.raises(BadRequest, match="not assigned"):
        fail(run, W0, task)


def test_fail_with_on_error_skip_reports_a_failure_that_is_not_fatal() -> None:
    run, task = one_task({"name": "a", "on_error": "skip", "retries": 5})
    fail(run, W0, task)
    (f,) = run.failures()
    assert (f.items, f.fatal, f.code) == ([1], False, "StageFailed")
    assert run.s.counters["skipped"] == 1 and run.s.counters["failed"] == 0
    assert run.stage("a")["failed"] == 1 and run.s.inflight_items == 0


def test_fail_with_on_error_retry_counts_attempts() -> None:
    run, task = one_task({"name": "a", "on_error": "retry", "retries": 2})
    seen = [task.attempts]
    for _ in range(2):
        fail(run, W0, task)
        assert run.failures() == []
        (task,) = run.tasks(W0)
        seen.append(task.attempts)
    assert seen == [0, 1, 2] and run.s.counters["retried"] == 2
    assert run.table.alloc.used > 0
    fail(run, W0, task)  # the third attempt of three
    (f,) = run.failures()
    assert (f.items, f.fatal, f.code) == ([1], True, "StageFailed")
    assert run.tasks(W0) == [] and run.table.alloc.used == 0 and run.s.inflight_items == 0


def test_retry_with_no_retries_fails_at_once() -> None:
    run, task = one_task({"name": "a", "on_error": "retry", "retries": 0})
    fail(run, W0, task)
    assert [f.items for f in run.failures()] == [[1]]
    assert run.s.counters["retried"] == 0


def test_a_retried_task_goes_behind_the_queue() -> None:
    run, task = one_task({"name": "a", "on_error": "retry"})
    run.put(0, [2])
    fail(run, W0, task)
    assert [t.items for t in run.tasks(W0)] == [[2]]
    assert [t.items for t in run.s.stages[0].queue] == [[1]]


def test_fail_cancels_the_workers_open_reservations() -> None:
    run = Run([{"name": "a"}, {"name": "b"}])
    run.register(DRV, SINK)
    run.register(W0, "a", credits=1)
    run.put(0, [1])
    (task,) = run.tasks(W0)
    used = run.table.alloc.used
    out = run.reserve(W0, 1, [1], shape=(1000,))
    assert out is not None and run.table.alloc.used > used
    fail(run, W0, task)
    assert run.table.alloc.used == 0
    assert run.s.stages[1].reserved == 0 and not run.s.members[W0].reservations
    with pytest.raises(BadRequest, match="no open reservation"):
        run.s.commit(W0, out.rsv)


def test_a_grouped_task_splits_so_only_the_failing_item_fails() -> None:
    run, task = one_task({"name": "a", "on_error": "fail"}, credits=8, items=[1, 2, 3, 4])
    assert task.each and task.rows == 4
    base = task.handle.offset
    fail(run, W0, task, item=3)
    assert run.s.counters["split"] == 1
    (f,) = run.failures()
    assert (f.items, f.fatal) == ([3], True)
    singles = run.tasks(W0)
    assert [(t.items, t.each, t.rows, t.attempts, t.handle.shape, t.handle.offset - base) for t in singles] == \
        [([1], False, 1, 0, (4,), 0), ([2], False, 1, 0, (4,), ROW), ([4], False, 1, 0, (4,), 3 * ROW)]
    assert run.s.inflight_items == 3 and run.stage("a")["failed"] == 1
    for t in singles:
        out = run.reserve(W0, 1, t.items)
        assert out is not None
        run.s.done(W0, Done(task=t.task, rsvs=[out.rsv]))
    for t in run.tasks(DRV):
        run.s.done(DRV, Done(task=t.task))
    assert run.table.alloc.used == 0 and not run.table.objects and run.s.inflight_items == 0


def test_a_grouped_task_retries_only_its_failing_item() -> None:
    run, task = one_task({"name": "a", "on_error": "retry", "retries": 1}, credits=1, items=[1, 2, 3])
    fail(run, W0, task, item=2)
    assert run.failures() == []
    assert [(t.items, t.attempts) for t in run.tasks(W0)] == [([1], 0)]
    assert [(t.items, t.attempts) for t in run.s.stages[0].queue] == [([3], 0), ([2], 1)]


def test_arena_backpressure_requeues_without_an_attempt_even_when_skipping() -> None:
    run = Run([{"name": "a", "on_error": "skip", "retries": 0}, {"name": "b"}])
    run.register(DRV, SINK)
    run.register(W0, "a", credits=1)
    run.put(0, [1])
    (task,) = run.tasks(W0)
    used = run.table.alloc.used
    for _ in range(4):
        out = run.reserve(W0, 1, [1])
        assert out is not None
        fail(run, W0, task, arena=True)
        (f,) = run.failures()
        assert (f.items, f.fatal, f.code, f.stage) == ([1], True, "ArenaFull", "a")
        (task,) = run.tasks(W0)  # back at the front, to the worker whose credit came back
        assert (task.items, task.attempts) == ([1], 0)
        assert run.table.alloc.used == used  # the output's reservation was cancelled
    assert run.s.counters["arena_waits"] == 4
    assert run.s.counters["skipped"] == 0 and run.stage("a")["failed"] == 0
    assert run.s.inflight_items == 1


def test_arena_backpressure_goes_to_the_front_of_the_queue() -> None:
    run, task = one_task({"name": "a"}, credits=1)
    run.put(0, [2])
    fail(run, W0, task, arena=True, credit=0)
    assert run.tasks(W0) == []
    assert [t.items for t in run.s.stages[0].queue] == [[1], [2]]


# -- workers that die ---------------------------------------------------------------------------------
def test_a_dead_workers_task_is_requeued_and_fails_after_retries_plus_one_deaths() -> None:
    run = Run([{"name": "a", "retries": 2}])
    run.register(DRV, SINK)
    run.put(0, [1])
    attempts = []
    for cid in (W0, W1, W2):
        run.register(cid, "a", credits=1, pid=4000 + cid)
        (task,) = run.tasks(cid)
        attempts.append(task.attempts)
        assert run.s.drop(cid) == 1
        assert run.stage("a")["inflight"] == 0
    assert attempts == [0, 1, 2]
    (f,) = run.failures()
    assert (f.items, f.code, f.worker_pid, f.fatal, f.stage) == ([1], "WorkerDied", 4000 + W2, True, "a")
    assert "attempt 3 of 3" in f.error and f"pid {4000 + W2}" in f.error
    assert run.s.counters["requeued"] == 3 and run.s.counters["workers_lost"] == 3
    assert run.s.counters["retried"] == 2 and run.s.counters["failed"] == 1
    assert run.table.alloc.used == 0 and run.s.inflight_items == 0 and run.stage("a")["failed"] == 1


def test_a_worker_death_is_not_fatal_when_the_stage_skips() -> None:
    run = Run([{"name": "a", "on_error": "skip", "retries": 0}])
    run.register(DRV, SINK)
    run.register(W0, "a", pid=77)
    run.put(0, [1])
    run.s.drop(W0)
    (f,) = run.failures()
    assert (f.code, f.worker_pid, f.fatal) == ("WorkerDied", 77, False)
    assert run.s.counters["skipped"] == 1


def test_deaths_and_stage_errors_share_the_attempts() -> None:
    run = Run([{"name": "a", "on_error": "retry", "retries": 1}])
    run.register(DRV, SINK)
    run.register(W0, "a", credits=1)
    run.put(0, [1])
    (task,) = run.tasks(W0)
    fail(run, W0, task)
    (task,) = run.tasks(W0)
    assert task.attempts == 1
    run.s.drop(W0)
    (f,) = run.failures()
    assert f.code == "WorkerDied" and f.items == [1]


def test_a_dead_workers_grouped_task_comes_back_one_item_per_task() -> None:
    run = Run([{"name": "a"}])
    run.register(W0, "a", credits=1)
    run.put(0, [1, 2, 3])
    (task,) = run.tasks(W0)
    assert task.each
    run.s.drop(W0)
    queue = list(run.s.stages[0].queue)
    assert [(t.items[0], len(t.items), t.attempts, t.each) for t in queue] == \
        [(1, 1, 1, False), (2, 1, 1, False), (3, 1, 1, False)]  # in the items' order
    run.register(W1, "a", credits=8)
    got = run.tasks(W1)
    assert sorted(t.items[0] for t in got) == [1, 2, 3]
    offsets = {t.items[0]: t.handle.offset for t in got}
    assert offsets[2] - offsets[1] == ROW and offsets[3] - offsets[1] == 2 * ROW
    for t in got:
        run.s.done(W1, Done(task=t.task, rsvs=[run.reserve(W1, 1, t.items).rsv]))
    assert run.stage("a")["done"] == 3


def test_done_without_outputs_is_refused_except_at_the_sink() -> None:
    """A stage task that names no output reservation would make its items vanish (and stay
    counted in flight, holding the source's gate shut); only the sink's tasks have no outputs."""
    run = Run([{"name": "a"}])
    run.register(W0, "a", credits=1)
    run.put(0, [1])
    (task,) = run.tasks(W0)
    with pytest.raises(BadRequest, match="names no reservation for its outputs"):
        run.s.done(W0, Done(task=task.task))
    assert run.stage("a")["inflight"] == 1 and run.s.inflight_items == 1  # nothing was lost


def test_drop_cancels_reservations_and_forgets_the_member() -> None:
    run = Run(BATCHED)
    r0 = run.reserve(SRC, 0, [1, 2])
    r1 = run.reserve(SRC, 1, [3])
    assert r0 is not None and r1 is not None
    assert run.s.inflight_items == 2
    assert run.s.drop(SRC) == 0
    assert SRC not in run.s.members
    assert run.s.inflight_items == 0 and run.s.stages[0].reserved == 0 and run.s.stages[1].reserved == 0
    assert run.s.counters["workers_lost"] == 0  # a source is not a worker
    assert run.s.drop(SRC) == 0
    run.s.tick(run.clock.t + 10.0)  # the cancelled row's batch goes away empty
    assert run.table.alloc.used == 0 and not run.table.objects


# -- failure reports ----------------------------------------------------------------------------------
def test_failures_are_kept_until_a_sink_registers() -> None:
    run = Run([{"name": "a", "on_error": "skip"}])
    run.register(W0, "a", credits=2)
    run.put(0, [1])
    run.put(0, [2])
    t1, t2 = run.tasks(W0)
    fail(run, W0, t1)
    fail(run, W0, t2)
    assert run.take(Failure) == []
    assert [f.items for f in run.s.kept_failures] == [[1], [2]]
    run.register(DRV, SINK)
    assert [f.items for f in run.failures(DRV)] == [[1], [2]]
    assert not run.s.kept_failures
    run.register(W1, SINK)  # a second sink gets nothing already delivered
    assert run.failures(W1) == []


def test_failures_go_to_every_registered_sink_and_not_to_workers() -> None:
    run, task = one_task({"name": "a"})
    run.register(W1, SINK)
    fail(run, W0, task)
    assert [f.items for f in run.failures(DRV)] == [[1]]
    assert [f.items for f in run.failures(W1)] == [[1]]
    assert run.take(Failure) == [] and not run.s.kept_failures


def test_kept_failures_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sched_mod, "KEPT_FAILURES", 3)
    run = Run([{"name": "a", "on_error": "skip"}])
    run.register(W0, "a", credits=1)
    for i in range(5):
        run.put(0, [i])
        (task,) = run.tasks(W0)
        fail(run, W0, task)
    assert len(run.s.kept_failures) == 3
    run.register(DRV, SINK)
    assert [f.items for f in run.failures(DRV)] == [[2], [3], [4]]  # the newest are kept


# -- stats ------------------------------------------------------------------------------------------------
def test_stats_reflect_queues_inflight_done_and_failed() -> None:
    run = Run([{"name": "a", "on_error": "skip"}, {"name": "b", "batch": 8}])
    run.register(W0, "a", credits=2, pid=321)
    for i in range(5):
        run.put(0, [i])
    t1, t2 = run.tasks(W0)
    run.clock.t += 2.0
    out = run.reserve(W0, 1, t1.items)
    assert out is not None
    run.s.done(W0, Done(task=t1.task, rsvs=[out.rsv], busy=0.5, copied=64))
    fail(run, W0, t2)
    run.clock.t += 2.0
    a, b, sink = run.s.stats()
    assert {k: a[k] for k in ("name", "batch", "queue", "inflight", "done", "failed", "busy", "copied")} == \
        {"name": "a", "batch": 0, "queue": 1, "inflight": 2, "done": 1, "failed": 1, "busy": 0.5,
         "copied": 64}
    assert a["rate"] == pytest.approx(0.5)  # 1 item done 2 s after the first dispatch
    (w,) = a["workers"]
    assert (w["pid"], w["name"], w["device"], w["done"]) == (321, f"w{W0}", "cpu", 1)
    assert w["busy"] == pytest.approx(0.5 / 4.0)
    assert (b["name"], b["batch"], b["queue"], b["inflight"], b["workers"]) == ("b", 8, 0, 0, [])
    assert sink["name"] == SINK and sink["done"] == 0
    assert run.s.batches_open  # the row waits in an open batch of "b"


def test_slots_are_reserved_ahead_only_when_that_takes_no_room_others_wait_for() -> None:
    """A task goes out with its output slots reserved (``Task.out``) once its worker has said what
    its results need; but not while a request waits for room, nor when the slots would take the
    room that another task of the same worker, sent without slots, has yet to reserve (that task
    would then wait for memory held for a task queued behind it: a 16 MiB pipeline stopped so)."""
    item = 10 << 20
    waiting = [0]
    table = ObjectTable(32 << 20, "tok", clock=FakeClock())
    s = Scheduler(table, clock=FakeClock(), waiting=lambda: waiting[0])
    s.configure([StageSettings(name="a")], 0)
    s.register(DRV, 1, "drv", SINK, 100, "host", False)
    s.register(W0, 2, "w0", "a", 2, "cpu", False)
    out = OutSpec(shape=[item // 4], dtype="<f4")

    def put(i: int) -> None:
        r = s.reserve(SRC, Reserve(stage=0, items=[i], shape=[16], dtype="<f4"))
        assert r is not None
        s.commit(SRC, r.rsv)

    def sent(cid: int) -> list[Task]:
        got = [m for c, m in s.outbox if c == cid and isinstance(m, Task)]
        s.outbox = [(c, m) for c, m in s.outbox if not (c == cid and isinstance(m, Task))]
        return got

    put(0)
    (t0,) = sent(W0)
    assert t0.out is None  # nothing known yet
    r0 = s.reserve(W0, Reserve(stage=1, items=[0], shape=out.shape, dtype="<f4"))
    assert r0 is not None
    s.done(W0, Done(task=t0.task, rsvs=[r0.rsv], busy=1.0, next_out=out))  # slow: one item per task
    put(1)
    (t1,) = sent(W0)
    assert t1.out is not None  # room: its slots go with it
    (sink0,) = sent(DRV)
    s.done(DRV, Done(task=sink0.task))  # the sink lets t0's results go
    waiting[0] = 1
    put(2)
    (t2,) = sent(W0)
    assert t2.out is None  # a request waits for room: nothing is taken ahead of it
    waiting[0] = 0
    s.done(W0, Done(task=t1.task, rsvs=[t1.out.rsv], busy=1.0, next_out=out))  # t1's 10 MiB at the sink
    hog = table.new(3 << 20, "|u1", (3 << 20,))
    assert hog is not None  # 19 MiB free: room for one task's slots, not for t2's and t3's
    put(3)
    (t3,) = sent(W0)
    assert t3.out is None  # t2 still has to reserve its 10 MiB
    r2 = s.reserve(W0, Reserve(stage=1, items=[2], shape=out.shape, dtype="<f4"))
    assert r2 is not None  # and gets them: nothing waits on a task queued behind it
