"""A handle queue in the arena: bounded, many producers and consumers, crash-safe, no broker message per item.

The zero-copy replacement for ``torch.multiprocessing.Queue``::

    q = client.queue("frames", maxsize=64)     # any process attached to the broker
    q.put(array)            # copied into the arena once; the sender's lease travels with the item
    h = q.get()             # a Handle whose hold now belongs to the receiver
    t = client.tensor(h)    # no message: the hold was taken in shared memory
    client.release(h)

The ring lies in one block of the arena, created by the broker on the first
``queue`` call for a name::

    header (32 words): magic | maxsize | slot words | head (puts) | tail (gets) | seq | space |
                       consumers waiting | producers waiting | redeliver | mutex (40 bytes) |
                       pending | redelivered | dropped | a pipeline stage's counters (done,
                       result bytes, busy ns, copied, first, last, input bytes) ...
    slots[maxsize]:    block data offset (0: empty) | length, deliveries << 32 | owner | msgpack
                       of the Handle ...
    pending[maxsize]:  the same, for items got but not yet released (``redeliver`` > 0 only)

Every operation holds a process-shared, robust ``pthread`` mutex (glibc, through
ctypes). A process that dies holding it makes the next locker get
``EOWNERDEAD``: it repairs the ring (clears the slots outside the live window
``[tail, head)``, recounts the pending entries) and goes on; no state is ever
half-written where it counts, because ``head`` and ``tail`` move only after the
slot they count is complete.

The slots' first words name blocks, and every owner's reuse rule scans them
(``holds.ControlRegion.named``): an item in the queue keeps its block alive
though its sender released it. ``get`` takes the receiver's hold before it
clears the slot, under the mutex: the block is never unprotected.

What happens to an item whose receiver dies before it releases it:

* ``redeliver=0`` (the default): it is lost; its hold vanishes with the process
  and the block is freed by its owner's next scan. Never read after reuse.
* ``redeliver=N``: at-least-once delivery. ``get`` also copies the item into a
  *pending* entry that names the receiver (its hold-table slot and that slot's
  epoch) until ``client.release`` (or a ``put`` of the handle into another
  queue, which is a release) ends it. When the broker notices the receiver's
  death, or its client closed with the item still held, it moves the item back
  to the front of the ring, up to ``N`` times per item; an item delivered to
  ``N + 1`` receivers that all died is dropped (its block freed) and counted in
  ``dropped``: a poison item does not kill consumers forever. Pending items
  count against ``maxsize``, so the ring always has room to take them back and
  memory stays bounded. A receiver that died mid-``get`` leaves the item in the
  ring (``repair`` drops the pending copy it had written); one that died after
  handling an item but before releasing it makes the item arrive twice (at
  least once, never lost): a consumer that must not see an item twice keeps
  the ids it has seen. A ``put`` of a got handle back into the same queue uses
  its pending entry's room (no wait for itself) and ends that entry.

Waiting: a consumer that finds the ring empty spins on the ``seq`` word for an
adaptive while (longer after a spin that was rewarded, shorter after one that
was not, never above ``SPIN_MAX``), then sleeps in ``futex(FUTEX_WAIT)`` on it;
a producer wakes it with ``FUTEX_WAKE`` only when someone waits. Producers wait
for room the same way on ``space``. ``Client.queue(..., spin=S)`` fixes the spin
at ``S`` seconds instead (``0``: sleep at once; long: poll, as iceoryx2's
subscriber does, keeping a core busy while it waits).
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from typing import Any, Protocol

import msgspec
import numpy as np

from .errors import BadRequest, BrokerError, BrokerTimeout, StaleHandle
from .holds import QUEUE_HEADER_WORDS
from .protocol import REDELIVER_MAX, Handle, ProtocolError, Task

__all__ = ["HandleQueue", "TaskQueue", "init_queue", "owner_word", "queue_words", "requeue", "REDELIVER_MAX",
           "SLOT_WORDS", "counters", "task_rows", "task_slot_words"]

SLOT_WORDS = 40  # 320 bytes a slot: three words of bookkeeping and a msgpack Handle of up to 296 bytes
_DATA = 3  # the first word of a slot's msgpack
MAGIC = int.from_bytes(b"SHMQUEUE", "little")
_HEAD, _TAIL, _SEQ, _SPACE, _CWAIT, _PWAIT, _REDELIVER = 3, 4, 5, 6, 7, 8, 9
_MUTEX = 10 * 8  # byte offset of the mutex in the header (40 bytes on x86-64 and aarch64 glibc)
_PENDING, _REDELIVERED, _DROPPED = 15, 16, 17
# a pipeline stage's counters, kept in its queue by the workers that take from it (``count``)
_DONE, _OUT, _BUSY, _COPIED, _FIRST, _LAST, _IN = 18, 19, 20, 21, 22, 23, 24
_START = 1 << 32  # head and tail start here, so a redelivered item can go in front of the first
SPIN_MAX = 200e-6  # seconds a waiter may spin before it sleeps
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(os.uname().machine)
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1

_libc = ctypes.CDLL(None, use_errno=True)
_lock = _libc.pthread_mutex_lock
_trylock = _libc.pthread_mutex_trylock
_unlock = _libc.pthread_mutex_unlock


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _futex_wait(addr: int, expected: int, timeout: float | None) -> None:
    ts = None
    if timeout is not None:
        ts = _Timespec(int(timeout), int((timeout % 1) * 1e9))
    _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAIT, ctypes.c_uint32(expected),
                  ctypes.byref(ts) if ts is not None else None, None, 0)


def _futex_wake(addr: int, n: int) -> None:
    _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAKE, n, None, None, 0)


def task_slot_words(items: int) -> int:
    """Words of a pipeline stage queue's slot for Tasks of up to ``items`` items: the three of
    bookkeeping, and a msgpack Task: its Handle and fields (256 bytes) and 9 bytes an item id."""
    return _DATA + (256 + 9 * items + 7) // 8


def queue_words(maxsize: int, redeliver: int, slot_words: int = SLOT_WORDS) -> int:
    """The size of a queue's block in 8-byte words (pending entries only if it redelivers)."""
    return QUEUE_HEADER_WORDS + (2 if redeliver else 1) * maxsize * slot_words


