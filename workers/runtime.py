"""The worker loop: receive a task, view its slot, from_numpy, to(device), call the stage, write back, ack.

One worker process serves one stage on one device::

    broker ──task(handle, items)──▶ view of the arena (no copy)
        torch.from_numpy(view) ──.to(device)──▶ fn(x) ──▶ result
        reserve(next stage) ──▶ write_into(slot, result)   (device→slot, no .cpu().numpy())
        stream.synchronize(); done(task, reservation) ──▶ broker

The task's input stays leased by the task until ``done``; if this process
dies, the broker re-queues the task for another worker.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import time
import traceback
from typing import Any, Callable

import numpy as np

from broker.client import Client
from broker.config import StageConfig, resolve
from broker.errors import BrokerError, BrokerGone, BrokerTimeout
from broker.protocol import Handle

from .bridge import cast, numpy_dtype, to_tensor, write_into
from .devices import pin_memory

__all__ = ["load_stage", "Worker", "worker_main", "worker_process"]

log = logging.getLogger("shmbroker.worker")


def load_stage(stage: StageConfig, device: str) -> Callable[[Any], Any]:
    """The stage's callable: ``fn`` with its ``args`` bound, or what ``factory(**args)`` returns."""
    if stage.factory:
        factory = resolve(stage.factory)
        args = dict(stage.args)
        if "device" in inspect.signature(factory).parameters:
            args.setdefault("device", device)
        return factory(**args)
    fn = resolve(stage.fn or "")
    args = stage.args
    return (lambda x: fn(x, **args)) if args else fn


class Worker:
    """State of one worker process; ``run()`` loops until stopped or the broker goes."""

    def __init__(self, endpoint: str, stage: StageConfig, index: int, device: str,
                 name: str | None = None, curve: tuple[str, str] | None = None) -> None:
        import torch

        self.torch = torch
        self.stage = stage
        self.index = index
        self.device = torch.device(device)
        if stage.threads:
            torch.set_num_threads(stage.threads)
        self.client = Client(endpoint, role="worker", name=name or f"{stage.name}-{os.getpid()}",
                             curve=curve)
        self.fn = load_stage(stage, device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.cuda.set_device(self.device)
            assert self.client.region is not None
            pin_memory(self.client.region.buffer)
        self.stopping = False
        self.acks: set[int] = set()
        self.client._request("register", stage=stage.name, credits=stage.credits, device=str(device))

    def run(self) -> int:
        while not self.stopping:
            msg = self.client.inbox.popleft() if self.client.inbox else self.client.recv(0.5)
            if msg is None:
                continue
            if msg["op"] == "task":
                self.process(msg)
            elif msg["rid"] in self.acks:  # the reply to a `done` sent without waiting
                self.acks.discard(msg["rid"])
                if msg["op"] == "error":
                    raise BrokerError(f"the broker refused an acknowledgement: {msg['message']}")
            else:
                log.debug("ignoring %s", msg["op"])
        self._flush_acks()
        return 0

    def _flush_acks(self, timeout: float = 5.0) -> None:
        """On a clean stop, wait until the broker has taken every `done` (else it redoes the work)."""
        deadline = time.monotonic() + timeout
        while self.acks and time.monotonic() < deadline:
            msg = self.client.inbox.popleft() if self.client.inbox else self.client.recv(0.1)
            if msg is not None:
                self.acks.discard(msg["rid"])

    def process(self, task: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        try:
            rsv, copied = self._compute_and_write(task)
        except (BrokerGone, BrokerTimeout):
            raise  # the broker's trouble, not the stage's
        except Exception as e:
            log.warning("stage %s failed on items %s: %r", self.stage.name, task["items"][:8], e)
            self.client._request("fail", task=task["task"], error=f"{type(e).__name__}: {e}",
                                 trace=traceback.format_exc(), credit=1)
            return
        # Not waiting for the reply saves a round trip per task; the broker handles this
        # connection's messages in order, so `done` lands before anything this worker sends next.
        self.acks.add(self.client.send("done", task=task["task"], rsv=rsv, credit=1,
                                       busy=time.perf_counter() - t0, copied=copied))

    def _compute_and_write(self, task: dict[str, Any]) -> tuple[int, int]:
        torch = self.torch
        view = self.client.view(Handle.from_wire(task["handle"]))
        items: list[int] = task["items"]
        batched = self.stage.batch > 1
        if batched:
            valid = task.get("valid")
            x = view[valid] if valid is not None else view[: task["rows"]]  # holes: a copy
        else:
            x = view
        t = to_tensor(x)
        if self.device.type != "cpu":
            t = t.to(self.device, non_blocking=True)
        with torch.inference_mode():
            out = self.fn(t)
        if not isinstance(out, (torch.Tensor, np.ndarray)):
            raise TypeError(f"stage {self.stage.name!r} returned {type(out).__name__}; "
                            f"return one tensor or NumPy array")
        if isinstance(out, np.ndarray):
            out = torch.from_numpy(np.ascontiguousarray(out))
        out = cast(out.detach(), self.stage.dtype)
        shape = tuple(out.shape[1:]) if batched else tuple(out.shape)
        if batched and out.shape[0] != len(items):
            raise ValueError(f"batched stage {self.stage.name!r} returned {out.shape[0]} rows "
                             f"for {len(items)} items")
        reply = self.client._request("reserve", stage=self.index + 1, items=items, shape=list(shape),
                                     dtype=numpy_dtype(out.dtype).str, timeout=None,
                                     _timeout=3600.0)
        rows = out if batched else out.unsqueeze(0)
        copied, row = 0, 0
        for wire, n in reply["segments"]:
            slot = self.client.view(Handle.from_wire(wire))
            copied += write_into(slot, rows[row: row + n], non_blocking=self.cuda)
            row += n
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        return reply["rsv"], copied


def worker_main(endpoint: str, stage_json: dict[str, Any], index: int, device: str,
                log_level: str = "WARNING", log_json: bool = False,
                curve: tuple[str, str] | None = None) -> int:
    """Entry point of a worker process (``multiprocessing`` spawn target and ``shmbroker worker``)."""
    from broker.logs import setup_logging

    stage = StageConfig.model_validate(stage_json)
    setup_logging(log_level, log_json, role=f"worker:{stage.name}")
    worker: Worker | None = None

    def stop(_sig: int, _frame: Any) -> None:
        if worker is not None:
            worker.stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker = Worker(endpoint, stage, index, device, curve=curve)
        return worker.run()
    except (BrokerGone, BrokerTimeout) as e:
        log.error("worker for stage %s stops: %s", stage.name, e)
        return 3
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if worker is not None:
            worker.client.close()


def worker_process(*args: Any) -> None:
    """``multiprocessing`` target: ``worker_main`` with its return value as the exit code."""
    import sys

    sys.exit(worker_main(*args))
