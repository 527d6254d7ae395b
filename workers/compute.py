"""The compute paths of one task: input views, the stage call, output slots, the write-back.

::

    task.handle ──view──▶ np.ndarray (the arena) ──from_numpy──▶ tensor ──to(device)──▶ fn
        fn(x) ──▶ result ──(device finished)──▶ reserve(next stage) ──▶ write_into(slot)
                                                                  ──(copies finished)──▶ done

Variations:

* a CPU stage whose function takes ``out=`` reserves first (once the output's
  shape is known from an earlier input of the same shape) and computes
  straight into the slot: ``reserve ──▶ fn(x, out=slot)``, nothing copied;
* a task with ``each`` carries a few small items for a stage that takes one at
  a time: ``fn`` is called per row, rows whose results have the same spec
  share one reservation, and one ``done`` reports them all;
* a batched task is the ``[batch, ...]`` slot the upstream writers filled in
  place (only its valid rows, a copy, when rows were cancelled);
* a result that is a tuple or dict is packed in rows of bytes (``broker.rows``).
"""

from __future__ import annotations

import collections
import math
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import numpy as np

from broker.client import Client
from broker.errors import ArenaFull, format_bytes
from broker.protocol import Layout, Reserved, Task, storage_dtype
from broker.protocol import OutSpec as OutSpecWire
from broker.rows import field_views, pack_fields

from .bridge import cast, to_tensor, wire_dtype, write_into
from .devices import Device
from .spec import StageSpec

__all__ = ["Compute", "OutSpec"]

KNOWN_SPECS = 64  # input shapes whose output spec a worker remembers (for out=)


class OutSpec(NamedTuple):
    """The slot a result needs in the next stage."""

    shape: tuple[int, ...]
    dtype: str
    layout: Layout | None = None


class Slots(Protocol):
    """Where a task's output slots come from: reservations of the broker (the ``Client``), or
    blocks the worker allocates itself when tasks travel in rings (``rings.RingSlots``)."""

    def reserve(self, stage: int, items: Sequence[int], shape: Sequence[int], dtype: Any, *,
                timeout: float | None = None, layout: Layout | None = None) -> Reserved: ...

    def cancel(self, reserved: Reserved | int, *, wait: bool = False) -> None: ...


