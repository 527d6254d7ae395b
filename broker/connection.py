"""One client's connection to a broker: hello over ZeroMQ, the arena by descriptor, then typed messages.

A client says hello over ZeroMQ, then fetches the arena's descriptor once
over the broker's Unix socket (``fd.sock``) and maps it; that connection
stays open for the client's life and is how each side learns the other has
died. By default the client's requests and the broker's replies and tasks
then travel over that same connection (``transport="unix"``), which skips
ZeroMQ's I/O threads; ``transport="zmq"`` keeps them on the DEALER socket.

A connection belongs to the process that made it: used in a forked child it
raises ``BrokerError`` (the child must connect anew), as pyzmq guards its
contexts.
"""

from __future__ import annotations

import collections
import json
import os
import select
import socket
import time
import weakref

import zmq

from .arena import SharedRegion, recv_fd
from .errors import BrokerError, BrokerGone, BrokerTimeout, error_from_wire
from .protocol import Error, FrameReader, Hello, Message, ProtocolError, Welcome, decode, encode, frame

__all__ = ["Connection"]

_FORKS = [0]  # bumped in every child after a fork: connections made before it are not the child's
os.register_at_fork(after_in_child=lambda: _FORKS.__setitem__(0, _FORKS[0] + 1))


class Connection:
    """Messages to and from one broker, and the arena mapped; not thread-safe, not fork-safe."""

    def __init__(self, endpoint: str, *, name: str, role: str, timeout: float = 30.0,
                 curve: tuple[str, str] | None = None, transport: str = "unix") -> None:
        if transport not in ("unix", "zmq"):
            raise ValueError(f"transport must be 'unix' or 'zmq', got {transport!r}")
        self.endpoint = endpoint
        self.transport = transport
        self.timeout = timeout
        self.name = name
        self._fork = _FORKS[0]
        self._pid = os.getpid()
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
        self.inbox: collections.deque[Message] = collections.deque()
        self._late: collections.deque[Error] = collections.deque()
        self._alive: socket.socket | None = None
        self._unix: socket.socket | None = None  # set once requests travel over ``_alive``
        self._frames = FrameReader()
        self._received: collections.deque[bytes] = collections.deque()
        self._deferred: list[bytes] = []  # frames of no-reply messages that go with the next write
        self._upoll = select.poll()
        self.region: SharedRegion | None = None
        self._finalizer = weakref.finalize(self, _close_sockets, self._sock, self._ctx)
        try:
            hello = self.request(Hello(name=name, pid=os.getpid(), role=role), min(timeout, 10.0))
            assert isinstance(hello, Welcome)
            self.broker = hello.broker
            self.cid = hello.cid
            self.slot = hello.slot  # this client's hold table (-1: none)
            self.capacity = hello.capacity
            self._attach(hello.fd_path, hello.key)
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

    def check_process(self) -> None:
        """Raise if this connection was inherited through ``fork``: it is the parent's."""
        if self._fork != _FORKS[0]:
            raise BrokerError(
                f"this Client was created in process {self._pid} and used in its forked child "
                f"{os.getpid()}; a client's leases and socket belong to the process that made it: "
                f"create a new Client in the child (handles pickle and may be passed to it)")

    # -- sending ----------------------------------------------------------------------------------
    def send(self, msg: Message) -> int:
        """Send a request without waiting; returns its request id.

        First raises the error of an earlier message that gets no reply
        (``drop``, ``grant``, ``claim``), if the broker refused one.
        """
        self.raise_late()
        self._rid += 1
        msg.rid = self._rid
        self._send(encode(msg))
        return self._rid

    def notify(self, msg: Message, defer: bool = False) -> None:
        """Send a message that gets no reply (``drop``, ``grant``, ``claim``).

        If the broker refuses it, the refusal arrives as a ``late`` error while
        this client waits for a later reply, and the request after that raises
        it (the answer being waited for is not lost).

        ``defer``: over the Unix connection, the message goes out with this
        connection's next write (a request, another message) or before it next
        waits for the broker, whichever comes first (``flush``), in the order
        sent: one write and one wake-up of the broker for several messages.
        """
        if defer and self._unix is not None:
            self.check_process()
            self._deferred.append(frame(encode(msg)))
            return
        self._send(encode(msg))

    def flush(self) -> None:
        """Write the deferred messages now."""
        if self._deferred:
            data = b"".join(self._deferred)
            self._deferred.clear()
            self._write(data)

    def raise_late(self) -> None:
        if self._late:
            err = self._late.popleft()
            raise error_from_wire(err.code, f"an earlier message was refused: {err.message}")

    def poll_late(self) -> None:
        """Raise a refusal of an earlier no-reply message if one has arrived (does not block)."""
        if self._unix is not None and self._read_unix():
            self._sort_received()
        self.raise_late()

    def _sort_received(self) -> None:
        keep: collections.deque[bytes] = collections.deque()
        while self._received:
            payload = self._received.popleft()
            msg = decode(payload)
            if isinstance(msg, Error) and msg.late:
                self._late.append(msg)
            else:
                keep.append(payload)
        self._received = keep

    def _send(self, payload: bytes) -> None:
        self.check_process()
        if self._unix is not None:
            if self._deferred:
                self._deferred.append(frame(payload))
                self.flush()
            else:
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

    # -- receiving --------------------------------------------------------------------------------
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

    def recv(self, timeout: float | None) -> Message | None:
        """The next message from the broker, or None after ``timeout`` seconds."""
        self.check_process()
        if self._unix is not None:
            self.flush()  # nothing deferred waits while this client does
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

    def next_message(self, timeout: float | None) -> Message | None:
        """The next unsolicited message (a task, a failure) or reply not waited for, or None."""
        if self.inbox:
            return self.inbox.popleft()
        msg = self.recv(timeout)
        while isinstance(msg, Error) and msg.late:
            self._late.append(msg)
            msg = self.recv(0)
        return msg

    def wait(self, rid: int, timeout: float | None = None) -> Message:
        """Wait for the reply to request ``rid``; other messages go to ``inbox``."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerTimeout(
                    f"no reply from the broker at {self.endpoint} within {timeout:.1f} s; "
                    f"is it running? (`shmbroker status`)")
            msg = self.recv(left)
            if msg is None:
                continue
            if isinstance(msg, Error):
                if msg.late:  # for a no-reply message: raised by send()
                    self._late.append(msg)
                    continue
                if msg.rid in (rid, 0):
                    raise error_from_wire(msg.code, msg.message)
            if msg.rid == rid:
                return msg
            self.inbox.append(msg)

    def request(self, msg: Message, timeout: float | None = None) -> Message:
        return self.wait(self.send(msg), timeout)

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        if self._deferred and self._unix is not None:
            try:
                self.flush()
            except BrokerError:  # the broker is gone: what was deferred is moot
                self._deferred.clear()
        if self._alive is not None:
            self._alive.close()
            self._alive = None
            self._unix = None
        if self.region is not None:
            self.region.close()
            self.region = None
        self._finalizer()


def _close_sockets(sock: zmq.Socket, ctx: zmq.Context) -> None:
    sock.close(0)
    ctx.term()

