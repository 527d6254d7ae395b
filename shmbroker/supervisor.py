"""Worker processes: how they start (fork server with torch preloaded), their restarts, their exit codes.

Workers are forked from a server process that has imported torch once
(``forkserver``), so they share its pages: about 50 MiB of PSS each instead
of about 170 MiB for a process that imports torch itself (``spawn``;
``benchmarks/memory.py``, benchmarks/NOTES.md), and they start in milliseconds. ``SHMBROKER_START_METHOD=spawn`` restores fully
independent interpreters. Processes that must answer like a worker would
(the CUDA device count, whether stage code imports: ``probe``) are forked
the same way, so the driver itself never imports torch.

Workers never need the user's ``__main__``: stages are found by
``module:function`` names. So their processes are started with preparation
data that names no main module (``_WorkerProcess``): ``multiprocessing``
would otherwise run the main script again in each child, and a script that
builds a ``Pipeline`` at top level without ``if __name__ == "__main__":``
would start pipelines from its workers (and ``python - < script.py`` has no
file to run at all). The launch code is CPython's own, with only
``get_preparation_data`` swapped. Should a future CPython launch differently,
the main module is run again as usual; a pipeline started while it runs
(``refuse_unguarded_main``) then stops the run at once with one message that
shows the guard.

A worker that exits is restarted with back-off; one that dies
``MAX_RESTARTS`` times within ``RESTART_WINDOW`` seconds fails the run. The
exit codes of workers that died are kept (the last ``KEPT_EXITS``), so the
broker's report of items whose workers died can name the code.
"""

from __future__ import annotations

import collections
import functools
import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.popen_forkserver
import multiprocessing.popen_spawn_posix
import multiprocessing.spawn
import os
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Any

from broker.errors import BrokerError, ConfigError
from workers.spec import StageSpec

__all__ = ["start_method", "worker_context", "process_class", "adopt_environment", "probe", "WorkerProc",
           "Supervisor", "describe_exit"]

log = logging.getLogger("shmbroker.supervisor")

MAX_RESTARTS = 5  # deaths of one worker within RESTART_WINDOW before the run fails
RESTART_WINDOW = 60.0
# shmbroker.forkserver_exit: the fork server removes its socket's directory when it ends
FORKSERVER_PRELOAD = ["torch", "workers.runtime", "workers.stages", "shmbroker.forkserver_exit"]
START_METHODS = ("forkserver", "spawn")
KEPT_EXITS = 1000
EXIT_UNGUARDED = 86  # a child that ran the main script, which started a pipeline
UNGUARDED = ("the main script was run again in a worker process and started a pipeline there; "
             "put the code that runs the pipeline under a guard:\n\n"
             "    if __name__ == \"__main__\":\n"
             "        with Pipeline.from_yaml(...) as p:\n"
             "            ...\n")


def start_method() -> str:
    """``SHMBROKER_START_METHOD``, ``forkserver`` by default; anything else is a ``ConfigError``."""
    method = os.environ.get("SHMBROKER_START_METHOD", "forkserver")
    if method not in START_METHODS:
        raise ConfigError(f"SHMBROKER_START_METHOD must be forkserver or spawn, not {method!r}")
    return method


def worker_context(method: str | None = None) -> Any:
    method = method or start_method()
    if method not in START_METHODS:
        raise ConfigError(f"SHMBROKER_START_METHOD must be forkserver or spawn, not {method!r}")
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        # Takes effect when this process's fork server starts (with its first worker). CUDA is
        # not initialised by importing torch, so forked workers may still use their GPU.
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    return ctx


def _preparation_without_main(name: str) -> dict[str, Any]:
    """``spawn.get_preparation_data`` without the main module: the child does not run it again."""
    data: dict[str, Any] = multiprocessing.spawn.get_preparation_data(name)
    data.pop("init_main_from_path", None)
    data.pop("init_main_from_name", None)
    return data


def _launch_without_main(popen: type) -> Any:
    """``popen._launch`` (CPython's code, any version) seeing a ``spawn`` module whose
    ``get_preparation_data`` names no main module; None if the code does not use it as expected."""
    launch = getattr(popen, "_launch")  # noqa: B009 (a private method mypy does not know)
    names = launch.__code__.co_names
    if "spawn" not in names or "get_preparation_data" not in names:
        return None
    spawn = types.SimpleNamespace(**{**vars(multiprocessing.spawn),
                                     "get_preparation_data": _preparation_without_main})
    return types.FunctionType(launch.__code__, {**launch.__globals__, "spawn": spawn}, launch.__name__,
                              launch.__defaults__, launch.__closure__)


