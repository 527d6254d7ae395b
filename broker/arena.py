"""The shared-memory arena: one memfd region, its mapping, and the allocator inside it.

Nothing outside this module does offset arithmetic on the arena.

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

The allocator
-------------
A two-level segregated-fit allocator (TLSF, Masmano et al. 2004), chosen over
a buddy allocator because a buddy rounds every block up to a power of two
(a 17 MiB item would take 32 MiB of a bounded arena), and over a plain
free list because allocation and free are O(1) here: a bitmap of non-empty
bins finds the first bin that can hold a request in one integer operation,
and coalescing looks up both neighbours in two dictionaries.

* Sizes are multiples of ``GRANULE`` (64 bytes: cache-line and AVX-512
  alignment). Blocks of ``PAGE`` (4096) bytes or more start on a page.
* Bin ``i`` holds free blocks whose size lies in ``[lo(i), lo(i+1))``; 16
  sub-bins per power of two bound the waste of a "good fit" to 1/16.
* A request is rounded up to the next bin boundary, so any block of the first
  non-empty bin at or above it fits: no search inside a bin.
* Each bin pops its most recently freed block first, and a request first
  tries the newest block of its own bin, so a steady pipeline keeps reusing
  the same warm pages (the same offset for the same size).
* Every allocation at an offset bumps that offset's generation; handles carry
  it, so a handle to a freed or reused block is detected, never read.
"""

from __future__ import annotations

import mmap
import os
import secrets
import socket
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

GRANULE = 64
PAGE = 4096
_SL_LOG = 4  # 16 second-level bins per power of two
_SL = 1 << _SL_LOG

__all__ = [
    "GRANULE",
    "PAGE",
    "Allocator",
    "Block",
    "SharedRegion",
    "host_memory_limit",
    "check_capacity",
    "format_bytes",
    "send_fd",
    "recv_fd",
    "pack_fields",
    "field_views",
]