class Compute:
    """Runs tasks of one stage on one device and writes their results into the next stage."""

    def __init__(self, client: Client, spec: StageSpec, device: Device, fn: Callable[..., Any],
                 direct: bool) -> None:
        import torch

        self.torch = torch
        self.client = client
        self.slots: Slots = client
        self.spec = spec
        self.device = device
        self.fn = fn
        # A CPU stage whose function takes ``out=`` computes straight into its output slot once
        # the output's shape is known (from an earlier input of the same shape): no copy.
        self.direct = direct and not device.cuda and spec.dtype is None
        self.out_specs: collections.OrderedDict[tuple[Any, ...], OutSpec] = collections.OrderedDict()
        self.failed_item: int | None = None  # the row of an ``each`` task the stage raised on
        self.prefetched: dict[int, tuple[Any, Any]] = {}  # task id -> (inputs on the device, event)
        self.counters_prefetched = 0
        self.held = 0  # bytes of the current task's input
        self.ahead: Reserved | None = None  # the current task's output slots, reserved by the broker
        self.ahead_spec: OutSpecWire | None = None  # ... for results of this slot
        self.last: OutSpec | None = None  # the last result's slot

    # -- a task -------------------------------------------------------------------------------------
    def run(self, task: Task) -> tuple[list[int], int]:
        """Compute a task and write its results; returns (reservations, bytes copied).

        A task may come with its output slots reserved ahead by the broker (``task.out``, from
        the spec this worker reported after its last task): they are used when the result
        needs exactly them, and given back otherwise."""
        self.held = task.handle.nbytes  # the input's block stays until the results are written
        self.ahead = task.out
        self.ahead_spec = task.out_spec
        try:
            return self._run(task)
        finally:
            if self.ahead is not None:  # not needed after all: the broker may give it to others
                self.client.cancel(self.ahead)
                self.ahead = None

    def hint(self) -> OutSpecWire | None:
        """What the next task's items will likely need (the last result's slot), for ``done``."""
        spec = self.last
        if spec is None:
            return None
        return OutSpecWire(shape=list(spec.shape), dtype=spec.dtype, layout=spec.layout)

    def _run(self, task: Task) -> tuple[list[int], int]:
        if task.each:
            return self._rows(self.client.view(task.handle), task)
        batched = task.batched
        x = self.task_input(task)
        key = (x.shape, x.dtype.str, task.layout is None)
        known = self._known(key) if self.direct and key[2] else None
        if known is not None:
            self.prefetched.pop(task.task, None)  # this path makes its own inputs (CPU only)
            finished, out = self._into_slot(x, task.items, batched, known)
            if finished is not None:
                return finished
        else:
            with self.torch.inference_mode():
                out = self.fn(self._device_inputs(task, x))
            self.device.finished()
        fields = self._outputs(out, len(task.items) if batched else None)
        spec = self._spec(out, fields, batched)
        if self.direct and key[2] and spec.layout is None:
            self._remember(key, spec)
        reserved = self._reserve(task.items, spec)
        return [reserved.rsv], self._write(reserved, fields, batched, spec)

    def task_input(self, task: Task) -> np.ndarray:
        """The arena view a (non-``each``) task names: the item, or the batch's valid rows."""
        view = self.client.view(task.handle)
        if task.batched:
            return view[task.valid] if task.valid is not None else view[: task.rows]  # holes: a copy
        return view

    def _known(self, key: tuple[Any, ...]) -> OutSpec | None:
        spec = self.out_specs.get(key)
        if spec is not None:
            self.out_specs.move_to_end(key)
        return spec

    def _remember(self, key: tuple[Any, ...], spec: OutSpec) -> None:
        self.out_specs[key] = spec
        self.out_specs.move_to_end(key)
        if len(self.out_specs) > KNOWN_SPECS:
            self.out_specs.popitem(last=False)

    def _reserve(self, items: list[int], spec: OutSpec) -> Reserved:
        """The slots for ``items``' results: those reserved ahead if they are exactly these,
        else reserved now (a round trip that may wait for room)."""
        self.last = spec
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            if _fits(ahead, self.ahead_spec, items, spec):
                return ahead
            self.client.cancel(ahead)
        self._check_room(len(items), spec)
        return self.slots.reserve(self.spec.index + 1, items, spec.shape, spec.dtype, layout=spec.layout)

    def _check_room(self, n: int, spec: OutSpec) -> None:
        """``ArenaFull`` at once (it stops the run) for a result that can never be placed: its
        block and the task's input, which stays until the result is written, exceed the arena."""
        region = self.client.region
        assert region is not None
        cap = region.capacity
        item = storage_dtype(spec.dtype).itemsize * math.prod(spec.shape)
        batch = self.spec.next_batch
        rows = batch if batch > 1 else n  # a batched next stage collates its rows in one block
        if item * rows + self.held <= cap:
            return
        dtype = spec.dtype if spec.dtype == "bfloat16" else np.dtype(spec.dtype).name
        what = f"{format_bytes(item)} ({dtype}{list(spec.shape)})" if spec.layout is None else \
            f"{format_bytes(item)} (a row of {len(spec.layout.fields)} fields)"
        if batch > 1:
            most = max(0, (cap - self.held) // max(item, 1))
            fix = (f"lower stages.{self.spec.next_name}.batch to at most {most}, or raise broker.capacity"
                   if most >= 1 else "raise broker.capacity")
            raise ArenaFull(
                f"stage {self.spec.next_name!r} collates batches of {batch} items in one block: "
                f"{batch} x {what} = {format_bytes(item * batch)}, and with the input of stage "
                f"{self.spec.name!r} it is written from ({format_bytes(self.held)}) that can never fit "
                f"the {format_bytes(cap)} arena; {fix} to more than "
                f"{format_bytes(item * batch + self.held)}")
        raise ArenaFull(
            f"the result of stage {self.spec.name!r} ({'' if n == 1 else f'{n} x '}{what}) and its "
            f"input ({format_bytes(self.held)}, kept until the result is written) can never fit the "
            f"{format_bytes(cap)} arena together; raise broker.capacity to more than "
            f"{format_bytes(item * rows + self.held)}")

    # -- inputs -------------------------------------------------------------------------------------
    def inputs(self, x: np.ndarray, layout: Layout | None, wire: str | None = None) -> Any:
        """The stage's argument on its device: one tensor, or the tuple/dict a stage returned."""
        if layout is None:
            return self.device.to_device(to_tensor(x, wire))
        views = field_views(x, layout)
        tensors = [self.device.to_device(to_tensor(v, f[1])) for f, v in zip(layout.fields, views, strict=True)]
        if layout.kind == "dict":
            return {f[0]: t for f, t in zip(layout.fields, tensors, strict=True)}
        return tuple(tensors)

    def prefetch(self, task: Task) -> None:
        """Start copying ``task``'s input to the device on the side stream."""
        if task.each or task.task in self.prefetched:
            return
        self.prefetched[task.task] = self.device.on_side_stream(
            lambda: self.inputs(self.task_input(task), task.layout, task.handle.dtype))

    def _device_inputs(self, task: Task, x: np.ndarray) -> Any:
        got = self.prefetched.pop(task.task, None)
        if got is None:
            return self.inputs(x, task.layout, task.handle.dtype)
        inputs, event = got
        self.device.use_prefetched(inputs, event)
        self.counters_prefetched += 1
        return inputs

    # -- outputs ------------------------------------------------------------------------------------
    def _outputs(self, out: Any, rows: int | None) -> list[tuple[Any, Any]]:
        """``[(key, tensor)]`` of a result: key None for a single tensor, else index or dict key."""
        torch = self.torch
        name = self.spec.name
        if isinstance(out, dict):
            pairs = list(out.items())
            if not all(isinstance(k, str) for k, _ in pairs):
                raise TypeError(f"stage {name!r} returned a dict with non-string keys")
        elif isinstance(out, (tuple, list)):
            pairs = list(enumerate(out))
        else:
            pairs = [(None, out)]
        if not pairs:
            raise TypeError(f"stage {name!r} returned an empty {type(out).__name__}")
        fields = []
        for key, value in pairs:
            if isinstance(value, (np.generic, bool, int, float)):  # a NumPy scalar or a number
                value = np.asarray(value)
            if isinstance(value, np.ndarray):  # (np.ascontiguousarray would make a 0-d array 1-d)
                value = torch.from_numpy(value if value.flags.c_contiguous else value.copy(order="C"))
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"stage {name!r} returned {type(value).__name__}"
                                f"{'' if key is None else f' in field {key!r}'}; return tensors, "
                                f"NumPy arrays or numbers (one, or a tuple/dict of them)")
            value = cast(value.detach(), self.spec.dtype)
            if rows is not None and (value.dim() == 0 or value.shape[0] != rows):
                raise ValueError(f"batched stage {name!r} returned "
                                 f"{tuple(value.shape)} for {rows} items (want {rows} rows)")
            fields.append((key, value))
        return fields

    @staticmethod
    def _spec(out: Any, fields: list[tuple[Any, Any]], batched: bool) -> OutSpec:
        """The slot a result needs: the array itself, or rows of bytes for a tuple/dict."""
        def shape(t: Any) -> tuple[int, ...]:
            return tuple(t.shape[1:] if batched else t.shape)

        if len(fields) == 1 and fields[0][0] is None:
            (_, t), = fields
            return OutSpec(shape(t), wire_dtype(t.dtype))
        layout, rowbytes = pack_fields("dict" if isinstance(out, dict) else "tuple",
                                       [(k, wire_dtype(t.dtype), shape(t)) for k, t in fields])
        return OutSpec((rowbytes,), "|u1", layout)

    def _write(self, reserved: Reserved, fields: list[tuple[Any, Any]], batched: bool,
               spec: OutSpec) -> int:
        """Copy a stage's result into the reserved rows; the bytes copied."""
        rows = [t if batched else t.unsqueeze(0) for _, t in fields]
        copied, row = 0, 0
        for handle, n in reserved.segments:
            slot = self.client.view(handle)
            slots = field_views(slot, spec.layout) if spec.layout else [slot]
            wires = [f[1] for f in spec.layout.fields] if spec.layout else [spec.dtype]
            for dst, src, wire in zip(slots, rows, wires, strict=True):
                copied += write_into(dst, src[row: row + n], non_blocking=self.device.cuda, wire=wire)
            row += n
        self.device.copied()
        return copied

    # -- out= ---------------------------------------------------------------------------------------
    def _into_slot(self, x: np.ndarray, items: list[int], batched: bool,
                   spec: OutSpec) -> tuple[tuple[list[int], int] | None, Any]:
        """Reserve the output first, then let the stage write its result there (``out=``).

        Returns ``((rsvs, bytes copied), None)`` when the result is in the slot.
        A result that is not the slot itself (the function ignored ``out``) is
        copied in when it has the expected shape; otherwise the reservation is
        cancelled and ``(None, result)`` returned for the ordinary path.
        """
        reserved = self._reserve(items, spec)
        (handle, _n), *rest = reserved.segments
        slot = self.client.view(handle)
        inputs = self.inputs(x, None)
        with self.torch.inference_mode():
            if rest:  # the rows span two batches of the next stage: no single destination
                out = self.fn(inputs)
            else:
                dst = to_tensor(slot if batched else slot[0])
                out = self.fn(inputs, out=dst)
                if _is_slot(out, dst):
                    return ([reserved.rsv], 0), None
        fields = self._outputs(out, len(items) if batched else None)
        if len(fields) != 1 or fields[0][0] is not None or self._spec(out, fields, batched) != spec:
            out = _own(out)  # it may be a view of the slot, which the cancel gives back to the arena
            self.slots.cancel(reserved)
            self.direct = False  # the output's shape is not a function of the input's
            return None, out
        return ([reserved.rsv], self._write(reserved, fields, batched, spec)), None

    # -- several items, one at a time ---------------------------------------------------------------
    def _rows(self, view: np.ndarray, task: Task) -> tuple[list[int], int]:
        """A task of several items for a stage that takes one at a time: the stage is called on
        each row; rows whose results have the same spec share one reservation."""
        items, layout_in, wire = task.items, task.layout, task.handle.dtype
        xs = [view[j] for j in range(len(items))]
        key = (xs[0].shape, xs[0].dtype.str, layout_in is None)
        known = self._known(key) if self.direct and key[2] else None
        if known is not None:
            done = self._rows_into_slots(xs, items, known)
            if done is not None:
                return done
        results = []
        with self.torch.inference_mode():
            for item, x in zip(items, xs, strict=True):
                self.failed_item = item  # named in `fail` if the stage raises on this row
                out = self.fn(self.inputs(x, layout_in, wire))
                self.device.finished()
                fields = self._outputs(out, None)
                results.append((fields, self._spec(out, fields, False)))
        self.failed_item = None
        if self.direct and key[2] and results[0][1].layout is None and \
                all(r[1] == results[0][1] for r in results):
            self._remember(key, results[0][1])
        rsvs, copied, start = [], 0, 0
        while start < len(results):  # runs of rows with the same output spec
            end = start + 1
            while end < len(results) and results[end][1] == results[start][1]:
                end += 1
            reserved = self._reserve(items[start:end], results[start][1])
            rsvs.append(reserved.rsv)
            copied += self._write_rows(reserved, [r[0] for r in results[start:end]], results[start][1])
            start = end
        return rsvs, copied

    def _rows_into_slots(self, xs: list[np.ndarray], items: list[int],
                         spec: OutSpec) -> tuple[list[int], int] | None:
        """``_rows`` with ``out=``: reserve first, each row computes into its slot row.
        None (reservation cancelled) if a result does not fit its slot."""
        reserved = self._reserve(items, spec)
        dsts = self.client.rows(reserved)
        copied = 0
        with self.torch.inference_mode():
            for item, x, d in zip(items, xs, dsts, strict=True):
                dst = to_tensor(d)
                self.failed_item = item
                out = self.fn(self.inputs(x, None), out=dst)
                self.failed_item = None
                if _is_slot(out, dst):
                    continue
                fields = self._outputs(out, None)
                if self._spec(out, fields, False) != spec:
                    self.slots.cancel(reserved)
                    self.direct = False  # the output's shape is not a function of the input's
                    return None
                copied += write_into(d, fields[0][1], wire=spec.dtype)
        return [reserved.rsv], copied

    def _write_rows(self, reserved: Reserved, per_row: list[list[tuple[Any, Any]]], spec: OutSpec) -> int:
        """Copy per-row results into the reserved rows, in order; the bytes copied."""
        copied, k = 0, 0
        wires = [f[1] for f in spec.layout.fields] if spec.layout else [spec.dtype]
        for handle, n in reserved.segments:
            slot = self.client.view(handle)
            for r in range(n):
                dst = slot[r:r + 1]
                slots = field_views(dst, spec.layout) if spec.layout else [dst]
                for d, (_, src), wire in zip(slots, per_row[k], wires, strict=True):
                    copied += write_into(d, src.unsqueeze(0), non_blocking=self.device.cuda, wire=wire)
                k += 1
        self.device.copied()
        return copied


def _fits(reserved: Reserved, made_for: OutSpecWire | None, items: list[int], spec: OutSpec) -> bool:
    """Whether slots reserved ahead (for results like ``made_for``) are the ones ``items``'
    results need: the same count, shape, dtype and row layout."""
    return made_for is not None and sum(n for _, n in reserved.segments) == len(items) and \
        (tuple(made_for.shape), made_for.dtype, made_for.layout) == (spec.shape, spec.dtype, spec.layout)


def _is_slot(out: Any, dst: Any) -> bool:
    """Whether a stage handed ``out=dst`` returned ``dst`` itself (so nothing is left to copy)."""
    import torch

    return isinstance(out, torch.Tensor) and out.data_ptr() == dst.data_ptr() and \
        out.shape == dst.shape and out.dtype == dst.dtype


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
