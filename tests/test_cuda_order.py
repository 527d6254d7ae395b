"""The order of a worker's CUDA calls and the device each worker uses, checked on a CPU-only host.

``workers/devices.py`` draws the order (``Device`` makes every CUDA call a
worker makes)::

    set_device(N) ─▶ (client, factory) ─▶ cudaHostRegister(arena, PORTABLE) ─▶ register(pinned)
    per task: to_device ─▶ stage ─▶ synchronize(N) ─▶ copies ─▶ event record+synchronize ─▶ done
    close: cudaHostUnregister(arena) ─▶ client closed

``CudaDouble`` stands in for ``torch.cuda``: every call is appended to one
list (``calls``), the stage helpers append to the same list
(``stage_helpers.order_log``), and so do the wrappers around
``Device.to_device`` (which leaves tensors on the CPU), the result copies
(``workers.compute.write_into``), the worker's ``Client`` and its
``register``/``done``/``close``. Tests then compare the list with the order
above, exactly. The tests marked ``gpu`` run the real thing.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import stage_helpers
import torch
import yaml

import workers.compute
import workers.runtime
from broker import Broker, Client, Pipeline
from broker.protocol import Task
from shmbroker.config import StageConfig
from shmbroker.plan import plan_devices
from workers.devices import CUDA_HOST_REGISTER_PORTABLE, Device
from workers.runtime import Worker
from workers.spec import StageSpec

ROOT = Path(__file__).resolve().parents[1]
CAPACITY = 16 * 2**20
FACTORY = "stage_helpers:record_device_factory"
SINK = "__sink__"


# -- the recording double of torch.cuda -------------------------------------------------------------
class _Stream:
    def __init__(self, cuda: CudaDouble, index: int, label: str) -> None:
        self.cuda, self.index, self.label = cuda, index, label

    def wait_event(self, event: _Event) -> None:
        self.cuda.calls.append(("wait_event", self.label, event.eid))

    def wait_stream(self, other: _Stream) -> None:
        self.cuda.calls.append(("wait_stream", self.label, other.label))

    def synchronize(self) -> None:
        self.cuda.calls.append(("stream.synchronize", self.label))

    def __repr__(self) -> str:
        return f"<stream {self.label}>"


class _Event:
    def __init__(self, cuda: CudaDouble, eid: int) -> None:
        self.cuda, self.eid = cuda, eid

    def record(self, stream: _Stream | None = None) -> None:
        stream = stream if stream is not None else self.cuda.stream_of(self.cuda.current)
        self.cuda.calls.append(("event.record", self.eid, stream.label))

    def synchronize(self) -> None:
        self.cuda.calls.append(("event.synchronize", self.eid))

    def wait(self, stream: _Stream | None = None) -> None:
        stream = stream if stream is not None else self.cuda.stream_of(self.cuda.current)
        self.cuda.calls.append(("event.wait", self.eid, stream.label))

    def query(self) -> bool:
        return True


class _Cudart:
    def __init__(self, cuda: CudaDouble) -> None:
        self.cuda = cuda

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802 (CUDA's name)
        self.cuda.calls.append(("cudaHostRegister", ptr, size, flags))
        return self.cuda.register_error

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        self.cuda.calls.append(("cudaHostUnregister", ptr))
        return 0


class CudaDouble:
    """``torch.cuda`` for a host without CUDA: ``count`` devices, every call appended to ``calls``.

    Streams are labelled ``default:N`` (device N's default stream) and
    ``sK:N`` (the K-th stream made, on device N); events are numbered from 1.
    """

    def __init__(self, count: int = 4, register_error: int = 0) -> None:
        self.count = count
        self.register_error = register_error  # what cudaHostRegister returns (0: cudaSuccess)
        self.calls: list[tuple[Any, ...]] = []
        self.current = 0
        self._streams = 0
        self._events = 0
        self._current_stream: dict[int, _Stream] = {}

    def index(self, device: Any = None) -> int:
        """The index a device argument names, checked like CUDA does (an invalid ordinal raises)."""
        if device is None:
            return self.current
        if isinstance(device, str):
            device = torch.device(device)
        if isinstance(device, torch.device):
            if device.type != "cuda":
                raise ValueError(f"expected a cuda device, got {device}")
            idx = self.current if device.index is None else device.index
        else:
            idx = int(device)
        if not 0 <= idx < self.count:
            raise RuntimeError(f"CUDA error: invalid device ordinal {idx} (the double has {self.count})")
        return idx

    def stream_of(self, idx: int) -> _Stream:
        """Device ``idx``'s current stream, not recorded as a call."""
        if idx not in self._current_stream:
            self._current_stream[idx] = _Stream(self, idx, f"default:{idx}")
        return self._current_stream[idx]

    # the torch.cuda functions workers/devices.py calls (and two that planning asks)
    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.count

    def current_device(self) -> int:
        self.calls.append(("current_device",))
        return self.current

    def set_device(self, device: Any) -> None:
        idx = self.index(device)
        self.calls.append(("set_device", idx))
        self.current = idx

    def Stream(self, device: Any = None, priority: int = 0) -> _Stream:  # noqa: N802 (torch's name)
        idx = self.index(device)
        self._streams += 1
        s = _Stream(self, idx, f"s{self._streams}:{idx}")
        self.calls.append(("Stream", idx, s.label))
        return s

    def Event(self, enable_timing: bool = False, blocking: bool = False,  # noqa: N802
              interprocess: bool = False) -> _Event:
        self._events += 1
        self.calls.append(("Event", self._events))
        return _Event(self, self._events)

    def current_stream(self, device: Any = None) -> _Stream:
        idx = self.index(device)
        self.calls.append(("current_stream", None if device is None else idx))  # None: not named
        return self.stream_of(idx)

    @contextlib.contextmanager
    def stream(self, s: _Stream) -> Iterator[_Stream]:
        self.calls.append(("stream.enter", s.label))
        before = self.stream_of(s.index)
        self._current_stream[s.index] = s
        try:
            yield s
        finally:
            self._current_stream[s.index] = before
            self.calls.append(("stream.exit", s.label))

    def synchronize(self, device: Any = None) -> None:
        idx = self.index(device)
        self.calls.append(("synchronize", None if device is None else idx))  # None: the current one

    def cudart(self) -> _Cudart:
        return _Cudart(self)


PATCHED = ("is_available", "device_count", "current_device", "set_device", "Stream", "Event",
           "current_stream", "stream", "synchronize", "cudart")


def _cuda_attributes_used(path: Path) -> set[str]:
    """``X`` of every ``torch.cuda.X`` / ``self.torch.cuda.X`` in a module."""
    tree = ast.parse(path.read_text())
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "cuda"}