def format_bytes(n: int) -> str:
    """``1536 -> '1.5 KiB'``: sizes in messages users read."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _bin_floor(units: int) -> int:
    """Index of the bin a free block of ``units`` granules belongs to."""
    if units < _SL:
        return units
    fl = units.bit_length() - 1
    sl = (units >> (fl - _SL_LOG)) - _SL
    return (fl - _SL_LOG + 1) * _SL + sl


def _bin_ceil(units: int) -> int:
    """Index of the first bin whose every block holds ``units`` granules."""
    if units < _SL:
        return units
    fl = units.bit_length() - 1
    return _bin_floor(units + (1 << (fl - _SL_LOG)) - 1)


@dataclass(slots=True)
class Block:
    """An allocated block: where it is, how big, and its generation."""

    offset: int
    size: int
    generation: int


class Allocator:
    """TLSF-style allocator over ``[0, capacity)``; pure bookkeeping, no memory.

    ``alloc`` returns ``None`` when no free block is large enough right now
    (the caller decides whether to wait) and raises ``ValueError`` for a
    request larger than the whole capacity.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < PAGE:
            raise ValueError(f"arena capacity must be at least {PAGE} bytes, got {capacity}")
        self.capacity = capacity // PAGE * PAGE
        nbins = _bin_floor(self.capacity // GRANULE) + 1
        self._bins: list[dict[int, int]] = [{} for _ in range(nbins)]
        self._bitmap = 0
        self._free_start: dict[int, int] = {}  # offset -> size
        self._free_end: dict[int, int] = {}  # end -> offset
        self._used: dict[int, Block] = {}
        self._generation: dict[int, int] = {}
        self.used = 0
        self.peak = 0
        self._insert(0, self.capacity)

    # -- free-list primitives -------------------------------------------------
    def _insert(self, offset: int, size: int) -> None:
        i = _bin_floor(size // GRANULE)
        self._bins[i][offset] = size
        self._bitmap |= 1 << i
        self._free_start[offset] = size
        self._free_end[offset + size] = offset

    def _remove(self, offset: int, size: int) -> None:
        i = _bin_floor(size // GRANULE)
        b = self._bins[i]
        del b[offset]
        if not b:
            self._bitmap &= ~(1 << i)
        del self._free_start[offset]
        del self._free_end[offset + size]

    def _take(self, size: int) -> tuple[int, int] | None:
        """Remove and return a free block of at least ``size`` bytes.

        First the most recently freed block of the request's own bin, if it
        fits: a block freed between used neighbours comes back for the same
        size (a bin holds sizes on both sides of a request that is not on a
        bin boundary, so the search below starts one bin higher and alone
        would never find it). Then the first non-empty bin whose every block fits.
        """
        units = size // GRANULE
        own = self._bins[_bin_floor(units)]
        if own:
            offset = next(reversed(own))
            bsize = own[offset]
            if bsize >= size:
                self._remove(offset, bsize)
                return offset, bsize
        i = _bin_ceil(units)
        mask = self._bitmap >> i
        if not mask:
            return None
        i += (mask & -mask).bit_length() - 1
        offset, bsize = self._bins[i].popitem()
        if not self._bins[i]:
            self._bitmap &= ~(1 << i)
        del self._free_start[offset]
        del self._free_end[offset + bsize]
        return offset, bsize

    def _give_back(self, offset: int, size: int) -> None:
        """Return ``[offset, offset+size)`` to the free lists, merging neighbours."""
        right = self._free_start.get(offset + size)
        if right is not None:
            self._remove(offset + size, right)
            size += right
        left = self._free_end.get(offset)
        if left is not None:
            self._remove(left, offset - left)
            size += offset - left
            offset = left
        self._insert(offset, size)

    # -- public API -------------------------------------------------------------
    def alloc(self, nbytes: int) -> Block | None:
        """Allocate ``nbytes`` (0 allowed); ``None`` if it does not fit now."""
        size = max(GRANULE, _round_up(nbytes, GRANULE))
        if size > self.capacity:
            raise ValueError(
                f"{format_bytes(nbytes)} does not fit in an arena of "
                f"{format_bytes(self.capacity)}"
            )
        align = PAGE if size >= PAGE else GRANULE
        got = self._take(size)
        if got is not None and _round_up(got[0], align) + size > got[0] + got[1]:
            self._give_back(*got)  # fits but not once aligned: ask for room to align
            got = None
        if got is None and align > GRANULE and size + align - GRANULE <= self.capacity:
            got = self._take(size + align - GRANULE)
        if got is None:
            return None
        offset, bsize = got
        start = _round_up(offset, align)
        if start > offset:
            self._give_back(offset, start - offset)
        tail = offset + bsize - (start + size)
        if tail:
            self._give_back(start + size, tail)
        gen = self._generation.get(start, 0) + 1
        self._generation[start] = gen
        block = Block(start, size, gen)
        self._used[start] = block
        self.used += size
        self.peak = max(self.peak, self.used)
        return block

    def free(self, block: Block) -> None:
        """Free a block returned by ``alloc``; a stale or double free raises."""
        cur = self._used.get(block.offset)
        if cur is None or cur.generation != block.generation:
            raise KeyError(f"block at offset {block.offset} gen {block.generation} is not allocated")
        del self._used[block.offset]
        self.used -= cur.size
        self._give_back(cur.offset, cur.size)

    def is_live(self, offset: int, generation: int) -> bool:
        cur = self._used.get(offset)
        return cur is not None and cur.generation == generation

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used

    @property
    def largest_free(self) -> int:
        return max(self._free_start.values(), default=0)

    @property
    def blocks(self) -> int:
        return len(self._used)

    def check(self) -> None:
        """Verify the invariants (tests call this): tiling, coalescing, bins."""
        spans = sorted([(b.offset, b.size, "u") for b in self._used.values()] +
                       [(o, s, "f") for o, s in self._free_start.items()])
        pos, prev = 0, ""
        for off, size, kind in spans:
            assert off == pos, f"gap or overlap at {pos}: next span starts at {off}"
            assert not (kind == prev == "f"), f"uncoalesced free blocks at {off}"
            if kind == "u":
                assert off % (PAGE if size >= PAGE else GRANULE) == 0, f"misaligned {off}"
            pos, prev = off + size, kind
        assert pos == self.capacity, f"spans end at {pos}, capacity {self.capacity}"
        assert self.used == sum(b.size for b in self._used.values())
        for i, b in enumerate(self._bins):
            assert bool(b) == bool(self._bitmap >> i & 1), f"bitmap wrong at bin {i}"


# -- rows of several fields (a stage that returns a tuple or a dict) ------------------
def pack_fields(specs: list[tuple[Any, str, tuple[int, ...]]]) -> tuple[list[list[Any]], int]:
    """Lay out fields ``(key, dtype, shape)`` in one row of bytes, each on a 64-byte boundary.

    Returns ``(fields, rowbytes)`` with ``fields`` as ``[key, dtype, shape, offset]`` lists
    (what travels with the slot) and ``rowbytes`` a multiple of 64, so every field of every
    row of a batch stays aligned.
    """
    fields, offset = [], 0
    for key, dtype, shape in specs:
        nbytes = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
        fields.append([key, np.dtype(dtype).str, list(shape), offset])
        offset += _round_up(max(nbytes, 1), GRANULE)
    return fields, max(offset, GRANULE)


def field_views(rows: np.ndarray, fields: list[list[Any]]) -> list[np.ndarray]:
    """Each field of byte rows ``[..., rowbytes]`` as an array ``[..., *shape]``: views, no copy."""
    lead = rows.shape[:-1]
    out = []
    for _key, dtype, shape, offset in fields:
        dt = np.dtype(dtype)
        nbytes = dt.itemsize * int(np.prod(shape, dtype=np.int64))
        out.append(rows[..., offset: offset + nbytes].view(dt).reshape(tuple(lead) + tuple(shape)))
    return out


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
