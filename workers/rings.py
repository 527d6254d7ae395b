"""A worker's loop when the pipeline's tasks travel in rings (``broker.rings: true``): no broker message per task.

::

    stage k's queue ──get──▶ Task: a group of n rows in one block, the items' ids (this worker's hold)
        ──▶ Compute.run: the output slots are blocks this worker allocates (its pool, no message)
        ──▶ count in stage k's queue ──▶ put the results' Task into stage k+1's queue
        ──▶ release the input (its pending entry in stage k's queue ends)

The broker made the queues when it was configured; it only allocates (a
worker's pool refills in batches) and referees. Failures are decided here,
with the stage's ``on_error`` and ``retries``:

* the stage raises on one row of an unbatched group: the other rows go on, the
  row alone is the failure; a batch that raises fails as a whole;
* ``retry``: the failed part runs again, up to ``retries`` more times; then,
  as for ``fail``, a fatal report (the driver stops the run); ``skip``: a
  report the driver records, and the run goes on without those items;
* no arena space for a result within the wait: a fatal ``ArenaFull`` report;
* a worker that dies holding a task: the broker gives the task back to the
  queue (at least once, the driver drops duplicates by item id); the worker
  that gets it back splits it into one task per row, and the worker that gets
  a task after ``retries + 1`` deaths reports its items failed instead of
  running them: an item that kills its workers fails alone and cannot
  crash-loop.
"""

from __future__ import annotations

import collections
import time
import traceback
from typing import Any, Callable, Sequence

import msgspec

from broker.client import Client
from broker.errors import ArenaFull, BrokerGone, BrokerTimeout
from broker.protocol import Failure, Handle, Layout, Reserved, Task
from broker.queue import task_rows
from broker.scheduler import TASK_ARENA_PART

from .compute import Compute
from .spec import StageSpec

__all__ = ["RingLoop", "RingSlots"]

_Out = tuple[Handle, list[int], "Layout | None"]