def _first(t: Any) -> float:
    return float(t.reshape(-1)[0])


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> CudaDouble:
    """The double installed as ``torch.cuda``'s functions, and the recording wrappers around it."""
    double = CudaDouble()
    for name in PATCHED:
        monkeypatch.setattr(torch.cuda, name, getattr(double, name))
    monkeypatch.setattr(stage_helpers, "order_log", double.calls)

    def to_device(self: Device, t: Any) -> Any:  # tensors cannot move to a device here: they stay
        double.calls.append(("to_device", str(self), _first(t), double.stream_of(self.device.index).label
                             if self.cuda else None))
        return t

    def record_stream(t: torch.Tensor, stream: _Stream) -> None:
        double.calls.append(("record_stream", _first(t), stream.label))

    real_write_into = workers.compute.write_into

    def write_into(slot: np.ndarray, result: Any, non_blocking: bool = False, wire: str | None = None) -> int:
        double.calls.append(("write_into", non_blocking))
        return real_write_into(slot, result, non_blocking=non_blocking, wire=wire)

    def client(*args: Any, **kw: Any) -> Client:
        double.calls.append(("Client",))
        c = Client(*args, **kw)
        register = c.register

        def recording_register(stage: str, credits: int = 1, device: str = "host", pinned: bool = False,
                               pipeline: str = "") -> int:
            double.calls.append(("register", stage, device, pinned))
            return register(stage, credits=credits, device=device, pinned=pinned, pipeline=pipeline)

        c.register = recording_register  # type: ignore[method-assign]
        return c

    monkeypatch.setattr(Device, "to_device", to_device)
    monkeypatch.setattr(torch.Tensor, "record_stream", record_stream)
    monkeypatch.setattr(workers.compute, "write_into", write_into)
    monkeypatch.setattr(workers.runtime, "Client", client)
    return double


def record(w: Worker, cuda: CudaDouble) -> None:
    """Note the worker's ``done`` messages and its client's close in the double's list."""
    done, close = w.client.done, w.client.close

    def recording_done(task: Task | int, *args: Any, **kw: Any) -> int:
        cuda.calls.append(("done", task.task if isinstance(task, Task) else task))
        return done(task, *args, **kw)

    def recording_close() -> None:
        cuda.calls.append(("client.close",))
        close()

    w.client.done = recording_done  # type: ignore[method-assign]
    w.client.close = recording_close  # type: ignore[method-assign]