def init_queue(words: np.ndarray, address: int, offset: int, maxsize: int, redeliver: int = 0,
               slot_words: int = SLOT_WORDS) -> None:
    """Lay out an empty ring at data offset ``offset`` (the broker, once); ``address`` is where
    byte 0 of the arena is mapped in this process."""
    first = offset // 8
    words[first: first + queue_words(maxsize, redeliver, slot_words)] = 0
    words[first + 1], words[first + 2], words[first + _REDELIVER] = maxsize, slot_words, redeliver
    words[first + _HEAD] = words[first + _TAIL] = _START
    attr = ctypes.create_string_buffer(64)
    _libc.pthread_mutexattr_init(attr)
    _libc.pthread_mutexattr_setpshared(attr, 1)  # PTHREAD_PROCESS_SHARED
    _libc.pthread_mutexattr_setrobust(attr, 1)  # PTHREAD_MUTEX_ROBUST
    rc = _libc.pthread_mutex_init(ctypes.c_void_p(address + offset + _MUTEX), attr)
    _libc.pthread_mutexattr_destroy(attr)
    if rc:
        raise OSError(rc, f"pthread_mutex_init failed: {os.strerror(rc)}")
    words[first] = MAGIC


def owner_word(slot: int, epoch: int) -> int:
    """How a pending entry names its receiver: its hold-table slot and that slot's epoch
    (``holds.ControlRegion.open_slot`` counts them), so a slot reused by a new client is not
    taken for the dead one."""
    return (slot + 1) << 32 | (epoch & 0xFFFFFFFF)


def repair(words: np.ndarray, first: int) -> None:
    """After ``EOWNERDEAD``: clear the ring slots outside the live window ``[tail, head)`` (a
    producer died mid-put), drop a pending entry that is still the item at ``tail`` (a receiver
    died mid-get, after its pending entry was written and before the ring let go: the item is
    delivered again from the ring, not twice), and recount the pending entries."""
    w, n, sw = words, int(words[first + 1]), int(words[first + 2])
    head, tail = int(w[first + _HEAD]), int(w[first + _TAIL])
    live = {(tail + k) % n for k in range(max(0, min(head - tail, n)))}
    ring = first + QUEUE_HEADER_WORDS
    for s in range(n):
        if s not in live:
            w[ring + s * sw] = 0
    if w[first + _REDELIVER]:
        pend = ring + n * sw
        at_tail = ring + (tail % n) * sw
        if head > tail and w[at_tail]:
            for p in np.flatnonzero(w[pend: pend + n * sw: sw] == w[at_tail]).tolist():
                e = pend + p * sw
                if (w[e + _DATA: e + sw] == w[at_tail + _DATA: at_tail + sw]).all() and \
                        int(w[e + 1]) & 0xFFFFFFFF == int(w[at_tail + 1]) & 0xFFFFFFFF:
                    w[e] = 0  # the same handle: the get did not finish
        w[first + _PENDING] = int(np.count_nonzero(w[pend: pend + n * sw: sw]))


