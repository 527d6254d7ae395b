"""The client API: ``Broker`` starts a broker process, ``Client`` maps its arena and moves handles.

A client says hello over ZeroMQ, then fetches the arena's descriptor once
over the broker's Unix socket and maps it; that connection stays open for the
client's life and is how each side learns the other has died. By default the
client's requests and the broker's replies and tasks then travel over that
same connection (``transport="unix"``), which skips ZeroMQ's I/O threads;
``transport="zmq"`` keeps them on the DEALER socket.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import select
import socket
import subprocess
import sys
import time
import weakref
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import zmq

from .arena import SharedRegion, recv_fd
from .errors import (
    BrokerError,
    BrokerGone,
    BrokerTimeout,
    StaleHandle,
    UnknownName,
    UnsupportedArray,
    error_from_wire,
)
from .protocol import FrameReader, Handle, ProtocolError, c_strides, decode, encode, frame

if TYPE_CHECKING:
    import torch

__all__ = ["Broker", "Client", "array_spec"]

log = logging.getLogger("shmbroker.client")

REFS_PER_MESSAGE = 1024  # handles per acquire_many/drop message: its frame stays below MAX_MESSAGE
POOL_MAX = 64 << 10  # arrays up to this size are placed in blocks the client pre-allocates
POOL_REFILL_BYTES = 256 << 10  # one refill asks for about this many bytes of one size class


def _size_class(nbytes: int) -> int:
    return max(256, 1 << (nbytes - 1).bit_length())


def array_spec(dtype: Any) -> np.dtype:
    """The dtype an array is stored as in the arena, or ``UnsupportedArray``.

    Non-native byte order is stored native (converted during the one copy that
    ``put`` makes anyway); object and structured dtypes are refused.
    """
    dt = np.dtype(dtype)
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise UnsupportedArray(
            f"dtype {dt} cannot be shared: object and structured arrays hold pointers or "
            f"mixed fields; convert to a plain numeric dtype first"
        )
    if dt.kind not in "biufcmM":
        raise UnsupportedArray(f"dtype {dt} (kind {dt.kind!r}) is not supported; use a numeric dtype")
    return dt.newbyteorder("=") if dt.byteorder not in "=|" else dt


class Client:
    """A connection to a broker and a mapping of its arena. A context manager.

    Not thread-safe and not fork-safe: create one per thread or process
    (handles pickle, clients do not).
    """

    def __init__(self, endpoint: str, *, name: str | None = None, role: str = "client",
                 timeout: float = 30.0, curve: tuple[str, str] | None = None,
                 transport: str = "unix", pool: bool = True) -> None:
        """``curve=(broker_public_key_file, own_secret_key_file)`` for a CURVE-protected broker.

        ``transport``: ``"unix"`` (default) carries requests over the Unix
        connection the arena came through; ``"zmq"`` keeps them on ZeroMQ.

        ``pool``: arrays of at most ``POOL_MAX`` bytes go into blocks this
        client takes from the broker a batch at a time (one round trip per
        batch of a size class: powers of two from 256 B), so most small
        ``put``/``alloc`` calls need no round trip. The blocks not yet used
        stay reserved for this client, at most ``POOL_REFILL_BYTES`` (or 4
        blocks) per size class, and return to the arena when it closes.
        """
        if transport not in ("unix", "zmq"):
            raise ValueError(f"transport must be 'unix' or 'zmq', got {transport!r}")
        self.endpoint = endpoint
        self.transport = transport
        self.pool = pool
        self._pool: dict[int, collections.deque[Handle]] = {}
        self.timeout = timeout
        self.name = name or f"{role}-{socket.gethostname()}-{os.getpid()}"
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            from .security import secure_client

            secure_client(self._sock, *curve)
        self._sock.connect(endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._rid = 0
        self.inbox: collections.deque[dict[str, Any]] = collections.deque()
        self._held: dict[int, Handle] = {}
        self._grants = 0
        self._late: collections.deque[tuple[str, str]] = collections.deque()
        self._alive: socket.socket | None = None
        self._unix: socket.socket | None = None  # set once requests travel over ``_alive``
        self._frames = FrameReader()
        self._received: collections.deque[bytes] = collections.deque()
        self._upoll = select.poll()
        self.region: SharedRegion | None = None
        self._finalizer = weakref.finalize(self, _close_sockets, self._sock, self._ctx)
        try:
            hello = self._request("hello", name=self.name, pid=os.getpid(), role=role,
                                  _timeout=min(timeout, 10.0))
            self.broker = hello["broker"]
            self.cid = hello["cid"]
            self._attach(hello["fd_path"], hello["key"])
        except BaseException:
            self.close()
            raise

    def _attach(self, fd_path: str, key: str) -> None:
        alive = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        alive.settimeout(10.0)
        try:
            alive.connect(fd_path)
            alive.sendall(f"{key}+{self.transport}".encode())
            meta, fd = recv_fd(alive)
        except OSError as e:
            alive.close()
            raise BrokerGone(f"could not get the arena from the broker at {fd_path}: {e}") from e
        alive.setblocking(False)
        self._alive = alive
        weakref.finalize(self, alive.close)  # a client dropped without close() still lets go
        self._poller.register(alive.fileno(), zmq.POLLIN)
        self.region = SharedRegion.attach(fd, json.loads(meta)["name"])
        if self.transport == "unix":
            self._unix = alive
            self._upoll.register(alive.fileno(), select.POLLIN)

    # -- messaging --------------------------------------------------------------
    def send(self, op: str, **fields: Any) -> int:
        """Send a request without waiting; returns its request id.

        First raises the error of an earlier message that gets no reply
        (``drop``, ``grant``, ``claim``), if the broker refused one.
        """
        self._raise_late()
        self._rid += 1
        self._send(encode(op, self._rid, **fields))
        return self._rid

    def notify(self, op: str, **fields: Any) -> None:
        """Send a message that gets no reply (``drop``, ``grant``, ``claim``).

        If the broker refuses it, the refusal arrives as a ``late`` error while
        this client waits for a later reply, and the request after that raises
        it (the answer being waited for is not lost).
        """
        self._send(encode(op, 0, **fields))

    def _raise_late(self) -> None:
        if self._late:
            code, message = self._late.popleft()
            raise error_from_wire(code, f"an earlier message was refused: {message}")

    def _send(self, payload: bytes) -> None:
        if self._unix is not None:
            self._write(frame(payload))
        else:
            self._sock.send(payload)

    def _write(self, data: bytes) -> None:
        assert self._unix is not None
        view = memoryview(data)
        while view:
            try:
                view = view[self._unix.send(view):]
            except BlockingIOError:  # the broker is not reading yet: wait for room
                _, ready, _ = select.select([], [self._unix], [], self.timeout)
                if not ready:
                    raise BrokerTimeout(f"the broker at {self.endpoint} took no request for "
                                        f"{self.timeout:.1f} s") from None
            except OSError as e:
                raise BrokerGone(f"the broker at {self.endpoint} exited (its connection closed: "
                                 f"{e.strerror})") from None

    def _read_unix(self) -> bool:
        """Take what the Unix connection holds into ``_received``; False if nothing was there."""
        assert self._unix is not None
        try:
            data = self._unix.recv(1 << 18)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            raise BrokerGone(f"the broker at {self.endpoint} exited (its connection closed)")
        try:
            self._received.extend(self._frames.feed(data))
        except ProtocolError as e:
            raise BrokerGone(f"the broker at {self.endpoint} sent a bad frame: {e}") from None
        return True

    def recv(self, timeout: float | None) -> dict[str, Any] | None:
        """The next message from the broker, or None after ``timeout`` seconds."""
        if self._unix is not None:
            if not self._received and not self._read_unix():
                if not self._upoll.poll(None if timeout is None else max(0.0, timeout) * 1000):
                    return None
                self._read_unix()
            return decode(self._received.popleft()) if self._received else None
        if self._sock.poll(0, zmq.POLLIN):  # the common case: the reply is already here
            return decode(self._sock.recv())
        events = dict(self._poller.poll(None if timeout is None else int(timeout * 1000)))
        if self._sock in events:
            return decode(self._sock.recv())
        if self._alive is not None and self._alive.fileno() in events:
            try:
                data = self._alive.recv(64)
            except BlockingIOError:
                data = b"?"
            except OSError:
                data = b""
            if not data:
                raise BrokerGone(f"the broker at {self.endpoint} exited (its connection closed)")
        return None

    def wait(self, rid: int, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the reply to request ``rid``; other messages go to ``inbox``."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerTimeout(
                    f"no reply from the broker at {self.endpoint} within {timeout:.1f} s; "
                    f"is it running? (`shmbroker status`)"
                )
            msg = self.recv(left)
            if msg is None:
                continue
            if msg["op"] == "error" and msg.get("late"):  # for a no-reply message: raised by send()
                self._late.append((msg["code"], msg["message"]))
                continue
            if msg["rid"] == rid:
                if msg["op"] == "error":
                    raise error_from_wire(msg["code"], msg["message"])
                return msg
            if msg["rid"] == 0 and msg["op"] == "error":
                raise error_from_wire(msg["code"], msg["message"])
            self.inbox.append(msg)

    def _request(self, op: str, _timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        return self.wait(self.send(op, **fields), _timeout)

    # -- arrays -----------------------------------------------------------------
    def view(self, handle: Handle) -> np.ndarray:
        """The array a handle this client may read names, as a view of the arena."""
        assert self.region is not None, "client is closed"
        dt = np.dtype(handle.dtype)
        count = math.prod(handle.shape)
        if dt.itemsize * count > handle.nbytes or handle.offset + handle.nbytes > self.region.capacity:
            raise StaleHandle(f"handle {handle} does not fit its block")
        flat = np.frombuffer(self.region.buffer, dtype=dt, count=count, offset=handle.offset)
        return flat.reshape(handle.shape)

    def _check_broker(self, handle: Handle) -> None:
        if not isinstance(handle, Handle):
            raise TypeError(f"expected a Handle, got {type(handle).__name__}")
        if handle.broker != self.broker:
            raise StaleHandle(
                f"handle of broker {handle.broker!r} given to a client of broker {self.broker!r}; "
                f"a handle is valid only with the broker that made it"
            )

    def alloc(self, shape: Iterable[int] | int, dtype: Any = "float32",
              timeout: float | None = None) -> tuple[Handle, np.ndarray]:
        """A writable slot: ``(handle, view)``. Waits up to ``timeout`` s for space."""
        dt = array_spec(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
        nbytes = dt.itemsize * math.prod(shape)
        wait = self.timeout if timeout is None else timeout
        if self.pool and 0 < nbytes <= POOL_MAX:
            block = self._from_pool(nbytes, wait)
            handle = Handle(self.broker, block.oid, block.generation, block.offset, nbytes, dt.str,
                            shape, c_strides(shape, dt.itemsize))
        else:
            reply = self._request("alloc", _timeout=wait + 5.0, nbytes=nbytes, dtype=dt.str,
                                  shape=list(shape), timeout=wait)
            handle = Handle.from_wire(reply["handle"])
        self._held[handle.oid] = handle
        return handle, self.view(handle)

    def _from_pool(self, nbytes: int, wait: float) -> Handle:
        """A block of ``nbytes``' size class this client already holds; refilled in one round trip."""
        size = _size_class(nbytes)
        blocks = self._pool.setdefault(size, collections.deque())
        if not blocks:
            count = max(4, min(64, POOL_REFILL_BYTES // size))
            reply = self._request("alloc_many", _timeout=wait + 5.0, nbytes=size, dtype="|u1",
                                  shape=[size], timeout=wait, count=count)
            blocks.extend(Handle.from_wire(w) for w in reply["handles"])
        return blocks.popleft()

    def put(self, array: Any, timeout: float | None = None) -> Handle:
        """Copy ``array`` into the arena (exactly one copy) and return its handle.

        Non-contiguous, negatively strided and non-native byte-order inputs are
        accepted: the one copy makes them C-contiguous and native.
        """
        array = np.asarray(array)
        handle, out = self.alloc(array.shape, array.dtype, timeout)
        np.copyto(out, array, casting="no" if array.dtype == out.dtype else "equiv")
        return handle

    def grant(self, handle: Handle, uses: int = 1, ttl: float = 30.0) -> Handle:
        """A copy of ``handle`` that carries a lease for its receiver(s).

        The broker holds the lease until ``uses`` receivers have claimed it
        or ``ttl`` seconds have passed, even if this client releases or dies
        meanwhile. A receiver's ``get`` then maps the array at once and claims
        the lease with a message it does not wait for: a hand-off with no
        round trip on the receiver's side. After ``ttl / 2`` seconds the
        receiver falls back to an ordinary ``get`` (a round trip; the array
        must still be alive). Over ``transport="zmq"`` the grant waits for
        its reply, since a message ZeroMQ has queued is lost if this process
        dies; over the Unix connection it is in the kernel when this returns.

        Over the Unix connection a refused grant (the handle was already
        stale, or this client has 100,000 grants nobody claimed) is raised by
        this client's next request; a receiver that claims it after the
        array is gone gets ``StaleHandle`` at its own next request.
        """
        self._check_broker(handle)
        if not 0 < ttl <= 3600 or not 0 < uses <= 1024:
            raise ValueError("grant: ttl must be in (0, 3600] s and uses in 1..1024")
        self._grants += 1
        token = self.cid << 32 | self._grants
        fields = dict(oid=handle.oid, gen=handle.generation, token=token, uses=uses, ttl=ttl)
        expires = time.monotonic() + ttl / 2
        self.notify("grant", **fields)
        if self._unix is None:
            self.ping()  # handled after the grant: when it returns, the grant is in the broker
            self._raise_late()
        return dataclasses.replace(handle, grant=token, expires=expires)

    def get(self, handle: Handle) -> np.ndarray:
        """A writable view of the array (no copy); takes a lease until ``release``.

        For a handle from ``grant`` (before its ``expires``), the lease is
        claimed without waiting for the broker.
        """
        self._check_broker(handle)
        held = self._held.get(handle.oid)
        if handle.grant and time.monotonic() < handle.expires:
            fresh = held is None or held.generation != handle.generation
            if fresh:
                held = dataclasses.replace(handle, grant=0, expires=0.0)
            assert held is not None
            array = self.view(held)  # bounds checked against the arena before anything else
            # claimed even when this client holds a lease already: the grant is used up
            self.notify("claim", oid=handle.oid, gen=handle.generation, token=handle.grant)
            self._held[held.oid] = held
            return array
        if held is None or held.generation != handle.generation:
            reply = self._request("acquire", oid=handle.oid, gen=handle.generation)
            held = self._adopt(handle, reply["handle"])
        return self.view(held)

    def get_many(self, handles: Iterable[Handle]) -> list[np.ndarray]:
        """``get`` for many handles: one round trip per 1024 of those this client does not hold yet.

        A stale handle raises ``StaleHandle`` and no lease of its group of 1024
        is taken; the leases of earlier groups are kept (``release`` drops them).
        """
        hs = list(handles)
        for h in hs:
            self._check_broker(h)
        todo = [h for h in hs if (held := self._held.get(h.oid)) is None or held.generation != h.generation]
        for i in range(0, len(todo), REFS_PER_MESSAGE):
            part = todo[i:i + REFS_PER_MESSAGE]
            reply = self._request("acquire_many", refs=[[h.oid, h.generation] for h in part])
            for h, wire in zip(part, reply["handles"], strict=True):
                self._adopt(h, wire)
        return [self.view(self._held[h.oid]) for h in hs]

    def _adopt(self, handle: Handle, wire: Any) -> Handle:
        """Hold an object after the broker granted its lease and returned its record.

        The broker's record is what gets mapped. A pooled block's record is
        only bytes (``|u1``) until it is published, so for one the caller's
        dtype and shape are used, checked to fit inside the block.
        """
        srv = Handle.from_wire(wire)
        if srv.dtype == "|u1" and srv.shape == (srv.nbytes,) and \
                (handle.dtype, handle.shape) != (srv.dtype, srv.shape):
            dt = np.dtype(handle.dtype)
            nbytes = dt.itemsize * math.prod(handle.shape)
            if nbytes > srv.nbytes:
                self._held[srv.oid] = srv  # the lease is taken: release(handle) still drops it
                raise StaleHandle(f"handle {handle} does not fit the broker's block {srv}")
            srv = Handle(srv.broker, srv.oid, srv.generation, srv.offset, nbytes, handle.dtype,
                         handle.shape, c_strides(handle.shape, dt.itemsize))
        self._held[srv.oid] = srv
        return srv

    def tensor(self, handle: Handle) -> torch.Tensor:
        """``torch.from_numpy(get(handle))``: zero-copy and writable."""
        from workers.bridge import to_tensor

        return to_tensor(self.get(handle))

    def release(self, handles: Handle | Iterable[Handle]) -> None:
        """Drop this client's reference(s); the block is freed with its last one.

        Does not wait for the broker: it frees the block when it reads the
        message, before anything this client sends afterwards.
        """
        hs = [handles] if isinstance(handles, Handle) else list(handles)
        for h in hs:
            self._check_broker(h)
            self._held.pop(h.oid, None)
        for i in range(0, len(hs), REFS_PER_MESSAGE):
            self.notify("drop", refs=[[h.oid, h.generation] for h in hs[i:i + REFS_PER_MESSAGE]])

    def publish(self, name: str, handle: Handle) -> None:
        """Make ``handle`` discoverable by ``name``; the broker keeps it alive until replaced."""
        self._check_broker(handle)
        self._request("publish", name=name, oid=handle.oid, gen=handle.generation,
                      dtype=handle.dtype, shape=list(handle.shape))

    def lookup(self, name: str, timeout: float = 5.0) -> Handle:
        """Wait up to ``timeout`` s for a handle published under ``name``."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            wire = self._request("lookup", name=name)["handle"]
            if wire is not None:
                return Handle.from_wire(wire)
            if time.monotonic() + delay > deadline:
                raise UnknownName(f"nothing was published as {name!r} within {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def stats(self) -> dict[str, Any]:
        """Arena and pipeline statistics: capacity, used, peak, objects, stages, ..."""
        return self._request("stats")["stats"]

    def ping(self, timeout: float | None = None) -> float:
        t = time.perf_counter()
        self._request("ping", _timeout=timeout)
        return time.perf_counter() - t

    def shutdown(self) -> None:
        """Ask the broker to stop (it removes its runtime directory)."""
        self._request("shutdown")

    # -- lifetime ---------------------------------------------------------------
    def close(self) -> None:
        if self._alive is not None:
            self._alive.close()
            self._alive = None
            self._unix = None
        if self.region is not None:
            self.region.close()
            self.region = None
        self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_sockets(sock: zmq.Socket, ctx: zmq.Context) -> None:
    sock.close(0)
    ctx.term()


class Broker:
    """Start a broker in its own process; stop it on exit. A context manager.

    ``endpoint`` is where clients connect (``Client(b.endpoint)``); by default
    an ipc socket in a fresh 0700 runtime directory.
    """

    def __init__(self, capacity: int = 256 * 2**20, *, endpoint: str | None = None,
                 stages: list[dict[str, Any]] | None = None, max_inflight: int = 0,
                 log_level: str = "WARNING", metrics_port: int | None = None,
                 curve: dict[str, str] | None = None, hwm: int = 10_000,
                 startup_timeout: float = 60.0) -> None:
        cmd = [sys.executable, "-m", "broker.server", "--capacity", str(int(capacity)),
               "--log-level", log_level, "--parent-pid", str(os.getpid()),
               "--max-inflight", str(max_inflight), "--hwm", str(hwm)]
        if endpoint:
            cmd += ["--endpoint", endpoint]
        if stages:
            cmd += ["--stages", json.dumps(stages)]
        if metrics_port is not None:
            cmd += ["--metrics-port", str(metrics_port)]
        if curve:
            cmd += ["--curve-secret", curve["secret"], "--curve-authorized", curve["authorized"]]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self._finalizer = weakref.finalize(self, _stop_process, self.proc)
        try:
            self.info = self._wait_ready(startup_timeout)
        except BaseException:
            self.close()
            raise
        self.endpoint: str = self.info["endpoint"]
        self.pid: int = self.proc.pid

    def _wait_ready(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            code = self.proc.poll()
            why = f"exited with code {code}" if code is not None else f"not ready in {timeout} s"
            raise BrokerError(f"the broker process {why}; its log is on stderr above")
        info = json.loads(line)
        if "error" in info:
            raise BrokerError(f"the broker did not start: {info['error']}")
        return info

    def close(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after 10 s); it removes its runtime directory."""
        self._finalizer()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
