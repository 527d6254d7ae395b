"""The wire format: every kind round-trips, every malformed payload is refused with a reason, handles travel intact."""

from __future__ import annotations

import pickle

import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import protocol as P
from broker.protocol import KINDS, MAX_MESSAGE, VERSION, Handle, ProtocolError, decode, encode

H = Handle("a1b2c3d4", 12, 3, 8192, 4096, "<f4", (32, 32), (128, 4))
LAYOUT = P.Layout(kind="dict", fields=[("a", "<f4", [2], 0), ("b", "bfloat16", [], 64)])

# one valid message of every kind
SAMPLES: dict[str, P.Message] = {m.kind: m for m in [
    P.Hello(name="w", pid=7, role="worker"), P.Ping(),
    P.Alloc(nbytes=8, dtype="<f8", shape=[1], timeout=0.5), P.AllocMany(nbytes=256, count=4),
    P.Acquire(oid=1, gen=2), P.AcquireMany(refs=[(1, 2), (3, 4)]), P.Release(refs=[(1, 2)]),
    P.Drop(refs=[(1, 2)]), P.Grant(oid=1, gen=2, token=1 << 32 | 1, uses=1, ttl=30.0),
    P.Claim(oid=1, gen=2, token=5), P.Publish(name="x", oid=1, gen=2, dtype="<f4", shape=[2, 2]),
    P.Lookup(name="x"), P.Stats(),
    P.ConfigurePipeline(stages=[P.StageSettings(name="a", batch=4, on_error="retry")], max_inflight=8),
    P.Register(stage="a", credits=2, device="cuda:1", pinned=True),
    P.Reserve(stage=1, items=[1, 2], shape=[3], dtype="<f4", timeout=None, layout=None),
    P.Commit(rsv=3), P.Cancel(rsv=3), P.Done(task=4, rsvs=[5, 6], busy=0.5, copied=12),
    P.Fail(task=4, error="ValueError: x", trace="tb", item=2, arena=False), P.Eof(items=10),
    P.Shutdown(), P.QueueOpen(name="q", maxsize=8), P.QueueInfo(offset=4160, maxsize=8, slot_words=40),
    P.Ok(), P.Welcome(cid=1, key="k", fd_path="/x", capacity=4096, broker="b"),
    P.HandleReply(handle=H), P.HandlesReply(handles=[H, H]), P.Released(stale=1),
    P.Reserved(rsv=2, segments=[(H, 3)]), P.StatsReply(stats={"used": 0}), P.Registered(stage=1),
    P.Configured(stages=["a", "__sink__"]), P.Error(code="BadRequest", message="m", late=True),
    P.Task(task=1, stage=0, items=[7], handle=H, rows=1, layout=LAYOUT, batched=True, valid=[0]),
    P.Failure(stage="a", items=[1], error="e", fatal=False, code="WorkerDied", worker_pid=9),
    P.Published(name="x", handle=H), P.Welcome(cid=2, key="k", fd_path="/x", capacity=4096, broker="b", slot=3),
]}


def _raw(**msg) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def test_every_kind_has_a_sample():
    assert sorted(SAMPLES) == sorted(KINDS)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_round_trips(kind):
    msg = SAMPLES[kind]
    msg.rid = 42
    back = decode(encode(msg))
    assert back == msg and type(back) is KINDS[kind] and back.kind == kind and back.v == VERSION


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"\x92\x01", b"not msgpack at all \xff\xfe",
                                     _raw(v=1, op="ping", rid=1)[:-2]])
def test_decode_rejects_non_msgpack(payload):
    with pytest.raises(ProtocolError):
        decode(payload)


@pytest.mark.parametrize("value", [[1, 2, 3], 5, "ping", None, b"bytes"])
def test_decode_rejects_non_maps(value):
    with pytest.raises(ProtocolError, match="bad message"):
        decode(msgpack.packb(value))


def test_decode_rejects_non_string_keys():
    with pytest.raises(ProtocolError):
        decode(msgpack.packb({1: "v", "op": "ping"}))


@pytest.mark.parametrize("version", [0, 2, "1", None, True, 1.0])
def test_decode_rejects_other_versions(version):
    with pytest.raises(ProtocolError, match=r"\$\.v"):
        decode(_raw(v=version, op="ping", rid=1))


@pytest.mark.parametrize("op", ["frobnicate", "", "PING", 5, None, ["ping"]])
def test_decode_rejects_unknown_kinds(op):
    with pytest.raises(ProtocolError, match=r"\$\.op"):
        decode(_raw(v=VERSION, op=op, rid=1))


