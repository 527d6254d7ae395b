"""References in shared memory: block headers, one hold table per client, and the rule for reusing a block.

Reading, passing and releasing an array cost no message to the broker. The
arena starts with a control region the broker lays out; every block has a
64-byte header just before its data::

    arena:  [control region][hdr|block data][hdr|block data] ...
    control: header | client slots (pid, state, high-water mark, epoch, large pool bytes) | hold tables |
             queue registry
    hdr:     generation (8 bytes; 0 while the block is retired or free) | owner | ...

A client that wants to read a block someone else owns takes a *hold*: it
writes the block's data offset into a free entry of its own hold table (only
it writes there), then reads the block's generation from the header; if it
is not the handle's generation the block was released and maybe reused, so
the entry is cleared and the handle is stale. Releasing a hold is clearing
the entry. Nothing is sent.

Whoever owns a block (a client for the blocks of its pool, the broker for
the rest) reuses it only after this, for a batch of blocks at once:

1. skip the blocks some hold table entry or queue slot names (they stay
   alive, and gettable, as long as anyone holds them);
2. write generation 0 into the header of the others: new holds fail;
3. a heavy memory barrier (``membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED)``:
   every CPU running a process of ours executes a full barrier);
4. scan again: a block now named was taken by a reader that validated before
   step 2 became visible; it stays retired (generation 0) until that hold is
   gone. The others may be reused.

Memory ordering: a reader's hold is a plain aligned 8-byte store followed by a
plain 8-byte load of the generation; the owner's retire is a store of the
generation followed by loads of the tables. Either order can be reordered by
the CPU (x86-64 lets a load pass an earlier store; ARMv8 more), which is what
step 3 is for: it is the asymmetric fence of hazard pointers (folly's
``asymmetric_heavy_barrier``). Readers register once
(``MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED``); the barrier costs about 1 µs on
the 2-core reference machine and is paid once per batch. Aligned 8-byte
stores and loads are single-copy atomic on x86-64 and ARMv8, so a scanner
never sees half an offset. Where ``membarrier`` is unavailable (an old
kernel, a seccomp profile that blocks it), holds are not used: a client then
takes and drops leases by message, as before.

A client that dies has its table cleared by the broker (its holds vanish);
its pool blocks become the broker's and are retired by the same rule.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass

import numpy as np

__all__ = ["HEADER", "Layout", "ControlRegion", "Holds", "fence_available", "heavy_fence",
           "register_reader", "GEN_BITS"]

log = logging.getLogger("shmbroker.holds")

HEADER = 64  # bytes of every block's header, just before its data
GEN_BITS = 24  # low bits of a generation count reuses of a block within one allocation
MAGIC = int.from_bytes(b"SHMHOLD1", "little")

_SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283}.get(os.uname().machine)
_CMD_GLOBAL_EXPEDITED = 1 << 1
_CMD_REGISTER_GLOBAL_EXPEDITED = 1 << 2
_libc = ctypes.CDLL(None, use_errno=True)
_fence_ok: bool | None = None


def _membarrier(cmd: int) -> int:
    if _SYS_MEMBARRIER is None:
        return -1
    return int(_libc.syscall(_SYS_MEMBARRIER, cmd, 0, 0))


def fence_available() -> bool:
    """Whether this kernel offers the expedited global membarrier (checked once per process)."""
    global _fence_ok
    if _fence_ok is None:
        supported = _membarrier(0)  # MEMBARRIER_CMD_QUERY
        _fence_ok = supported >= 0 and bool(supported & _CMD_GLOBAL_EXPEDITED) and \
            os.environ.get("SHMBROKER_HOLDS", "1") != "0"
    return _fence_ok


def register_reader() -> bool:
    """Let the heavy barrier reach this process's CPUs; False if it cannot."""
    return fence_available() and _membarrier(_CMD_REGISTER_GLOBAL_EXPEDITED) == 0


def heavy_fence() -> None:
    """A full memory barrier on every CPU that runs a registered process (step 3 above)."""
    if _membarrier(_CMD_GLOBAL_EXPEDITED) != 0:
        raise OSError(ctypes.get_errno(), "membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED) failed")


