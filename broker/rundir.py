"""Runtime directories: one 0700 directory per broker for its sockets, a lock that proves it alive, cleanup."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["base_dir", "RunDir", "Entry", "list_rundirs", "cleanup"]

LOCK = "lock"
INFO = "broker.json"


def base_dir() -> Path:
    """``$SHMBROKER_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/shmbroker``, else ``/tmp/shmbroker-<uid>``."""
    env = os.environ.get("SHMBROKER_RUNTIME_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "shmbroker"
    return Path(f"/tmp/shmbroker-{os.getuid()}")


def _private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700, or check an existing one is ours and private."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(f"{path} is not a directory owned by uid {os.getuid()}; remove it")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


class RunDir:
    """A broker's runtime directory, held locked (``flock``) for the broker's life.

    The kernel drops the lock when the broker dies, however it dies, so
    ``cleanup`` can tell a dead broker's directory from a live one without
    trusting pids (which are reused).
    """

    def __init__(self, base: Path | None = None) -> None:
        base = base or base_dir()
        _private_dir(base)
        self.token = secrets.token_hex(4)
        self.path = base / f"{os.getpid()}-{self.token}"
        self.path.mkdir(mode=0o700)
        os.chmod(self.path, 0o700)
        self._lock_fd = os.open(self.path / LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def file(self, name: str) -> str:
        return str(self.path / name)

    def write_info(self, info: dict[str, Any]) -> None:
        tmp = self.path / (INFO + ".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.path / INFO)

    def remove(self) -> None:
        if self._lock_fd >= 0:
            shutil.rmtree(self.path, ignore_errors=True)
            os.close(self._lock_fd)
            self._lock_fd = -1


@dataclass
class Entry:
    path: Path
    info: dict[str, Any]
    live: bool


def _is_live(path: Path) -> bool:
    try:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:  # a broker between mkdir and flock looks like this too
        try:
            return time.time() - path.stat().st_mtime < 10
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def list_rundirs(base: Path | None = None) -> list[Entry]:
    base = base or base_dir()
    out = []
    for path in sorted(base.glob("*-*")) if base.is_dir() else []:
        try:
            info = json.loads((path / INFO).read_text())
        except (OSError, ValueError):
            info = {}
        out.append(Entry(path, info, _is_live(path)))
    return out


def cleanup(base: Path | None = None, dry_run: bool = False) -> list[Entry]:
    """Remove the runtime directories of brokers that are gone; never a live one's."""
    removed = []
    for entry in list_rundirs(base):
        if entry.live:
            continue
        if not dry_run:
            shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry)
    return removed