@pytest.mark.parametrize("rid", [None, "1", 1.0, True, [1], -1])
def test_decode_rejects_bad_request_ids(rid):
    with pytest.raises(ProtocolError, match="rid"):
        decode(_raw(v=VERSION, op="ping", rid=rid))


def _fields(kind: str) -> dict:
    return msgspec.to_builtins(SAMPLES[kind])


def _required(kind: str) -> list[str]:
    return [f.encode_name for f in msgspec.structs.fields(KINDS[kind]) if f.required]


@pytest.mark.parametrize(("kind", "field"), [(k, f) for k in sorted(KINDS) for f in _required(k)])
def test_decode_rejects_a_missing_field(kind, field):
    fields = _fields(kind)
    del fields[field]
    with pytest.raises(ProtocolError, match=f"missing required field `{field}`"):
        decode(msgpack.packb(fields))


@pytest.mark.parametrize(("kind", "field"), [(k, f.encode_name) for k in sorted(KINDS)
                                             for f in msgspec.structs.fields(KINDS[k])])
def test_decode_rejects_a_field_of_the_wrong_type(kind, field):
    fields = _fields(kind)
    fields[field] = {"not": "this"}  # no field of any kind is a map of strings
    if field == "stats":
        fields[field] = [1]
    with pytest.raises(ProtocolError, match=rf"\$\.{field}"):
        decode(msgpack.packb(fields))


@pytest.mark.parametrize(("kind", "field"), [
    (k, f.encode_name) for k in sorted(KINDS) for f in msgspec.structs.fields(KINDS[k])
    if isinstance(f.default, int) and not isinstance(f.default, bool) or f.type is int])
def test_decode_rejects_bool_where_an_int_is_expected(kind, field):
    fields = _fields(kind)
    fields[field] = True
    with pytest.raises(ProtocolError, match="got `bool`"):
        decode(msgpack.packb(fields))


def test_decode_rejects_unknown_fields_and_out_of_range_values():
    for raw in (_raw(v=1, op="ping", rid=1, extra=2),  # a field no kind has
                _raw(v=1, op="grant", rid=0, oid=1, gen=1, token=1, uses=0, ttl=1.0),  # uses >= 1
                _raw(v=1, op="grant", rid=0, oid=1, gen=1, token=1, uses=1, ttl=7200.0),  # ttl <= 1 h
                _raw(v=1, op="alloc", rid=1, nbytes=8, dtype="<f8", shape=[-1]),  # negative dimension
                _raw(v=1, op="alloc", rid=1, nbytes=8, dtype="<f8", shape=[1] * 33),  # 33 dimensions
                _raw(v=1, op="reserve", rid=1, stage=0, items=[], shape=[1], dtype="<f4"),  # no items
                _raw(v=1, op="pipeline", rid=1, stages=[{"name": "a", "on_error": "explode"}])):
        with pytest.raises(ProtocolError):
            decode(raw)


def test_decode_rejects_oversized_messages():
    big = encode(P.Lookup(rid=1, name="x" * MAX_MESSAGE))
    assert len(big) > MAX_MESSAGE
    with pytest.raises(ProtocolError, match=f"exceeds the {MAX_MESSAGE} byte limit"):
        decode(big)
    just = encode(P.Lookup(rid=1, name="x" * (MAX_MESSAGE - 100)))
    assert len(just) <= MAX_MESSAGE
    assert decode(just).name == "x" * (MAX_MESSAGE - 100)


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_decode_of_random_bytes_returns_a_valid_message_or_protocol_error(data):
    try:
        msg = decode(data)
    except ProtocolError:
        return
    assert msg.v == VERSION and msg.kind in KINDS  # only valid messages get through


@given(st.dictionaries(st.sampled_from(["v", "op", "rid", "oid", "gen", "name", "refs", "x"]),
                       st.one_of(st.integers(-2**63, 2**64 - 1), st.booleans(), st.none(),
                                 st.text(max_size=5), st.sampled_from(sorted(KINDS)),
                                 st.lists(st.integers(-2**63, 2**64 - 1), max_size=3), st.floats())))
@settings(max_examples=300, deadline=None)
def test_decoded_messages_always_match_their_schema(fields):
    try:
        msg = decode(msgpack.packb(fields))
    except ProtocolError:
        return
    # a message that got through converts to its own kind again: every field as declared
    assert msgspec.convert(msgspec.to_builtins(msg), type(msg)) == msg


