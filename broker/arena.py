"""The shared-memory arena: one memfd region, its mapping, descriptor passing, the host's memory limit.

Why memfd and not ``/dev/shm``
------------------------------
The broker creates the region with ``os.memfd_create`` and hands the descriptor
to each client once over a Unix socket (SCM_RIGHTS, see ``send_fd``/``recv_fd``).
The region has no name in any file system, so

* the kernel frees it when the last process holding the descriptor or a
  mapping exits: no crash (``kill -9`` of anyone) can leak a segment;
* Docker's 64 MiB ``/dev/shm`` default does not apply (no ``--shm-size``);
* only processes the broker handed the descriptor to can map it.

The memfd is named ``shmbroker-<pid>-<token>`` so it shows in
``/proc/PID/fd`` and ``/proc/PID/maps`` and a leak can be traced to its owner.
Where blocks lie inside it is the allocator's business (``allocator.py``);
a handle's ``offset`` and ``nbytes`` come from the broker's table, and
``Client.view`` checks them against the region before it maps anything.
"""

from __future__ import annotations

import mmap
import os
import secrets
import socket
import weakref

from .errors import format_bytes

__all__ = ["SharedRegion", "host_memory_limit", "check_capacity", "send_fd", "recv_fd"]


# -- host limits -----------------------------------------------------------------
def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def host_memory_limit() -> tuple[int, str]:
    """The memory this process may use: min of MemAvailable and the cgroup limit.

    Returns ``(bytes, where)`` with ``where`` naming the limit that binds.
    """
    avail, where = None, "MemAvailable in /proc/meminfo"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        where = "physical memory"
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        limit = _read_int(path)
        if limit is not None and limit < avail:
            usage = _read_int(path.replace("memory.max", "memory.current")
                              .replace("limit_in_bytes", "usage_in_bytes")) or 0
            avail, where = max(0, limit - usage), f"the container's memory limit ({path})"
    return avail, where


def check_capacity(capacity: int) -> None:
    """Refuse a capacity the host or the container cannot hold, naming both sizes."""
    limit, where = host_memory_limit()
    if capacity > limit:
        raise MemoryError(
            f"arena capacity {format_bytes(capacity)} is more than the "
            f"{format_bytes(limit)} available to this process ({where}); "
            f"lower broker.capacity or raise the limit"
        )


# -- the region ------------------------------------------------------------------
class SharedRegion:
    """A memfd-backed region mapped into this process. A context manager.

    ``create`` makes a new region (the broker); ``attach`` maps a descriptor
    received from the broker (clients). Views made with ``buffer`` stay
    valid as long as they exist: ``close`` unmaps only when none remain.
    """

    def __init__(self, fd: int, capacity: int, name: str, owner: bool) -> None:
        self.fd = fd
        self.capacity = capacity
        self.name = name
        self.owner = owner
        self.mmap = mmap.mmap(fd, capacity, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.buffer = memoryview(self.mmap)
        # the safety net: a region dropped without close() must not keep the memfd open
        self._close_fd = weakref.finalize(self, os.close, fd)

    @classmethod
    def create(cls, capacity: int, token: str | None = None) -> SharedRegion:
        token = token or secrets.token_hex(4)
        name = f"shmbroker-{os.getpid()}-{token}"
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, capacity)
            # Take the memory now: the arena's pages are charged to the broker (and its
            # container's limit) at start, and a later write can never SIGBUS for want of one.
            os.posix_fallocate(fd, 0, capacity)
            return cls(fd, capacity, name, owner=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, name: str = "") -> SharedRegion:
        capacity = os.fstat(fd).st_size
        return cls(fd, capacity, name, owner=False)

    def close(self) -> None:
        if self.fd < 0:
            return
        self.buffer.release()
        try:
            self.mmap.close()
        except BufferError:
            pass  # live views remain; the mapping goes with the last of them
        self._close_fd()
        self.fd = -1

    def __enter__(self) -> SharedRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def send_fd(sock: socket.socket, fd: int, message: bytes) -> None:
    """Send ``fd`` with ``message`` over a Unix socket (SCM_RIGHTS)."""
    socket.send_fds(sock, [message], [fd])


def recv_fd(sock: socket.socket, maxlen: int = 4096) -> tuple[bytes, int]:
    """Receive one descriptor and its message from a Unix socket."""
    msg, fds, _flags, _addr = socket.recv_fds(sock, maxlen, 1)
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ConnectionError(f"expected one descriptor from the broker, got {len(fds)}")
    return msg, fds[0]