def _popen_without_main(base: type) -> type:
    launch = _launch_without_main(base)
    if launch is None:  # an unknown CPython: the stock launch (a guard is then needed)
        log.debug("%s._launch has an unexpected form; the main module is prepared as usual", base)
        return base
    return type(f"{base.__name__}WithoutMain", (base,), {"_launch": launch})


class _ForkServerProcess(multiprocessing.context.ForkServerProcess):
    _popen = _popen_without_main(multiprocessing.popen_forkserver.Popen)

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return _ForkServerProcess._popen(process_obj)


class _SpawnProcess(multiprocessing.context.SpawnProcess):
    _popen = _popen_without_main(multiprocessing.popen_spawn_posix.Popen)

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return _SpawnProcess._popen(process_obj)


def refuse_unguarded_main() -> None:
    """In a child that is running the main script again (``multiprocessing`` preparing it),
    exit at once with ``EXIT_UNGUARDED``; the parent then says what to do."""
    if getattr(multiprocessing.process.current_process(), "_inheriting", False):
        os._exit(EXIT_UNGUARDED)


def process_class(method: str | None = None) -> type[multiprocessing.process.BaseProcess]:
    """The ``Process`` class for workers: ``method``'s, started without the main module."""
    method = method or start_method()
    worker_context(method)  # checks the name; sets the fork server's preload
    return _ForkServerProcess if method == "forkserver" else _SpawnProcess


def adopt_environment(env: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)


def describe_exit(code: int | None) -> str:
    """``-9`` -> ``'exit code -9 (SIGKILL: killed, often by the OOM killer)'``."""
    if code is None:
        return "exit code unknown (a worker this process did not start)"
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = ": killed, often by the OOM killer" if code == -9 else ""
        return f"exit code {code} ({name}{why})"
    return f"exit code {code}"


def _worker_entry(env: dict[str, str], *args: Any) -> None:
    """A worker process's target, importable without torch (the driver only pickles its name).

    A forked worker inherits the fork server's environment, taken when the server started;
    ``env`` is the driver's at the time of this spawn (as a spawned process would see it).
    """
    adopt_environment(env)
    from workers.runtime import worker_process

    worker_process(*args)


# -- asking a process like the workers ------------------------------------------------------------
StageCall = tuple[str, str, str]  # (module:function, "fn" or "factory", the args as JSON)


@functools.lru_cache(maxsize=8)
def probe(stages: tuple[StageCall, ...] = (), search_path: tuple[str, ...] = ()
          ) -> tuple[int, dict[int, tuple[str, str]]]:
    """What a worker would see: the CUDA device count, and what is wrong with each stage's code:
    ``{stage index: (key, why)}``, key ``fn``/``factory`` (it does not import) or ``args`` (the
    function does not accept them).

    A process that has not imported torch (a pipeline's driver) asks a process
    forked from the workers' fork server, which has torch loaded already: the
    driver then never pays torch's ~150 MiB itself.
    """
    refuse_unguarded_main()
    if "torch" not in sys.modules and start_method() == "forkserver":
        r, w = multiprocessing.Pipe(duplex=False)
        child = process_class("forkserver")(target=_report, args=(w, stages, search_path, dict(os.environ)),
                                            daemon=True)
        child.start()
        w.close()
        try:
            if r.poll(120):
                count, errors = r.recv()
                return int(count), dict(errors)
        except EOFError:
            pass
        finally:
            r.close()
            child.join(10)
        if child.exitcode == EXIT_UNGUARDED:
            raise ConfigError(UNGUARDED)
        log.warning("the worker probe process gave no answer; importing torch here")
    return _count_here(), _stage_errors(stages, search_path)


def _count_here() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _stage_errors(stages: tuple[StageCall, ...], search_path: tuple[str, ...]) -> dict[int, tuple[str, str]]:
    import json

    from workers.spec import call_error, resolve

    errors = {}
    for i, (target, kind, args) in enumerate(stages):
        try:
            fn = resolve(target, search_path)
        except (ImportError, AttributeError, TypeError) as e:
            errors[i] = (kind, f"cannot import {target!r}: {e}")
            continue
        why = call_error(fn, json.loads(args), factory=kind == "factory")
        if why:
            errors[i] = ("args", f"{target} does not accept them: {why}")
    return errors


