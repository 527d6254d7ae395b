"""Hypothesis sends thousands of arbitrary frames; each gets one reply and the broker keeps serving."""

from __future__ import annotations

import msgpack
import numpy as np
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import Broker, Client
from broker.protocol import KINDS, VERSION, decode

FIELDS = sorted({f for spec in KINDS.values() for f in spec} | {"v", "op", "rid"})
scalars = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | \
    st.text(max_size=20) | st.binary(max_size=20)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c,
                                                                                     max_size=3),
                      max_leaves=12)
messages = st.fixed_dictionaries(
    {"v": st.sampled_from([VERSION, VERSION, 0, 2, "1", True]), "op": st.sampled_from(sorted(KINDS)) | values,
     "rid": st.integers(-5, 2**40) | values},
    optional={f: values for f in FIELDS if f not in ("v", "op", "rid")},
)


def packed(m: dict) -> bytes:
    return msgpack.packb(m, use_bin_type=True)


frames = st.one_of(st.binary(max_size=300), messages.map(packed),
                   st.lists(values, max_size=5).map(packed))


def test_arbitrary_frames_each_get_a_reply_and_data_stays_intact() -> None:
    data = np.arange(10_000, dtype=np.float64)
    with Broker(capacity=8 * 2**20) as b, Client(b.endpoint) as good:
        h = good.put(data)
        ctx = zmq.Context()
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(b.endpoint)
        sent = []

        @settings(max_examples=3000, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(frame=frames)
        def one(frame: bytes) -> None:
            raw.send(frame)
            assert raw.poll(5000), f"no reply to {frame[:60]!r}"
            reply = decode(raw.recv())  # every reply is itself a valid message
            assert reply["op"] in ("ok", "error")
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
        assert stats["objects"] == 1
