"""Stage functions, factories and sources the benchmarks' pipelines import in their workers.

Importable as ``benchmarks._bench_stages`` (the benchmark scripts put the repo
root on ``sys.path``; spawned workers inherit it).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import numpy as np

FEATURES = 256  # the "model" is x.reshape(-1, FEATURES) @ W
OUT_FEATURES = 64


# -- sources ---------------------------------------------------------------------------
_POOLS: dict[tuple[int, int], list[np.ndarray]] = {}


def pool(rows: int, k: int = 4, seed: int = 0) -> list[np.ndarray]:
    """``k`` distinct float32 ``[rows, FEATURES]`` arrays, made once per process.

    Both the shmbroker source and the DataLoader dataset hand these out
    (item ``i`` is ``pool[i % k]``), so neither pays for generating data in
    the timed loop and both start from an identical, already-resident array.
    """
    key = (rows, seed)
    if key not in _POOLS:
        rng = np.random.default_rng(seed)
        _POOLS[key] = [rng.standard_normal((rows, FEATURES), dtype=np.float32) * 3 + 1 for _ in range(k)]
    return _POOLS[key]


def pool_source(count: int, rows: int, seed: int = 0) -> Iterator[np.ndarray]:
    """A ``type: python`` source: ``count`` items, ``pool(rows)[i % 4]`` (no copy here)."""
    items = pool(rows, seed=seed)
    for i in range(count):
        yield items[i % len(items)]


def tiny_source(count: int, n: int = 16) -> Iterator[np.ndarray]:
    a = np.arange(n, dtype=np.float32)
    for _ in range(count):
        yield a


# -- stages ----------------------------------------------------------------------------
def model_factory(features: int = FEATURES, out: int = OUT_FEATURES, seed: int = 0,
                  device: str = "cpu") -> Callable[[Any], Any]:
    """The CPU "model": ``x.reshape(-1, features) @ W`` with a fixed seeded ``W``.

    A batch ``[B, rows, features]`` gives ``[B, rows, out]`` (one row of output per item).
    With ``out=`` (the pipeline's output slot) the result is written there.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(features, out, generator=g, dtype=torch.float32).to(device) / features ** 0.5

    def model(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is not None:  # the pipeline's output slot: compute straight into it
            torch.matmul(x.reshape(-1, features), w, out=out.view(-1, w.shape[1]))
            return out
        y = x.reshape(-1, features) @ w
        return y.reshape(*x.shape[:-1], w.shape[1])

    return model


def row_normalize(x: Any) -> Any:
    """Each row to mean 0, standard deviation 1 (an item or a batch of them alike)."""
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-6)


def busy_factory(iters: int, n: int = 128, seed: int = 0) -> Callable[[Any], Any]:
    """A CPU-bound stage: ``iters`` matmuls of ``[n, n] @ [n, n]`` per item, returns the item."""
    import torch

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g) / n ** 0.5

    def busy(x: torch.Tensor) -> torch.Tensor:
        y = a
        for _ in range(iters):
            y = torch.tanh(y @ b)
        return x + y[0, : x.shape[-1]] * 0  # depends on the work; same shape as x

    return busy


def busy_seconds_per_item(iters: int, n: int = 128, reps: int = 30) -> float:
    """Median seconds of one ``busy`` call in this process (set torch threads first)."""
    import torch

    fn = busy_factory(iters, n)
    x = torch.zeros(16)
    fn(x)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


# -- the same pipeline wired by hand on handle queues (benchmarks/pipeline.py, system "queues") --
def queue_stage(endpoint: str, qin: str, qout: str, maxsize: int, stage: str) -> None:
    """A process of the hand-wired pipeline: take groups from ``qin``, run ``stage`` on each, put
    the result into ``qout``; stop at an empty group. ``preprocess``: ``normalize`` each row into
    a block of its own (``out=``); ``model``: the model on the group as a batch of BATCH rows, its
    result copied into the arena by ``put``."""
    import torch

    from broker import Client
    from workers.stages import normalize

    torch.set_num_threads(1)
    model = model_factory() if stage == "model" else None
    with Client(endpoint, role="worker") as c:
        src, dst = c.queue(qin, maxsize=maxsize), c.queue(qout, maxsize=maxsize)
        while True:
            h = src.get()
            if h.shape[0] == 0:
                c.release(h)
                return
            x = c.tensor(h)
            with torch.inference_mode():
                if model is not None:
                    result: Any = model(x).numpy()
                else:
                    result, out = c.alloc(h.shape, "float32")
                    o = torch.from_numpy(out)
                    for i in range(x.shape[0]):
                        normalize(x[i], out=o[i])
            c.release(h)
            dst.put(result)
