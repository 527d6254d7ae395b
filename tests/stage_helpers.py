"""Stage functions the pipeline tests run inside worker processes."""

from __future__ import annotations

import os
import time

import torch


def _arena_ranges() -> list[tuple[int, int]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            if "memfd:shmbroker-" in line:
                lo, hi = line.split()[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


def probe(x: torch.Tensor) -> torch.Tensor:
    """Return [in_arena, contiguous, rows, pid, first value] for the input tensor it was given."""
    ptr = x.data_ptr()
    inside = any(lo <= ptr and ptr + x.nbytes <= hi for lo, hi in _arena_ranges())
    rows = x.shape[0] if x.dim() > 0 else 0
    first = float(x.reshape(-1)[0]) if x.numel() else 0.0
    return torch.tensor([float(inside), float(x.is_contiguous()), float(rows), float(os.getpid()), first],
                        dtype=torch.float64)


def probe_batched(x: torch.Tensor) -> torch.Tensor:
    """Per row: [in_arena, rows in batch, row value]; proves a batch is a view of one arena slot."""
    info = probe(x)
    return torch.stack([torch.stack([info[0], info[2], x[i].reshape(-1)[0].double()])
                        for i in range(x.shape[0])])


def slow(x: torch.Tensor, seconds: float = 0.02) -> torch.Tensor:
    time.sleep(seconds)
    return x + 1


def boom_on(x: torch.Tensor, value: float = 3.0) -> torch.Tensor:
    if float(x.reshape(-1)[0]) == value:
        raise RuntimeError(f"boom on {value}")
    return x * 10


def counting_source(n: int = 5, shape: tuple[int, ...] = (4,)):
    for i in range(n):
        yield torch.full(shape, float(i), dtype=torch.float64).numpy()


collected: list = []


def collect(array, index):
    collected.append((index, array.copy()))


def die(x: torch.Tensor) -> torch.Tensor:
    os._exit(17)  # a worker that crashes on every item (segfault-like: no traceback, no fail message)


def die_at_start():
    os._exit(17)  # a factory that kills its worker before it ever registers


def fail_first(x: torch.Tensor, marker: str) -> torch.Tensor:
    """Fail the first call across all workers (a marker file remembers), succeed after."""
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write("failed once")
        raise RuntimeError("transient failure")
    return x


def to_dict(x: torch.Tensor) -> dict:
    """Two outputs of different shape and dtype per item."""
    return {"x2": x * 2, "s": x.sum(-1).to(torch.float32)}


def from_dict(d: dict) -> torch.Tensor:
    """Consume a dict (batched): both fields must be views of the arena."""
    ranges = _arena_ranges()
    for t in d.values():
        assert any(lo <= t.data_ptr() and t.data_ptr() < hi for lo, hi in ranges), "field copied"
    return d["x2"] + d["s"].double().unsqueeze(-1)


def to_tuple(x: torch.Tensor) -> tuple:
    return x + 1, (x * 3).to(torch.int64)


def ignores_out(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Declares ``out`` but returns a new tensor: the worker copies it into the slot."""
    return x * 2


def shape_by_value(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The output's length depends on the values, not the input's shape."""
    n = int(x.reshape(-1)[0]) % 3 + 1
    return x.reshape(-1)[:n] * 1


def add_env(x: torch.Tensor, name: str = "SHMBROKER_TEST_ADD") -> torch.Tensor:
    """Adds the number in an environment variable: shows which environment the worker has."""
    import os

    return x + float(os.environ[name])


def count_and_fail(x: torch.Tensor, value: float, path: str) -> torch.Tensor:
    """Appends a line to ``path`` and raises for items whose first element is ``value``."""
    if float(x.reshape(-1)[0]) == value:
        with open(path, "a") as f:
            f.write("called\n")
        raise RuntimeError(f"always fails on {value}")
    return x


def reshapes_out(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Given ``out``, writes into it but returns a view of another shape (which must not be trusted)."""
    y = x * 2
    if out is None:
        return y
    out.copy_(y)
    return out.unsqueeze(0)


# -- CUDA call order (tests/test_cuda_order.py) ---------------------------------------------------
order_log: list = []  # test_cuda_order points this at its recording double's list of calls


def record_device_factory(device: str = "cpu"):
    """A factory that notes the device it was given and the current CUDA device when it runs (the
    test's double of ``torch.cuda`` on a CPU host); its stage notes each call and returns x*2."""
    order_log.append(("factory", device, torch.cuda.current_device()))

    def double(x: torch.Tensor) -> torch.Tensor:
        order_log.append(("stage", float(x.reshape(-1)[0])))
        return x * 2

    return double


def cuda_device_of(x: torch.Tensor, seconds: float = 0.05) -> torch.Tensor:
    """[current CUDA device, the input's device index (-1 on the CPU), pid] (real GPUs only)."""
    time.sleep(seconds)  # long enough that every worker of the stage gets some of the items
    index = x.device.index if x.is_cuda else -1
    return torch.tensor([torch.cuda.current_device(), index, os.getpid()], dtype=torch.int64)


# -- what people naturally return (tests/test_stage_code.py) --------------------------------------
def mean_only(x: torch.Tensor):
    """A NumPy scalar on its own (``g.mean()``)."""
    return x.numpy().mean()


def scalars_in_dict(x: torch.Tensor) -> dict:
    """NumPy scalars, a Python int and a bool next to a tensor, in a dict."""
    g = x.numpy()
    return {"mean": g.mean(), "max": g.max(), "n": int(g.size), "positive": bool(g.sum() > 0), "x2": x * 2}


def scalars_in_tuple(x: torch.Tensor) -> tuple:
    return float(x[0]), x.numpy().astype("float64").sum(), True


def grow(x: torch.Tensor, times: int = 3) -> torch.Tensor:
    """A result ``times`` as large as its input."""
    return x.repeat(times)


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """A batched stage: one float32 sum per row."""
    return x.reshape(x.shape[0], -1).sum(-1).to(torch.float32)


# -- a cluster run (tests/test_cluster.py) ---------------------------------------------------------
def on_node(x: torch.Tensor) -> dict:
    """``x * 2`` and the Ray node id the worker runs on (``SHMBROKER_NODE_ID``, as bytes)."""
    import numpy as np

    node = np.frombuffer(os.environ.get("SHMBROKER_NODE_ID", "?").encode(), dtype=np.uint8).copy()
    return {"y": x * 2, "node": torch.from_numpy(node)}


def node_of(d: dict, seconds: float = 0.0) -> dict:
    """After ``on_node`` (batched or not): ``y + 1``, the first stage's node and this worker's."""
    import numpy as np

    time.sleep(seconds)
    node = torch.from_numpy(np.frombuffer(os.environ.get("SHMBROKER_NODE_ID", "?").encode(),
                                          dtype=np.uint8).copy())
    if d["y"].dim() == 2:  # a batch: one row per item
        node = node.expand(d["y"].shape[0], -1)
    return {"y": d["y"] + 1, "first": d["node"], "second": node}


def ray_loaded(x: torch.Tensor) -> torch.Tensor:
    """``x + 1`` if Ray is imported in this worker, else ``x``."""
    import sys

    return x + float("ray" in sys.modules)


def small_then_big(small: int = 2000, big: int = 60, big_elems: int = 1 << 18):
    """Many 128-byte items, then 2 MiB ones (float64)."""
    for i in range(small):
        yield torch.full((16,), float(i), dtype=torch.float64).numpy()
    for i in range(big):
        yield torch.full((big_elems,), float(i), dtype=torch.float64).numpy()