def spec(name: str = "g") -> StageSpec:
    return StageSpec(name=name, index=0, factory=FACTORY, credits=2)


def arena(w: Worker) -> tuple[int, int]:
    """The address and size of the worker's mapping of the arena."""
    buf = np.frombuffer(w.client.region.buffer, dtype=np.uint8)
    return buf.ctypes.data, buf.nbytes


def worker_stats(c: Client, name: str) -> dict[str, Any]:
    (ws,) = [w for st in c.stats()["stages"] for w in st["workers"] if w["name"] == name]
    return ws


def feed(c: Client, values: list[float]) -> None:
    """The driver's part: one item of three float32 per value, each reserved and committed."""
    for i, v in enumerate(values):
        reserved = c.reserve(0, [i], [3], "<f4", timeout=1.0)
        c.rows(reserved)[0][:] = v
        c.commit(reserved)


def wait_tasks(w: Worker, n: int, timeout: float = 10.0) -> list[Task]:
    """Receive until ``n`` tasks wait in the worker's inbox (left there, in order)."""
    inbox = w.client.conn.inbox
    deadline = time.monotonic() + timeout
    while sum(isinstance(m, Task) for m in inbox) < n:
        if time.monotonic() > deadline:
            pytest.fail(f"the worker got {sum(isinstance(m, Task) for m in inbox)} of {n} tasks in {timeout} s")
        msg = w.client.conn.recv(0.5)
        if msg is not None:
            inbox.append(msg)
    return [m for m in inbox if isinstance(m, Task)]


def sink_values(c: Client, n: int, timeout: float = 10.0) -> dict[int, np.ndarray]:
    got: dict[int, np.ndarray] = {}
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        msg = c.next_message(0.5)
        if isinstance(msg, Task):
            got[msg.items[0]] = c.task_rows(msg)[0].copy()
            c.done(msg)
    return got


# -- the double itself ------------------------------------------------------------------------------
def test_the_double_covers_every_torch_cuda_call_of_devices_py() -> None:
    """Should ``Device`` start calling another ``torch.cuda`` function, the double must grow (else
    the tests below would call the real one, which fails without CUDA, or silently skip a call)."""
    used = _cuda_attributes_used(ROOT / "workers" / "devices.py")
    assert used, "found no torch.cuda calls in workers/devices.py"
    assert used <= set(PATCHED), f"not in the double: {sorted(used - set(PATCHED))}"


# -- 1. the device first, the arena pinned, unpinned before the client closes -----------------------
def test_set_device_comes_first_then_the_factory_then_pinning_and_unpin_before_close(cuda: CudaDouble) -> None:
    with Broker(capacity=CAPACITY, stages=[{"name": "g"}]) as b, \
            Client(b.endpoint, role="driver", pool=False) as c:
        w = Worker(b.endpoint, spec(), "cuda:2", name="g-cuda2")
        try:
            record(w, cuda)
            addr, size = arena(w)
            assert size == w.client.region.capacity
            copy = w.device.copy_stream.label
            assert cuda.calls == [
                ("set_device", 2),  # the worker's first CUDA call, before anything else
                ("Stream", 2, copy),  # its copy stream, on its device
                ("Client",),
                ("current_device",), ("factory", "cuda:2", 2),  # the factory ran on device 2
                ("cudaHostRegister", addr, size, CUDA_HOST_REGISTER_PORTABLE),  # once, the arena
                ("register", "g", "cuda:2", True),
            ]
            assert CUDA_HOST_REGISTER_PORTABLE == 1  # cudaHostRegisterPortable
            assert w.device.pinned == addr and w.device.pin_error == ""
            ws = worker_stats(c, "g-cuda2")
            assert (ws["device"], ws["pinned"]) == ("cuda:2", True)
            cuda.calls.clear()
        finally:
            w.close()
        assert cuda.calls == [("cudaHostUnregister", addr), ("client.close",)]
        assert w.device.pinned is None


