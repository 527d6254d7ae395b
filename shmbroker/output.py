"""An npy sink's output directory: one run at a time, what the run is, resume and overwrite.

::

    out/
      000000.npy 000001.npz ...  results, each written atomically (io.py: a temporary file, os.replace)
      failures.jsonl             items a stage skipped, one JSON line each (``failures:`` may move it)
      shmbroker-run.json         the manifest: what the run is, and ``complete`` once it has finished
      .shmbroker.lock            ``flock``ed by the run writing here, for as long as it runs

A run starts only into an empty directory, unless it resumes (``--resume``:
the manifest must describe the same run) or overwrites (``--overwrite``:
this project's files there are removed first). The manifest is written
(atomically) when a run starts, with ``complete: false``, and again when it
ends: a directory whose manifest does not say ``complete: true`` holds a
partial output, whoever looks at it.

What identifies a run (``run_identity``): the parts of the config that decide
the results (the source, and each stage's name, ``fn``/``factory``, ``args``
and ``dtype``; not batch sizes, devices, replicas or broker settings, which a
resume may change) and the source's contents as far as they can be checked:
an ``npy`` source's sorted file list with sizes and modification times, a
``synthetic`` source's parameters; of a ``python`` source only its function's
name and arguments (what it yields cannot be checked, and a resume assumes it
yields the same items in the same order).

On resume, the items already settled are left out: those whose result file
is complete (its header and size check out; a file cut short by a power cut
is redone) and those ``failures.jsonl`` records as skipped.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from broker.errors import ConfigError

from .config import NpySink, NpySource, PipelineConfig, PythonSource, SyntheticSource
from .io import npy_files

__all__ = ["RunOutput", "run_identity", "identity_differences", "MANIFEST", "LOCK"]

log = logging.getLogger("shmbroker.output")

MANIFEST = "shmbroker-run.json"
LOCK = ".shmbroker.lock"
FORMAT = 1
LISTED = 2000  # source files listed in the manifest by name (beyond, only their count and hash)
RESULT = re.compile(r"^(\d+)\.(npy|npz)$")
TEMP = re.compile(r"^\..+\.\d+\.tmp$")
STAGE_KEYS = ("name", "fn", "factory", "args", "dtype")  # what of a stage decides its results
RESUME = "--resume (run(resume=True))"
OVERWRITE = "--overwrite (run(overwrite=True))"


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def describe_source(cfg: PipelineConfig) -> dict[str, Any]:
    """What can be checked of the source's contents (see the module's docstring)."""
    src = cfg.source
    if isinstance(src, NpySource):
        listing = []
        for f in npy_files(src.path):
            st = os.stat(f)
            listing.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
        out: dict[str, Any] = {"type": "npy", "path": src.path, "files": len(listing),
                               "listing_hash": _hash(listing)}
        if len(listing) <= LISTED:
            out["listing"] = listing
        return out
    if isinstance(src, SyntheticSource):
        return {"type": "synthetic", "parameters": src.model_dump()}
    assert isinstance(src, PythonSource)
    return {"type": "python", "fn": src.fn, "args": src.args,
            "checked": "the function's name and arguments only; a resume assumes it yields the same "
                       "items in the same order"}


def run_identity(cfg: PipelineConfig) -> dict[str, Any]:
    """The config that decides the results and the source's contents, each with its hash."""
    config = {"source": cfg.source.model_dump(),
              "stages": [{k: getattr(st, k) for k in STAGE_KEYS} for st in cfg.stages]}
    source = describe_source(cfg)
    source_hash = source.get("listing_hash") or _hash(source)
    identity = {"config": config, "config_hash": _hash(config), "source": source,
                "source_hash": source_hash}
    return dict(json.loads(json.dumps(identity, default=str)))  # as it reads back from the manifest


_MISSING = object()


def _diff(then: Any, now: Any, where: str) -> list[str]:
    if isinstance(then, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(then) | set(now), key=str):
            out += _diff(then.get(k, _MISSING), now.get(k, _MISSING), f"{where}.{k}" if where else str(k))
        return out
    if isinstance(then, list) and isinstance(now, list) and len(then) == len(now):
        return [d for i, (a, b) in enumerate(zip(then, now, strict=True)) for d in _diff(a, b, f"{where}[{i}]")]
    if then == now:
        return []
    shown = ["(absent)" if v is _MISSING else repr(v) for v in (then, now)]
    return [f"{where}: {shown[0]} then, {shown[1]} now"]