class RingSlots:
    """Output slots for ``Compute`` when tasks travel in rings: a reservation is a block this
    worker allocates (``Client.alloc``, from its pool), put into the next stage's queue later."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.open: dict[int, _Out] = {}
        self._next = 0

    def reserve(self, stage: int, items: Sequence[int], shape: Sequence[int], dtype: Any, *,
                timeout: float | None = None, layout: Layout | None = None) -> Reserved:
        handle, _ = self.client.alloc((len(items), *shape), dtype, timeout=timeout)
        self._next += 1
        self.open[self._next] = (handle, list(items), layout)
        return Reserved(rsv=self._next, segments=[(handle, len(items))])

    def cancel(self, reserved: Reserved | int, *, wait: bool = False) -> None:
        rsv = reserved if isinstance(reserved, int) else reserved.rsv
        handle, _, _ = self.open.pop(rsv)
        self.client.release(handle)

    def take(self, rsv: int) -> _Out:
        return self.open.pop(rsv)

    def cancel_all(self) -> None:
        """After a failure: the slots the failed part allocated go back."""
        for rsv in list(self.open):
            self.cancel(rsv)


class RingLoop:
    """Take stage ``spec.index``'s tasks from its queue until stopped; see the module's text."""

    def __init__(self, client: Client, spec: StageSpec, compute: Compute, prefetch: bool = False) -> None:
        self.client = client
        self.prefetch = prefetch  # copy the next task's input to the device on a side stream
        self._ids = 0
        self.spec = spec
        self.compute = compute
        self.slots = RingSlots(client)
        compute.slots = self.slots
        self.src = client.task_queue(spec.index)
        self.dst = client.task_queue(spec.index + 1)
        self.next_batched = bool(spec.next_name) and spec.next_batch > 1
        self.carry: Task | None = None  # got while collating a batch it did not fit
        # tasks held per block: the rows of a split task share one, and one release of a block
        # ends this process's hold and every pending entry of it, so it waits for the last
        self.refs: collections.Counter[int] = collections.Counter()
        assert client.region is not None
        self.room = client.region.capacity // TASK_ARENA_PART  # the largest batch it collates

    def run(self, stopping: Callable[[], bool]) -> None:
        trimmed = True
        while not stopping():
            task = self._take(0.5)
            if task is None:  # idle: is the broker still there? (BrokerGone if not)
                self.client.next_message(0)
                if not trimmed:  # and the blocks this worker's pool keeps go back to the arena
                    self.client.trim_pool()
                    trimmed = True
                continue
            trimmed = False
            group = [task]
            batch = self.spec.batch
            row = task.handle.nbytes // max(1, task.rows)
            if batch > 1 and task.rows < batch and (task.rows + 1) * row <= self.room:
                # a batch of several groups, collated here (a copy), as far as 1/8 of the arena
                # allows: groups kept smaller than the batch by that room go as they are
                deadline = time.monotonic() + self.spec.batch_timeout
                rows = task.rows
                while rows < batch:
                    more = self._take(max(0.0, deadline - time.monotonic()))
                    if more is None:
                        break
                    if rows + more.rows > batch or (rows + more.rows) * row > self.room or \
                            not _same_rows(more, task):
                        self.carry = more  # the next batch's first
                        break
                    group.append(more)
                    rows += more.rows
            elif self.prefetch and self.carry is None:  # the next task's input to the GPU meanwhile
                self.carry = self._take(0.0)
                if self.carry is not None:
                    self.compute.prefetch(self.carry)
            self.process(group)

    def _take(self, timeout: float) -> Task | None:
        """The next task to run (None after ``timeout`` s without one): a task held over from
        the last batch, else the queue's next; those that fail or split here are done with."""
        while True:
            if self.carry is not None:
                task, self.carry = self.carry, None
            else:
                try:
                    task = self.src.get(timeout=timeout)
                except BrokerTimeout:
                    return None
                self._ids += 1  # an id of this worker's own: what Compute keys a prefetch by
                task = msgspec.structs.replace(task, task=self._ids)
                self.refs[task.handle.oid] += 1
            spec = self.spec
            if task.attempts > spec.retries:  # its workers died holding it retries + 1 times
                self._report(task.items, f"the worker processing it died (attempt {task.attempts} of "
                                         f"{spec.retries + 1})", code="WorkerDied",
                             fatal=spec.on_error != "skip")
                self._let_go([task])
            elif task.attempts and task.rows > 1:  # a worker died holding it: one row at a time
                self.src.split(task, release=False)  # from here, so a row that kills its workers
                self._let_go([task])  # fails alone
            else:
                return task
            timeout = 0.0

    def process(self, group: list[Task]) -> None:
        """Run a task, or the batch of several ``group`` makes (copied into one block), put the
        results into the next stage's queue, release the inputs."""
        t0 = time.perf_counter()
        spec = self.spec
        task, collated, copied = group[0], None, 0
        try:
            if len(group) > 1:
                task, collated = self._collate(group)
                copied = collated.nbytes
            outs, n = self._outputs(task, 0)
            copied += n
        except ArenaFull as e:  # the driver stops the run (as it does when tasks are messages)
            self.slots.cancel_all()
            self._report([i for t in group for i in t.items], f"stage {spec.name!r} could not write its "
                         f"result: {e}", code="ArenaFull", fatal=True)
            outs = []
        # counted before the results go on: the driver that has the last item sees its count
        self.src.count(done=sum(len(items) for _, items, _ in outs), out=sum(h.nbytes for h, _, _ in outs),
                       busy=time.perf_counter() - t0, copied=copied,
                       inp=sum(t.handle.nbytes for t in group) if outs else 0)
        for handle, items, layout in outs:
            self.dst.put(Task(task=0, stage=spec.index + 1, items=items, handle=handle, rows=len(items),
                              batched=self.next_batched, each=not self.next_batched, layout=layout))
        if collated is not None:
            self.client.release(collated)
        self._let_go(group)  # after the results are in the next queue

    def _let_go(self, tasks: list[Task]) -> None:
        """These tasks are done with: release each block no other task held here still names."""
        last = []
        for t in tasks:
            oid = t.handle.oid
            self.refs[oid] -= 1
            if self.refs[oid] <= 0:
                del self.refs[oid]
                last.append(t.handle)
        if last:
            self.client.release(last)

    def _collate(self, group: list[Task]) -> tuple[Task, Handle]:
        """The rows of several groups copied into one block: one batch (a copy, which tasks as
        messages avoid by reserving rows of one batch block; here only for groups smaller than
        the batch)."""
        first = group[0].handle
        rows = sum(t.rows for t in group)
        handle, block = self.client.alloc((rows, *first.shape[1:]), first.dtype, timeout=None)
        at = 0
        for t in group:
            block[at: at + t.rows] = self.client.view(t.handle)[: t.rows]
            at += t.rows
        task = Task(task=0, stage=self.spec.index, items=[i for t in group for i in t.items], handle=handle,
                    rows=rows, batched=True, layout=group[0].layout)
        return task, handle

    def _outputs(self, task: Task, attempt: int) -> tuple[list[_Out], int]:
        """The results of ``task`` (its Tasks for the next stage, not yet put) and the bytes
        copied; failures are reported here and leave their items out."""
        batch = max(1, self.spec.batch)
        if task.batched and task.rows > batch:  # a group larger than this stage's batch
            return self._parts(task, [(a, min(a + batch, task.rows)) for a in range(0, task.rows, batch)],
                               attempt)
        try:
            rsvs, copied = self.compute.run(task)
        except (ArenaFull, BrokerGone, BrokerTimeout):
            raise  # not the stage's failure
        except Exception as e:
            self.slots.cancel_all()
            item, self.compute.failed_item = self.compute.failed_item, None
            error, trace = f"{type(e).__name__}: {e}", traceback.format_exc()
            if task.each and item is not None and len(task.items) > 1:  # one row raised
                j = task.items.index(item)
                outs, copied = self._parts(task, [(0, j), (j + 1, len(task.items))], attempt)
                more, more_copied = self._failed(task_rows(task, j, j + 1), error, trace, attempt)
                return outs + more, copied + more_copied
            return self._failed(task, error, trace, attempt)
        return [self.slots.take(r) for r in rsvs], copied

    def _parts(self, task: Task, spans: list[tuple[int, int]], attempt: int) -> tuple[list[_Out], int]:
        outs: list[_Out] = []
        copied = 0
        for start, end in spans:
            if end > start:
                more, n = self._outputs(task_rows(task, start, end), attempt)
                outs += more
                copied += n
        return outs, copied

    def _failed(self, task: Task, error: str, trace: str, attempt: int) -> tuple[list[_Out], int]:
        """One more attempt of ``task`` failed: again while ``on_error: retry`` has attempts
        left, else reported (fatal unless the stage skips failures)."""
        spec = self.spec
        if spec.on_error == "retry" and attempt < spec.retries:
            return self._outputs(task, attempt + 1)
        self._report(task.items, error, trace, fatal=spec.on_error != "skip")
        return [], 0

    def _report(self, items: list[int], error: str, trace: str = "", *, fatal: bool,
                code: str = "StageFailed") -> None:
        self.client.report(Failure(stage=self.spec.name, items=items, error=error, trace=trace,
                                   fatal=fatal, code=code))


def _same_rows(a: Task, b: Task) -> bool:
    """Whether two groups' rows can be collated into one batch: the same row shape, dtype, layout."""
    return (a.handle.shape[1:], a.handle.dtype, a.layout) == (b.handle.shape[1:], b.handle.dtype, b.layout)