# -- 2. each worker of a 4-GPU plan on its own device ---------------------------------------------
def test_each_worker_of_a_four_gpu_plan_selects_its_planned_device_first(cuda: CudaDouble) -> None:
    stage = StageConfig(name="g", factory=FACTORY, device="cuda", devices="all", replicas_per_device=1)
    devices = plan_devices(stage, 4, require_gpu=True)
    assert devices == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    with Broker(capacity=CAPACITY, stages=[stage.to_broker()]) as b, \
            Client(b.endpoint, role="driver", pool=False) as c:
        for n, dev in enumerate(devices):
            cuda.calls.clear()
            cuda.current = 3 - n  # whatever device the process had before: select() must change it
            w = Worker(b.endpoint, stage.worker_spec(0), dev, name=f"g-{n}")
            try:
                assert cuda.calls[0] == ("set_device", n), cuda.calls
                assert ("factory", dev, n) in cuda.calls, cuda.calls
                assert [x for x in cuda.calls if x[0] in ("set_device", "Stream")] == \
                    [("set_device", n), ("Stream", n, w.device.copy_stream.label)]
                assert w.device.copy_stream.index == n
                ws = worker_stats(c, f"g-{n}")
                assert (ws["device"], ws["pinned"]) == (dev, True)
            finally:
                w.close()


def test_a_bare_cuda_device_resolves_to_the_current_device(cuda: CudaDouble) -> None:
    cuda.current = 3
    d = Device("cuda")
    assert (str(d), d.cuda) == ("cuda:3", True)
    assert cuda.calls == [("current_device",)]
    d.select()
    assert cuda.calls[1:] == [("set_device", 3), ("Stream", 3, d.copy_stream.label)]


# -- 3. the stage finished before its result is read, the copies before `done` ---------------------
def test_a_task_runs_to_device_stage_synchronize_copies_event_then_done(cuda: CudaDouble) -> None:
    with Broker(capacity=CAPACITY, stages=[{"name": "g"}]) as b, \
            Client(b.endpoint, role="driver", pool=False) as c:
        c.register(SINK, credits=8)
        feed(c, [1.0])
        w = Worker(b.endpoint, spec(), "cuda:1", name="g-cuda1")
        try:
            record(w, cuda)
            (task,) = wait_tasks(w, 1)
            w.client.conn.inbox.remove(task)
            cuda.calls.clear()
            w.process(task)
            assert cuda.calls == [
                ("to_device", "cuda:1", 1.0, "default:1"),
                ("stage", 1.0),
                ("synchronize", 1),  # the stage's work on every stream, before its result is read
                ("write_into", True),  # the result copied device -> slot, not blocking
                ("Event", 1), ("current_stream", 1), ("event.record", 1, "default:1"),
                ("event.synchronize", 1),  # the copies waited for ...
                ("done", task.task),  # ... before `done` is sent
            ]
            got = sink_values(c, 1)
            assert list(got) == [0]
            np.testing.assert_array_equal(got[0], np.full(3, 2.0, dtype=np.float32))
        finally:
            w.close()


