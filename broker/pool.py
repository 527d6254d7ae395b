"""A client's own blocks for small and medium arrays: taken from the broker in batches, reused locally.

``put`` and ``alloc`` of an array of at most ``POOL_MAX`` bytes take a block
of its size class (from 256 B, four classes per power of two) from this pool:
no message.
The pool is refilled by one ``alloc_many`` round trip for a batch of blocks
(about ``REFILL_BYTES`` of one class, at least 4 blocks, and at most 1/32 of
the arena: 1 MiB arrays in an 8 MiB arena come one block at a time). A block the client
releases is not given back: it waits in ``retired`` until the pool of its
class runs dry, and then the retire rule of ``holds.py`` tells which retired
blocks nobody holds any more; those get a new generation (the low
``GEN_BITS`` bits count reuses) and are used again. So a steady
put/get/release loop costs no message and, every batch, one scan of the hold
tables and one memory barrier.

Arrays above ``POOL_MAX`` and up to the client's ``large_keep`` (1/8 of the
arena, at most ``LARGE_KEEP_MAX``) are pooled too, one block at a time: the
first ``put`` of a size allocates by message, and once released the block is
this client's to reuse by the same rule, so a put/release loop of 16 MiB
arrays sends nothing after the first (a round trip of 150-320 µs on the
reference VM, a fifth of the put's time). Memory stays bounded: the large
blocks a client owns (in use, free or retired) are at most ``large_keep``
bytes, and all clients' together at most 1/LARGE_TOTAL_PART of the arena
(each writes what it owns into its slot of the control region; a release
reads the sum): a block released beyond either goes back to the broker at
once, and a new size class first gives back the free and retired large
blocks of the others. So many clients that put large arrays cannot keep the
arena from each other: at most a quarter of it sits in their pools.

The processes of a pipeline whose tasks travel in rings (the driver and its
workers) keep every large block they release (``in_pipeline``): a block
another stage still reads is reused once it is done with, as iceoryx2's
publishers reuse their samples, with no ``drop`` and no ``alloc_many`` per
group; what they hold is bounded by the driver's limit on items in flight
(3/4 of the arena, by each stage's result size), and an idle one gives its
pool back (``trim``). Without it, 1 MiB items in the benchmark's 128 MiB
arena cost an allocation and a drop message per 16-item group and stage.

A block whose array was published or granted is the broker's to keep alive
from then on: the pool forgets it (its release becomes a ``drop`` message).
Without a hold table (no ``membarrier`` on this host) a released block goes
back to the broker with a ``drop``, as before.
"""

from __future__ import annotations

import collections
from typing import Callable

import numpy as np

from .holds import GEN_BITS, ControlRegion
from .protocol import LARGE_KEEP_MAX, LARGE_KEEP_PART, Handle

__all__ = ["Pool", "POOL_MAX", "LARGE_KEEP_MAX", "LARGE_KEEP_PART", "size_class"]

POOL_MAX = 1 << 20  # arrays up to this size are placed in pooled blocks
REFILL_BYTES = 256 << 10  # one refill asks for about this many bytes of one size class (4 blocks at least)
KEEP_BYTES = 4 << 20  # free blocks of one class kept after a recycle beyond this go back to the broker
LARGE_TOTAL_PART = 4  # all clients' pools together keep at most this part of the arena in large blocks
_REUSES = (1 << GEN_BITS) - 1


