"""A handle queue in the arena: bounded, many producers and consumers, crash-safe, no broker message per item.

The zero-copy replacement for ``torch.multiprocessing.Queue``::

    q = client.queue("frames", maxsize=64)     # any process attached to the broker
    q.put(array)            # copied into the arena once; the sender's lease travels with the item
    h = q.get()             # a Handle whose hold now belongs to the receiver
    t = client.tensor(h)    # no message: the hold was taken in shared memory
    client.release(h)

The ring lies in one block of the arena, created by the broker on the first
``queue`` call for a name::

    header (16 words): magic | maxsize | slot words | head (puts) | tail (gets) | seq | space |
                       consumers waiting | producers waiting | mutex (40 bytes) ...
    slots[maxsize]:    block data offset (0: empty) | encoded length | msgpack of the Handle ...

Every operation holds a process-shared, robust ``pthread`` mutex (glibc, through
ctypes). A process that dies holding it makes the next locker get
``EOWNERDEAD``: it repairs the ring (clears the slots outside the live window
``[tail, head)``) and goes on; no state is ever half-written where it counts,
because ``head`` and ``tail`` move only after the slot they count is complete.

The slots' first words name blocks, and every owner's reuse rule scans them
(``holds.ControlRegion.named``): an item in the queue keeps its block alive
though its sender released it. ``get`` takes the receiver's hold before it
clears the slot, under the mutex: the block is never unprotected. A receiver
that dies holding an item loses it (its hold vanishes and the block is freed
by its owner's next scan); it is never read after reuse.

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
from .protocol import Handle, ProtocolError

__all__ = ["HandleQueue", "init_queue", "SLOT_WORDS"]

SLOT_WORDS = 40  # 320 bytes a slot: two words of bookkeeping and a msgpack Handle of up to 304 bytes
MAGIC = int.from_bytes(b"SHMQUEUE", "little")
_HEAD, _TAIL, _SEQ, _SPACE, _CWAIT, _PWAIT = 3, 4, 5, 6, 7, 8
_MUTEX = 10 * 8  # byte offset of the mutex in the header (40 bytes on x86-64 and aarch64 glibc)
SPIN_MAX = 200e-6  # seconds a waiter may spin before it sleeps
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(os.uname().machine)
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1

_libc = ctypes.CDLL(None, use_errno=True)
_lock = _libc.pthread_mutex_lock
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


def init_queue(words: np.ndarray, address: int, offset: int, maxsize: int) -> None:
    """Lay out an empty ring at data offset ``offset`` (the broker, once); ``address`` is where
    byte 0 of the arena is mapped in this process."""
    first = offset // 8
    words[first: first + QUEUE_HEADER_WORDS + maxsize * SLOT_WORDS] = 0
    words[first + 1], words[first + 2] = maxsize, SLOT_WORDS
    attr = ctypes.create_string_buffer(64)
    _libc.pthread_mutexattr_init(attr)
    _libc.pthread_mutexattr_setpshared(attr, 1)  # PTHREAD_PROCESS_SHARED
    _libc.pthread_mutexattr_setrobust(attr, 1)  # PTHREAD_MUTEX_ROBUST
    rc = _libc.pthread_mutex_init(ctypes.c_void_p(address + offset + _MUTEX), attr)
    _libc.pthread_mutexattr_destroy(attr)
    if rc:
        raise OSError(rc, f"pthread_mutex_init failed: {os.strerror(rc)}")
    words[first] = MAGIC


class Owner(Protocol):
    """What a queue needs of the client it belongs to (``client.Client``; declared here so the
    queue does not import the client that makes queues)."""

    conn: Any

    def _check_broker(self, handle: Handle) -> None: ...
    def _hold(self, handle: Handle) -> np.ndarray | None: ...
    def holds_handle(self, handle: Handle) -> bool: ...
    def get(self, handle: Handle) -> np.ndarray: ...
    def put(self, array: Any, timeout: float | None = None) -> Handle: ...
    def release(self, handles: Any) -> None: ...


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

    def __repr__(self) -> str:
        return f"HandleQueue({self.name!r}, maxsize={self.maxsize}, size={self.qsize()})"

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
        w, f, n, sw = self.words, self.first, self.maxsize, self.slot_words
        head, tail = int(w[f + _HEAD]), int(w[f + _TAIL])
        live = {(tail + k) % n for k in range(max(0, min(head - tail, n)))}
        for s in range(n):
            if s not in live:
                w[f + QUEUE_HEADER_WORDS + s * sw] = 0

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
        data = handle.to_bytes()
        if len(data) > (self.slot_words - 2) * 8:
            raise BrokerError(f"queue {self.name!r}: a handle of {len(data)} bytes does not fit a slot")
        deadline = None if timeout is None else time.monotonic() + timeout
        w, f = self.words, self.first
        while True:
            self._acquire()
            head, tail = int(w[f + _HEAD]), int(w[f + _TAIL])
            if head - tail < self.maxsize:
                s = self._slot(head)
                start = s * 8 + 16
                self.bytes[start: start + len(data)] = np.frombuffer(data, np.uint8)
                w[s + 1] = len(data)
                w[s] = handle.block  # from here the slot keeps the block alive
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
        c.release(handle)  # the queue's slot holds the block now

    def get(self, timeout: float | None = None) -> Handle:
        """The oldest item; its hold is this process's (``client.release`` ends it). Blocks
        while the queue is empty (``BrokerTimeout`` after ``timeout`` s)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        w, f = self.words, self.first
        while True:
            self._acquire()
            head, tail = int(w[f + _HEAD]), int(w[f + _TAIL])
            if head > tail:
                try:
                    handle = self._take(tail)
                finally:
                    w[f + _TAIL] = tail + 1
                    w[f + _SPACE] = int(w[f + _SPACE]) + 1
                    wake = int(w[f + _PWAIT]) > 0
                    _unlock(self.mutex)
                if wake:
                    _futex_wake(self.space_addr, 1)
                if handle is not None:
                    return handle
                continue  # an empty or stale slot (a producer died mid-put): the next one
            seq = int(w[f + _SEQ]) & 0xFFFFFFFF
            _unlock(self.mutex)
            self._wait(self.seq_addr, _SEQ, _CWAIT, seq, deadline, "get: the queue stayed empty")

    def _take(self, index: int) -> Handle | None:
        """Under the mutex: the hold of the item at ``index``, then its slot cleared."""
        w, s = self.words, self._slot(index)
        if not w[s]:
            return None
        n = int(w[s + 1])
        start = s * 8 + 16
        try:
            handle = Handle.from_bytes(self.bytes[start: start + n].tobytes())
            c = self.client
            # before the slot stops protecting the block; a block this process holds already
            # stays held by that one reference (one per array and process, as for get)
            if not c.holds_handle(handle) and c._hold(handle) is None:
                c.get(handle)  # no free hold: a lease, taken while the slot protects it
        except (ProtocolError, StaleHandle, BadRequest):
            handle = None
        finally:
            w[s] = 0  # whatever happened, the slot names the block no more
        return handle

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