def requeue(words: np.ndarray, address: int, offset: int, owner: int) -> tuple[int, list[bytes]] | None:
    """The broker, for a receiver that is gone: its pending items back to the front of the ring
    (up to the queue's ``redeliver`` deliveries each; beyond, dropped). Returns (moved, the
    dropped items' msgpack), or None if another process holds the mutex now (then the broker
    tries again later: it never blocks on a client)."""
    mutex = ctypes.c_void_p(address + offset + _MUTEX)
    rc = _trylock(mutex)
    if rc == errno.EBUSY:
        return None
    w, f = words, offset // 8
    if rc == errno.EOWNERDEAD:
        repair(w, f)
        _libc.pthread_mutex_consistent(mutex)
    elif rc:
        raise BrokerError(f"queue at {offset}: pthread_mutex_trylock failed: {os.strerror(rc)}")
    moved, dropped = 0, []
    try:
        n, sw, limit = int(w[f + 1]), int(w[f + 2]), int(w[f + _REDELIVER])
        ring = f + QUEUE_HEADER_WORDS
        pend = ring + n * sw
        mine = np.flatnonzero((w[pend + 2: pend + n * sw: sw] == owner) & (w[pend: pend + n * sw: sw] != 0))
        for p in mine[::-1].tolist():  # the last one first: the items keep their order in front
            e = pend + p * sw
            deliveries = int(w[e + 1]) >> 32
            if deliveries > limit:
                length = int(w[e + 1]) & 0xFFFFFFFF
                dropped.append(w[e + _DATA: e + sw].tobytes()[:length])
            else:
                tail = int(w[f + _TAIL]) - 1
                s = ring + (tail % n) * sw
                w[s + 1: s + sw] = w[e + 1: e + sw]
                w[s + 2] = 0
                w[s] = w[e]  # the ring slot names the block before the pending entry stops
                w[f + _TAIL] = tail
                moved += 1
            w[e] = 0
        if mine.size:
            w[f + _PENDING] = int(w[f + _PENDING]) - mine.size
            w[f + _REDELIVERED] = int(w[f + _REDELIVERED]) + moved
            w[f + _DROPPED] = int(w[f + _DROPPED]) + len(dropped)
        if moved:
            w[f + _SEQ] = int(w[f + _SEQ]) + 1
        if dropped:
            w[f + _SPACE] = int(w[f + _SPACE]) + 1
        wake_c, wake_p = moved and int(w[f + _CWAIT]) > 0, bool(dropped) and int(w[f + _PWAIT]) > 0
    finally:
        _unlock(mutex)
    if wake_c:
        _futex_wake(address + offset + _SEQ * 8, moved)
    if wake_p:
        _futex_wake(address + offset + _SPACE * 8, len(dropped))
    return moved, dropped


class Owner(Protocol):
    """What a queue needs of the client it belongs to (``client.Client``; declared here so the
    queue does not import the client that makes queues)."""

    conn: Any
    holds: Any

    def _check_broker(self, handle: Handle) -> None: ...
    def _hold(self, handle: Handle) -> np.ndarray | None: ...
    def holds_handle(self, handle: Handle) -> bool: ...
    def get(self, handle: Handle) -> np.ndarray: ...
    def put(self, array: Any, timeout: float | None = None) -> Handle: ...
    def release(self, handles: Any) -> None: ...
    _pending: dict[int, list[tuple[Any, int, int]]]  # oid -> (queue, entry, block) its release ends


