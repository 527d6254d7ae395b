"""The arena's allocator: two-level segregated fit (TLSF) over ``[0, capacity)``, pure bookkeeping.

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
* Every allocation gets a new generation from one counter (64 bits: it never
  wraps); a handle carries it, so a handle to a freed or reused block is
  detected, never read. One counter, not one per offset: the allocator's
  memory is bounded by its live and free blocks, never by its history.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import format_bytes

GRANULE = 64
PAGE = 4096
_SL_LOG = 4  # 16 second-level bins per power of two
_SL = 1 << _SL_LOG

__all__ = ["GRANULE", "PAGE", "Allocator", "Block"]


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _aligned(offset: int, align: int, lead: int) -> int:
    """The first start at or after ``offset`` whose ``start + lead`` is ``align``-ed."""
    return _round_up(offset + lead, align) - lead


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
    lead: int = 0  # bytes before the aligned start (a header)


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
        self._generation = 0  # the last generation handed out, over all offsets
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

    def _take_aligned(self, size: int, align: int, lead: int = 0) -> tuple[int, int] | None:
        """The last resort before saying "full": any free block that holds ``size`` at an
        ``align``-ed start, found by a scan of the free blocks. The padded request above misses
        a block that fits exactly once aligned (a page-aligned hole left by a freed page-aligned
        block, say); without this the arena would refuse a request it can serve."""
        for offset, bsize in self._free_start.items():
            if _aligned(offset, align, lead) + size <= offset + bsize:
                self._remove(offset, bsize)
                return offset, bsize
        return None

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
    def alloc(self, nbytes: int, lead: int = 0) -> Block | None:
        """Allocate ``nbytes`` (0 allowed); ``None`` if it does not fit now.

        ``lead``: bytes at the start of the block that come before the aligned
        start (a header): the block's ``offset + lead`` is aligned, so the data
        after a header keeps the alignment a block of its size gets.
        """
        size = max(GRANULE, _round_up(nbytes, GRANULE))
        if size > self.capacity:
            raise ValueError(
                f"{format_bytes(nbytes)} does not fit in an arena of "
                f"{format_bytes(self.capacity)}"
            )
        align = PAGE if size - lead >= PAGE else GRANULE
        got = self._take(size)
        if got is not None and _aligned(got[0], align, lead) + size > got[0] + got[1]:
            self._give_back(*got)  # fits but not once aligned: ask for room to align
            got = None
        if got is None and align > GRANULE and size + align - GRANULE <= self.capacity:
            got = self._take(size + align - GRANULE)
        if got is None and align > GRANULE:
            got = self._take_aligned(size, align, lead)
        if got is None:
            return None
        offset, bsize = got
        start = _aligned(offset, align, lead)
        if start > offset:
            self._give_back(offset, start - offset)
        tail = offset + bsize - (start + size)
        if tail:
            self._give_back(start + size, tail)
        self._generation += 1
        block = Block(start, size, self._generation, lead)
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
        spans = sorted([(b.offset, b.size, "u", b.lead) for b in self._used.values()] +
                       [(o, s, "f", 0) for o, s in self._free_start.items()])
        pos, prev = 0, ""
        for off, size, kind, lead in spans:
            assert off == pos, f"gap or overlap at {pos}: next span starts at {off}"
            assert not (kind == prev == "f"), f"uncoalesced free blocks at {off}"
            if kind == "u":
                assert (off + lead) % (PAGE if size - lead >= PAGE else GRANULE) == 0, f"misaligned {off}"
            pos, prev = off + size, kind
        assert pos == self.capacity, f"spans end at {pos}, capacity {self.capacity}"
        assert self.used == sum(b.size for b in self._used.values())
        for i, b in enumerate(self._bins):
            assert bool(b) == bool(self._bitmap >> i & 1), f"bitmap wrong at bin {i}"
