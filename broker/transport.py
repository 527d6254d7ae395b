"""The broker's sockets, all of them: ZeroMQ ROUTER and PUB, the Unix listener, each client's Unix connection.

::

    client ──hello──▶ ROUTER ──▶ server: a Link (client id, key)
    client ──connect fd.sock, send key──▶ listener ──▶ handshake: peer uid checked,
            the arena's descriptor sent back (SCM_RIGHTS); the connection stays open
    client ══ requests / replies / tasks ══ that connection (length-prefixed frames),
            or the DEALER/ROUTER pair for a client on ``transport="zmq"``
    client's process dies ──▶ the kernel closes the connection ──▶ on_close(link)

The transport decodes nothing: it hands each payload to the server's
``on_message(peer, payload)`` (``peer`` is a ``Link``, or the ZeroMQ
identity of a client that has not said hello) and reports a closed or
dropped connection with ``on_close(link, why)``. It never blocks: what a
client's socket does not take is queued on its link and flushed when the
socket is writable; a client that lets ``MAX_BACKLOG`` pile up is dropped.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import zmq

from .arena import SharedRegion, send_fd
from .errors import format_bytes
from .protocol import FrameReader, ProtocolError, frame
from .rundir import RunDir
from .security import check_bind, secure_server

__all__ = ["Link", "Transport", "MAX_BACKLOG"]

log = logging.getLogger("shmbroker.transport")

_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: pyzmq's enums cost a Flag op per turn
MAX_BACKLOG = 64 << 20  # bytes queued for a Unix-connected client that is not reading: then it is dropped
HANDSHAKE_TIMEOUT = 5.0  # seconds a connection to fd.sock has to send its key


@dataclass(eq=False)
class Link:
    """One client's connection: its ZeroMQ identity and, once attached, its Unix socket."""

    cid: int
    identity: bytes
    key: str
    sock: socket.socket | None = None
    unix: bool = False  # requests, replies and tasks travel over ``sock`` (else over ZeroMQ)
    frames: FrameReader = field(default_factory=FrameReader)
    backlog: bytearray = field(default_factory=bytearray)  # bytes the socket did not take yet
    dead: str = ""  # set when the connection must be dropped


Peer = Link | bytes
OnMessage = Callable[[Peer, bytes], None]
OnClose = Callable[[Link, str], None]