def _report(conn: Any, stages: tuple[StageCall, ...], search_path: tuple[str, ...],
            env: dict[str, str]) -> None:
    adopt_environment(env)  # CUDA_VISIBLE_DEVICES and the like as the driver has them now
    conn.send((_count_here(), _stage_errors(stages, search_path)))
    conn.close()


# -- the workers of a run --------------------------------------------------------------------------
@dataclass(eq=False)
class WorkerProc:
    """One planned worker: a stage on a device, and the process that currently runs it."""

    spec: StageSpec
    name: str
    device: str
    proc: multiprocessing.process.BaseProcess | None = None
    restarts: int = 0
    restart_at: float = 0.0
    deaths: list[float] = field(default_factory=list)


class Supervisor:
    """Starts the planned workers, restarts the ones that exit, stops them all at the end."""

    def __init__(self, endpoint: str, workers: list[WorkerProc], log_level: str = "WARNING",
                 log_json: bool = False, curve: tuple[str, str] | None = None) -> None:
        self.endpoint = endpoint
        self.workers = workers
        self.log_level = log_level
        self.log_json = log_json
        self.curve = curve
        self.process = process_class()
        self.restarts: collections.Counter[str] = collections.Counter()
        self.exits: collections.OrderedDict[int, int] = collections.OrderedDict()  # pid -> code
        self.stopping = False

    def start(self) -> None:
        refuse_unguarded_main()
        for w in self.workers:
            self._spawn(w)

    def _spawn(self, w: WorkerProc) -> None:
        w.proc = self.process(
            target=_worker_entry, name=w.name, daemon=True,
            args=(dict(os.environ), self.endpoint, w.spec, w.device, self.log_level, self.log_json,
                  self.curve))
        w.proc.start()

    def supervise(self) -> None:
        """Restart workers that exited, with back-off; fail once one dies ``MAX_RESTARTS``
        times within ``RESTART_WINDOW`` seconds (a crash loop, not bad luck over hours)."""
        if self.stopping:  # workers that exit now were told to
            return
        now = time.monotonic()
        for w in self.workers:
            if w.proc is None or w.proc.exitcode is None:
                continue
            if w.restart_at == 0.0:
                code = w.proc.exitcode
                if code == EXIT_UNGUARDED:
                    raise ConfigError(UNGUARDED)
                self._record_exit(w)
                w.deaths = [t for t in w.deaths if now - t < RESTART_WINDOW] + [now]
                if len(w.deaths) > MAX_RESTARTS:
                    raise BrokerError(
                        f"worker {w.name} on {w.device} exited {len(w.deaths)} times within "
                        f"{RESTART_WINDOW:.0f} s, last with {describe_exit(code)}; giving up; "
                        f"see its log above")
                w.restart_at = now + min(0.1 * 2 ** (len(w.deaths) - 1), 5.0)
                log.warning("worker %s exited with %s; restarting", w.name, describe_exit(code))
                self.restarts[w.spec.name] += 1
            elif now >= w.restart_at:
                w.restarts += 1
                w.restart_at = 0.0
                self._spawn(w)

    def _record_exit(self, w: WorkerProc) -> None:
        assert w.proc is not None and w.proc.pid is not None and w.proc.exitcode is not None
        self.exits[w.proc.pid] = w.proc.exitcode
        if len(self.exits) > KEPT_EXITS:
            self.exits.popitem(last=False)

    def exit_code(self, pid: int, wait: float = 2.0) -> int | None:
        """The exit code of worker ``pid`` (waiting up to ``wait`` s for it to be reaped), or
        None if it is not one of ours."""
        if pid in self.exits:
            return self.exits[pid]
        for w in self.workers:
            if w.proc is not None and w.proc.pid == pid:
                w.proc.join(wait)
                return w.proc.exitcode
        return None

    def close(self) -> None:
        self.stopping = True
        started = [w.proc for w in self.workers if w.proc is not None and w.proc.pid is not None]
        for p in started:
            if p.exitcode is None:
                p.terminate()
        for p in started:
            p.join(5)
            if p.exitcode is None:
                p.kill()
                p.join()
