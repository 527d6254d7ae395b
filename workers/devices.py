"""A worker's device: chosen before anything touches CUDA, the arena pinned, streams and the finish line.

Every CUDA call a worker makes goes through ``Device``; its order is the
point of this module (tests check it with a recording double of
``torch.cuda``, ``tests/test_cuda_order.py``)::

    Device.select()      torch.cuda.set_device(N)        before the stage is loaded or its
                                                         factory called (else its model lands on GPU 0)
    Device.pin(region)   cudaHostRegister(arena, PORTABLE) once; so host<->device copies are DMA
    per task:            inputs .to(device, non_blocking) (the next task's on a side stream)
                         the stage runs
    Device.finished()    torch.cuda.synchronize(device)  the stage's work on every stream of ours
                         (a stage may launch on streams of its own), before its result is read
                         results copied device -> slot (non_blocking into the pinned arena)
    Device.copied()      an event recorded after the copies, waited on, before ``done`` is sent
    Device.unpin()       cudaHostUnregister(arena)       before the arena is unmapped

A CPU device does none of it. A pinning failure is reported (``pinned``
false in ``shmbroker status`` and the run's summary) and the copies are then
staged by the driver; it is never silent.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

__all__ = ["Device", "CUDA_HOST_REGISTER_PORTABLE"]

log = logging.getLogger("shmbroker.devices")

# cudaHostRegisterPortable: the pages count as pinned in every CUDA context of the process, not
# only the current one (a stage may drive a second device). Not Mapped (no device pointer is
# needed: copies go through the copy engines) and not ReadOnly (results are written back into
# the arena by device->host copies).
CUDA_HOST_REGISTER_PORTABLE = 1


class Device:
    """One worker's device (``cpu`` or ``cuda:N``) and the CUDA calls made on it."""

    def __init__(self, name: str) -> None:
        import torch

        self.torch = torch
        if name == "cuda":  # no index: the one this process would use
            name = f"cuda:{torch.cuda.current_device()}"
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"
        self.pinned: int | None = None  # the registered host address
        self.pin_error = ""
        self.copy_stream: Any = None

    def __str__(self) -> str:
        return str(self.device)

    def select(self) -> None:
        """Make this the current device: the first CUDA call of the worker."""
        if self.cuda:
            self.torch.cuda.set_device(self.device)
            self.copy_stream = self.torch.cuda.Stream(self.device)

    def pin(self, buffer: Any) -> bool:
        """Register ``buffer`` (the arena) as page-locked; False, with ``pin_error`` set, if refused."""
        if not self.cuda:
            return False
        arr = np.frombuffer(buffer, dtype=np.uint8)
        err = self.torch.cuda.cudart().cudaHostRegister(arr.ctypes.data, arr.nbytes,
                                                        CUDA_HOST_REGISTER_PORTABLE)
        code = int(getattr(err, "value", err))
        if code != 0:
            self.pin_error = f"cudaHostRegister of the {arr.nbytes} byte arena failed ({err}); " \
                             f"check `ulimit -l` (docker: --ulimit memlock=-1)"
            log.warning("%s; host-device copies will be staged", self.pin_error)
            return False
        self.pinned = arr.ctypes.data
        return True

    def unpin(self) -> None:
        """Unregister the arena; call before it is unmapped."""
        if self.pinned is not None:
            self.torch.cuda.cudart().cudaHostUnregister(self.pinned)
            self.pinned = None

    def to_device(self, t: Any) -> Any:
        return t.to(self.device, non_blocking=True) if self.cuda else t

    def on_side_stream(self, make: Callable[[], Any]) -> tuple[Any, Any]:
        """``make()`` with its device work queued on the copy stream; returns ``(its result, an
        event recorded after it)`` (no event on the CPU)."""
        if not self.cuda:
            return make(), None
        with self.torch.cuda.stream(self.copy_stream):
            out = make()
            event = self.torch.cuda.Event()
            event.record(self.copy_stream)
        return out, event

    def use_prefetched(self, inputs: Any, event: Any) -> None:
        """Inputs made on the side stream are used on the current one: wait for their copy and
        keep their memory until then."""
        if event is None:
            return
        stream = self.torch.cuda.current_stream(self.device)
        stream.wait_event(event)
        values = inputs.values() if isinstance(inputs, dict) else \
            inputs if isinstance(inputs, tuple) else (inputs,)
        for t in values:
            t.record_stream(stream)

    def finished(self) -> None:
        """Wait for all of the stage's device work, on any stream (before its result is read)."""
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def copied(self) -> None:
        """Wait for the result copies queued on the current stream (before ``done`` is sent)."""
        if self.cuda:
            event = self.torch.cuda.Event()
            event.record(self.torch.cuda.current_stream(self.device))
            event.synchronize()