# -- 4. a refused pin is reported ----------------------------------------------------------------------
def test_a_refused_pin_is_reported_and_the_worker_runs_unpinned(cuda: CudaDouble,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    cuda.register_error = 2  # cudaErrorMemoryAllocation: what a low `ulimit -l` gives
    with Broker(capacity=CAPACITY, stages=[{"name": "g"}]) as b, \
            Client(b.endpoint, role="driver", pool=False) as c, \
            caplog.at_level(logging.WARNING, logger="shmbroker.devices"):
        w = Worker(b.endpoint, spec(), "cuda:0", name="g-unpinned")
        try:
            record(w, cuda)
            addr, size = arena(w)
            assert ("cudaHostRegister", addr, size, CUDA_HOST_REGISTER_PORTABLE) in cuda.calls
            assert cuda.calls[-1] == ("register", "g", "cuda:0", False)
            assert w.device.pinned is None
            assert f"{size} byte arena" in w.device.pin_error and "ulimit -l" in w.device.pin_error
            assert w.device.pin_error in caplog.text
            ws = worker_stats(c, "g-unpinned")
            assert (ws["device"], ws["pinned"]) == ("cuda:0", False)
            cuda.calls.clear()
        finally:
            w.close()
        assert cuda.calls == [("client.close",)]  # nothing to unregister


# -- 5. the next task's input copied on the side stream, waited for on the current one -------------
def test_prefetch_copies_on_the_copy_stream_and_the_stage_waits_for_its_event(
        cuda: CudaDouble, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHMBROKER_PREFETCH", raising=False)  # on a GPU, prefetch is on by default
    with Broker(capacity=CAPACITY, stages=[{"name": "g"}]) as b, \
            Client(b.endpoint, role="driver", pool=False) as c:
        c.register(SINK, credits=8)
        feed(c, [1.0, 2.0])
        w = Worker(b.endpoint, spec(), "cuda:1", name="g-prefetch")
        try:
            assert w.prefetch
            record(w, cuda)
            first, second = wait_tasks(w, 2)
            deadline = time.monotonic() + 10
            done, next_message = w.client.done, w.client.next_message

            def stop_after_two(task: Task | int, *args: Any, **kw: Any) -> int:
                rid = done(task, *args, **kw)
                w.stopping = sum(x[0] == "done" for x in cuda.calls) == 2
                return rid

            def guarded(timeout: float | None) -> Any:
                if time.monotonic() > deadline:
                    w.stopping = True  # fails the assertions below rather than hanging
                return next_message(timeout)

            w.client.done = stop_after_two  # type: ignore[method-assign]
            w.client.next_message = guarded  # type: ignore[method-assign]
            cuda.calls.clear()
            assert w.run() == 0
            copy = w.device.copy_stream.label
            def copies(event: int) -> list[tuple[Any, ...]]:
                return [("write_into", True), ("Event", event), ("current_stream", 1),
                        ("event.record", event, "default:1"), ("event.synchronize", event)]

            expected = [
                # the run loop: the first task, and before it computes the second's input, ahead
                ("stream.enter", copy),
                ("to_device", "cuda:1", 2.0, copy),  # made under torch.cuda.stream(copy stream)
                ("Event", 1), ("event.record", 1, copy),  # its event, on the copy stream
                ("stream.exit", copy),
                ("to_device", "cuda:1", 1.0, "default:1"),  # the first task's own input
                ("stage", 1.0), ("synchronize", 1), *copies(2), ("done", first.task),
                # the second task: no copy of its own; the current stream waits for the event
                ("current_stream", 1), ("wait_event", "default:1", 1), ("record_stream", 2.0, "default:1"),
                ("stage", 2.0), ("synchronize", 1), *copies(3), ("done", second.task),
            ]
            assert cuda.calls == expected
            assert w.compute.counters_prefetched == 1 and not w.compute.prefetched
            got = sink_values(c, 2)
            assert sorted(got) == [0, 1]
            np.testing.assert_array_equal(got[0], np.full(3, 2.0, dtype=np.float32))
            np.testing.assert_array_equal(got[1], np.full(3, 4.0, dtype=np.float32))
        finally:
            w.close()


# -- on real GPUs ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this host)")
def test_the_host_source_of_a_gpu_workers_input_is_pinned() -> None:
    with Broker(capacity=CAPACITY) as b, Client(b.endpoint) as client:
        dev = Device("cuda:0")
        dev.select()
        assert dev.pin(client.region.buffer), dev.pin_error
        try:
            x = np.arange(4096, dtype=np.float32)
            h = client.put(x)
            t = torch.from_numpy(client.get(h))
            assert t.is_pinned()  # so its copy to the device is a DMA, asynchronous
            on_gpu = dev.to_device(t)
            assert on_gpu.device == torch.device("cuda:0")
            np.testing.assert_array_equal(on_gpu.cpu().numpy(), x)
            client.release(h)
        finally:
            dev.unpin()
        assert dev.pinned is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices")
def test_a_two_gpu_pipeline_runs_each_worker_on_its_own_device(tmp_path: Path) -> None:
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump({
        "source": {"type": "synthetic", "count": 1, "shape": [4], "dtype": "float32"},
        "stages": [{"name": "where", "fn": "stage_helpers:cuda_device_of", "device": "cuda",
                    "devices": [0, 1], "replicas_per_device": 1}],
    }))
    # items of 256 KiB: one per task, so both workers get some
    arrays = [np.full(65536, float(i), dtype=np.float32) for i in range(16)]
    with Pipeline.from_yaml(cfg, require_gpu=True) as p:
        assert sorted(w.device for w in p.workers) == ["cuda:0", "cuda:1"]
        got = list(p.map(arrays))
        (stage,) = p.client.stats()["stages"]
        registered = {w["pid"]: (w["device"], w["pinned"]) for w in stage["workers"]}
    assert sorted(registered.values()) == [("cuda:0", True), ("cuda:1", True)]
    used = set()
    for out in got:
        current, input_device, pid = (int(v) for v in out)
        assert registered[pid][0] == f"cuda:{current}"  # the worker's current device is its own ...
        assert input_device == current  # ... and its input was put there
        used.add(current)
    assert used == {0, 1}
