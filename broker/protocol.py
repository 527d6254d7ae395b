"""The wire format: every message kind, the Handle, msgpack encode/decode with validation.

Nothing else in the project calls ``msgpack``.

Frames
------
A client says ``hello`` to the broker's ROUTER socket through a DEALER, then
fetches the arena's descriptor over the broker's Unix socket (``fd.sock``).
From then on its requests, the replies and its tasks travel over that Unix
connection, each payload prefixed by its length (4 bytes, little-endian);
a client that asks for it (``transport="zmq"``) keeps using the DEALER. The
broker's events go out on a PUB socket::

    client DEALER                       broker ROUTER
    [payload] ───────────────────────▶  [identity][payload]
    [payload] ◀───────────────────────  [identity][payload]    (reply or task)

    client fd.sock connection           broker
    [len][payload] ──────────────────▶  (same payloads)
    [len][payload] ◀──────────────────

    broker PUB  ──▶ [topic][payload]     topic: b"publish" | b"stats"

Why two transports: a ZeroMQ round trip passes through an I/O thread on each
side; the Unix connection does not, and measured 2–5× faster per round trip
at half the CPU on the 2-core reference machine (benchmarks/NOTES.md).

``payload`` is one msgpack map::

    {"v": 1, "op": <kind>, "rid": <request id, 0 if unsolicited>, <fields>}

Every request gets exactly one reply with the same ``rid``: ``{"op": "ok", ...}``
or ``{"op": "error", "code": <BrokerError subclass name>, "message": ...}``;
except the kinds in ``NO_REPLY`` (``drop``, ``grant``, ``claim``), which are
answered only when refused, by an error marked ``late`` (the client raises it
at its next request). The broker also sends unsolicited ``task`` messages
(rid 0) to workers and to the pipeline driver, which credit-based flow
control bounds.

A payload that is not msgpack, not a map, of another version, of an unknown
kind, or whose fields have the wrong type is refused by ``decode`` with
``ProtocolError``; the broker answers it with an error and keeps serving. On
a Unix connection a length over ``MAX_MESSAGE`` cannot be skipped (the stream
cannot be resynchronised), so the broker closes that connection instead.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

VERSION = 1
MAX_MESSAGE = 1 << 20  # bytes; handles are ~100 B, a task a few hundred

__all__ = ["VERSION", "MAX_MESSAGE", "NO_REPLY", "Handle", "ProtocolError", "KINDS", "encode", "decode",
           "frame", "FrameReader", "c_strides"]


class ProtocolError(ValueError):
    """A message that cannot be decoded or does not match its kind's schema."""


_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_LIST = (list,)
_OPT_INT = (int, type(None))
_OPT_NUM = (int, float, type(None))

# kind -> {field: allowed Python types}. Every field listed is required.
KINDS: dict[str, dict[str, tuple[type, ...]]] = {
    # client -> broker
    "hello": {"name": _STR, "pid": _INT, "role": _STR},
    "ping": {},
    "alloc": {"nbytes": _INT, "dtype": _STR, "shape": _LIST, "timeout": _OPT_NUM},
    "acquire": {"oid": _INT, "gen": _INT},
    "alloc_many": {"nbytes": _INT, "dtype": _STR, "shape": _LIST, "timeout": _OPT_NUM, "count": _INT},
    "acquire_many": {"refs": _LIST},
    "release": {"refs": _LIST},
    "drop": {"refs": _LIST},  # a release that gets no reply
    "grant": {"oid": _INT, "gen": _INT, "token": _INT, "uses": _INT, "ttl": _NUM},  # no reply
    "claim": {"oid": _INT, "gen": _INT, "token": _INT},  # no reply
    "publish": {"name": _STR, "oid": _INT, "gen": _INT, "dtype": _STR, "shape": _LIST},
    "lookup": {"name": _STR},
    "stats": {},
    "pipeline": {"stages": _LIST, "max_inflight": _INT},
    "register": {"stage": _STR, "credits": _INT, "device": _STR},
    "reserve": {"stage": _INT, "items": _LIST, "shape": _LIST, "dtype": _STR,
                "timeout": _OPT_NUM},
    "commit": {"rsv": _INT},
    "cancel": {"rsv": _INT},
    "done": {"task": _INT, "rsv": _OPT_INT, "credit": _INT, "busy": _NUM},
    "fail": {"task": _INT, "error": _STR, "trace": _STR, "credit": _INT},
    "eof": {"items": _INT},
    "shutdown": {},
    # broker -> client
    "ok": {},
    "error": {"code": _STR, "message": _STR},
    "task": {"task": _INT, "stage": _INT, "items": _LIST, "handle": _LIST, "rows": _INT},
    "failure": {"stage": _STR, "items": _LIST, "error": _STR, "trace": _STR, "fatal": _INT},
}

NO_REPLY = frozenset({"drop", "grant", "claim"})  # kinds answered only if refused (``late`` errors)

_packer = msgpack.Packer(use_bin_type=True)


