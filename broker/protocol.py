"""The wire format: every message kind declared once as a typed struct, the Handle, frames.

Nothing else in the project encodes or decodes a message; nothing else
checks a message's fields: ``decode`` validates every field of every kind
(types, bounds, required or optional) in C, through msgspec, and refuses
anything else with ``ProtocolError``.

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

    broker PUB  ──▶ [topic][payload]     topic: b"publish"

Why two transports: a ZeroMQ round trip passes through an I/O thread on each
side; the Unix connection does not, and measured 2–5× faster per round trip
at half the CPU on the 2-core reference machine (benchmarks/NOTES.md).

``payload`` is one msgpack map::

    {"op": <kind>, "v": 1, "rid": <request id, 0 if unsolicited>, <the kind's fields>}

Every request gets exactly one reply with the same ``rid``: a reply kind
(``ok``, ``handle``, ``reserved``, ...) or ``error`` (``code``: a
``BrokerError`` subclass name, ``message``); except the kinds in
``NO_REPLY`` (``drop``, ``grant``, ``claim``, ``commit``, ``cancel``,
``done``), answered only when refused, by an ``error`` marked ``late`` (the
client raises it at its next request): one broker message per task, not two.
The broker also sends unsolicited ``task`` and ``failure`` messages (rid 0)
to workers and to the pipeline driver, bounded by credits; a task may carry
its output slots, reserved ahead, so a worker asks nothing while it works.

A Unix-connection length over ``MAX_MESSAGE`` cannot be skipped (the stream
cannot be resynchronised), so the broker closes that connection instead.
A message that omits ``v`` is read as version 1.
"""

from __future__ import annotations

import functools
import struct
from typing import Annotated, Any, ClassVar, Literal, Union

import msgspec
import numpy as np

VERSION = 1
MAX_MESSAGE = 1 << 20  # bytes; handles are ~100 B, a task a few hundred
MAX_DIMS = 32
MAX_REFS = 1024  # handles per acquire_many/drop/release message: the frame stays below MAX_MESSAGE
MAX_ITEMS = 65536  # item ids per reservation
REDELIVER_MAX = 1000  # a handle queue's redeliveries of one item
# A client's pool may own blocks above 1 MiB, one per ``alloc_many`` of count 1, up to 1/8 of the
# arena (64 MiB at most) in total; the broker refuses larger pool blocks.
LARGE_KEEP_PART, LARGE_KEEP_MAX = 8, 64 << 20
BFLOAT16 = "bfloat16"  # NumPy has no bfloat16: such arrays are stored, and seen by NumPy, as <u2

__all__ = [
    "VERSION", "MAX_MESSAGE", "MAX_REFS", "NO_REPLY", "BFLOAT16", "ProtocolError", "Handle",
    "Message", "Layout", "OutSpec", "StageSettings", "KINDS", "encode", "decode", "frame", "FrameReader",
    "c_strides", "storage_dtype",
    # requests
    "Hello", "Ping", "Alloc", "AllocMany", "Acquire", "AcquireMany", "Release", "Drop", "Grant",
    "Claim", "Publish", "Lookup", "Stats", "ConfigurePipeline", "Register", "Reserve", "Commit",
    "Cancel", "Done", "Fail", "Eof", "Shutdown", "QueueOpen",
    # replies and broker messages
    "Ok", "Welcome", "HandleReply", "HandlesReply", "Released", "Reserved", "StatsReply",
    "Registered", "Configured", "Error", "Task", "Failure", "QueueInfo", "Published",
]


class ProtocolError(ValueError):
    """A message that cannot be decoded or does not match its kind's schema."""


NonNeg = Annotated[int, msgspec.Meta(ge=0)]
Id = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Dims = Annotated[tuple[NonNeg, ...], msgspec.Meta(max_length=MAX_DIMS)]
Shape = Annotated[list[Annotated[int, msgspec.Meta(ge=0, lt=2**48)]], msgspec.Meta(max_length=MAX_DIMS)]
Name = Annotated[str, msgspec.Meta(max_length=4096)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]
Ref = tuple[Id, Id]  # (object id, generation)
Items = Annotated[list[int], msgspec.Meta(min_length=1, max_length=MAX_ITEMS)]


def c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """The strides of a C-contiguous array of ``shape`` (every array in the arena is one)."""
    strides, step = [], itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def storage_dtype(dtype: str) -> np.dtype:
    """The NumPy dtype an arena array of wire dtype ``dtype`` is viewed as.

    ``"bfloat16"`` is stored as its raw bits, ``<u2`` (NumPy has no bfloat16;
    ``Client.tensor`` and the workers view it as ``torch.bfloat16``).
    Raises ``TypeError``/``ValueError`` for a string NumPy does not know.
    """
    return np.dtype("<u2") if dtype == BFLOAT16 else np.dtype(dtype)


