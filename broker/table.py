"""The object table: arrays in the arena, who holds them (leases), grants, published names. No I/O.

An *object* is a whole block of the arena or a view of rows inside one; a
block is freed with its last object. References to an object are held by

* clients: one *lease* per client and object (``alloc``, ``acquire``,
  ``claim`` take it, ``release`` drops it, ``drop_client`` drops them all);
* grants: a lease the table holds for whoever claims the grant's token,
  until it is used up or its ttl passes (``Client.grant``);
* published names, and the pipeline's tasks and reservations (``scheduler.py``).

Given the arena's mapping (``buffer``), the table also keeps the control
region of ``holds.py``: every block gets a header with its generation, each
client a hold table, and a block whose last reference is gone is not freed
at once but *retiring* until ``reclaim`` finds no hold or queue slot naming
it (a client may be reading it without having told the broker). Without a
mapping (unit tests, or no ``membarrier``), blocks are freed at once.

Every method is a plain call that returns a value or raises a
``BrokerError``; the server turns them into replies. Tests drive it directly
(``tests/test_table.py``).
"""

from __future__ import annotations

import collections
import heapq
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .allocator import Allocator, Block
from .errors import BadRequest, ItemTooLarge, StaleHandle, format_bytes
from .holds import GEN_BITS, HEADER, ControlRegion
from .holds import Layout as ControlLayout
from .protocol import LARGE_KEEP_MAX, LARGE_KEEP_PART, Handle, Layout, c_strides, storage_dtype

__all__ = ["Obj", "ObjectTable", "array_nbytes", "POOL_BLOCK_MAX", "MAX_GRANTS"]

POOL_BLOCK_MAX = 1 << 20  # the largest block ``alloc_many`` hands out
# Grants of one client not yet claimed or expired (~250 bytes of broker memory each). A grant is
# never refused for this (its receiver may already read the array): the granter is told, by an
# error its next request raises, to grant fewer or with a shorter ttl.
MAX_GRANTS = 100_000
EARLY_CLAIMS_MAX = 100_000
EARLY_CLAIM_TTL = 60.0


def array_nbytes(dtype: str, shape: list[int] | tuple[int, ...]) -> int:
    """Validate a dtype string and shape from the wire; return the array's size in bytes."""
    try:
        dt = storage_dtype(dtype)
    except (TypeError, ValueError):
        raise BadRequest(f"unknown dtype {dtype!r}") from None
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise BadRequest(f"dtype {dtype!r} cannot live in shared memory (object or structured)")
    return dt.itemsize * math.prod(shape)


REUSE_FIRST = 1 << 20  # from this size ``new`` frees the released blocks first, to reuse one


@dataclass(slots=True, eq=False)
class Obj:
    """An array in the arena: a whole block or a view of rows inside one."""

    oid: int
    block: Block
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    refs: int = 1
    layout: Layout | None = None  # fields packed in each row (a stage that returns a tuple or dict)
    pooled: bool = False  # a block a client sub-allocates: its dtype/shape are set when published


@dataclass(slots=True, eq=False)
class Grant:
    """A lease the table holds for whoever claims ``token``."""

    obj: Obj
    uses: int
    deadline: float
    cid: int


