"""Hypothesis sends thousands of arbitrary frames, as a stranger and as an attached client; the broker keeps serving."""

from __future__ import annotations

import os
import socket

import msgpack
import msgspec
import numpy as np
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import Broker, Client
from broker.arena import recv_fd
from broker.protocol import KINDS, VERSION, FrameReader, Hello, Ping, decode, encode, frame

FIELDS = sorted({f.encode_name for cls in KINDS.values() for f in msgspec.structs.fields(cls)}
                | {"v", "op", "rid"})
REQUESTS = sorted(set(KINDS) - {"shutdown"})  # an attached client may stop the broker: not here
scalars = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | \
    st.text(max_size=20) | st.binary(max_size=20)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c,
                                                                                     max_size=3),
                      max_leaves=12)
small = st.integers(0, 8) | st.sampled_from([1 << 32 | 1, 2 << 32 | 1]) | values


def messages(kinds: list[str]) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {"v": st.sampled_from([VERSION, VERSION, 0, 2, "1", True]), "op": st.sampled_from(kinds) | values,
         "rid": st.integers(-5, 2**40) | values},
        optional={f: small for f in FIELDS if f not in ("v", "op", "rid")},
    )


def _like(value: object) -> st.SearchStrategy:
    """Values of the same shape as a valid field's: most pass the schema and reach a handler."""
    if isinstance(value, bool):
        return st.booleans() | small
    if isinstance(value, int):
        return st.integers(0, 12) | st.just(value) | small
    if isinstance(value, float):
        return st.floats(0, 2) | st.just(value) | small
    if isinstance(value, str):
        return st.sampled_from(["a", "__sink__", "<f4", "|u1", "bfloat16", "x" * 300]) | st.just(value)
    if isinstance(value, list):
        return st.lists(st.integers(0, 12) | st.lists(st.integers(0, 12), min_size=2, max_size=2),
                        max_size=4) | st.just(value)
    return st.just(value) | values


def valid_like(kinds: list[str]) -> st.SearchStrategy[dict]:
    """Messages built on a valid sample of each kind, each field drawn near its valid values."""
    from test_protocol import SAMPLES

    def build(kind: str) -> st.SearchStrategy[dict]:
        template = msgspec.to_builtins(SAMPLES[kind])
        return st.fixed_dictionaries({k: (st.just(v) if k in ("op", "v") else _like(v))
                                      for k, v in template.items()})

    return st.one_of([build(k) for k in kinds])


def packed(m: object) -> bytes:
    return msgpack.packb(m, use_bin_type=True)


def frames(kinds: list[str]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=300), messages(kinds).map(packed),
                     st.lists(values, max_size=5).map(packed))


SETTINGS = settings(max_examples=2500, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_arbitrary_frames_each_get_a_reply_and_data_stays_intact() -> None:
    """A stranger (no hello): every frame gets exactly one reply, an error or a pong."""
    data = np.arange(10_000, dtype=np.float64)
    with Broker(capacity=8 * 2**20) as b, Client(b.endpoint) as good:
        h = good.put(data)
        ctx = zmq.Context()
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(b.endpoint)
        sent = []

        @SETTINGS
        @given(frame=frames(sorted(KINDS)))
        def one(frame: bytes) -> None:
            raw.send(frame)
            assert raw.poll(5000), f"no reply to {frame[:60]!r}"
            reply = decode(raw.recv())  # every reply is itself a valid message
            assert reply.kind in ("ok", "error", "welcome", "stats_reply")
            sent.append(frame)

        try:
            one()
        finally:
            raw.close(0)
            ctx.term()
        assert len(sent) >= 2000
        np.testing.assert_array_equal(good.get(h), data)  # no other client's data was touched
        stats = good.stats()
        assert stats["counters"].get("bad_messages", 0) > 500


class Attached:
    """A client that said hello and took the arena's descriptor, then speaks raw frames."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(endpoint)
        dealer.send(encode(Hello(rid=1, name="fuzz", pid=os.getpid(), role="fuzz")))
        assert dealer.poll(5000)
        hello = decode(dealer.recv())
        self.dealer = dealer
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(hello.fd_path)
        self.sock.sendall(f"{hello.key}+unix".encode())
        _meta, fd = recv_fd(self.sock)
        os.close(fd)
        self.frames = FrameReader()
        self.pings = 1 << 50

    def exchange(self, payload: bytes) -> list:
        """Send one hostile payload, then a ping; return every message that came back before
        the ping's answer (the broker answers one connection's frames in order)."""
        self.pings += 1
        self.sock.sendall(frame(payload) + frame(encode(Ping(rid=self.pings))))
        got: list = []
        while True:
            data = self.sock.recv(1 << 16)
            assert data, "the broker closed an attached client's connection over a well-framed payload"
            for p in self.frames.feed(data):
                msg = decode(p)  # every message the broker sends is valid
                if msg.kind == "ok" and msg.rid == self.pings:
                    return got
                got.append(msg)

    def close(self) -> None:
        self.sock.close()
        self.dealer.close(0)
        self.ctx.term()


def test_hostile_frames_from_an_attached_client_reach_the_handlers_and_harm_nobody() -> None:
    """Past hello and the arena handshake, hostile payloads reach the request handlers: each is
    answered or refused, the broker keeps serving, another client's data is untouched."""
    data = np.arange(10_000, dtype=np.float64)
    with Broker(capacity=8 * 2**20, wait_timeout=0.01) as b, Client(b.endpoint) as good:
        h = good.put(data)
        leases = good.stats()["sizes"]["leases"]
        raw = Attached(b.endpoint)
        kinds: dict[str, int] = {}

        @SETTINGS
        @given(payload=frames(REQUESTS) | valid_like(REQUESTS).map(packed))
        def one(payload: bytes) -> None:
            try:
                op = msgpack.unpackb(payload).get("op")
            except Exception:
                op = None
            if op == "shutdown":
                return
            for msg in raw.exchange(payload):
                kinds[msg.kind] = kinds.get(msg.kind, 0) + 1

        try:
            one()
            handled = good.stats()["requests"]
        finally:
            raw.close()
        np.testing.assert_array_equal(good.get(h), data)
        # the handlers were reached, not only the decoder: requests of many kinds were served
        served = {k for k, n in handled.items() if n and k not in ("ping", "stats", "hello")}
        assert len(served) >= 10, served
        assert kinds.get("error", 0) > 100
        sizes = good.stats()["sizes"]  # the fuzzer is gone: what it held was given back
        assert sizes["leases"] == leases, sizes  # the good client's own
        assert sizes["reservations"] == 0 and sizes["tasks"] == 0 and sizes["pending"] == 0, sizes
        assert sizes["sessions"] == 1, sizes