class Handle(msgspec.Struct, frozen=True, array_like=True):
    """A reference to an array in a broker's arena: ~100 bytes on the wire, a list of 10 fields.

    Pass it to any process (``to_wire`` for msgpack, or pickle); ``Client.get``
    there resolves it against the broker's own table, which checks
    ``broker``, ``oid`` and ``generation`` so a handle to a released or reused
    block is refused, never read as garbage. Arrays in the arena are
    C-contiguous; ``strides`` are recorded for the consumer's convenience.

    A handle from ``Client.grant`` also carries ``grant`` (a token for a lease
    the broker holds for the receiver) and ``expires`` (``time.monotonic()``
    before which the receiver may use it without asking the broker first).
    """

    broker: Name
    oid: Id
    generation: Id
    offset: NonNeg
    nbytes: NonNeg
    dtype: Annotated[str, msgspec.Meta(max_length=64)]
    shape: Dims
    strides: Dims
    grant: NonNeg = 0
    expires: float = 0.0
    base: NonNeg = 0  # the data offset of the block this array lies in (0: ``offset`` itself)

    def to_wire(self) -> list[Any]:
        """The handle as plain lists and scalars (what msgpack carries)."""
        wire = [self.broker, self.oid, self.generation, self.offset, self.nbytes, self.dtype,
                list(self.shape), list(self.strides), self.grant, self.expires]
        return wire + [self.base] if self.base else wire

    @property
    def block(self) -> int:
        """The data offset of the block whose header holds this array's generation."""
        return self.base or self.offset

    @classmethod
    def from_wire(cls, wire: Any) -> Handle:
        """Rebuild and validate a handle from ``to_wire``'s form (8, 10 or 11 fields)."""
        if not isinstance(wire, (list, tuple)) or len(wire) not in (8, 10, 11):
            raise ProtocolError(f"a handle is a list of 8 (or 10, 11) fields, got {wire!r:.80}")
        try:
            handle = msgspec.convert(wire, cls)
        except msgspec.ValidationError as e:
            raise ProtocolError(f"bad handle: {e}") from None
        handle.check()
        return handle

    def check(self) -> None:
        """What the schema cannot say: one stride per dimension, a dtype NumPy knows and that
        holds no pointers (``ProtocolError`` otherwise)."""
        if len(self.strides) != len(self.shape):
            raise ProtocolError(f"handle has {len(self.shape)} dimensions but {len(self.strides)} strides")
        if not _plain_dtype(self.dtype):
            raise ProtocolError(f"handle names dtype {self.dtype!r}, not a plain NumPy dtype")

    def to_bytes(self) -> bytes:
        """The handle as msgpack bytes (~100 B): for a byte channel (``Pipe.send_bytes``, a socket,
        ZeroMQ). Cheaper to make and read than a pickle; ``Handle.from_bytes`` reads it."""
        return _handle_encoder.encode(self)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Handle:
        """Read ``to_bytes``' form, validated (``ProtocolError`` if it is not a handle)."""
        try:
            handle = _handle_decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            raise ProtocolError(f"not a handle: {e}") from None
        handle.check()
        return handle


_handle_encoder = msgspec.msgpack.Encoder()
_handle_decoder = msgspec.msgpack.Decoder(Handle)


@functools.lru_cache(maxsize=256)
def _plain_dtype(wire: str) -> bool:
    """Whether an array of wire dtype ``wire`` can be viewed in the arena (cached: a handle's
    check is on the hand-off path)."""
    try:
        dt = storage_dtype(wire)
    except (TypeError, ValueError):
        return False
    return not (dt.hasobject or dt.fields is not None or dt.subdtype is not None)


# -- what travels inside messages ----------------------------------------------------------------
FieldSpec = tuple[int | str, str, Shape, NonNeg]  # key, dtype, shape, offset in the row


class Layout(msgspec.Struct, frozen=True):
    """How a stage's tuple or dict result is packed in one row of bytes (``workers.layout``)."""

    kind: Literal["tuple", "dict"]
    fields: Annotated[list[FieldSpec], msgspec.Meta(min_length=1, max_length=64)]


RING_PREFIX = "__stage__/"  # a stage's queue of tasks (``broker.rings``): its index follows


RING_GROUP_MAX = 64  # items of a group with tasks in rings when no stage is batched (else the batch)


def ring_name(stage: int) -> str:
    """The name of stage ``stage``'s queue when tasks travel in rings (the sink's is the last)."""
    return f"{RING_PREFIX}{stage}"


class StageSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the broker needs to know of a pipeline stage (the rest stays with its workers)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    batch: NonNeg = 0
    on_error: Literal["fail", "skip", "retry"] = "fail"
    retries: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 2
    batch_timeout: Seconds = 0.05


# -- messages ------------------------------------------------------------------------------------
class Message(msgspec.Struct, tag_field="op", kw_only=True, forbid_unknown_fields=True):
    """Base of every message: the kind (``op``, the tag), the protocol version and a request id."""

    kind: ClassVar[str] = ""  # the tag, set for every kind below
    v: Annotated[int, msgspec.Meta(ge=VERSION, le=VERSION)] = VERSION
    rid: Id = 0


# client -> broker
class Hello(Message, tag="hello"):
    name: Name
    pid: NonNeg
    role: Name


class Ping(Message, tag="ping"):
    pass


class Alloc(Message, tag="alloc"):
    nbytes: NonNeg
    dtype: Name
    shape: Shape
    timeout: Seconds | None = None


class AllocMany(Message, tag="alloc_many"):
    """Up to ``count`` blocks of ``nbytes`` for a client's pool (above 1 MiB: one, see LARGE_KEEP_PART)."""

    nbytes: NonNeg
    count: Annotated[int, msgspec.Meta(ge=1, le=256)]
    timeout: Seconds | None = None


class Acquire(Message, tag="acquire"):
    oid: Id
    gen: Id


class AcquireMany(Message, tag="acquire_many"):
    refs: Annotated[list[Ref], msgspec.Meta(max_length=MAX_REFS)]


class Release(Message, tag="release"):
    refs: Annotated[list[Ref], msgspec.Meta(max_length=MAX_REFS)]


class Drop(Message, tag="drop"):
    """A release that gets no reply."""

    refs: Annotated[list[Ref], msgspec.Meta(max_length=MAX_REFS)]


class Grant(Message, tag="grant"):
    """Hold a lease for whoever claims ``token`` (no reply)."""

    oid: Id
    gen: Id
    token: Id
    uses: Annotated[int, msgspec.Meta(ge=1, le=1024)]
    ttl: Annotated[float, msgspec.Meta(gt=0, le=3600)]


class Claim(Message, tag="claim"):
    """Take the lease a grant holds (no reply)."""

    oid: Id
    gen: Id
    token: Id


class Publish(Message, tag="publish"):
    name: Name
    oid: Id
    gen: Id
    dtype: Name
    shape: Shape


class Lookup(Message, tag="lookup"):
    name: Text


class Stats(Message, tag="stats"):
    pass


class ConfigurePipeline(Message, tag="pipeline"):
    stages: Annotated[list[StageSettings], msgspec.Meta(min_length=1, max_length=256)]
    max_inflight: NonNeg = 0
    pipeline: Name = ""  # which pipeline this is (e.g. "name@config-hash"); "" says nothing
    rings: bool = False  # tasks travel in queues in the arena, not as messages (``broker.rings``)


class Register(Message, tag="register"):
    """A worker (or the driver, for the sink ``__sink__``) joins a stage with ``credits``."""

    stage: Name
    credits: Annotated[int, msgspec.Meta(ge=1, le=1024)]
    device: Name
    pinned: bool = False
    pipeline: Name = ""  # the pipeline the client belongs to: refused if the broker runs another


class Reserve(Message, tag="reserve"):
    """Slots in stage ``stage`` for ``items``, each an array of ``shape``/``dtype``."""

    stage: NonNeg
    items: Items
    shape: Shape
    dtype: Name
    timeout: Seconds | None = None
    layout: Layout | None = None


class Commit(Message, tag="commit"):
    rsv: Id


class Cancel(Message, tag="cancel"):
    rsv: Id


class OutSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The slot one item's result needs in the next stage (a worker's guess for its next task)."""

    shape: Shape
    dtype: Name
    layout: Layout | None = None


class Done(Message, tag="done"):
    """A task is finished; its outputs are in reservations ``rsvs`` (none for the sink).

    ``next_out``: the slot each item of this worker's next task will likely need; the broker
    then reserves it when it dispatches that task and sends it along (``Task.out``), so the
    worker asks for nothing while it works."""

    task: Id
    rsvs: Annotated[list[Id], msgspec.Meta(max_length=1024)] = []
    credit: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 1
    busy: Seconds = 0.0
    copied: NonNeg = 0
    next_out: OutSpec | None = None


class Fail(Message, tag="fail"):
    """A task's stage raised (``item``: the one row of a grouped task that did), or its output
    could not get arena space within the wait (``arena``: backpressure, not the stage's error)."""

    task: Id
    error: Text
    trace: Text = ""
    credit: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 1
    item: int | None = None
    arena: bool = False


class Eof(Message, tag="eof"):
    items: NonNeg


class Shutdown(Message, tag="shutdown"):
    pass


class QueueOpen(Message, tag="queue_open"):
    """Create the named handle queue (or find it): a ring of ``maxsize`` handles in the arena."""

    name: Name
    maxsize: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)] = 64
    redeliver: Annotated[int, msgspec.Meta(ge=0, le=REDELIVER_MAX)] = 0  # deliveries to receivers that died