class ObjectTable:
    """Objects, blocks, leases, grants and names of one arena."""

    def __init__(self, capacity: int, token: str, clock: Callable[[], float] = time.monotonic,
                 buffer: memoryview | None = None) -> None:
        self.alloc = Allocator(capacity)
        self.token = token
        self.region: ControlRegion | None = None
        self.lead = 0  # bytes of header before every block's data
        self.retiring: list[Block] = []  # blocks without references, not yet known to be unheld
        self.retiring_since = 0.0  # when the oldest of them was released (time.monotonic)
        self.slots: dict[int, int] = {}  # client id -> its hold table in the control region
        if buffer is not None:
            layout = ControlLayout.for_capacity(self.alloc.capacity)
            self.region = ControlRegion(buffer, layout)
            self.region.init()
            ctrl = self.alloc.alloc(layout.size)
            assert ctrl is not None and ctrl.offset == 0
            self.lead = HEADER
        self.clock = clock
        self.objects: dict[int, Obj] = {}
        self._block_objs: dict[int, int] = {}  # block offset -> objects in that block
        self.names: dict[str, Obj] = {}
        self.leases: dict[int, set[int]] = {}  # client id -> object ids it leases
        self.grants: dict[int, Grant] = {}  # token -> grant
        self._grant_heap: list[tuple[float, int]] = []  # (deadline, token)
        self.grants_of: collections.Counter[int] = collections.Counter()  # client id -> open grants
        self.early_claims: dict[int, tuple[int, float]] = {}  # token -> (claims, deadline)
        self._claims_swept = 0.0
        self._next = 1
        self.counters: collections.Counter[str] = collections.Counter()

    # -- objects ------------------------------------------------------------------------------
    def new(self, nbytes: int, dtype: str, shape: tuple[int, ...]) -> Obj | None:
        """A new object in a block of its own; None if the arena has no room now."""
        room = self.alloc.capacity - (self.region.layout.size + self.lead if self.region else 0)
        if nbytes > room:
            raise ItemTooLarge(
                f"an array of {format_bytes(nbytes)} ({dtype}{list(shape)}) is larger than the "
                f"whole arena ({format_bytes(self.alloc.capacity)}, of which {format_bytes(room)} "
                f"can hold one array); raise broker.capacity")
        need = nbytes + self.lead
        # a large array goes into a block just released if nobody holds it any more: its pages
        # are mapped and warm in every process (a block new to a process costs a page fault per
        # 4 KiB page in each: 16 MiB copied in 10-12 ms instead of 2 ms here)
        first = nbytes >= REUSE_FIRST and any(b.size >= need for b in self.retiring)
        if first:
            self.reclaim()
        block = self.alloc.alloc(need, lead=self.lead)
        if block is None and not first and self.retiring and self.reclaim():  # once is enough
            block = self.alloc.alloc(need, lead=self.lead)
        if block is None:
            return None
        base = block.offset + self.lead
        if self.region is not None:
            self.region.words[(base - HEADER) >> 3] = block.generation << GEN_BITS
            self.region.words[((base - HEADER) >> 3) + 1] = block.size - self.lead
        return self._add(block, base, nbytes, dtype, shape)

    def view(self, parent: Obj, offset: int, dtype: str, shape: tuple[int, ...]) -> Obj:
        """A new object for rows inside ``parent``'s block (one reference, the caller's)."""
        nbytes = storage_dtype(dtype).itemsize * math.prod(shape)
        assert parent.offset <= offset and offset + nbytes <= parent.offset + parent.nbytes
        obj = self._add(parent.block, offset, nbytes, dtype, shape)
        obj.layout = parent.layout
        return obj

    def _add(self, block: Block, offset: int, nbytes: int, dtype: str, shape: tuple[int, ...]) -> Obj:
        obj = Obj(self._next, block, offset, nbytes, dtype, shape)
        self._next += 1
        self.objects[obj.oid] = obj
        self._block_objs[block.offset] = self._block_objs.get(block.offset, 0) + 1
        return obj

    def decref(self, obj: Obj) -> bool:
        """Drop one reference; free the block with its last object. True if the block was freed."""
        obj.refs -= 1
        if obj.refs > 0:
            return False
        del self.objects[obj.oid]
        left = self._block_objs[obj.block.offset] - 1
        if left:
            self._block_objs[obj.block.offset] = left
            return False
        del self._block_objs[obj.block.offset]
        if self.region is None:
            self.alloc.free(obj.block)
        else:
            if not self.retiring:
                self.retiring_since = time.monotonic()
            self.retiring.append(obj.block)  # freed by reclaim once no hold names it
        return True

    def reclaim(self) -> int:
        """Free the retiring blocks no client holds (the rule of ``holds.py``); returns how many."""
        if not self.retiring or self.region is None:
            return 0
        bases = np.fromiter((b.offset + self.lead for b in self.retiring), dtype=np.uint64,
                            count=len(self.retiring))
        free = self.region.retire(bases)
        keep = []
        for block, ok in zip(self.retiring, free, strict=True):
            if ok:
                self.alloc.free(block)
            else:
                keep.append(block)
        freed = len(self.retiring) - len(keep)
        if keep:  # still held: looked at again in a while, not at once
            self.retiring_since = time.monotonic()
        self.retiring = keep
        return freed

    def generation(self, obj: Obj) -> int:
        """The generation a handle of ``obj`` must carry (its block's header, when there are headers)."""
        if self.region is None:
            return obj.block.generation
        return self.region.generation(obj.block.offset + self.lead)

    def get(self, oid: int, gen: int) -> Obj:
        obj = self.objects.get(oid)
        if obj is None or self.generation(obj) != gen:
            raise StaleHandle(
                f"handle (object {oid}, generation {gen}) is stale: the array was released "
                f"or its memory reused; keep a reference (do not release) while it is in use"
            )
        return obj

    def handle(self, obj: Obj) -> Handle:
        itemsize = storage_dtype(obj.dtype).itemsize
        base = obj.block.offset + self.lead
        return Handle(self.token, obj.oid, self.generation(obj), obj.offset, obj.nbytes,
                      obj.dtype, obj.shape, c_strides(obj.shape, itemsize),
                      base=base if base != obj.offset else 0)

    # -- leases -------------------------------------------------------------------------------
    def add_client(self, cid: int, pid: int = 0) -> int:
        """A new client; returns its hold table's slot (-1: it must take leases by message)."""
        self.leases[cid] = set()
        slot = self.region.open_slot(pid) if self.region is not None else None
        if slot is None:
            return -1
        self.slots[cid] = slot
        return slot

    def drop_client(self, cid: int) -> int:
        """Release every lease of a client that is gone; returns how many it held.

        The grants it made stay: that is their point (a receiver may claim after
        the granter released or died), until claimed or expired.
        """
        slot = self.slots.pop(cid, None)
        if slot is not None and self.region is not None:
            self.region.close_slot(slot)  # its holds vanish
        held = self.leases.pop(cid, set())
        for oid in held:
            obj = self.objects.get(oid)
            if obj is not None:
                self.decref(obj)
        return len(held)

    def _lease(self, cid: int, obj: Obj) -> None:
        held = self.leases[cid]
        if obj.oid not in held:
            held.add(obj.oid)
            obj.refs += 1

    def alloc_for(self, cid: int, nbytes: int, dtype: str, shape: list[int]) -> Handle | None:
        """``alloc``: a new array leased to ``cid``; None while the arena has no room."""
        if array_nbytes(dtype, shape) != nbytes:
            raise BadRequest(f"alloc: nbytes {nbytes} does not match {dtype}{shape}")
        obj = self.new(nbytes, dtype, tuple(shape))
        if obj is None:
            return None
        self.leases[cid].add(obj.oid)  # the object's first reference is this lease
        return self.handle(obj)

    def alloc_many(self, cid: int, nbytes: int, count: int) -> list[Handle]:
        """Up to ``count`` byte blocks of ``nbytes`` for a client's pool (empty while full):
        any number up to POOL_BLOCK_MAX, one at a time up to 1/LARGE_KEEP_PART of the arena."""
        large = max(POOL_BLOCK_MAX, min(LARGE_KEEP_MAX, self.alloc.capacity // LARGE_KEEP_PART))
        if not 0 < nbytes <= (POOL_BLOCK_MAX if count > 1 else large):
            raise BadRequest(f"alloc_many: blocks of 1..{POOL_BLOCK_MAX} bytes, or one of up to {large}, "
                             f"not {count} of {nbytes}")
        out = []
        for _ in range(count):
            obj = self.new(nbytes, "|u1", (nbytes,))
            if obj is None:
                break
            obj.pooled = True
            self.leases[cid].add(obj.oid)
            out.append(self.handle(obj))
        return out

    def acquire(self, cid: int, oid: int, gen: int) -> Handle:
        obj = self.get(oid, gen)
        self._lease(cid, obj)
        return self.handle(obj)

    def acquire_many(self, cid: int, refs: list[tuple[int, int]]) -> list[Handle]:
        """``acquire`` of many; a stale one fails the lot, and then no lease is taken."""
        objs = [self.get(oid, gen) for oid, gen in refs]
        for obj in objs:
            self._lease(cid, obj)
        return [self.handle(o) for o in objs]

    def release(self, cid: int, refs: list[tuple[int, int]]) -> int:
        """Drop ``cid``'s leases on ``refs``; returns how many it did not hold (stale)."""
        held = self.leases[cid]
        stale = 0
        for oid, gen in refs:
            obj = self.objects.get(oid) if oid in held else None
            if obj is None or self.generation(obj) != gen:
                stale += 1
                continue
            held.discard(oid)
            self.decref(obj)
        return stale

    # -- grants -------------------------------------------------------------------------------
    def grant(self, cid: int, oid: int, gen: int, token: int, uses: int, ttl: float) -> bool:
        """Hold a lease for ``uses`` claims of ``token``, at most ``ttl`` s; the granter must
        hold a lease. False (the grant is kept all the same) if ``cid`` is over ``MAX_GRANTS``.

        The token's high bits are the granter's client id, so the tokens of
        different clients never clash.
        """
        if token >> 32 != cid or token in self.grants:
            raise BadRequest("grant: the token must be (client id << 32 | n) and new")
        if oid not in self.leases[cid]:
            raise BadRequest(f"grant: this client holds no lease on object {oid}; only an array "
                             f"this client has put, allocated or got can be granted")
        obj = self.get(oid, gen)
        claimed, _ = self.early_claims.pop(token, (0, 0.0))
        if claimed >= uses:
            return True  # every claim came before the grant and took its own lease
        obj.refs += 1
        deadline = self.clock() + ttl
        self.grants[token] = Grant(obj, uses - claimed, deadline, cid)
        self.grants_of[cid] += 1
        heapq.heappush(self._grant_heap, (deadline, token))
        if len(self._grant_heap) > 2 * len(self.grants) + 1024:  # entries of claimed grants: drop them
            self._grant_heap = [(g.deadline, t) for t, g in self.grants.items()]
            heapq.heapify(self._grant_heap)
        return self.grants_of[cid] <= MAX_GRANTS

    def claim(self, cid: int, oid: int, gen: int, token: int) -> None:
        """Take the lease a grant holds. A claim that overtook its grant (they travel on
        different connections) takes a lease of its own and is counted against the grant."""
        grant = self.grants.get(token)
        if grant is not None and (grant.obj.oid, self.generation(grant.obj)) == (oid, gen):
            obj = grant.obj
            grant.uses -= 1
            last = grant.uses == 0  # the grant's own reference passes to this claim
            if last:
                self._close_grant(token)
            held = self.leases[cid]
            if obj.oid not in held:
                held.add(obj.oid)
                if not last:
                    obj.refs += 1
            elif last:
                self.decref(obj)
            return
        try:
            obj = self.get(oid, gen)
        except StaleHandle as e:
            raise StaleHandle(f"claim of a granted handle failed: {e}; the grant expired or was "
                              f"used up before this claim, and the array is gone") from None
        self._lease(cid, obj)
        if token >> 32 > 0 and len(self.early_claims) < EARLY_CLAIMS_MAX:
            n, _ = self.early_claims.get(token, (0, 0.0))
            self.early_claims[token] = (n + 1, self.clock() + EARLY_CLAIM_TTL)

    def _close_grant(self, token: int) -> Grant:
        grant = self.grants.pop(token)
        self.grants_of[grant.cid] -= 1
        if not self.grants_of[grant.cid]:
            del self.grants_of[grant.cid]
        return grant

    def expire(self, now: float) -> None:
        """Give back the leases of grants whose ttl passed; forget stale early claims."""
        heap = self._grant_heap
        while heap and heap[0][0] <= now:
            _deadline, token = heapq.heappop(heap)
            grant = self.grants.get(token)
            if grant is not None and grant.deadline <= now:
                self.decref(self._close_grant(token).obj)
                self.counters["grants_expired"] += 1
        if self.early_claims and now - self._claims_swept > 1.0:
            self._claims_swept = now
            for token in [t for t, (_n, d) in self.early_claims.items() if d <= now]:
                del self.early_claims[token]

    @property
    def next_deadline(self) -> float | None:
        """When ``expire`` next has something to do (None: nothing pending)."""
        due = [self._grant_heap[0][0]] if self._grant_heap else []
        if self.early_claims:
            due.append(self._claims_swept + 1.0)
        return min(due, default=None)

    # -- names --------------------------------------------------------------------------------
    def publish(self, cid: int, name: str, oid: int, gen: int, dtype: str, shape: list[int]) -> Handle:
        """Keep ``oid`` alive under ``name`` (replacing what was there). A pooled block is typed
        by its first publish; any other object must be published as what it is."""
        obj = self.get(oid, gen)
        if obj.dtype != dtype or list(obj.shape) != shape:
            nbytes = array_nbytes(dtype, shape)
            if not obj.pooled or nbytes > obj.block.size or obj.oid not in self.leases[cid]:
                raise BadRequest(f"publish: object {obj.oid} is {obj.dtype}{list(obj.shape)}, "
                                 f"not {dtype}{shape}")
            obj.dtype, obj.shape, obj.nbytes = dtype, tuple(shape), nbytes
        obj.pooled = False  # typed by its first publish: what a name resolves to never changes
        old = self.names.get(name)
        obj.refs += 1
        self.names[name] = obj
        if old is not None:
            self.decref(old)
        return self.handle(obj)

    def lookup(self, name: str) -> Handle | None:
        obj = self.names.get(name)
        return None if obj is None else self.handle(obj)

    # -- reporting ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """``used`` counts the blocks of arrays (each with its 64-byte header); ``control`` the
        control region at the start of the arena; ``free`` is what is left of ``capacity``."""
        a = self.alloc
        control = self.region.layout.size if self.region is not None else 0
        return {"capacity": a.capacity, "control": control, "used": a.used - control,
                "peak": a.peak - control, "free": a.free_bytes, "largest_free": a.largest_free,
                "objects": len(self.objects), "blocks": a.blocks - (1 if control else 0),
                "names": len(self.names), "grants": len(self.grants)}

    def sizes(self) -> dict[str, int]:
        """How many entries each of the table's structures holds (each bounded by live state)."""
        a = self.alloc
        return {"objects": len(self.objects), "blocks": len(self._block_objs), "used_blocks": a.blocks,
                "free_blocks": len(a._free_start), "leases": sum(len(v) for v in self.leases.values()),
                "grants": len(self.grants), "grant_heap": len(self._grant_heap),
                "early_claims": len(self.early_claims), "names": len(self.names),
                "retiring": len(self.retiring)}

