"""What a worker is told about its stage (``StageSpec``), and how stage code is found and imported.

The pipeline layer validates a YAML stage and hands its workers this plain
record; a worker needs nothing else of the config. Stage code is named
``module:function``; the module is imported from ``sys.path`` plus the
stage's ``search_path`` (the config file's directory and the working
directory of the run, in that order), so a ``mypkg/`` next to the config or
in the current directory is found without ``PYTHONPATH``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["StageSpec", "resolve", "add_search_path", "call_error"]


@dataclass(frozen=True)
class StageSpec:
    """One stage as its workers see it."""

    name: str
    index: int  # the stage's position; its outputs are reserved in stage index + 1
    fn: str | None = None  # module:function, called as fn(x, **args)
    factory: str | None = None  # module:function, called once per worker as factory(**args)
    args: dict[str, Any] = field(default_factory=dict)
    batch: int = 1
    dtype: str | None = None  # cast results to this dtype
    credits: int = 2
    threads: int | None = None  # torch.set_num_threads
    search_path: tuple[str, ...] = ()  # directories stage modules are looked for in, after sys.path
    next_batch: int = 1  # the next stage's batch: results are collated in blocks of this many rows
    next_name: str = ""  # the next stage's name ("" for the sink)
    pipeline: str = ""  # which pipeline (name@config hash): the broker refuses a worker of another
    on_error: str = "fail"  # what a failure does (with tasks in rings the workers decide it)
    retries: int = 2
    batch_timeout: float = 0.05  # with tasks in rings: how long a batch waits for more groups

    @property
    def target(self) -> str:
        return self.fn or self.factory or ""


def add_search_path(paths: tuple[str, ...] | list[str]) -> None:
    """Append ``paths`` to ``sys.path`` (each once), after what is there."""
    for p in paths:
        p = os.path.abspath(p)
        if p not in sys.path:
            sys.path.append(p)


def resolve(spec: str, search_path: tuple[str, ...] | list[str] = ()) -> Callable[..., Any]:
    """Import ``module:function``; a module that is not found names every place looked in."""
    add_search_path(search_path)
    module, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not module.startswith(e.name):
            raise  # a module the stage's own code imports is missing: its error says which
        looked = [p or os.getcwd() for p in sys.path]
        raise ModuleNotFoundError(
            f"no module named {e.name!r} (for {spec!r}); looked in: {', '.join(looked)}; put the "
            f"module next to the config file or in the working directory, or install it",
            name=e.name) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"module {module!r} has no attribute {part!r} (for {spec!r})") from None
    if not callable(obj):
        raise TypeError(f"{spec} is not callable")
    return obj


def call_error(fn: Callable[..., Any], args: dict[str, Any], *, factory: bool = False,
               leading: int = 1, how: str = "fn(x, **args)") -> str | None:
    """Why calling ``fn`` as a stage calls it would fail on its arguments, or None.

    A stage function is called ``fn(x, **args)`` (``leading`` positional values
    first; ``how`` says so in the message), a factory ``factory(**args)`` with
    ``device=`` if it takes one. Functions without a signature (some builtins)
    are not checked.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    if factory:
        leading, how = 0, "factory(**args)"
        if "device" in sig.parameters and "device" not in args:
            args = {**args, "device": "cpu"}  # the worker passes its device
    try:
        sig.bind(*([None] * leading), **args)
    except TypeError as e:
        return f"{e}; it is called as {how} and takes {sig}"
    return None
