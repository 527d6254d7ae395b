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

import time
import traceback
from typing import Any, Callable, Sequence

from broker.client import Client
from broker.errors import ArenaFull, BrokerGone, BrokerTimeout
from broker.protocol import Failure, Handle, Layout, Reserved, Task
from broker.queue import task_rows

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

    def __init__(self, client: Client, spec: StageSpec, compute: Compute) -> None:
        self.client = client
        self.spec = spec
        self.compute = compute
        self.slots = RingSlots(client)
        compute.slots = self.slots
        self.src = client.task_queue(spec.index)
        self.dst = client.task_queue(spec.index + 1)
        self.next_batched = bool(spec.next_name) and spec.next_batch > 1

    def run(self, stopping: Callable[[], bool]) -> None:
        while not stopping():
            try:
                task = self.src.get(timeout=0.5)
            except BrokerTimeout:  # idle: is the broker still there? (BrokerGone if not)
                self.client.next_message(0)
                continue
            self.process(task)

    def process(self, task: Task) -> None:
        t0 = time.perf_counter()
        spec = self.spec
        if task.attempts > spec.retries:  # its workers died holding it retries + 1 times
            self._report(task.items, f"the worker processing it died (attempt {task.attempts} of "
                                     f"{spec.retries + 1}; its group's other items failed with it)",
                         code="WorkerDied", fatal=spec.on_error != "skip")
            self.client.release(task.handle)
            return
        if task.attempts and task.rows > 1:  # a worker died holding it: one row at a time from
            self.src.split(task)  # here, so a row that kills its workers fails alone
            return
        try:
            outs, copied = self._outputs(task, 0)
        except ArenaFull as e:  # the driver stops the run (as it does when tasks are messages)
            self.slots.cancel_all()
            self._report(task.items, f"stage {spec.name!r} could not write its result: {e}",
                         code="ArenaFull", fatal=True)
            self.client.release(task.handle)
            return
        # counted before the results go on: the driver that has the last item sees its count
        self.src.count(done=sum(len(items) for _, items, _ in outs), busy=time.perf_counter() - t0,
                       copied=copied)
        for handle, items, layout in outs:
            self.dst.put(Task(task=0, stage=spec.index + 1, items=items, handle=handle, rows=len(items),
                              batched=self.next_batched, each=not self.next_batched, layout=layout))
        self.client.release(task.handle)  # after the results are in the next queue: at least once

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
