"""The wire format: every kind round-trips, every malformed payload is refused with a reason, handles travel intact."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.protocol import KINDS, MAX_MESSAGE, VERSION, Handle, ProtocolError, decode, encode

# one valid value per field type, for building a message of every kind
_SAMPLE = {(int,): 7, (int, float): 2.5, (str,): "x", (list,): [1, 2],
           (int, type(None)): None, (int, float, type(None)): 0.5}
# a value of the wrong type for each field type
_WRONG = {(int,): "7", (int, float): "2.5", (str,): 7, (list,): {"a": 1},
          (int, type(None)): 1.5, (int, float, type(None)): "soon"}


def _fields(kind: str) -> dict:
    return {name: copy.deepcopy(_SAMPLE[types]) for name, types in KINDS[kind].items()}


def _raw(**msg) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_round_trips(kind):
    fields = _fields(kind)
    msg = decode(encode(kind, 42, **fields))
    assert msg == {"v": VERSION, "op": kind, "rid": 42, **fields}


def test_replies_may_carry_extra_fields():
    msg = decode(encode("ok", 3, handle=["b", 1, 1, 0, 8, "<f8", [1], [8]], stats={"used": 0}))
    assert msg["handle"][0] == "b" and msg["stats"] == {"used": 0}


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"\x92\x01", b"not msgpack at all \xff\xfe",
                                     _raw(v=1, op="ping", rid=1)[:-2]])
def test_decode_rejects_non_msgpack(payload):
    with pytest.raises(ProtocolError, match="not a msgpack message"):
        decode(payload)


@pytest.mark.parametrize("value", [[1, 2, 3], 5, "ping", None, b"bytes"])
def test_decode_rejects_non_maps(value):
    with pytest.raises(ProtocolError, match="must be a map"):
        decode(msgpack.packb(value))


def test_decode_rejects_non_string_keys():
    with pytest.raises(ProtocolError):
        decode(msgpack.packb({1: "v", "op": "ping"}))


@pytest.mark.parametrize("version", [0, 2, "1", None, True, 1.0])
def test_decode_rejects_other_versions(version):
    with pytest.raises(ProtocolError, match="version"):
        decode(_raw(v=version, op="ping", rid=1))


def test_decode_rejects_missing_version():
    with pytest.raises(ProtocolError, match="version"):
        decode(_raw(op="ping", rid=1))


@pytest.mark.parametrize("op", ["frobnicate", "", "PING", 5, None, ["ping"]])
def test_decode_rejects_unknown_kinds(op):
    with pytest.raises(ProtocolError, match="unknown message kind"):
        decode(_raw(v=VERSION, op=op, rid=1))


@pytest.mark.parametrize("rid", [None, "1", 1.0, True, [1]])
def test_decode_rejects_bad_request_ids(rid):
    with pytest.raises(ProtocolError, match="rid"):
        decode(_raw(v=VERSION, op="ping", rid=rid))


@pytest.mark.parametrize(("kind", "field"), [(k, f) for k in sorted(KINDS) for f in KINDS[k]])
def test_decode_rejects_a_missing_field(kind, field):
    fields = _fields(kind)
    del fields[field]
    with pytest.raises(ProtocolError, match=f"missing field '{field}'"):
        decode(encode(kind, 1, **fields))


@pytest.mark.parametrize(("kind", "field"), [(k, f) for k in sorted(KINDS) for f in KINDS[k]])
def test_decode_rejects_a_field_of_the_wrong_type(kind, field):
    fields = _fields(kind)
    fields[field] = _WRONG[KINDS[kind][field]]
    with pytest.raises(ProtocolError, match=f"field '{field}' must be"):
        decode(encode(kind, 1, **fields))


@pytest.mark.parametrize(("kind", "field"),
                         [(k, f) for k in sorted(KINDS) for f, t in KINDS[k].items() if int in t])
def test_decode_rejects_bool_where_an_int_is_expected(kind, field):
    fields = _fields(kind)
    fields[field] = True
    with pytest.raises(ProtocolError, match=f"field '{field}' must be .* got bool"):
        decode(encode(kind, 1, **fields))


def test_decode_rejects_oversized_messages():
    big = encode("lookup", 1, name="x" * MAX_MESSAGE)
    assert len(big) > MAX_MESSAGE
    with pytest.raises(ProtocolError, match=f"exceeds the {MAX_MESSAGE} byte limit"):
        decode(big)
    just = encode("lookup", 1, name="x" * (MAX_MESSAGE - 100))
    assert len(just) <= MAX_MESSAGE
    assert decode(just)["name"] == "x" * (MAX_MESSAGE - 100)


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_decode_of_random_bytes_returns_a_valid_message_or_protocol_error(data):
    try:
        msg = decode(data)
    except ProtocolError:
        return
    assert msg["v"] == VERSION and msg["op"] in KINDS  # only valid messages get through


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
    for name, types in KINDS[msg["op"]].items():
        assert isinstance(msg[name], types)
        assert not isinstance(msg[name], bool)
    assert isinstance(msg["rid"], int) and not isinstance(msg["rid"], bool)


# -- the Handle ---------------------------------------------------------------------------------
H = Handle("a1b2c3d4", 12, 3, 8192, 4096, "<f4", (32, 32), (128, 4))


def test_handle_wire_round_trip():
    wire = H.to_wire()
    assert wire == ["a1b2c3d4", 12, 3, 8192, 4096, "<f4", [32, 32], [128, 4]]
    assert Handle.from_wire(wire) == H
    # through msgpack too, as it travels (lists, not tuples, come back)
    back = decode(encode("ok", 1, handle=wire))["handle"]
    assert Handle.from_wire(back) == H
    assert len(msgpack.packb(wire)) < 100


def test_handle_pickle_round_trip():
    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(H, protocol=proto)
        assert pickle.loads(data) == H
    zero_d = Handle("b", 1, 1, 0, 8, "<f8", (), ())
    assert pickle.loads(pickle.dumps(zero_d)) == zero_d


def test_handle_is_frozen_slotted_and_hashable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        H.offset = 0  # type: ignore[misc]
    assert not hasattr(H, "__dict__")
    assert {H: 1}[Handle.from_wire(H.to_wire())] == 1


@pytest.mark.parametrize("wire", [
    ["b", 1, 1, 0, 8, "<f8", [1]],  # 7 fields
    ["b", 1, 1, 0, 8, "<f8", [1], [8], "extra"],  # 9 fields
    {"broker": "b"},
    "b,1,1,0,8",
    None,
])
def test_from_wire_rejects_wrong_layouts(wire):
    with pytest.raises(ProtocolError, match=r"list of 8 \(or 10\) fields"):
        Handle.from_wire(wire)


def test_granted_handle_round_trips_and_bad_grant_fields_are_refused():
    g = dataclasses.replace(H, grant=7 << 32 | 1, expires=123.5)
    assert len(g.to_wire()) == 10 and Handle.from_wire(g.to_wire()) == g
    assert pickle.loads(pickle.dumps(g)) == g
    assert len(H.to_wire()) == 8  # a plain handle's wire form is unchanged
    for grant, expires in [(-1, 1.0), ("1", 1.0), (1, "soon"), (True, 1.0)]:
        with pytest.raises(ProtocolError, match="grant"):
            Handle.from_wire([*H.to_wire(), grant, expires])


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