def _source_diff(then: dict[str, Any], now: dict[str, Any]) -> str:
    if then.get("type") != "npy" or now.get("type") != "npy":
        return "; ".join(_diff(then, now, "source")) or "the source differs"
    if then.get("files") != now.get("files"):
        return f"the source files differ: {then.get('files')} then, {now.get('files')} now ({now['path']})"
    if "listing" in then and "listing" in now:
        for (f0, s0, m0), (f1, s1, m1) in zip(then["listing"], now["listing"], strict=True):
            if f0 != f1:
                return f"the source files differ: {f0} then, {f1} now at the same position"
            if s0 != s1:
                return f"source file {f1} changed: {s0} bytes then, {s1} now"
            if m0 != m1:
                return f"source file {f1} was modified since"
    return f"the source files differ in sizes or modification times ({now['files']} files, {now['path']})"


def identity_differences(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between the run a manifest describes and ``now`` (``run_identity``)."""
    out = []
    if then.get("config_hash") != now["config_hash"]:
        out += [f"config {d}" for d in _diff(then.get("config"), now["config"], "")] or ["the config differs"]
    if then.get("source_hash") != now["source_hash"]:
        said = any(d.startswith("config source.") for d in out)  # a synthetic source's parameters
        if now["source"].get("type") == "npy" or not said:
            out.append(_source_diff(then.get("source") or {}, now["source"]))
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _complete(path: Path) -> bool:
    """Whether a result file is whole: an .npy's header and size agree, an .npz's directory reads."""
    try:
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as z:
                return bool(z.namelist())
        np.load(path, mmap_mode="r")  # reads the header and maps the data: a short file is refused
        return True
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False


class RunOutput:
    """The output directory of a run with an npy sink, held (locked) for that run.

    ``RunOutput.open`` takes the lock and decides how the run starts (fresh,
    resumed or overwritten) or refuses it; ``done`` holds the items a resume
    leaves out; ``begin``/``finish``/``stopped`` keep the manifest.
    """

    def __init__(self, directory: Path, failures: Path, identity: dict[str, Any], lock_fd: int) -> None:
        self.directory = directory
        self.failures = failures
        self.identity = identity
        self.lock_fd = lock_fd
        self.mode = "fresh"
        self.done: set[int] = set()
        self.manifest: dict[str, Any] = {}

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, cfg: PipelineConfig, *, resume: bool = False, overwrite: bool = False,
             failures: Path | None = None) -> RunOutput:
        """Lock the npy sink's directory and prepare it for a run; ``ConfigError`` if the run must
        not start (the directory is busy, not empty, or holds a different run)."""
        if resume and overwrite:
            raise ConfigError(f"{RESUME} and {OVERWRITE} exclude each other: continue a run, or start over")
        assert isinstance(cfg.sink, NpySink)
        directory = Path(cfg.sink.path)
        directory.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(directory)
        out = cls(directory, failures or directory / "failures.jsonl", run_identity(cfg), lock_fd)
        try:
            out._prepare(resume, overwrite)
        except BaseException:
            out.close()
            raise
        return out

    def _prepare(self, resume: bool, overwrite: bool) -> None:
        manifest = self._read_manifest()
        entries = sorted(p.name for p in self.directory.iterdir() if p.name != LOCK)
        if overwrite:
            self._clear()
            self.mode = "overwrite"
        elif resume and manifest is not None:
            diffs = identity_differences(manifest, self.identity)
            if diffs:
                raise ConfigError(f"cannot resume the run in {self.directory}: it was another run: "
                                  + "; ".join(diffs[:6]) + f". Resume with that run's config and "
                                  f"source, or start over with {OVERWRITE}")
            self.manifest = manifest
            self._remove_temporaries()
            self.done = self._complete_items() | self._settled_skips()
            self.mode = "resume"
        elif entries:
            raise ConfigError(self._not_empty(manifest, entries, resume))
        if self.mode != "resume" and self.failures.exists():
            self.failures.unlink()  # failures.jsonl belongs to one run

    def _not_empty(self, manifest: dict[str, Any] | None, entries: list[str], resume: bool) -> str:
        d = self.directory
        if manifest is None:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            what = "nothing to resume there: it" if resume else "it"
            return (f"{d} is not empty and {what} holds no {MANIFEST} ({len(entries)} entries: {shown}), "
                    f"so they are not the results of a run of this project; a run writes into an empty "
                    f"directory: choose another sink.path, or pass {OVERWRITE} to remove this "
                    f"project's files there (result files NNNNNN.npy/.npz, failures.jsonl)")
        results = sum(1 for e in entries if RESULT.match(e))
        if manifest.get("complete"):
            return (f"{d} holds the results of a finished run ({results} result files, finished "
                    f"{manifest.get('finished')}); pass {OVERWRITE} to replace them, or choose another "
                    f"sink.path")
        stopped = f", stopped: {manifest['stopped']}" if manifest.get("stopped") else ""
        return (f"{d} holds an unfinished run ({results} result files, started {manifest.get('started')}"
                f"{stopped}); pass {RESUME} to continue it, or {OVERWRITE} to start over")

    # -- the directory's contents ------------------------------------------------------------------
    def _read_manifest(self) -> dict[str, Any] | None:
        path = self.directory / MANIFEST
        try:
            value = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path} cannot be read ({e}); remove it, or start over with {OVERWRITE}") from None
        if not isinstance(value, dict) or value.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a manifest of this version (format {FORMAT}); start over "
                              f"with {OVERWRITE}")
        return value

    def _clear(self) -> None:
        """Remove what earlier runs of this project left: results, temporaries, manifest, failures."""
        for p in self.directory.iterdir():
            if RESULT.match(p.name) or TEMP.match(p.name) or p.name == MANIFEST:
                p.unlink()

    def _remove_temporaries(self) -> None:
        for p in self.directory.iterdir():
            if TEMP.match(p.name):
                p.unlink()

    def _complete_items(self) -> set[int]:
        done, partial = set(), []
        for p in self.directory.iterdir():
            m = RESULT.match(p.name)
            if m is None:
                continue
            if _complete(p):
                done.add(int(m.group(1)))
            else:
                partial.append(p.name)
        if partial:
            log.warning("%d result file(s) in %s are incomplete and are redone: %s", len(partial),
                        self.directory, ", ".join(sorted(partial)[:5]))
        return done

    def _settled_skips(self) -> set[int]:
        """Items the interrupted run recorded as skipped (a line cut short by a crash is ignored)."""
        out: set[int] = set()
        with contextlib.suppress(FileNotFoundError), open(self.failures) as f:
            for line in f:
                try:
                    out.update(int(i) for i in json.loads(line)["items"])
                except (ValueError, KeyError, TypeError):
                    continue
        return out

    # -- the manifest ------------------------------------------------------------------------------
    def begin(self, total: int | None) -> None:
        """The run starts: the manifest says what it is, and that it is not complete."""
        now = _now()
        previous = self.manifest
        self.manifest = {
            "format": FORMAT, "complete": False, "started": previous.get("started", now),
            "resumed": [*previous.get("resumed", []), now] if self.mode == "resume" else [],
            "finished": None, "stopped": None, "items": total, "written": None, "skipped": None,
            "pid": os.getpid(), "command": sys.argv, **self.identity}
        self._write()

    def finish(self, skipped: int) -> None:
        """Every item of the source is settled: the output is complete."""
        self.manifest.update(complete=True, finished=_now(), stopped=None, written=self._results(),
                             skipped=skipped)
        self._write()

    def stopped(self, reason: str) -> None:
        """The run ended before its source did: the manifest says why (``complete`` stays false)."""
        if not self.manifest:
            return
        self.manifest.update(stopped=reason[:2000], written=self._results(), updated=_now())
        with contextlib.suppress(OSError):
            self._write()

    def _results(self) -> int:
        return sum(1 for p in self.directory.iterdir() if RESULT.match(p.name))

    def _write(self) -> None:
        """Write the manifest atomically (a temporary file, fsync, rename, fsync of the directory)."""
        path = self.directory / MANIFEST
        tmp = self.directory / f".{MANIFEST}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Release the directory (the lock); the lock file stays."""
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def _lock(directory: Path) -> int:
    """Hold ``directory/.shmbroker.lock`` (``flock``; released when this process ends, however it
    ends); ``ConfigError`` naming the holder if another run has it."""
    path = directory / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(f"{directory} is being written by another run ({holder}); two runs must not "
                          f"share a sink: wait for it to end, or choose another sink.path") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)}\n".encode(), 0)
    return fd
