"""The worker loop: receive a task, view its slot, from_numpy, to(device), call the stage, write back, ack.

One worker process serves one stage on one device::

    broker ──task(handle, items)──▶ view of the arena (no copy)
        torch.from_numpy(view) ──.to(device)──▶ fn(x) ──▶ result
        reserve(next stage) ──▶ write_into(slot, result)   (device→slot, no .cpu().numpy())
        stream.synchronize(); done(task, reservation) ──▶ broker

The task's input stays leased by the task until ``done``; if this process
dies, the broker re-queues the task for another worker.

Variations on that path:

* a CPU stage whose function takes ``out=`` reserves first (once the output's
  shape is known from an earlier input of the same shape) and computes
  straight into the slot: ``reserve ──▶ fn(x, out=slot)``, nothing copied;
* a task with ``each`` carries a few small items for a stage that takes one at
  a time: ``fn`` is called per row, rows whose results have the same shape
  share one reservation, and one ``done`` reports them all;
* on a GPU, the next waiting task's input is copied to the device on a side
  stream while the current task computes (``_prefetch_next``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import signal
import time
import traceback
from typing import Any, Callable

import numpy as np

from broker.arena import field_views, pack_fields
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
    return functools.partial(fn, **stage.args) if stage.args else fn  # keeps an ``out`` parameter visible


def takes_out(fn: Callable[..., Any]) -> bool:
    """Whether a stage function accepts ``out=``: a tensor to write its result into."""
    try:
        return "out" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


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
        self.fn: Callable[..., Any] = load_stage(stage, device)
        self.cuda = self.device.type == "cuda"
        # A CPU stage whose function takes ``out=`` computes straight into its output slot once
        # the output's shape is known (from an earlier input of the same shape): no copy.
        self.direct = takes_out(self.fn) and not self.cuda and stage.dtype is None
        self.out_specs: dict[tuple[Any, ...], dict[str, Any]] = {}
        if self.cuda:
            torch.cuda.set_device(self.device)
            assert self.client.region is not None
            pin_memory(self.client.region.buffer)
        # While a task computes, the next task's input is already copied to the GPU on a side
        # stream (SHMBROKER_PREFETCH=0 turns it off; =1 runs the same bookkeeping on a CPU stage).
        flag = os.environ.get("SHMBROKER_PREFETCH")
        self.prefetch = self.cuda if flag is None else flag == "1"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.prefetched: dict[int, tuple[Any, Any]] = {}  # task id -> (inputs on the device, event)
        self.counters_prefetched = 0
        self.failed_item: int | None = None  # the row of an `each` task the stage raised on
        self.stopping = False
        self.acks: set[int] = set()
        self.client._request("register", stage=stage.name, credits=stage.credits, device=str(device))

    def run(self) -> int:
        while not self.stopping:
            msg = self.client.inbox.popleft() if self.client.inbox else self.client.recv(0.5)
            if msg is None:
                continue
            if msg["op"] == "task":
                if self.prefetch:
                    self._prefetch_next()
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
            which = {"item": self.failed_item} if self.failed_item is not None else {}
            self.failed_item = None
            self.client._request("fail", task=task["task"], error=f"{type(e).__name__}: {e}",
                                 trace=traceback.format_exc(), credit=1, **which)
            return
        # Not waiting for the reply saves a round trip per task; the broker handles this
        # connection's messages in order, so `done` lands before anything this worker sends next.
        rsvs = rsv if isinstance(rsv, list) else [rsv]
        extra = {"rsvs": rsvs[1:]} if len(rsvs) > 1 else {}
        self.acks.add(self.client.send("done", task=task["task"], rsv=rsvs[0], credit=1,
                                       busy=time.perf_counter() - t0, copied=copied, **extra))

    def _task_input(self, task: dict[str, Any]) -> np.ndarray:
        """The arena view a (non-``each``) task names: the item, or the batch's valid rows."""
        view = self.client.view(Handle.from_wire(task["handle"]))
        if self.stage.batch > 1:
            valid = task.get("valid")
            return view[valid] if valid is not None else view[: task["rows"]]  # holes: a copy
        return view

    def _prefetch_next(self) -> None:
        """Start copying the next waiting task's input to the device on the side stream."""
        if not self.client.inbox:
            msg = self.client.recv(0)
            if msg is None:
                return
            self.client.inbox.append(msg)
        nxt = next((m for m in self.client.inbox if m["op"] == "task"), None)
        if nxt is None or nxt.get("each") or nxt["task"] in self.prefetched:
            return
        with self._side_stream():
            inputs = self._inputs(self._task_input(nxt), nxt.get("layout"))
            event = self._record()
        self.prefetched[nxt["task"]] = (inputs, event)

    def _side_stream(self) -> Any:
        import contextlib

        return self.torch.cuda.stream(self.copy_stream) if self.cuda else contextlib.nullcontext()

    def _record(self) -> Any:
        if not self.cuda:
            return None
        event = self.torch.cuda.Event()
        event.record(self.copy_stream)
        return event

    def _device_inputs(self, task: dict[str, Any], x: np.ndarray) -> Any:
        """The stage's inputs on its device: prefetched on the side stream, or copied now."""
        got = self.prefetched.pop(task["task"], None)
        if got is None:
            return self._inputs(x, task.get("layout"))
        inputs, event = got
        if event is not None:
            stream = self.torch.cuda.current_stream(self.device)
            stream.wait_event(event)  # compute starts once the copy is done
            values = inputs.values() if isinstance(inputs, dict) else \
                inputs if isinstance(inputs, tuple) else (inputs,)
            for t in values:  # made on the side stream, used on this one: keep its memory till then
                t.record_stream(stream)
        self.counters_prefetched += 1
        return inputs

    def _compute_and_write(self, task: dict[str, Any]) -> tuple[int | list[int], int]:
        items: list[int] = task["items"]
        if task.get("each"):
            view = self.client.view(Handle.from_wire(task["handle"]))
            return self._compute_rows(view, items, task.get("layout"))
        batched = self.stage.batch > 1
        x = self._task_input(task)
        key = (x.shape, x.dtype.str, task.get("layout") is None)
        known = self.out_specs.get(key) if self.direct and key[2] else None
        if known is not None:
            self.prefetched.pop(task["task"], None)  # this path makes its own inputs (CPU only)
            finished, out = self._compute_into_slot(x, items, batched, known)
            if finished is not None:
                return finished
        else:
            with self.torch.inference_mode():
                out = self.fn(self._device_inputs(task, x))
        fields = self._outputs(out, len(items) if batched else None)
        spec, layout = self._spec(out, fields, batched)
        if self.direct and key[2] and layout is None:
            self.out_specs[key] = spec
        reply = self._reserve(items, spec)
        return reply["rsv"], self._write(reply, fields, batched, layout)

    @staticmethod
    def _spec(out: Any, fields: list[tuple[Any, Any]], batched: bool) -> tuple[dict[str, Any], Any]:
        """The slot a result needs: ``({shape, dtype[, layout]}, layout or None)``."""
        if len(fields) == 1 and fields[0][0] is None:  # one tensor: the slot is that array
            (_, t), = fields
            return {"shape": list(t.shape[1:] if batched else t.shape), "dtype": numpy_dtype(t.dtype).str}, None
        # a tuple or dict: each item's fields packed in one row of bytes
        packed, rowbytes = pack_fields([(k, numpy_dtype(t.dtype).str, tuple(t.shape[1:] if batched
                                        else t.shape)) for k, t in fields])
        layout = {"kind": "dict" if isinstance(out, dict) else "tuple", "fields": packed}
        return {"shape": [rowbytes], "dtype": "|u1", "layout": layout}, layout

    def _compute_rows(self, view: np.ndarray, items: list[int],
                      layout_in: dict[str, Any] | None) -> tuple[int | list[int], int]:
        """A task of several items for a stage that takes one at a time: the stage is called on
        each row; rows whose results have the same shape share one reservation."""
        xs = [view[j] for j in range(len(items))]
        key = (xs[0].shape, xs[0].dtype.str, layout_in is None)
        known = self.out_specs.get(key) if self.direct and key[2] else None
        if known is not None:
            done = self._rows_into_slots(xs, items, known)
            if done is not None:
                return done
        results = []
        with self.torch.inference_mode():
            for item, x in zip(items, xs, strict=True):
                self.failed_item = item  # named in `fail` if the stage raises on this row
                out = self.fn(self._inputs(x, layout_in))
                fields = self._outputs(out, None)
                results.append((fields, *self._spec(out, fields, False)))
        self.failed_item = None
        if self.direct and key[2] and results[0][2] is None and \
                all(r[1] == results[0][1] for r in results):
            self.out_specs[key] = results[0][1]
        rsvs, copied, start = [], 0, 0
        while start < len(results):  # runs of rows with the same output spec
            end = start + 1
            while end < len(results) and results[end][1] == results[start][1]:
                end += 1
            reply = self._reserve(items[start:end], results[start][1])
            rsvs.append(reply["rsv"])
            copied += self._write_rows(reply, [r[0] for r in results[start:end]], results[start][2])
            start = end
        return rsvs, copied

    def _rows_into_slots(self, xs: list[np.ndarray], items: list[int],
                         spec: dict[str, Any]) -> tuple[int, int] | None:
        """``_compute_rows`` with ``out=``: reserve first, each row computes into its slot row.
        None (reservation cancelled) if a result does not fit its slot."""
        reply = self._reserve(items, spec)
        dsts = [slot[r] for wire, n in reply["segments"]
                for slot in [self.client.view(Handle.from_wire(wire))] for r in range(n)]
        copied = 0
        with self.torch.inference_mode():
            for item, x, d in zip(items, xs, dsts, strict=True):
                dst = to_tensor(d)
                self.failed_item = item
                out = self.fn(self._inputs(x, None), out=dst)
                self.failed_item = None
                if self._is_slot(out, dst):
                    continue
                fields = self._outputs(out, None)
                if self._spec(out, fields, False)[0] != spec:
                    self.client._request("cancel", rsv=reply["rsv"])
                    self.direct = False  # the output's shape is not a function of the input's
                    return None
                copied += write_into(d, fields[0][1])
        return reply["rsv"], copied

    def _write_rows(self, reply: dict[str, Any], per_row: list[list[tuple[Any, Any]]],
                    layout: dict[str, Any] | None) -> int:
        """Copy per-row results into the reserved rows, in order; the bytes copied."""
        copied, k = 0, 0
        for wire, n in reply["segments"]:
            slot = self.client.view(Handle.from_wire(wire))
            for r in range(n):
                dst = slot[r:r + 1]
                slots = field_views(dst, layout["fields"]) if layout else [dst]
                for d, (_, src) in zip(slots, per_row[k], strict=True):
                    copied += write_into(d, src.unsqueeze(0), non_blocking=self.cuda)
                k += 1
        if self.cuda:
            self.torch.cuda.current_stream(self.device).synchronize()
        return copied

    def _reserve(self, items: list[int], spec: dict[str, Any]) -> dict[str, Any]:
        return self.client._request("reserve", stage=self.index + 1, items=items, timeout=None,
                                    _timeout=3600.0, **spec)

    def _compute_into_slot(self, x: np.ndarray, items: list[int], batched: bool,
                           spec: dict[str, Any]) -> tuple[tuple[int, int] | None, Any]:
        """Reserve the output first, then let the stage write its result there (``out=``).

        Returns ``((rsv, bytes copied), None)`` when the result is in the slot.
        A result that is not the slot itself (the function ignored ``out``) is
        copied in when it has the expected shape; otherwise the reservation is
        cancelled and ``(None, result)`` returned for the ordinary path.
        """
        reply = self._reserve(items, spec)
        (wire, n), *rest = reply["segments"]
        slot = self.client.view(Handle.from_wire(wire))
        inputs = self._inputs(x, None)
        with self.torch.inference_mode():
            if rest:  # the rows span two batches of the next stage: no single destination
                out = self.fn(inputs)
            else:
                dst = to_tensor(slot if batched else slot[0])
                out = self.fn(inputs, out=dst)
                if self._is_slot(out, dst):
                    return (reply["rsv"], 0), None
        fields = self._outputs(out, len(items) if batched else None)
        (_, t), = fields if len(fields) == 1 else [(None, None)]
        want = tuple(spec["shape"])
        if t is None or tuple(t.shape[1:] if batched else t.shape) != want or \
                numpy_dtype(t.dtype).str != spec["dtype"]:
            out = _own(out)  # it may be a view of the slot, which the cancel gives back to the arena
            self.client._request("cancel", rsv=reply["rsv"])
            self.direct = False  # the output's shape is not a function of the input's
            return None, out
        return (reply["rsv"], self._write(reply, fields, batched, None)), None

    def _is_slot(self, out: Any, dst: Any) -> bool:
        """Whether a stage handed ``out=dst`` returned ``dst`` itself (so nothing is left to copy)."""
        return isinstance(out, self.torch.Tensor) and out.data_ptr() == dst.data_ptr() and \
            out.shape == dst.shape and out.dtype == dst.dtype

    def _write(self, reply: dict[str, Any], fields: list[tuple[Any, Any]], batched: bool,
               layout: dict[str, Any] | None) -> int:
        """Copy a stage's result into the reserved rows; the bytes copied."""
        rows = [t if batched else t.unsqueeze(0) for _, t in fields]
        copied, row = 0, 0
        for wire, n in reply["segments"]:
            slot = self.client.view(Handle.from_wire(wire))
            slots = field_views(slot, layout["fields"]) if layout else [slot]
            for dst, src in zip(slots, rows, strict=True):
                copied += write_into(dst, src[row: row + n], non_blocking=self.cuda)
            row += n
        if self.cuda:
            self.torch.cuda.current_stream(self.device).synchronize()
        return copied

    def _inputs(self, x: np.ndarray, layout: dict[str, Any] | None) -> Any:
        """The stage's argument: one tensor, or the tuple/dict a previous stage returned."""
        def tensor(a: np.ndarray) -> Any:
            t = to_tensor(a)
            return t.to(self.device, non_blocking=True) if self.device.type != "cpu" else t

        if layout is None:
            return tensor(x)
        views = field_views(x, layout["fields"])
        if layout["kind"] == "dict":
            return {f[0]: tensor(v) for f, v in zip(layout["fields"], views, strict=True)}
        return tuple(tensor(v) for v in views)

    def _outputs(self, out: Any, rows: int | None) -> list[tuple[Any, Any]]:
        """``[(key, tensor)]`` of a result: key None for a single tensor, else index or dict key."""
        torch = self.torch
        if isinstance(out, dict):
            pairs = list(out.items())
            if not all(isinstance(k, str) for k, _ in pairs):
                raise TypeError(f"stage {self.stage.name!r} returned a dict with non-string keys")
        elif isinstance(out, (tuple, list)):
            pairs = list(enumerate(out))
        else:
            pairs = [(None, out)]
        if not pairs:
            raise TypeError(f"stage {self.stage.name!r} returned an empty {type(out).__name__}")
        fields = []
        for key, value in pairs:
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(np.ascontiguousarray(value))
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"stage {self.stage.name!r} returned {type(value).__name__}"
                                f"{'' if key is None else f' in field {key!r}'}; return tensors or "
                                f"NumPy arrays (one, or a tuple/dict of them)")
            value = cast(value.detach(), self.stage.dtype)
            if rows is not None and (value.dim() == 0 or value.shape[0] != rows):
                raise ValueError(f"batched stage {self.stage.name!r} returned "
                                 f"{tuple(value.shape)} for {rows} items (want {rows} rows)")
            fields.append((key, value))
        return fields


def _own(value: Any) -> Any:
    """``value`` (a tensor, array, or tuple/list/dict of them) copied, so it aliases nothing."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        return {k: _own(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_own(v) for v in value)
    return value


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
