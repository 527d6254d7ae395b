"""Sources and sinks of a pipeline file: synthetic arrays, .npy files, Python generators and callables.

A source yields ``(index, array)``; the index is the item's identity
through the run (the sink de-duplicates by it). The npy sink writes
``out/000000.npy`` ... atomically (a temporary file, then ``os.replace``),
one ``.npz`` per item for a tuple/dict result.
"""

from __future__ import annotations

import glob
import inspect
import os
from pathlib import Path
from typing import Any, Callable, Container, Iterator

import numpy as np

from broker.errors import ConfigError
from workers.spec import resolve

from .config import NpySink, NpySource, PipelineConfig, PythonSink, PythonSource, SyntheticSource

__all__ = ["source_items", "make_sink"]


def npy_files(pattern: str) -> list[str]:
    """An npy source's files: the glob's matches, sorted (an item's index is its position)."""
    return sorted(glob.glob(pattern))


def source_items(cfg: PipelineConfig, skip: Container[int] = (), where: tuple[str, ...] = ()
                 ) -> tuple[Iterator[tuple[int, np.ndarray]], int | None]:
    """The items of the config's source as ``(index, array)``, and their count if known.

    Items in ``skip`` (settled by an earlier run) are left out: an npy file is then not
    opened; a synthetic or python source still makes them, so the items after keep their
    values and indices. ``where``: directories a python source's module is looked for in.
    """
    src = cfg.source
    if isinstance(src, SyntheticSource):
        def synthetic() -> Iterator[tuple[int, np.ndarray]]:
            rng = np.random.default_rng(src.seed)
            dt = np.dtype(src.dtype)
            for i in range(src.count):
                if dt.kind == "f":
                    item = rng.standard_normal(src.shape).astype(dt, copy=False)
                else:
                    item = rng.integers(0, 100, src.shape).astype(dt)
                if i not in skip:
                    yield i, item
        return synthetic(), src.count
    if isinstance(src, NpySource):
        files = npy_files(src.path)
        if not files:
            raise ConfigError(f"source.path {src.path!r} matches no files (relative to {os.getcwd()})")
        return ((i, np.load(f, mmap_mode="r")) for i, f in enumerate(files) if i not in skip), len(files)
    assert isinstance(src, PythonSource)
    gen = resolve(src.fn, where)(**src.args)
    return ((i, np.asarray(a)) for i, a in enumerate(gen) if i not in skip), None


def make_sink(cfg: PipelineConfig, total: int | None, where: tuple[str, ...] = ()
              ) -> Callable[[int, np.ndarray], None]:
    sink = cfg.sink
    if isinstance(sink, NpySink):
        out = Path(sink.path)
        out.mkdir(parents=True, exist_ok=True)
        digits = max(6, len(str(max(0, (total or 1) - 1))))

        def write_npy(idx: int, arr: Any) -> None:
            fields = not isinstance(arr, np.ndarray)  # a tuple or dict result: one .npz per item
            final = out / f"{idx:0{digits}d}.{'npz' if fields else 'npy'}"
            tmp = out / f".{final.name}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                if isinstance(arr, dict):
                    np.savez(f, **arr)
                elif fields:
                    np.savez(f, *arr)
                else:
                    np.save(f, arr)
            os.replace(tmp, final)  # atomic: a reader never sees half a file

        return write_npy
    if isinstance(sink, PythonSink):
        fn = resolve(sink.fn, where)
        takes_index = len(inspect.signature(fn).parameters) - len(sink.args) >= 2
        if takes_index:
            return lambda i, a: fn(a, i, **sink.args)
        return lambda i, a: fn(a, **sink.args)
    return lambda i, a: None