def size_class(nbytes: int) -> int:
    """The block size for ``nbytes``: 256 B at least, then four classes per power of two
    (a block wastes at most a fifth of itself), each a multiple of 64 bytes."""
    if nbytes <= 256:
        return 256
    step = 1 << max(6, (nbytes - 1).bit_length() - 3)
    return -(-nbytes // step) * step


class Pool:
    """Pooled blocks by size class: free ones, and released ones waiting to be reused."""

    def __init__(self, refill: Callable[[int, int], list[Handle]], region: ControlRegion | None,
                 give_back: Callable[[list[Handle]], None], large_keep: int = 0, slot: int = -1,
                 capacity: int = 0) -> None:
        self.refill = refill  # (block size, count) -> handles of new blocks (a round trip)
        self.region = region
        self._give_back = give_back  # blocks this client lets go of (a drop message)
        self.free: dict[int, collections.deque[tuple[Handle, int]]] = {}
        self.retired: dict[int, list[tuple[Handle, int]]] = {}
        # blocks above POOL_MAX: this client's budget, and all clients' (reported in its slot)
        self.large_keep = large_keep if slot >= 0 else 0
        self.large_total = capacity // LARGE_TOTAL_PART
        self.capacity = capacity or 1 << 62  # 0: not known (then refills are not bounded by it)
        self.slot = slot
        self._large = 0  # bytes of them it owns now: in use, free or retired
        # a member of a pipeline whose tasks travel in rings: the driver bounds what is in flight
        # (and so these pools), idle members give all back (``trim``); no budget of large blocks
        self.in_pipeline = False

    @property
    def large(self) -> int:
        return self._large

    @large.setter
    def large(self, nbytes: int) -> None:
        self._large = nbytes
        if self.region is not None and self.slot >= 0:
            self.region.set_pooled_large(self.slot, 0 if self.in_pipeline else nbytes)

    @property
    def max_size(self) -> int:
        """The largest array this pool takes (larger ones are allocated by message)."""
        return max(POOL_MAX, self.large_keep) if self.region is not None else POOL_MAX

    def take(self, size: int) -> tuple[Handle, int]:
        """A block of size class ``size`` and the generation its next array carries."""
        free = self.free.get(size)
        if not free:
            free = self.free[size] = collections.deque()
            self._recycle(size, free)
            if not free:
                if size > POOL_MAX:
                    if self.in_pipeline or self.large + size > self.large_keep:
                        self._give_back_large(but=size)  # (a pipeline's member: one size at a time)
                    self.large += size
                    count = 1
                else:  # 4 at least, a recycle per 4 puts; in a small arena at most 1/32 of it
                    count = min(max(4, min(64, REFILL_BYTES // size)), max(1, self.capacity // (32 * size)))
                try:
                    free.extend((h, h.generation) for h in self.refill(size, count))
                except BaseException:
                    if size > POOL_MAX:
                        self.large -= size
                    raise
        return free.popleft()

    def retire(self, block: Handle, gen: int) -> None:
        """The array in ``block`` (generation ``gen``) was released by this client."""
        if self.region is None or (block.nbytes > POOL_MAX and not self.in_pipeline and (
                self.large > self.large_keep or self.region.pooled_large() > self.large_total)):
            self.give_back([block])
            return
        self.retired.setdefault(block.nbytes, []).append((block, gen))

    def forget(self, block: Handle) -> None:
        """``block`` is the broker's to keep alive now (published or granted): no longer this
        pool's, nor counted in its budget."""
        if block.nbytes > POOL_MAX:
            self.large -= block.nbytes

    def trim(self) -> int:
        """Give every free and retired block back to the broker (it frees a retired one once
        nobody holds it): what an idle client does, so its pool keeps nobody else from the
        arena. Returns how many."""
        spent = [h for free in self.free.values() for h, _ in free] + \
            [h for retired in self.retired.values() for h, _ in retired]
        self.free.clear()
        self.retired.clear()
        if spent:
            self.give_back(spent)
        return len(spent)

    def give_back(self, blocks: list[Handle]) -> None:
        self.large -= sum(b.nbytes for b in blocks if b.nbytes > POOL_MAX)
        self._give_back(blocks)

    def _give_back_large(self, but: int) -> None:
        """Room in the large budget: the free and retired large blocks of other size classes go
        back to the broker (it frees a retired one once nobody holds it)."""
        spent = []
        for size in [s for s in (*self.free, *self.retired) if s > POOL_MAX and s != but]:
            spent += [h for h, _ in self.free.pop(size, ())] + [h for h, _ in self.retired.pop(size, ())]
        if spent:
            self.give_back(spent)

    def _recycle(self, size: int, free: collections.deque[tuple[Handle, int]]) -> None:
        retired = self.retired.get(size)
        if not retired or self.region is None:
            return
        if len(retired) == 1:  # a large block's usual case: no arrays to build
            ok = [self.region.retire_one(retired[0][0].offset)]
        else:
            bases = np.fromiter((b.offset for b, _ in retired), dtype=np.uint64, count=len(retired))
            ok = self.region.retire(bases).tolist()
        keep, spent = [], []
        for (block, gen), reusable in zip(retired, ok, strict=True):
            if not reusable:
                keep.append((block, gen))
            elif gen & _REUSES == _REUSES:
                spent.append(block)  # its reuse counter is used up: the broker's again
            else:
                self.region.set_generation(block.offset, gen + 1)
                free.append((block, gen + 1))
        self.retired[size] = keep
        while size <= POOL_MAX and len(free) > max(4, KEEP_BYTES // size):  # a burst is over: keep a few
            spent.append(free.pop()[0])
        if spent:
            self.give_back(spent)
