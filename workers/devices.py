"""Device assignment (cpu / cuda:N / auto / devices lists), the CPU fallback, and pinning the arena for CUDA."""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any

from broker.config import StageConfig
from broker.errors import ConfigError

__all__ = ["cuda_count", "plan_devices", "pin_memory", "unpin_memory"]

log = logging.getLogger("shmbroker.devices")


def cuda_count() -> int:
    """Number of usable CUDA devices (0 without CUDA or without a CUDA build of torch)."""
    return probe()[0]


@functools.lru_cache(maxsize=8)
def probe(specs: tuple[str, ...] = ()) -> tuple[int, dict[str, str]]:
    """What a worker would see: the CUDA device count, and why each ``module:fn`` spec does not import.

    A process that has not imported torch (a pipeline's driver) asks a process
    forked from the workers' fork server, which has torch loaded already: the
    driver then never pays torch's ~150 MiB itself.
    """
    if "torch" not in sys.modules:
        from broker.launcher import START_METHOD, worker_context

        if START_METHOD == "forkserver":
            ctx = worker_context(START_METHOD)
            r, w = ctx.Pipe(duplex=False)
            child = ctx.Process(target=_report, args=(w, specs, dict(os.environ)), daemon=True)
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
            log.warning("the worker probe process gave no answer; importing torch here")
    return _count_here(), _import_errors(specs)


def _count_here() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _import_errors(specs: tuple[str, ...]) -> dict[str, str]:
    from broker.config import resolve

    errors = {}
    for spec in specs:
        try:
            resolve(spec)
        except (ImportError, AttributeError, TypeError) as e:
            errors[spec] = str(e)
    return errors


def _report(conn: Any, specs: tuple[str, ...], env: dict[str, str]) -> None:
    from broker.launcher import adopt_environment

    adopt_environment(env)  # CUDA_VISIBLE_DEVICES and the like as the driver has them now
    conn.send((_count_here(), _import_errors(specs)))
    conn.close()


def plan_devices(stage: StageConfig, count: int, require_gpu: bool = False,
                 warn: Any = None) -> list[str]:
    """One device string per worker process of ``stage``, given ``count`` CUDA devices.

    * ``device: cpu``: ``replicas`` processes on the CPU.
    * ``device: auto``: CUDA when there is one, else the CPU (no warning: that is what auto means).
    * ``device: cuda`` / ``cuda:N``: on a host without CUDA, the CPU with one warning,
      unless ``require_gpu``; an index the host does not have is an error.
    * ``devices: all | [0, 2]`` picks the GPUs; ``replicas_per_device`` puts that many
      processes on each, else ``replicas`` processes go round-robin over them.
    """
    where = f"stages[{stage.name}]"
    if stage.device == "cpu":
        return ["cpu"] * _total(stage, 1)
    if count == 0:
        if stage.device != "auto" and require_gpu:
            raise ConfigError(f"{where}.device: {stage.device} was required but this host has no "
                              f"CUDA device (torch.cuda.is_available() is False)")
        if stage.device != "auto" and warn is not None:
            warn(f"stage {stage.name!r} asks for {stage.device} but this host has no CUDA device; "
                 f"running it on the CPU (pass --require-gpu to fail instead)")
        return ["cpu"] * _total(stage, 1)
    gpus = _gpus(stage, count, where)
    if stage.replicas_per_device:
        return [f"cuda:{g}" for g in gpus for _ in range(stage.replicas_per_device)]
    return [f"cuda:{gpus[i % len(gpus)]}" for i in range(_total(stage, len(gpus)))]


def _total(stage: StageConfig, ndev: int) -> int:
    if stage.replicas_per_device:
        return stage.replicas_per_device * ndev
    return stage.replicas


def _gpus(stage: StageConfig, count: int, where: str) -> list[int]:
    if stage.device.startswith("cuda:"):
        idx = int(stage.device[5:])
        if stage.devices is not None:
            raise ConfigError(f"{where}: give either device: cuda:N or devices:, not both")
        if idx >= count:
            raise ConfigError(f"{where}.device: cuda:{idx} does not exist; this host has "
                              f"{count} CUDA device(s): cuda:0..cuda:{count - 1}")
        return [idx]
    if stage.devices is None or stage.devices == "all":
        return list(range(count))
    bad = [d for d in stage.devices if d >= count]
    if bad:
        raise ConfigError(f"{where}.devices: {bad} do not exist; this host has {count} CUDA device(s)")
    return list(stage.devices)


def pin_memory(buffer: Any) -> bool:
    """Register a host buffer (the arena) as page-locked with CUDA, once per GPU worker.

    With the arena pinned, ``tensor.to(device, non_blocking=True)`` is a real
    asynchronous DMA instead of a staged copy. Returns False where it cannot
    (no CUDA, or the locked-memory limit refused).
    """
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        return False
    arr = np.frombuffer(buffer, dtype=np.uint8)
    err = torch.cuda.cudart().cudaHostRegister(arr.ctypes.data, arr.nbytes, 0)
    ok = int(getattr(err, "value", err)) == 0
    if not ok:
        log.warning("could not pin the arena (%s); host-device copies will be staged; "
                    "check `ulimit -l`", err)
    return ok


def unpin_memory(buffer: Any) -> None:
    import numpy as np
    import torch

    arr = np.frombuffer(buffer, dtype=np.uint8)
    torch.cuda.cudart().cudaHostUnregister(arr.ctypes.data)