class HandleQueue:
    """One process's use of a named queue; get it from ``Client.queue``."""

    def __init__(self, client: Owner, name: str, offset: int, maxsize: int, slot_words: int,
                 spin: float | None = None) -> None:
        region = client.conn.region
        assert region is not None
        self.client = client
        self.name = name
        self.maxsize = maxsize
        self.slot_words = slot_words
        self.words = np.frombuffer(region.buffer, dtype="<u8")
        self.bytes = np.frombuffer(region.buffer, dtype=np.uint8)
        self.first = offset // 8
        address = self.bytes.ctypes.data
        self.mutex = ctypes.c_void_p(address + offset + _MUTEX)
        self.seq_addr = address + offset + _SEQ * 8
        self.space_addr = address + offset + _SPACE * 8
        self.fixed_spin = spin  # seconds every wait spins; None: adaptive, up to SPIN_MAX
        self.spin = 50e-6 if spin is None else spin
        if int(self.words[self.first]) != MAGIC:
            raise BrokerError(f"queue {name!r}: no queue at offset {offset} (the broker's answer was wrong)")
        self.redeliver = int(self.words[self.first + _REDELIVER])
        self.pending_first = self.first + QUEUE_HEADER_WORDS + maxsize * slot_words
        holds = client.holds  # a pending entry names this client by its slot (get needs one)
        self.owner = owner_word(holds.slot, holds.region.epoch(holds.slot)) if holds is not None else 0

    def __repr__(self) -> str:
        return f"HandleQueue({self.name!r}, maxsize={self.maxsize}, size={self.qsize()})"

    def stats(self) -> dict[str, int]:
        """``size`` (items waiting), ``pending`` (got, not yet released; ``redeliver`` > 0),
        ``redelivered`` and ``dropped`` (items given back after a receiver died, and items
        dropped after ``redeliver`` redeliveries), ``maxsize``, ``redeliver``."""
        w, f = self.words, self.first
        return {"size": self.qsize(), "pending": int(w[f + _PENDING]), "redelivered": int(w[f + _REDELIVERED]),
                "dropped": int(w[f + _DROPPED]), "maxsize": self.maxsize, "redeliver": self.redeliver}

    # -- the mutex ----------------------------------------------------------------------------------
    def _acquire(self) -> None:
        self.client.conn.check_process()
        rc = _lock(self.mutex)
        if rc == errno.EOWNERDEAD:  # a process died holding it: make the ring consistent again
            self._repair()
            _libc.pthread_mutex_consistent(self.mutex)
        elif rc:
            raise BrokerError(f"queue {self.name!r}: pthread_mutex_lock failed: {os.strerror(rc)}")

    def _repair(self) -> None:
        repair(self.words, self.first)

    def _slot(self, index: int) -> int:
        return self.first + QUEUE_HEADER_WORDS + (index % self.maxsize) * self.slot_words

    # -- operations ---------------------------------------------------------------------------------
    def qsize(self) -> int:
        return int(self.words[self.first + _HEAD]) - int(self.words[self.first + _TAIL])

    def put(self, item: Any, timeout: float | None = None) -> None:
        """Add an array (copied into the arena once) or a Handle this process holds; its
        reference passes to the queue. Blocks while the queue is full (``BrokerTimeout`` after
        ``timeout`` s)."""
        c = self.client
        if isinstance(item, Handle):
            c._check_broker(item)
            if not c.holds_handle(item):
                raise StaleHandle(f"queue {self.name!r}: put a Handle this process holds (put, "
                                  f"alloc or get), or an array; {item} is not held here")
            handle = item
        else:
            handle = c.put(item, timeout=timeout)
        handle = msgspec.structs.replace(handle, grant=0, expires=0.0)
        self._put(handle, handle.to_bytes(), timeout)

    def _put(self, handle: Handle, data: bytes, timeout: float | None, keep: bool = False) -> None:
        """Add the item ``data`` (msgpack) whose block ``handle`` names; this process's reference
        to it passes to the queue (``keep``: this process keeps it too, and the room of a pending
        entry of it stays that entry's)."""
        c = self.client
        if len(data) > (self.slot_words - _DATA) * 8:
            raise BrokerError(f"queue {self.name!r}: a handle of {len(data)} bytes does not fit a slot")
        deadline = None if timeout is None else time.monotonic() + timeout
        w, f = self.words, self.first
        # an item got from this very queue and put back: its pending entry's room is its own
        mine = [] if keep else \
            [p for p in c._pending.get(handle.oid, ()) if p[0] is self and int(w[p[1]]) == p[2]]
        while True:
            self._acquire()
            head, tail = int(w[f + _HEAD]), int(w[f + _TAIL])
            own = 1 if mine and int(w[mine[0][1]]) == mine[0][2] else 0
            if head - tail + int(w[f + _PENDING]) - own < self.maxsize:
                s = self._slot(head)
                start = (s + _DATA) * 8
                self.bytes[start: start + len(data)] = np.frombuffer(data, np.uint8)
                w[s + 1] = len(data)
                w[s + 2] = 0
                w[s] = handle.block  # from here the slot keeps the block alive
                if own:  # the item is back in the ring: its pending entry ends (after, not before)
                    w[mine[0][1]] = 0
                    w[f + _PENDING] = int(w[f + _PENDING]) - 1
                    c._pending[handle.oid].remove(mine[0])
                w[f + _HEAD] = head + 1
                w[f + _SEQ] = int(w[f + _SEQ]) + 1
                wake = int(w[f + _CWAIT]) > 0
                _unlock(self.mutex)
                break
            space = int(w[f + _SPACE]) & 0xFFFFFFFF
            _unlock(self.mutex)
            self._wait(self.space_addr, _SPACE, _PWAIT, space, deadline, "put: the queue stayed full")
        if wake:
            _futex_wake(self.seq_addr, 1)
        if not keep:
            c.release(handle)  # the queue's slot holds the block now

    def get(self, timeout: float | None = None) -> Handle:
        """The oldest item; its hold is this process's (``client.release`` ends it). Blocks
        while the queue is empty (``BrokerTimeout`` after ``timeout`` s)."""
        handle, _ = self._get(timeout)
        return handle

    def _get(self, timeout: float | None) -> tuple[Handle, Any]:
        """The oldest item's handle (held by this process) and what ``_decode`` made of it."""
        if self.client.holds is None:
            raise BadRequest(f"queue {self.name!r}: get needs this client's hold table in shared "
                             f"memory (Client(..., holds=True), the default): an item's block is "
                             f"kept alive by the queue alone, which a lease by message cannot see")
        deadline = None if timeout is None else time.monotonic() + timeout
        w, f = self.words, self.first
        while True:
            self._acquire()
            head, tail = int(w[f + _HEAD]), int(w[f + _TAIL])
            if head > tail:
                got, taken = None, False
                try:
                    got = self._take(tail)
                    taken = True
                finally:
                    wake = False
                    if taken:  # else the item stays where it is, for a later get
                        w[f + _TAIL] = tail + 1
                        if got is None or not self.redeliver:  # else its room stays taken until the ack
                            w[f + _SPACE] = int(w[f + _SPACE]) + 1
                            wake = int(w[f + _PWAIT]) > 0
                    _unlock(self.mutex)
                if wake:
                    _futex_wake(self.space_addr, 1)
                if got is not None:
                    return got
                continue  # an empty or stale slot (a producer died mid-put): the next one
            seq = int(w[f + _SEQ]) & 0xFFFFFFFF
            _unlock(self.mutex)
            self._wait(self.seq_addr, _SEQ, _CWAIT, seq, deadline, "get: the queue stayed empty")

    def _take(self, index: int) -> tuple[Handle, Any] | None:
        """Under the mutex: the hold of the item at ``index`` (and its pending entry, if the
        queue redelivers), then its slot cleared; None for an empty or stale slot. If this
        process has no free hold the item is left in its slot and ``BrokerError`` raised."""
        w, s = self.words, self._slot(index)
        if not w[s]:
            return None
        n = int(w[s + 1]) & 0xFFFFFFFF
        start = (s + _DATA) * 8
        c = self.client
        try:
            handle, value = self._decode(self.bytes[start: start + n].tobytes(), int(w[s + 1]) >> 32)
            # before the slot stops protecting the block; a block this process holds already
            # stays held by that one reference (one per array and process, as for get)
            held = c.holds_handle(handle) or c._hold(handle) is not None
        except (ProtocolError, StaleHandle, BadRequest):
            w[s] = 0  # an unreadable or stale item: the slot names its block no more
            return None
        if not held:
            raise BrokerError(f"queue {self.name!r}: this process's hold table is full (it holds "
                              f"{len(c.holds.table)} arrays): release some before get; the item "
                              f"stays in the queue")
        if self.redeliver:
            self._pend(s, handle)
        w[s] = 0  # the hold (and the pending entry) protect the block from here
        return handle, value

    def _decode(self, data: bytes, deliveries: int) -> tuple[Handle, Any]:
        """An item's msgpack as (the handle of its block, what ``get`` returns); ``deliveries``:
        how often it was given to receivers that died holding it."""
        handle = Handle.from_bytes(data)
        return handle, handle

    def _pend(self, s: int, handle: Handle) -> None:
        """Under the mutex: copy ring slot ``s`` into a free pending entry that names this
        receiver, until ``client.release`` of the handle acks it. There is always one free:
        pending entries and ring items together are at most ``maxsize``."""
        w, sw, pf = self.words, self.slot_words, self.pending_first
        p = int(np.flatnonzero(w[pf: pf + self.maxsize * sw: sw] == 0)[0])
        e = pf + p * sw
        w[e + 1: e + sw] = w[s + 1: s + sw]
        w[e + 1] = int(w[e + 1]) + (1 << 32)  # one more delivery
        w[e + 2] = self.owner
        block = int(w[s])
        w[e] = block  # named by the entry before the ring slot is cleared
        w[self.first + _PENDING] = int(w[self.first + _PENDING]) + 1
        self.client._pending.setdefault(handle.oid, []).append((self, e, block))  # its release acks

    def _ack(self, e: int, block: int) -> None:
        """The receiver released the item of pending entry ``e``: the entry ends and its room
        goes back to the producers. Nothing if the broker gave the item back meanwhile (it took
        this client for gone)."""
        w, f = self.words, self.first
        self._acquire()
        try:
            if int(w[e]) != block or int(w[e + 2]) != self.owner:
                return
            w[e] = 0
            w[f + _PENDING] = int(w[f + _PENDING]) - 1
            w[f + _SPACE] = int(w[f + _SPACE]) + 1
            wake = int(w[f + _PWAIT]) > 0
        finally:
            _unlock(self.mutex)
        if wake:
            _futex_wake(self.space_addr, 1)

    def _wait(self, addr: int, word: int, waiting: int, seen: int, deadline: float | None,
              what: str) -> None:
        """Until ``word`` moves past ``seen``: spin on it for an adaptive while, then, counted in
        ``waiting`` (so the other side knows to wake us), sleep in its futex.

        The spin budget follows the gaps it sees: an item that came during the spin, or soon
        after it ended, makes the next spin as long as that wait (up to ``SPIN_MAX``); a long
        sleep halves it. Nobody is told we wait while we only spin: no wake-up syscall is paid
        for a waiter that is not asleep."""
        f, w = self.first, self.words
        started = time.perf_counter()
        spun_until = started + self.spin
        if deadline is not None:
            spun_until = min(spun_until, started + max(0.0, deadline - time.monotonic()))
        while time.perf_counter() < spun_until:
            if int(w[f + word]) & 0xFFFFFFFF != seen:
                if self.fixed_spin is None:
                    self.spin = min(SPIN_MAX, max(self.spin, (time.perf_counter() - started) * 1.25))
                return
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise BrokerTimeout(f"queue {self.name!r}: {what} for the timeout")
        self._acquire()  # announce the sleep, unless the word moved meanwhile (no lost wake-up:
        moved = int(w[f + word]) & 0xFFFFFFFF != seen  # the other side bumps it under the lock)
        if not moved:
            w[f + waiting] = int(w[f + waiting]) + 1
        _unlock(self.mutex)
        if moved:
            return
        try:
            _futex_wait(addr, seen, 1.0 if left is None else min(left, 1.0))
        finally:
            self._acquire()
            w[f + waiting] = max(0, int(w[f + waiting]) - 1)
            _unlock(self.mutex)
        if self.fixed_spin is None:
            waited = time.perf_counter() - started
            self.spin = min(SPIN_MAX, waited * 1.25) if waited < SPIN_MAX else self.spin * 0.5

    # -- a pipeline stage's counters ------------------------------------------------------------------
    def counters(self) -> dict[str, Any]:
        """What ``count`` added up, and the size and pending items (``queue.counters``)."""
        return counters(self.words, self.first * 8)

    def count(self, done: int = 0, out: int = 0, busy: float = 0.0, copied: int = 0, inp: int = 0) -> None:
        """Add to the counters of the stage that takes from this queue (its workers call this
        once per task; the broker reads them for ``stats``): items done, bytes of their results,
        seconds busy, bytes copied, bytes of the inputs they came from."""
        w, f = self.words, self.first
        now = time.monotonic_ns()
        self._acquire()
        try:
            w[f + _DONE] = int(w[f + _DONE]) + done
            w[f + _OUT] = int(w[f + _OUT]) + out
            w[f + _IN] = int(w[f + _IN]) + inp
            w[f + _BUSY] = int(w[f + _BUSY]) + int(busy * 1e9)
            w[f + _COPIED] = int(w[f + _COPIED]) + copied
            if done and not w[f + _FIRST]:
                w[f + _FIRST] = now
            if done:
                w[f + _LAST] = now
        finally:
            _unlock(self.mutex)