# broker -> client
class Ok(Message, tag="ok"):
    pass


class Welcome(Message, tag="welcome"):
    """``slot``: this client's hold table in the control region (-1: none; take leases by message)."""

    cid: Id
    key: Name
    fd_path: Name
    capacity: NonNeg
    broker: Name
    slot: int = -1


class HandleReply(Message, tag="handle"):
    handle: Handle | None


class HandlesReply(Message, tag="handles"):
    handles: list[Handle]


class Released(Message, tag="released"):
    stale: NonNeg


class Reserved(Message, tag="reserved"):
    """A reservation: ``segments`` of ``(slot handle, rows)``, rows in item order."""

    rsv: Id
    segments: list[tuple[Handle, NonNeg]]


class StatsReply(Message, tag="stats_reply"):
    stats: dict[str, Any]


class Registered(Message, tag="registered"):
    stage: NonNeg
    rings: bool = False  # take tasks from the stage's queue in the arena (``Client.task_queue``)


class Configured(Message, tag="configured"):
    stages: list[str]


class Error(Message, tag="error"):
    code: Name
    message: Text
    late: bool = False


class Task(Message, tag="task"):
    """Work for a worker (or finished items for the sink): ``rows`` rows of ``handle``.

    ``batched``: ``handle`` is a ``[batch, ...]`` slot whose first rows are
    the items (``valid``: the rows that hold one, when some were cancelled);
    ``each``: several items, one per row, for a stage that takes one at a time;
    otherwise ``handle`` is the one item. ``attempts``: how many times these
    items were given to a worker before (a retry or a dead worker).
    """

    task: Id
    stage: NonNeg
    items: Items
    handle: Handle
    rows: NonNeg
    valid: list[NonNeg] | None = None
    batched: bool = False
    each: bool = False
    layout: Layout | None = None
    attempts: NonNeg = 0
    out: Reserved | None = None  # the items' output slots, reserved ahead (``Done.next_out``) ...
    out_spec: OutSpec | None = None  # ... for results of this slot


class Failure(Message, tag="failure"):
    """Items a stage gave up on; ``fatal`` unless the stage skips them. ``worker_pid``: set
    when the items failed because the workers processing them died (``code`` WorkerDied)."""

    stage: Name
    items: list[int]
    error: Text
    trace: Text = ""
    fatal: bool = True
    code: Name = "StageFailed"
    worker_pid: NonNeg = 0


class QueueInfo(Message, tag="queue_info"):
    """Where a queue's ring lies: its block's data offset, slots and words per slot."""

    offset: NonNeg
    maxsize: NonNeg
    slot_words: NonNeg


class Published(Message, tag="published"):
    name: Text
    handle: Handle


_ALL = (Hello, Ping, Alloc, AllocMany, Acquire, AcquireMany, Release, Drop, Grant, Claim, Publish,
        Lookup, Stats, ConfigurePipeline, Register, Reserve, Commit, Cancel, Done, Fail, Eof, Shutdown,
        QueueOpen, Ok, Welcome, HandleReply, HandlesReply, Released, Reserved, StatsReply, Registered,
        Configured, Error, Task, Failure, QueueInfo, Published)
for _cls in _ALL:
    _cls.kind = _cls.__struct_config__.tag  # type: ignore[assignment]
KINDS: dict[str, type[Message]] = {cls.kind: cls for cls in _ALL}
# kinds answered only if refused (``late`` errors): what a client sends many times per item
NO_REPLY = frozenset({"drop", "grant", "claim", "commit", "cancel", "done"})

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(Union[_ALL])  # noqa: UP007 (a tuple of types)


def encode(msg: Message) -> bytes:
    """One payload: the message as a msgpack map."""
    return _encoder.encode(msg)


def decode(payload: bytes) -> Message:
    """Decode and validate one payload, or raise ``ProtocolError`` saying why."""
    if len(payload) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds the {MAX_MESSAGE} byte limit")
    try:
        return _decoder.decode(payload)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"bad message: {e}") from None
    except msgspec.DecodeError as e:
        raise ProtocolError(f"not a msgpack message: {e}") from None


_LEN = struct.Struct("<I")


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
