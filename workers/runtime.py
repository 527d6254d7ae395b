"""The worker process: choose the device, attach, load the stage, then receive tasks until stopped.

One worker process serves one stage on one device::

    Device.select()  ──▶  Client(endpoint)  ──▶  load the stage (fn, or factory(**args))
        ──▶ pin the arena (CUDA) ──▶ register(stage, credits, device, pinned)
    loop: task ──▶ Compute.run (compute.py) ──▶ done(task, reservations)   (not waited for)
          (with ``broker.rings``: tasks from the stage's queue in the arena instead, rings.py)
          a stage that raises ──▶ fail(task, error, traceback)   (the broker retries, skips or fails)
          no arena space for the result within wait_timeout ──▶ fail(task, arena): backpressure,
          the task goes back to its queue and is never the stage's error

The task's input stays leased by the task until ``done``; if this process
dies, the broker re-queues the task for another worker (counting an attempt).
On a GPU, the next waiting task's input is copied to the device on a side
stream while the current one computes.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import signal
import sys
import time
import traceback
from typing import Any, Callable

from broker.client import Client
from broker.errors import ArenaFull, BrokerGone, BrokerTimeout
from broker.protocol import Task

from .compute import Compute
from .devices import Device
from .rings import RingLoop
from .spec import StageSpec, resolve

__all__ = ["load_stage", "takes_out", "Worker", "worker_main", "worker_process"]

log = logging.getLogger("shmbroker.worker")


def load_stage(spec: StageSpec, device: str) -> Callable[[Any], Any]:
    """The stage's callable: ``fn`` with its ``args`` bound, or what ``factory(**args)`` returns."""
    if spec.factory:
        factory = resolve(spec.factory, spec.search_path)
        args = dict(spec.args)
        if "device" in inspect.signature(factory).parameters:
            args.setdefault("device", device)
        return factory(**args)
    fn = resolve(spec.fn or "", spec.search_path)
    return functools.partial(fn, **spec.args) if spec.args else fn  # keeps an ``out`` parameter visible


def takes_out(fn: Callable[..., Any]) -> bool:
    """Whether a stage function accepts ``out=``: a tensor to write its result into."""
    try:
        return "out" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


class Worker:
    """One worker process's state; ``run()`` loops until stopped or the broker goes."""

    def __init__(self, endpoint: str, spec: StageSpec, device: str, name: str | None = None,
                 curve: tuple[str, str] | None = None) -> None:
        import torch

        self.spec = spec
        self.device = Device(device)
        self.device.select()  # first: a factory that calls .cuda() must land on this device
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.client = Client(endpoint, role="worker", name=name or f"{spec.name}-{os.getpid()}",
                             curve=curve)
        try:
            fn = load_stage(spec, str(self.device))
            assert self.client.region is not None
            pinned = self.device.pin(self.client.region.buffer)
            self.compute = Compute(self.client, spec, self.device, fn, takes_out(fn))
            # The next waiting task's input is copied to the GPU on a side stream while a task
            # computes (SHMBROKER_PREFETCH=0 turns it off; =1 runs the same bookkeeping on a CPU).
            flag = os.environ.get("SHMBROKER_PREFETCH")
            self.prefetch = self.device.cuda if flag is None else flag == "1"
            self.stopping = False
            self.client.register(spec.name, credits=spec.credits, device=str(self.device), pinned=pinned,
                                 pipeline=spec.pipeline)
            # tasks in the arena's queues (broker.rings): the loop of rings.py, no message per task
            self.rings = RingLoop(self.client, spec, self.compute, self.prefetch) if self.client.rings else None
        except BaseException:
            self.close()
            raise

    def run(self) -> int:
        if self.rings is not None:
            self.rings.run(lambda: self.stopping)
            self._flush()
            return 0
        while not self.stopping:
            msg = self.client.next_message(0.5)
            if msg is None:
                continue
            if isinstance(msg, Task):
                if self.prefetch:
                    self._prefetch_next()
                self.process(msg)
            else:
                log.debug("ignoring %s", msg.kind)
        self._flush()
        return 0

    def _flush(self) -> None:
        """On a clean stop, make sure the broker has taken every ``done`` (else it redoes the
        work): a ping is answered after everything this worker sent before it."""
        try:
            self.client.ping(timeout=5.0)
        except (BrokerGone, BrokerTimeout):
            pass

    def process(self, task: Task) -> None:
        t0 = time.perf_counter()
        try:
            rsvs, copied = self.compute.run(task)
        except ArenaFull as e:  # backpressure: the task waits in its queue, the stage is not to blame
            # the driver reports it (it stops the run); here only for --log-level INFO
            log.info("stage %s: no arena space for the result of items %s: %s", self.spec.name,
                     task.items[:8], e)
            self.client.fail(task, f"stage {self.spec.name!r} could not write its result: {e}",
                             arena=True)
            return
        except (BrokerGone, BrokerTimeout):
            raise  # the broker's trouble, not the stage's
        except Exception as e:
            item, self.compute.failed_item = self.compute.failed_item, None
            # the driver reports the failure (once, with its items); here only for --log-level INFO
            log.info("stage %s failed on item(s) %s: %r", self.spec.name,
                     [item] if item is not None else task.items[:8], e)
            self.client.fail(task, f"{type(e).__name__}: {e}", traceback.format_exc(), item=item)
            return
        # Not answered: the broker handles this connection's messages in order, so `done` lands
        # before anything this worker sends next; a refusal is raised by its next request.
        self.client.done(task, rsvs, busy=time.perf_counter() - t0, copied=copied,
                         next_out=self.compute.hint())

    def _prefetch_next(self) -> None:
        """Start copying the next waiting task's input to the device on the side stream."""
        inbox = self.client.conn.inbox
        if not inbox:
            msg = self.client.next_message(0)
            if msg is None:
                return
            inbox.append(msg)
        nxt = next((m for m in inbox if isinstance(m, Task)), None)
        if nxt is not None:
            self.compute.prefetch(nxt)

    def close(self) -> None:
        self.device.unpin()  # before the arena is unmapped
        self.client.close()


def worker_main(endpoint: str, spec: StageSpec, device: str, log_level: str = "WARNING",
                log_json: bool = False, curve: tuple[str, str] | None = None) -> int:
    """Entry point of a worker process (``multiprocessing`` target and ``shmbroker worker``)."""
    from broker.logs import setup_logging

    setup_logging(log_level, log_json, role=f"worker:{spec.name}")
    worker: Worker | None = None

    def stop(_sig: int, _frame: Any) -> None:
        if worker is not None:
            worker.stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker = Worker(endpoint, spec, device, curve=curve)
        return worker.run()
    except (BrokerGone, BrokerTimeout) as e:
        if worker is not None and worker.stopping:  # told to stop, and the broker stopped too
            log.info("worker for stage %s stops: %s", spec.name, e)
            return 0
        log.error("worker for stage %s stops: %s", spec.name, e)
        return 3
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if worker is not None:
            worker.close()


def worker_process(*args: Any) -> None:
    """``multiprocessing`` target: ``worker_main`` with its return value as the exit code."""
    sys.exit(worker_main(*args))