class Transport:
    """Binds the broker's endpoints in ``rundir`` and moves payloads; a context manager."""

    def __init__(self, rundir: RunDir, region: SharedRegion, on_message: OnMessage, on_close: OnClose,
                 endpoint: str | None = None, events: str | None = None, hwm: int = 10_000,
                 curve: dict[str, str] | None = None) -> None:
        if endpoint:
            check_bind(endpoint, bool(curve))
        self.region = region
        self.on_message = on_message
        self.on_close = on_close
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.SNDHWM, hwm)
        self.router.setsockopt(zmq.RCVHWM, hwm)
        self.router.setsockopt(zmq.LINGER, 0)
        self.auth = secure_server(self.ctx, self.router, curve["secret"], curve["authorized"]) \
            if curve else None
        self.endpoint = endpoint or f"ipc://{rundir.file('broker.sock')}"
        self.router.bind(self.endpoint)
        if self.endpoint.startswith("tcp://") and self.endpoint.endswith(":0"):
            self.endpoint = self.router.get_string(zmq.LAST_ENDPOINT)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.events = events or f"ipc://{rundir.file('events.sock')}"
        self.pub.bind(self.events)
        self.fd_path = rundir.file("fd.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.fd_path)
        os.chmod(self.fd_path, 0o600)
        self.listener.listen(128)
        self.listener.setblocking(False)
        # epoll, not zmq.Poller: one epoll_wait per wait (zmq_poll polls once without waiting
        # first, and rebuilds its item array at every call). Ping, median of 5 A/B pairs on the
        # 2-core VM (2026-12-04): the broker's CPU 50 -> 47 us per round trip, rtt 91 -> 78 us.
        # The ROUTER is watched through its ZMQ_FD, which only says "look at ZMQ_EVENTS": the
        # loop checks ZMQ_EVENTS at every turn (``poll``), so nothing waits behind it.
        self.epoll = select.epoll()
        self.router_fd = int(self.router.getsockopt(zmq.FD))
        self._router_dirty = True  # ask ZMQ_EVENTS at the next poll
        self.epoll.register(self.router_fd, select.EPOLLIN)
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self._watched: set[int] = {self.router_fd, self.listener.fileno()}
        self.links: dict[bytes, Link] = {}  # by ZeroMQ identity
        self._by_fd: dict[int, Link] = {}
        self._unkeyed: dict[int, tuple[socket.socket, float]] = {}
        self.bad_frames = 0

    # -- links ------------------------------------------------------------------------------------
    def new_link(self, identity: bytes, cid: int) -> Link:
        """A client said hello: a link with the key it must present on ``fd.sock``."""
        link = Link(cid, identity, secrets.token_hex(16))
        self.links[identity] = link
        return link

    def forget(self, link: Link, why: str) -> None:
        """Close a link's connection and forget it (the server already dropped the client)."""
        link.dead = link.dead or why
        if self.links.get(link.identity) is link:
            del self.links[link.identity]
        if link.sock is not None:
            self._by_fd.pop(link.sock.fileno(), None)
            self._unwatch(link.sock.fileno())
            link.sock.close()

    # -- sending ----------------------------------------------------------------------------------
    def send(self, to: Peer, payload: bytes) -> None:
        """One payload to a client: over its Unix connection, or by ZeroMQ identity."""
        if isinstance(to, Link):
            if to.unix:
                return self._send_unix(to, payload)
            to = to.identity
        self._router_dirty = True
        try:
            self.router.send_multipart([to, payload], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # peer gone (ROUTER_MANDATORY) or its queue full
            log.warning("cannot send to client %r: %s", to, e)

    def publish(self, topic: bytes, payload: bytes) -> None:
        self.pub.send_multipart([topic, payload])

    def _send_unix(self, link: Link, payload: bytes) -> None:
        if link.sock is None or link.dead:
            return
        data = frame(payload)
        if not link.backlog:
            try:
                n = link.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:  # the peer is gone; the poll loop sees the close and drops it
                return
            if n == len(data):
                return
            data = data[n:]
            self._watch(link.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)
        link.backlog += data
        if len(link.backlog) > MAX_BACKLOG:
            link.dead = f"it stopped reading ({format_bytes(len(link.backlog))} of messages queued)"

    def _flush(self, link: Link) -> None:
        assert link.sock is not None
        try:
            n = link.sock.send(link.backlog)
        except BlockingIOError:
            return
        except OSError:
            link.backlog.clear()
            return
        del link.backlog[:n]
        if not link.backlog:
            self._watch(link.sock.fileno(), select.EPOLLIN)

    def _watch(self, fd: int, events: int) -> None:
        if fd in self._watched:
            self.epoll.modify(fd, events)
        else:
            self.epoll.register(fd, events)
            self._watched.add(fd)

    def _unwatch(self, fd: int) -> None:
        if fd in self._watched:
            self._watched.discard(fd)
            self.epoll.unregister(fd)

    # -- receiving --------------------------------------------------------------------------------
    def poll(self, timeout_ms: int) -> None:
        """Wait up to ``timeout_ms`` for traffic; hand every payload and close to the server."""
        # ZMQ_EVENTS is asked only when the ROUTER may hold something: its ZMQ_FD turned
        # readable, or this process sent on it (a send may take in the signal of a message that
        # arrived). Asking costs an enum lookup in pyzmq, 12-15 % of the broker's CPU when it was
        # asked twice per turn (py-spy --gil, an alloc/release loop).
        router_ready = self._router_dirty and bool(int(self.router.getsockopt(_EVENTS)) & _POLLIN)
        for fd, ev in self.epoll.poll(0 if router_ready else timeout_ms / 1000):
            if fd == self.router_fd:
                self._router_dirty = True  # ZMQ_EVENTS says what it holds, below
                continue
            if fd == self.listener.fileno():
                self._accept()
            elif fd in self._unkeyed:
                self._handshake(fd)
            else:
                link = self._by_fd.get(fd)
                if link is not None and ev & select.EPOLLOUT and link.backlog:
                    self._flush(link)
                if link is not None and ev & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                    self._read(link)
        if router_ready or self._router_dirty:
            while int(self.router.getsockopt(_EVENTS)) & _POLLIN:
                self._drain_router()
            self._router_dirty = False
        now = time.monotonic()
        if self._unkeyed:
            self._expire_unkeyed(now)
        for link in [k for k in self.links.values() if k.dead]:
            self.on_close(link, link.dead)

    def _drain_router(self) -> None:
        for _ in range(1000):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            if len(frames) != 2:
                if frames:
                    self.on_message(frames[0], b"")  # an empty payload: refused as not msgpack
                continue
            identity, payload = frames
            link = self.links.get(identity)
            if link is not None and link.unix:  # it talks over its Unix connection now
                self.bad_frames += 1
                continue
            self.on_message(link if link is not None else identity, payload)

    def _accept(self) -> None:
        """Accept a descriptor request; its key is read when it arrives (never blocking the loop)."""
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        self._unkeyed[sock.fileno()] = (sock, time.monotonic() + HANDSHAKE_TIMEOUT)
        self._watch(sock.fileno(), select.EPOLLIN)

    def _handshake(self, fd: int) -> None:
        sock, _deadline = self._unkeyed.pop(fd)
        self._unwatch(fd)
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            _pid, uid, _gid = np.frombuffer(creds, dtype=np.int32)
            key, _, mode = sock.recv(64).decode(errors="replace").partition("+")
            link = next((k for k in self.links.values() if k.key == key and k.sock is None), None)
            if link is None or uid != os.getuid():
                raise PermissionError("unknown key or other user")
            sock.settimeout(2.0)
            send_fd(sock, self.region.fd, json.dumps(
                {"capacity": self.region.capacity, "name": self.region.name}).encode())
            sock.setblocking(False)
        except (OSError, PermissionError) as e:
            log.warning("refused a descriptor request: %s", e)
            sock.close()
            return
        link.sock = sock
        link.unix = mode == "unix"
        self._by_fd[sock.fileno()] = link
        self._watch(sock.fileno(), select.EPOLLIN)

    def _expire_unkeyed(self, now: float) -> None:
        for fd, (sock, deadline) in list(self._unkeyed.items()):
            if now > deadline:
                del self._unkeyed[fd]
                self._unwatch(fd)
                sock.close()
                log.warning("closed a descriptor request that sent no key within %.0f s",
                            HANDSHAKE_TIMEOUT)

    def _read(self, link: Link) -> None:
        """Requests from a Unix-connected client, or the close of any client's connection."""
        assert link.sock is not None
        try:
            data = link.sock.recv(1 << 18)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.on_close(link, "its connection closed (process exited)")
            return
        if not link.unix:
            return  # a liveness-only connection: nothing is expected on it
        try:
            payloads = link.frames.feed(data)
        except ProtocolError as e:
            self.bad_frames += 1
            self.on_close(link, f"it sent a bad frame ({e})")
            return
        for payload in payloads:
            if link.dead or self.links.get(link.identity) is not link:
                return
            self.on_message(link, payload)

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        for link in list(self.links.values()):
            if link.sock is not None:
                link.sock.close()
        for sock, _ in self._unkeyed.values():
            sock.close()
        self.epoll.close()
        self.listener.close()
        self.router.close(0)
        self.pub.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