def counters(words: np.ndarray, offset: int) -> dict[str, Any]:
    """What ``HandleQueue.count`` added up in the queue at ``offset``, and its size and pending
    items (read without the mutex: each word is written whole, and only ever grows or moves on)."""
    f = offset // 8
    span = (int(words[f + _LAST]) - int(words[f + _FIRST])) / 1e9
    return {"queue": max(0, int(words[f + _HEAD]) - int(words[f + _TAIL])), "pending": int(words[f + _PENDING]),
            "done": int(words[f + _DONE]), "out": int(words[f + _OUT]), "in": int(words[f + _IN]),
            "busy": int(words[f + _BUSY]) / 1e9, "copied": int(words[f + _COPIED]), "span": max(0.0, span)}


class TaskQueue(HandleQueue):
    """A pipeline stage's queue (``tasks: rings``): each item a ``Task``, a group of items in one
    block and their ids, layout and attempts; get it from ``Client.task_queue``. ``put`` takes
    a Task whose handle this process holds (the hold passes to the queue, as for a Handle);
    ``get`` returns one with ``attempts`` raised to the deliveries to receivers that died."""

    def put(self, item: Any, timeout: float | None = None) -> None:
        if not isinstance(item, Task):
            raise TypeError(f"queue {self.name!r} takes pipeline Tasks, not {type(item).__name__}")
        c = self.client
        c._check_broker(item.handle)
        if not c.holds_handle(item.handle):
            raise StaleHandle(f"queue {self.name!r}: the task's block is not held by this process")
        handle = msgspec.structs.replace(item.handle, grant=0, expires=0.0)
        self._put(handle, _TASK_ENCODER.encode(msgspec.structs.replace(item, handle=handle)), timeout)

    def split(self, task: Task, release: bool = True) -> None:
        """Put each row of a got ``task`` back into this queue as a task of its own (views of the
        same block, its attempts kept), then release ``task`` (``release=False``: the caller
        does, once it holds no other task of that block: a release ends them all): until all
        are in, its pending entry stands, so a death midway loses nothing (rows then arrive
        twice, at least once). The room is there when at most ``maxsize - 1`` items are in
        flight (a pipeline's rings)."""
        for j in range(task.rows):
            part = task_rows(task, j, j + 1)
            self._put(part.handle, _TASK_ENCODER.encode(part), None, keep=True)
        if release:
            self.client.release(task.handle)

    def get(self, timeout: float | None = None) -> Task:  # type: ignore[override]
        _, task = self._get(timeout)
        return task

    def _decode(self, data: bytes, deliveries: int) -> tuple[Handle, Any]:
        try:
            task = _TASK_DECODER.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ProtocolError(f"queue {self.name!r}: not a task: {e}") from e
        if deliveries:  # the attempts of the task it was split from, and the deaths since
            task = msgspec.structs.replace(task, attempts=task.attempts + deliveries)
        return task.handle, task


def task_rows(task: Task, start: int, end: int) -> Task:
    """Rows ``[start, end)`` of a group's task: a view of the same block (no copy)."""
    h = task.handle
    rowbytes = h.nbytes // max(1, task.rows)
    handle = msgspec.structs.replace(h, offset=h.offset + start * rowbytes, nbytes=(end - start) * rowbytes,
                                     shape=(end - start, *h.shape[1:]), base=h.block, grant=0, expires=0.0)
    return msgspec.structs.replace(task, items=task.items[start:end], handle=handle, rows=end - start,
                                   valid=None)


_TASK_ENCODER = msgspec.msgpack.Encoder()
_TASK_DECODER = msgspec.msgpack.Decoder(Task)