def encode(op: str, rid: int = 0, **fields: Any) -> bytes:
    """Build one payload; ``fields`` are the kind's fields (extra ones allowed on replies)."""
    fields["v"] = VERSION
    fields["op"] = op
    fields["rid"] = rid
    return _packer.pack(fields)


def decode(payload: bytes) -> dict[str, Any]:
    """Decode and validate one payload, or raise ``ProtocolError`` saying why."""
    if len(payload) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds the {MAX_MESSAGE} byte limit")
    try:
        msg = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises a zoo of types on garbage
        raise ProtocolError(f"not a msgpack message: {type(e).__name__}: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"message must be a map, got {type(msg).__name__}")
    if type(msg.get("v")) is not int or msg["v"] != VERSION:  # True and 1.0 equal 1 too
        raise ProtocolError(f"protocol version {msg.get('v')!r} is not supported (want {VERSION})")
    op, rid = msg.get("op"), msg.get("rid")
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise ProtocolError(f"field 'rid' must be an integer, got {type(rid).__name__}")
    spec = KINDS.get(op) if isinstance(op, str) else None
    if spec is None:
        raise ProtocolError(f"unknown message kind {op!r}")
    for name, types in spec.items():
        value = msg.get(name, _MISSING)
        if value is _MISSING:
            raise ProtocolError(f"{op}: missing field {name!r}")
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            want = " or ".join(t.__name__ for t in types)
            raise ProtocolError(f"{op}: field {name!r} must be {want}, got {type(value).__name__}")
    return msg


_MISSING = object()

_LEN = struct.Struct("<I")


def c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """The strides of a C-contiguous array of ``shape`` (every array in the arena is one)."""
    strides, step = [], itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def frame(payload: bytes) -> bytes:
    """One payload as sent over a Unix connection: its length, then the bytes."""
    return _LEN.pack(len(payload)) + payload


class FrameReader:
    """Splits a byte stream into length-prefixed payloads."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the payloads now complete, in order.

        A length over ``MAX_MESSAGE`` raises ``ProtocolError``: the stream
        cannot be resynchronised after it, so the connection must be closed.
        """
        buf = self._buf
        buf += data
        out, pos, end = [], 0, len(buf)
        while end - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if n > MAX_MESSAGE:
                raise ProtocolError(f"frame of {n} bytes exceeds the {MAX_MESSAGE} byte limit")
            if end - pos - 4 < n:
                break
            out.append(bytes(buf[pos + 4:pos + 4 + n]))
            pos += 4 + n
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete payload held back."""
        return len(self._buf)


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > 32:
        raise ProtocolError(f"handle {what} must be a list of at most 32 integers")
    out = tuple(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in out):
        raise ProtocolError(f"handle {what} must hold non-negative integers, got {value!r:.80}")
    return out


@dataclass(frozen=True, slots=True)
class Handle:
    """A reference to an array in a broker's arena: ~100 bytes on the wire.

    Pass it to any process (msgpack via ``to_wire``, or pickle); ``Client.get``
    there resolves it against the broker's own table, which checks
    ``broker``, ``oid`` and ``generation`` so a handle to a released or reused
    block is refused, never read as garbage. Arrays in the arena are
    C-contiguous; ``strides`` are recorded for the consumer's convenience.

    A handle from ``Client.grant`` also carries ``grant`` (a token for a lease
    the broker holds for the receiver) and ``expires`` (``time.monotonic()``
    before which the receiver may use it without asking the broker first).
    """

    broker: str
    oid: int
    generation: int
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    grant: int = 0
    expires: float = 0.0

    def to_wire(self) -> list[Any]:
        wire = [self.broker, self.oid, self.generation, self.offset, self.nbytes,
                self.dtype, list(self.shape), list(self.strides)]
        return wire + [self.grant, self.expires] if self.grant else wire

    @classmethod
    def from_wire(cls, wire: Any) -> Handle:
        if not isinstance(wire, (list, tuple)) or len(wire) not in (8, 10):
            raise ProtocolError(f"a handle is a list of 8 (or 10) fields, got {wire!r:.80}")
        grant, expires = 0, 0.0
        if len(wire) == 10:
            grant, expires = wire[8], wire[9]
            if type(grant) is not int or grant < 0 or type(expires) not in (int, float):
                raise ProtocolError("handle grant must be a non-negative integer and expires a number")
        broker, oid, gen, offset, nbytes, dtype, shape, strides = wire[:8]
        if not isinstance(broker, str) or not isinstance(dtype, str):
            raise ProtocolError("handle broker and dtype must be strings")
        oid, gen, offset, nbytes = _int_tuple([oid, gen, offset, nbytes], "ids")
        shape, strides = _int_tuple(shape, "shape"), _int_tuple(strides, "strides")
        if len(strides) != len(shape):
            raise ProtocolError(f"handle has {len(shape)} dimensions but {len(strides)} strides")
        return cls(broker, oid, gen, offset, nbytes, dtype, shape, strides, grant, float(expires))

    def __reduce__(self) -> tuple[Any, ...]:
        return (Handle.from_wire, (self.to_wire(),))
