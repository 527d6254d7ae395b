"""``Broker``: a broker in a process of its own, started and stopped from Python. A context manager.

The process runs ``python -m broker.server``, which prints one JSON line
(its endpoint, pid, arena) when it is ready; ``Broker`` waits for that line,
and stops the process (SIGTERM, then SIGKILL after 10 s) on ``close`` or
when it is garbage collected. The broker also stops by itself when the
process that started it is gone (``--parent-pid``). It runs in a process
group of its own, so a Ctrl-C at the terminal interrupts the program that
started it, which then stops it in its own time (after its workers).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import weakref
from typing import Any, Sequence

import msgspec

from .errors import BrokerError
from .protocol import StageSettings

__all__ = ["Broker"]


class Broker:
    """Start a broker in its own process; stop it on exit. A context manager.

    ``endpoint`` is where clients connect (``Client(b.endpoint)``); by default
    an ipc socket in a fresh 0700 runtime directory.
    """

    def __init__(self, capacity: int = 256 * 2**20, *, endpoint: str | None = None,
                 stages: Sequence[StageSettings | dict[str, Any]] | None = None, max_inflight: int = 0,
                 wait_timeout: float = 60.0, log_level: str = "WARNING",
                 metrics_port: int | None = None, curve: dict[str, str] | None = None,
                 hwm: int = 10_000, startup_timeout: float = 60.0, pipeline: str = "",
                 rings: bool = False) -> None:
        """``stages``: run a pipeline of these stages (``StageSettings`` or maps of its fields),
        ``pipeline`` its id (clients that give another are refused), ``rings``: its tasks travel
        in queues in the arena (no broker message per task);
        ``wait_timeout``: seconds a request waits for arena space when it names no timeout."""
        cmd = [sys.executable, "-m", "broker.server", "--capacity", str(int(capacity)),
               "--log-level", log_level, "--parent-pid", str(os.getpid()),
               "--max-inflight", str(max_inflight), "--hwm", str(hwm),
               "--wait-timeout", str(wait_timeout)]
        if endpoint:
            cmd += ["--endpoint", endpoint]
        if pipeline:
            cmd += ["--pipeline", pipeline]
        if rings:
            cmd += ["--rings"]
        if stages:
            settings = [s if isinstance(s, StageSettings) else msgspec.convert(s, StageSettings)
                        for s in stages]
            cmd += ["--stages", msgspec.json.encode(settings).decode()]
        if metrics_port is not None:
            cmd += ["--metrics-port", str(metrics_port)]
        if curve:
            cmd += ["--curve-secret", curve["secret"], "--curve-authorized", curve["authorized"]]
        # A process group of its own: a Ctrl-C at the terminal reaches the program that started it
        # (which stops its clients first, then the broker), not the broker in the middle of a run.
        group: dict[str, Any] = {"process_group": 0} if sys.version_info >= (3, 11) else \
            {"preexec_fn": os.setpgrp}
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                              stdin=subprocess.DEVNULL, **group)
        self._finalizer = weakref.finalize(self, _stop_process, self.proc)
        try:
            self.info = self._wait_ready(startup_timeout)
        except BaseException:
            self.close()
            raise
        self.endpoint: str = self.info["endpoint"]
        self.pid: int = self.proc.pid

    def _wait_ready(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            code = self.proc.poll()
            why = f"exited with code {code}" if code is not None else f"not ready in {timeout} s"
            raise BrokerError(f"the broker process {why}; its log is on stderr above")
        info = json.loads(line)
        if "error" in info:
            raise BrokerError(f"the broker did not start: {info['error']}")
        return info

    def close(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after 10 s); it removes its runtime directory."""
        self._finalizer()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