# -- the Handle ---------------------------------------------------------------------------------
def test_handle_wire_round_trip():
    wire = H.to_wire()
    assert wire == ["a1b2c3d4", 12, 3, 8192, 4096, "<f4", [32, 32], [128, 4], 0, 0.0]
    assert Handle.from_wire(wire) == H
    assert Handle.from_wire(wire[:8]) == H  # the 8-field form of earlier versions
    back = decode(encode(P.HandleReply(rid=1, handle=H))).handle
    assert back == H
    assert len(msgpack.packb(wire)) < 100


def test_handle_pickle_round_trip():
    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(H, protocol=proto)
        assert pickle.loads(data) == H
    zero_d = Handle("b", 1, 1, 0, 8, "<f8", (), ())
    assert pickle.loads(pickle.dumps(zero_d)) == zero_d


def test_handle_bytes_round_trip_and_refusals():
    data = H.to_bytes()
    assert isinstance(data, bytes) and len(data) < 100
    assert Handle.from_wire(msgpack.unpackb(data)) == H  # the wire form (a list), msgpack-encoded
    assert Handle.from_bytes(data) == H and Handle.from_bytes(memoryview(data)) == H
    granted = msgspec.structs.replace(H, grant=7, expires=1.5, base=4096)
    assert Handle.from_bytes(granted.to_bytes()) == granted
    bad_strides = msgpack.packb([*H.to_wire()[:7], [4]])
    for junk in (b"", b"\xc1", msgpack.packb({"op": "ping"}), msgpack.packb([1, 2, 3]), bad_strides):
        with pytest.raises(ProtocolError):
            Handle.from_bytes(junk)


def test_handle_is_frozen_slotted_and_hashable():
    with pytest.raises(AttributeError):
        H.offset = 0  # type: ignore[misc]
    assert not hasattr(H, "__dict__")
    assert {H: 1}[Handle.from_wire(H.to_wire())] == 1


@pytest.mark.parametrize("wire", [
    ["b", 1, 1, 0, 8, "<f8", [1]],  # 7 fields
    ["b", 1, 1, 0, 8, "<f8", [1], [8], "extra"],  # 9 fields
    ["b", 1, 1, 0, 8, "<f8", [1], [8], 0, 0.0, 64, "extra"],  # 12 fields
    {"broker": "b"},
    "b,1,1,0,8",
    None,
])
def test_from_wire_rejects_wrong_layouts(wire):
    with pytest.raises(ProtocolError, match=r"list of 8 \(or 10, 11\) fields"):
        Handle.from_wire(wire)


def test_granted_handle_round_trips_and_bad_grant_fields_are_refused():
    g = msgspec.structs.replace(H, grant=7 << 32 | 1, expires=123.5)
    assert Handle.from_wire(g.to_wire()) == g
    assert pickle.loads(pickle.dumps(g)) == g
    for grant, expires in [(-1, 1.0), ("1", 1.0), (1, "soon"), (True, 1.0)]:
        with pytest.raises(ProtocolError, match="bad handle"):
            Handle.from_wire([*H.to_wire()[:8], grant, expires])


@pytest.mark.parametrize(("index", "value"), [
    (0, 5), (5, 4),  # broker and dtype must be strings
    (1, -1), (2, -3), (3, -64), (4, -8),  # negative ids
    (1, "1"), (2, 1.0), (3, None), (4, True),  # non-int ids (bool included)
])
def test_from_wire_rejects_bad_fields(index, value):
    wire = H.to_wire()
    wire[index] = value
    with pytest.raises(ProtocolError):
        Handle.from_wire(wire)


@pytest.mark.parametrize(("shape", "strides"), [
    ([-1, 32], [128, 4]),  # negative dimension
    ([32, 32.0], [128, 4]),  # non-int dimension
    ([32, "32"], [128, 4]),
    ([32, True], [128, 4]),
    ([32, None], [128, 4]),
    ([1] * 33, [4] * 33),  # too many dimensions
    ([32, 32], [128]),  # one stride short
    ([32], [128, 4]),  # one stride too many
    ([32, 32], [128, -4]),  # arena arrays are C-contiguous: no negative strides
    (32, [4]),  # not a list
    ({"0": 32}, [4]),
])
def test_from_wire_rejects_bad_shapes(shape, strides):
    wire = H.to_wire()
    wire[6], wire[7] = shape, strides
    with pytest.raises(ProtocolError):
        Handle.from_wire(wire)