@dataclass(frozen=True)
class Layout:
    """Where the parts of the control region lie (byte offsets into the arena)."""

    slots: int  # client slots
    holds: int  # hold entries per slot
    queues: int  # queue registry entries
    slots_at: int
    tables_at: int
    queues_at: int
    size: int  # of the whole control region

    @classmethod
    def for_capacity(cls, capacity: int) -> Layout:
        big = capacity >= 64 << 20
        slots, holds, queues = (64, 1024, 64) if big else (32, 256, 16)
        slots_at = 4096
        tables_at = slots_at + slots * 64
        queues_at = tables_at + slots * holds * 8
        size = -(-(queues_at + queues * 64) // 4096) * 4096
        return cls(slots, holds, queues, slots_at, tables_at, queues_at, size)


class ControlRegion:
    """Typed views of the control region and the block headers, over one mapping of the arena."""

    def __init__(self, buffer: memoryview | bytearray, layout: Layout) -> None:
        self.layout = layout
        self.words = np.frombuffer(buffer, dtype="<u8")  # the whole arena, 8 bytes a word
        lo = layout
        self.slots = self.words[lo.slots_at // 8: lo.tables_at // 8].reshape(lo.slots, 8)
        self.tables = self.words[lo.tables_at // 8: lo.queues_at // 8].reshape(lo.slots, lo.holds)
        self.queues = self.words[lo.queues_at // 8: lo.queues_at // 8 + lo.queues * 8].reshape(lo.queues, 8)

    def init(self) -> None:
        """Lay the region out (the broker, once, on a fresh arena)."""
        self.words[: self.layout.size // 8] = 0
        self.words[0:4] = [MAGIC, self.layout.slots, self.layout.holds, self.layout.queues]

    # -- block headers -------------------------------------------------------------------------
    def generation(self, base: int) -> int:
        return int(self.words[(base - HEADER) >> 3])

    def set_generation(self, base: int, gen: int) -> None:
        self.words[(base - HEADER) >> 3] = gen

    # -- slots (the broker writes these) -------------------------------------------------------
    def open_slot(self, pid: int) -> int | None:
        """A free client slot, its table cleared; None if all are taken."""
        free = np.flatnonzero(self.slots[:, 1] == 0)
        if not len(free):
            return None
        s = int(free[0])
        self.tables[s] = 0
        self.slots[s, 3] = int(self.slots[s, 3]) + 1  # its epoch: who held this slot before is told apart
        self.slots[s, 4] = 0
        self.slots[s, 0], self.slots[s, 2], self.slots[s, 1] = pid, 0, 1
        return s

    def epoch(self, s: int) -> int:
        return int(self.slots[s, 3])

    # -- what the clients' pools own above 1 MiB (each writes its own, everyone reads the sum) --
    def set_pooled_large(self, s: int, nbytes: int) -> None:
        self.slots[s, 4] = nbytes

    def pooled_large(self) -> int:
        return int(self.slots[:, 4].sum())

    def close_slot(self, s: int) -> None:
        """A client is gone: its holds vanish (then its slot may be reused)."""
        self.slots[s, 1] = 0
        self.tables[s] = 0
        self.slots[s, 2] = self.slots[s, 4] = 0

    # -- queues (the broker registers, everyone scans) -----------------------------------------
    def register_queue(self, offset: int, capacity: int, slot_words: int) -> int:
        """A queue's block at ``offset``: ``capacity`` slots of ``slot_words`` words (the ring's,
        then its pending entries') whose first words may name blocks."""
        free = np.flatnonzero(self.queues[:, 0] == 0)
        if not len(free):
            raise MemoryError(f"all {self.layout.queues} queues of this arena are in use")
        q = int(free[0])
        self.queues[q, 1:3] = [capacity, slot_words]
        self.queues[q, 0] = offset
        return q

    # -- scanning -------------------------------------------------------------------------------
    def named(self, bases: np.ndarray) -> np.ndarray:
        """For each block data offset in ``bases``: does a hold or a queue slot name it?"""
        if len(bases) <= 4:  # the common case: a few blocks; np.isin sorts, this only compares
            parts = self._parts()
            return np.array([any((p == b).any() for p in parts) for b in bases.tolist()], dtype=bool)
        words = self.naming_words()
        if not len(words):
            return np.zeros(len(bases), dtype=bool)
        return np.isin(bases, words)

    def names(self, base: int) -> bool:
        """``named`` of one block."""
        return any((p == base).any() for p in self._parts())

    def _parts(self) -> list[np.ndarray]:
        """Views of every word that may name a block: the used part of each hold table, each
        queue's slots. Each comparison reads a part once, so views will do (an aligned 8-byte
        word is never read half-written; the fence and the second scan of ``retire`` cover what
        changes meanwhile)."""
        tables, parts = self.tables, []
        hwms = self.slots[:, 2]
        for s in np.flatnonzero(hwms).tolist():  # the clients that hold something (a few)
            parts.append(tables[s, :int(hwms[s])])
        queues = self.queues
        for q in np.flatnonzero(queues[:, 0]).tolist():
            offset, capacity, slot_words = queues[q, :3].tolist()
            first = offset // 8 + QUEUE_HEADER_WORDS
            parts.append(self.words[first: first + capacity * slot_words: slot_words])
        return parts

    def naming_words(self) -> np.ndarray:
        """The words of ``_parts``, copied out of the shared tables: np.isin reads its input more
        than once (its min and max bound a lookup table), so it must not change meanwhile."""
        parts = self._parts()
        if not parts:
            return _NO_WORDS
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)

    def retire_one(self, base: int) -> bool:
        """``retire`` of one block without the arrays: whether it may be reused now."""
        if self.names(base):
            return False  # named: skipped, generation kept
        self.words[(base - HEADER) >> 3] = 0
        heavy_fence()
        return not self.names(base)

    def retire(self, bases: np.ndarray) -> np.ndarray:
        """The four steps above for a batch of released blocks (their data offsets); returns
        a mask of those that may be reused now. The others are either still named (skipped:
        generation kept) or retired while a reader holds them (generation 0)."""
        if not len(bases):
            return np.zeros(0, dtype=bool)
        idle = ~self.named(bases)
        if not idle.any():
            return idle
        self.words[(bases[idle] - HEADER) >> 3] = 0
        heavy_fence()
        late = self.named(bases[idle])
        free = idle.copy()
        free[np.flatnonzero(idle)[late]] = False
        return free


QUEUE_HEADER_WORDS = 32  # a queue block's header (queue.py), before its slots
_NO_WORDS = np.zeros(0, dtype=np.uint64)
_NO_WORDS.flags.writeable = False


class Holds:
    """One client's hold table: take a hold on a block, check it, drop it. Only this client writes it."""

    def __init__(self, region: ControlRegion, slot: int) -> None:
        self.region = region
        self.slot = slot
        # memoryviews, not NumPy arrays: an item of one is a plain int (no scalar object to make)
        self.words = region.words.data.cast("B").cast("Q")
        lo = region.layout
        first = lo.tables_at // 8 + slot * lo.holds
        self.table = self.words[first: first + lo.holds]
        self.hwm_at = lo.slots_at // 8 + slot * 8 + 2
        self.free = list(range(lo.holds - 1, -1, -1))  # lowest index last: popped first
        self.hwm = 0

    def take(self, base: int, gen: int) -> int | None:
        """Hold the block at ``base`` if it still has generation ``gen``: the entry's index,
        or -1 if the block was released (stale); None if this table is full."""
        if not self.free:
            return None
        i = self.free.pop()
        if i >= self.hwm:
            self.hwm = i + 1
            self.words[self.hwm_at] = self.hwm
        self.table[i] = base
        if self.words[(base - HEADER) >> 3] != gen:
            self.table[i] = 0
            self.free.append(i)
            return -1
        return i

    def drop(self, i: int) -> None:
        self.table[i] = 0
        self.free.append(i)
        if i + 1 == self.hwm:  # the last entry in use: scanners may stop earlier now
            table, hwm = self.table, self.hwm - 1
            while hwm and not table[hwm - 1]:
                hwm -= 1
            self.hwm = hwm
            self.words[self.hwm_at] = hwm
