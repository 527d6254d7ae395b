"""Planning a run: which workers each stage gets on which device, and whether the stage code imports.

``plan_devices`` is pure (a stage and a CUDA device count in, one device
string per worker out), so it is tested with any count. ``check_imports``
and ``cuda_count`` ask a process like the workers (``supervisor.probe``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from broker.errors import ConfigError

from .config import NpySource, PipelineConfig, StageConfig
from .io import npy_files
from .supervisor import probe, start_method

__all__ = ["plan_devices", "cuda_count", "check_device", "check_imports", "source_warnings", "search_path"]


def cuda_count() -> int:
    """Number of usable CUDA devices (0 without CUDA or without a CUDA build of torch)."""
    return probe()[0]


def check_device(device: str, count: int) -> None:
    """A device named on the command line (``cuda:N``) that this host has; else ``ConfigError``."""
    if not device.startswith("cuda"):
        return
    if count == 0:
        raise ConfigError(f"--device {device}: this host has no CUDA device (torch.cuda.is_available() "
                          f"is False); use --device cpu, or run this worker on a GPU host")
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise ConfigError(f"--device {device} does not exist; this host has {count} CUDA device(s): "
                          f"cuda:0..cuda:{count - 1}")


def search_path(config_path: str | Path | None) -> tuple[str, ...]:
    """Where stage modules are looked for after ``sys.path``: the config file's directory, then
    the working directory."""
    dirs = [str(Path(config_path).resolve().parent)] if config_path else []
    cwd = str(Path.cwd())
    return tuple(dirs + [cwd] if cwd not in dirs else dirs)


def check_imports(cfg: PipelineConfig, path: str | Path | None) -> None:
    """Every stage, source and sink function imports where it will run and accepts the config's
    ``args``, and the start method is known; else ``ConfigError`` naming the file, the key and
    (for a module not found) where it was looked for."""
    start_method()
    where = search_path(path)
    calls = tuple((st.fn or st.factory or "", "fn" if st.fn else "factory",
                   json.dumps(st.args, sort_keys=True, default=str)) for st in cfg.stages)
    _count, errors = probe(calls, where)
    for i in sorted(errors):
        key, why = errors[i]
        raise ConfigError(f"{cfg.origin(f'stages[{i}].{key}', path)}: stages[{i}].{key}: {why}")
    from workers.spec import call_error, resolve

    for key, part, leading, how in (("source", cfg.source, 0, "fn(**args)"),
                                    ("sink", cfg.sink, 1, "fn(array, **args) or fn(array, index, **args)")):
        fn = getattr(part, "fn", None)
        if not fn:
            continue
        try:
            found = resolve(fn, where)
        except (ImportError, AttributeError, TypeError) as e:
            raise ConfigError(f"{cfg.origin(f'{key}.fn', path)}: {key}.fn: cannot import {fn!r}: {e}") from None
        args = getattr(part, "args", {})
        problem = call_error(found, args, leading=leading, how=how)
        if problem and key == "sink":  # a sink may take the item's index after the array
            problem = problem if call_error(found, args, leading=2, how=how) else None
        if problem:
            raise ConfigError(f"{cfg.origin(f'{key}.args', path)}: {key}.args: {fn} does not accept them: "
                              f"{problem}")


def source_warnings(cfg: PipelineConfig) -> list[str]:
    """What is not an error yet but will be when the run starts (a glob that matches nothing)."""
    src = cfg.source
    if isinstance(src, NpySource) and not npy_files(src.path):
        return [f"source.path {src.path!r} matches no files now (relative to {Path.cwd()}); "
                f"`run` fails unless they appear"]
    return []


def plan_devices(stage: StageConfig, count: int, require_gpu: bool = False,
                 warn: Any = None) -> list[str]:
    """One device string per worker process of ``stage``, given ``count`` CUDA devices.

    * ``device: cpu``: ``replicas`` processes on the CPU.
    * ``device: auto``: CUDA when there is one, else the CPU (no warning: that is what auto
      means), unless ``require_gpu``: then an error.
    * ``device: cuda`` / ``cuda:N``: on a host without CUDA, the CPU with one warning,
      unless ``require_gpu``; an index the host does not have is an error.
    * ``devices: all | [0, 2]`` picks the GPUs; ``replicas_per_device`` puts that many
      processes on each, else ``replicas`` processes go round-robin over them.
    """
    where = f"stages[{stage.name}]"
    if stage.device == "cpu":
        return ["cpu"] * _total(stage, 1)
    if count == 0:
        if require_gpu:  # device: auto too: --require-gpu means no stage but the CPU ones on the CPU
            raise ConfigError(f"{where}.device: {stage.device} would run on the CPU: this host has no "
                              f"CUDA device (torch.cuda.is_available() is False) and a GPU was required "
                              f"(--require-gpu)")
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

