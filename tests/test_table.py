"""The object table driven with plain calls: leases, refcounts, stale handles, grants, expiry, names, views."""

from __future__ import annotations

import pytest

import broker.table as table_mod
from broker.allocator import GRANULE
from broker.errors import BadRequest, ItemTooLarge, StaleHandle
from broker.protocol import Handle, Layout
from broker.table import EARLY_CLAIM_TTL, POOL_BLOCK_MAX, ObjectTable

CAPACITY = 1 << 20
TOKEN = "tok123"
A, B, C, D = 1, 2, 3, 4  # client ids


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def tok(cid: int, n: int) -> int:
    return cid << 32 | n


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def table(clock: FakeClock) -> ObjectTable:
    t = ObjectTable(CAPACITY, TOKEN, clock=clock)
    for cid in (A, B, C, D):
        t.add_client(cid)
    return t


def put(t: ObjectTable, cid: int = A, n: int = 12) -> Handle:
    """A float32 array of ``n`` elements leased to ``cid``."""
    h = t.alloc_for(cid, 4 * n, "<f4", [n])
    assert h is not None
    return h


def ref(h: Handle) -> tuple[int, int]:
    return (h.oid, h.generation)


def refs(t: ObjectTable, h: Handle) -> int:
    return t.objects[h.oid].refs


# -- alloc, acquire, release ----------------------------------------------------------------------
def test_alloc_for_returns_a_handle_leased_to_the_client(table: ObjectTable) -> None:
    h = table.alloc_for(A, 48, "<f4", [3, 4])
    assert h is not None
    assert (h.broker, h.nbytes, h.dtype, h.shape, h.strides) == (TOKEN, 48, "<f4", (3, 4), (16, 4))
    assert h.offset % GRANULE == 0
    assert table.leases[A] == {h.oid}
    assert refs(table, h) == 1
    s = table.stats()
    assert (s["used"], s["objects"], s["blocks"], s["capacity"]) == (GRANULE, 1, 1, CAPACITY)


def test_alloc_for_bfloat16_is_stored_as_two_byte_words(table: ObjectTable) -> None:
    h = table.alloc_for(A, 8, "bfloat16", [2, 2])
    assert h is not None
    assert (h.dtype, h.strides, h.nbytes) == ("bfloat16", (4, 2), 8)


@pytest.mark.parametrize(("nbytes", "dtype", "shape"), [
    (47, "<f4", [3, 4]),  # nbytes does not match
    (8, "not-a-dtype", [2]),
    (8, "O", [1]),  # object dtype cannot live in shared memory
    (8, "i4,i4", [1]),  # structured
])
def test_alloc_for_refuses_bad_specs(table: ObjectTable, nbytes: int, dtype: str, shape: list[int]) -> None:
    with pytest.raises(BadRequest):
        table.alloc_for(A, nbytes, dtype, shape)
    assert table.stats()["used"] == 0 and not table.leases[A]


def test_item_larger_than_the_arena_raises_item_too_large(table: ObjectTable) -> None:
    with pytest.raises(ItemTooLarge, match="larger than the whole arena"):
        table.alloc_for(A, CAPACITY + 1, "|u1", [CAPACITY + 1])
    assert table.stats()["used"] == 0


def test_alloc_returns_none_while_the_arena_is_full(table: ObjectTable) -> None:
    whole = table.alloc_for(A, CAPACITY, "|u1", [CAPACITY])
    assert whole is not None and table.alloc.used == CAPACITY
    assert table.alloc_for(A, 64, "|u1", [64]) is None
    assert table.leases[A] == {whole.oid}
    assert table.release(A, [ref(whole)]) == 0
    assert table.alloc_for(A, 64, "|u1", [64]) is not None


def test_acquire_and_release_count_one_lease_per_client(table: ObjectTable) -> None:
    h = put(table)
    got = table.acquire(B, *ref(h))
    assert got == h
    assert refs(table, h) == 2
    table.acquire(B, *ref(h))  # a second acquire by the same client takes no second reference
    assert refs(table, h) == 2
    assert table.release(A, [ref(h)]) == 0
    assert refs(table, h) == 1 and table.alloc.used == GRANULE
    assert table.release(B, [ref(h)]) == 0
    assert h.oid not in table.objects
    s = table.stats()
    assert (s["used"], s["objects"], s["blocks"]) == (0, 0, 0)
    table.alloc.check()


def test_release_counts_what_the_client_did_not_hold_as_stale(table: ObjectTable) -> None:
    h = put(table)
    assert table.release(B, [ref(h)]) == 1  # B never held it: nothing is dropped
    assert refs(table, h) == 1
    assert table.release(A, [(h.oid, h.generation + 1)]) == 1  # wrong generation
    assert refs(table, h) == 1
    assert table.release(A, [ref(h), ref(h), (999, 1)]) == 2  # the second and the unknown are stale
    assert table.alloc.used == 0


def test_handles_go_stale_after_release_and_reuse(table: ObjectTable) -> None:
    old = put(table)
    table.release(A, [ref(old)])
    new = put(table)
    assert new.offset == old.offset  # the same memory, reused
    assert new.generation != old.generation and new.oid != old.oid
    with pytest.raises(StaleHandle, match="stale") as e:
        table.acquire(B, *ref(old))
    assert isinstance(e.value, KeyError)
    with pytest.raises(StaleHandle):
        table.acquire(B, new.oid, old.generation)  # a live object, another generation
    with pytest.raises(StaleHandle):
        table.get(old.oid, new.generation)
    assert table.leases[B] == set()
    assert refs(table, new) == 1


def test_acquire_many_is_all_or_nothing(table: ObjectTable) -> None:
    h1, h2, gone = put(table), put(table), put(table)
    table.release(A, [ref(gone)])
    with pytest.raises(StaleHandle):
        table.acquire_many(B, [ref(h1), ref(gone), ref(h2)])
    assert table.leases[B] == set()
    assert (refs(table, h1), refs(table, h2)) == (1, 1)
    got = table.acquire_many(B, [ref(h1), ref(h2), ref(h1)])
    assert [g.oid for g in got] == [h1.oid, h2.oid, h1.oid]
    assert table.leases[B] == {h1.oid, h2.oid}
    assert (refs(table, h1), refs(table, h2)) == (2, 2)


def test_drop_client_releases_every_lease(table: ObjectTable) -> None:
    h1, h2, h3 = put(table), put(table), put(table)
    table.acquire(B, *ref(h2))
    assert table.drop_client(A) == 3
    assert A not in table.leases
    assert set(table.objects) == {h2.oid}
    assert refs(table, h2) == 1 and table.alloc.used == GRANULE
    assert table.drop_client(B) == 1
    assert table.alloc.used == 0 and not table.objects
    assert table.drop_client(99) == 0
    del h1, h3


# -- alloc_many and pooled blocks -----------------------------------------------------------------
def test_alloc_many_hands_out_leased_byte_blocks(table: ObjectTable) -> None:
    hs = table.alloc_many(A, 256, 3)
    assert len(hs) == 3
    assert all(h.dtype == "|u1" and h.shape == (256,) and h.nbytes == 256 for h in hs)
    assert len({h.offset for h in hs}) == 3
    assert table.leases[A] == {h.oid for h in hs}
    assert all(table.objects[h.oid].pooled for h in hs)
    assert table.alloc.used == 3 * 256


@pytest.mark.parametrize("nbytes", [0, -1, POOL_BLOCK_MAX + 1])
def test_alloc_many_refuses_block_sizes_out_of_range(table: ObjectTable, nbytes: int) -> None:
    with pytest.raises(BadRequest, match="alloc_many"):
        table.alloc_many(A, nbytes, 1)


def test_alloc_many_gives_what_fits_and_nothing_while_full(clock: FakeClock) -> None:
    t = ObjectTable(16 * 4096, TOKEN, clock=clock)
    t.add_client(A)
    hs = t.alloc_many(A, 4096, 20)
    assert len(hs) == 16 and t.alloc.used == 16 * 4096
    assert t.alloc_many(A, 4096, 1) == []
    assert len(t.leases[A]) == 16


# -- grants -----------------------------------------------------------------------------------------
def test_grant_outlives_the_granter(table: ObjectTable) -> None:
    h = put(table)
    assert table.grant(A, *ref(h), tok(A, 1), 1, 30.0) is True
    assert refs(table, h) == 2 and table.stats()["grants"] == 1
    assert table.drop_client(A) == 1
    assert refs(table, h) == 1 and table.alloc.used == GRANULE  # the grant holds it
    table.claim(B, *ref(h), tok(A, 1))
    assert table.leases[B] == {h.oid}
    assert refs(table, h) == 1  # the grant's reference passed to B's lease
    assert table.stats()["grants"] == 0 and not table.grants_of
    table.release(B, [ref(h)])
    assert table.alloc.used == 0 and not table.objects


def test_grant_requires_a_lease(table: ObjectTable) -> None:
    h = put(table)
    with pytest.raises(BadRequest, match="holds no lease"):
        table.grant(B, *ref(h), tok(B, 1), 1, 30.0)
    table.release(A, [ref(h)])
    with pytest.raises(BadRequest, match="holds no lease"):
        table.grant(A, *ref(h), tok(A, 1), 1, 30.0)
    assert not table.grants and not table.grants_of


def test_grant_of_a_stale_generation_is_refused(table: ObjectTable) -> None:
    h = put(table)
    with pytest.raises(StaleHandle):
        table.grant(A, h.oid, h.generation + 1, tok(A, 1), 1, 30.0)
    assert not table.grants and refs(table, h) == 1


def test_grant_token_must_be_the_clients_and_new(table: ObjectTable) -> None:
    h = put(table)
    with pytest.raises(BadRequest, match="token"):
        table.grant(A, *ref(h), tok(B, 1), 1, 30.0)
    with pytest.raises(BadRequest, match="token"):
        table.grant(A, *ref(h), 7, 1, 30.0)  # client id 0 in the high bits
    assert table.grant(A, *ref(h), tok(A, 1), 1, 30.0)
    with pytest.raises(BadRequest, match="token"):
        table.grant(A, *ref(h), tok(A, 1), 1, 30.0)  # still open: not new
    assert len(table.grants) == 1 and refs(table, h) == 2


def test_grant_with_several_uses(table: ObjectTable) -> None:
    h = put(table)
    table.grant(A, *ref(h), tok(A, 1), 3, 30.0)
    assert refs(table, h) == 2
    table.claim(B, *ref(h), tok(A, 1))
    assert refs(table, h) == 3 and table.grants[tok(A, 1)].uses == 2
    table.claim(C, *ref(h), tok(A, 1))
    assert refs(table, h) == 4 and table.grants[tok(A, 1)].uses == 1
    table.claim(D, *ref(h), tok(A, 1))  # the last use takes over the grant's reference
    assert refs(table, h) == 4 and tok(A, 1) not in table.grants
    for cid in (A, B, C, D):
        assert table.release(cid, [ref(h)]) == 0
    assert table.alloc.used == 0 and not table.objects


def test_last_claim_by_a_client_that_already_holds_a_lease(table: ObjectTable) -> None:
    h = put(table)
    table.acquire(B, *ref(h))
    table.grant(A, *ref(h), tok(A, 1), 2, 30.0)
    assert refs(table, h) == 3
    table.claim(B, *ref(h), tok(A, 1))  # B holds a lease already: no second one
    assert refs(table, h) == 3 and table.grants[tok(A, 1)].uses == 1
    table.claim(B, *ref(h), tok(A, 1))  # last use: the grant's reference is dropped
    assert refs(table, h) == 2 and not table.grants
    table.release(A, [ref(h)])
    table.release(B, [ref(h)])
    assert table.alloc.used == 0


def test_claim_before_its_grant_leaves_no_extra_reference(table: ObjectTable) -> None:
    h = put(table)
    table.claim(B, *ref(h), tok(A, 1))  # overtook the grant
    assert table.leases[B] == {h.oid} and refs(table, h) == 2
    assert tok(A, 1) in table.early_claims
    assert table.grant(A, *ref(h), tok(A, 1), 1, 30.0) is True
    assert not table.grants and not table.grants_of and not table.early_claims
    assert refs(table, h) == 2
    table.release(A, [ref(h)])
    table.release(B, [ref(h)])
    assert table.alloc.used == 0 and not table.objects


def test_early_claim_counts_against_a_grant_of_several_uses(table: ObjectTable) -> None:
    h = put(table)
    table.claim(B, *ref(h), tok(A, 1))
    table.grant(A, *ref(h), tok(A, 1), 2, 30.0)
    assert table.grants[tok(A, 1)].uses == 1
    assert refs(table, h) == 3  # A, B and the grant
    table.claim(C, *ref(h), tok(A, 1))
    assert not table.grants and refs(table, h) == 3  # A, B, C
    for cid in (A, B, C):
        table.release(cid, [ref(h)])
    assert table.alloc.used == 0


def test_claim_of_a_used_up_grant_whose_array_is_gone_is_stale(table: ObjectTable) -> None:
    h = put(table)
    table.grant(A, *ref(h), tok(A, 1), 1, 30.0)
    table.release(A, [ref(h)])
    table.claim(B, *ref(h), tok(A, 1))
    table.release(B, [ref(h)])
    assert table.alloc.used == 0
    with pytest.raises(StaleHandle, match="claim of a granted handle failed"):
        table.claim(C, *ref(h), tok(A, 1))
    assert table.leases[C] == set() and not table.early_claims


def test_expiry_frees_the_granted_object(table: ObjectTable, clock: FakeClock) -> None:
    h = put(table)
    t0 = clock.t
    table.grant(A, *ref(h), tok(A, 1), 1, 5.0)
    table.release(A, [ref(h)])
    assert table.next_deadline == t0 + 5.0
    table.expire(t0 + 4.9)
    assert refs(table, h) == 1 and table.counters["grants_expired"] == 0
    table.expire(t0 + 5.0)
    assert table.counters["grants_expired"] == 1
    assert not table.grants and not table.grants_of
    assert table.alloc.used == 0 and not table.objects
    assert table.next_deadline is None
    with pytest.raises(StaleHandle):
        table.claim(B, *ref(h), tok(A, 1))


def test_expiry_leaves_an_object_someone_still_leases(table: ObjectTable, clock: FakeClock) -> None:
    h = put(table)
    table.grant(A, *ref(h), tok(A, 1), 2, 1.0)
    table.claim(B, *ref(h), tok(A, 1))
    table.expire(clock.t + 1.0)
    assert table.counters["grants_expired"] == 1
    assert refs(table, h) == 2  # A and B
    assert table.stats()["grants"] == 0


def test_expiry_takes_grants_in_deadline_order(table: ObjectTable, clock: FakeClock) -> None:
    h1, h2 = put(table), put(table)
    t0 = clock.t
    table.grant(A, *ref(h1), tok(A, 1), 1, 10.0)
    table.grant(A, *ref(h2), tok(A, 2), 1, 2.0)
    assert table.next_deadline == t0 + 2.0
    table.release(A, [ref(h1), ref(h2)])
    table.expire(t0 + 3.0)
    assert set(table.objects) == {h1.oid}
    assert table.next_deadline == t0 + 10.0
    table.expire(t0 + 10.0)
    assert not table.objects and table.counters["grants_expired"] == 2


def test_a_claimed_grant_does_not_expire(table: ObjectTable, clock: FakeClock) -> None:
    h = put(table)
    table.grant(A, *ref(h), tok(A, 1), 1, 1.0)
    table.claim(B, *ref(h), tok(A, 1))
    table.expire(clock.t + 100.0)
    assert table.counters["grants_expired"] == 0
    assert refs(table, h) == 2


def test_early_claims_are_forgotten_after_their_ttl(table: ObjectTable, clock: FakeClock) -> None:
    h = put(table)
    table.claim(B, *ref(h), tok(A, 1))
    assert table.next_deadline is not None
    table.expire(clock.t + EARLY_CLAIM_TTL - 1.0)
    assert tok(A, 1) in table.early_claims
    table.expire(clock.t + EARLY_CLAIM_TTL + 1.0)
    assert not table.early_claims and table.next_deadline is None
    # a grant arriving after that holds its own reference, as if nobody had claimed
    table.grant(A, *ref(h), tok(A, 1), 1, 5.0)
    assert table.grants[tok(A, 1)].uses == 1 and refs(table, h) == 3


def test_next_deadline_is_the_earliest_pending_work(table: ObjectTable, clock: FakeClock) -> None:
    h1, h2 = put(table), put(table)
    table.claim(B, *ref(h1), tok(A, 9))  # an early claim whose grant never comes
    table.expire(clock.t)  # the early claims were just swept: next sweep in 1 s
    table.grant(A, *ref(h2), tok(A, 1), 1, 0.25)
    due = table.next_deadline
    assert due is not None and due <= clock.t + 0.25


def test_grants_over_max_grants_return_false_but_are_kept(table: ObjectTable,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table_mod, "MAX_GRANTS", 2)
    h = put(table)
    assert table.grant(A, *ref(h), tok(A, 1), 1, 30.0) is True
    assert table.grant(A, *ref(h), tok(A, 2), 1, 30.0) is True
    assert table.grant(A, *ref(h), tok(A, 3), 1, 30.0) is False
    assert len(table.grants) == 3 and table.grants_of[A] == 3
    assert refs(table, h) == 4  # every grant holds its reference all the same
    table.claim(B, *ref(h), tok(A, 3))  # the over-cap grant works like the others
    assert table.leases[B] == {h.oid} and table.grants_of[A] == 2
    h2 = put(table, cid=B)
    assert table.grant(B, *ref(h2), tok(B, 1), 1, 30.0) is True  # the cap is per client
    table.claim(C, *ref(h), tok(A, 1))
    assert table.grant(A, *ref(h), tok(A, 4), 1, 30.0) is True  # back under: 2 open


def test_grant_heap_stays_bounded_by_open_grants(table: ObjectTable) -> None:
    h = put(table)
    for n in range(1, 2001):
        table.grant(A, *ref(h), tok(A, n), 1, 30.0)
        table.claim(B, *ref(h), tok(A, n))
    assert not table.grants
    assert len(table._grant_heap) <= 1024 + 1
    assert refs(table, h) == 2


# -- published names --------------------------------------------------------------------------------
def test_publish_keeps_the_object_alive(table: ObjectTable) -> None:
    h = put(table)
    got = table.publish(A, "x", *ref(h), "<f4", [12])
    assert got == h
    table.release(A, [ref(h)])
    assert refs(table, h) == 1 and table.alloc.used == GRANULE
    assert table.lookup("x") == h
    assert table.lookup("y") is None
    assert table.stats()["names"] == 1


def test_publish_replaces_and_frees_what_was_there(table: ObjectTable) -> None:
    h1, h2 = put(table), put(table)
    table.publish(A, "x", *ref(h1), "<f4", [12])
    table.release(A, [ref(h1)])
    table.publish(A, "x", *ref(h2), "<f4", [12])
    assert set(table.objects) == {h2.oid}
    assert table.lookup("x") == h2
    assert refs(table, h2) == 2  # A's lease and the name
    table.publish(A, "x", *ref(h2), "<f4", [12])  # the same again: no reference gained or lost
    assert refs(table, h2) == 2 and table.stats()["names"] == 1


def test_publish_of_a_stale_handle_or_another_type_is_refused(table: ObjectTable) -> None:
    h = put(table)
    with pytest.raises(BadRequest, match="publish"):
        table.publish(A, "x", *ref(h), "<i4", [12])
    with pytest.raises(BadRequest, match="publish"):
        table.publish(A, "x", *ref(h), "<f4", [3, 4])
    with pytest.raises(StaleHandle):
        table.publish(A, "x", h.oid, h.generation + 1, "<f4", [12])
    assert table.lookup("x") is None and refs(table, h) == 1


def test_a_pooled_block_is_typed_once_by_publish(table: ObjectTable) -> None:
    (blk,) = table.alloc_many(A, 256, 1)
    got = table.publish(A, "x", *ref(blk), "<f4", [8, 4])
    assert (got.dtype, got.shape, got.nbytes, got.strides) == ("<f4", (8, 4), 128, (16, 4))
    assert table.lookup("x") == got
    assert not table.objects[blk.oid].pooled
    with pytest.raises(BadRequest, match="publish"):
        table.publish(A, "y", *ref(blk), "<i2", [128])
    assert table.publish(A, "y", *ref(blk), "<f4", [8, 4]) == got  # as what it now is
    assert table.lookup("x") == got


def test_a_pooled_block_is_typed_only_by_a_lease_holder_and_within_its_block(table: ObjectTable) -> None:
    (blk,) = table.alloc_many(A, 256, 1)
    table.acquire(C, *ref(blk))
    with pytest.raises(BadRequest):
        table.publish(B, "x", *ref(blk), "<f4", [64])  # B holds no lease
    with pytest.raises(BadRequest):
        table.publish(A, "x", *ref(blk), "<f4", [65])  # larger than the block
    assert table.objects[blk.oid].pooled and table.lookup("x") is None
    assert table.publish(C, "x", *ref(blk), "<f4", [64]).dtype == "<f4"  # any lease holder


def test_a_pooled_block_published_as_bytes_is_typed_for_good(table: ObjectTable) -> None:
    (blk,) = table.alloc_many(A, 256, 1)
    first = table.publish(A, "x", *ref(blk), "|u1", [256])
    assert first.dtype == "|u1"
    with pytest.raises(BadRequest):
        table.publish(A, "y", *ref(blk), "<f4", [64])
    assert table.lookup("x") == first


# -- row views --------------------------------------------------------------------------------------
def test_row_views_keep_their_block_alive_until_the_last_is_dropped(table: ObjectTable) -> None:
    parent = table.new(4 * 16, "<f4", (4, 4))
    assert parent is not None
    layout = Layout(kind="tuple", fields=[(0, "<f4", [4], 0)])
    parent.layout = layout
    v1 = table.view(parent, parent.offset, "<f4", (2, 4))
    v2 = table.view(parent, parent.offset + 32, "<f4", (2, 4))
    assert (v1.nbytes, v2.offset, v2.layout) == (32, parent.offset + 32, layout)
    assert table.stats()["objects"] == 3 and table.alloc.blocks == 1
    assert table.decref(parent) is False
    assert table.alloc.used == GRANULE
    h2 = table.acquire(A, v2.oid, v2.block.generation)
    assert (h2.offset, h2.shape, h2.nbytes) == (parent.offset + 32, (2, 4), 32)
    assert table.decref(v1) is False
    assert table.alloc.used == GRANULE
    assert table.release(A, [(v2.oid, v2.block.generation)]) == 0
    assert table.decref(v2) is True  # the last object of the block frees it
    assert table.alloc.used == 0 and not table.objects and table.alloc.blocks == 0


def test_stats_reflect_the_table(table: ObjectTable) -> None:
    h1, h2 = put(table), put(table, n=2048)
    table.publish(A, "x", *ref(h1), "<f4", [12])
    table.grant(A, *ref(h2), tok(A, 1), 1, 30.0)
    s = table.stats()
    assert s == {"capacity": CAPACITY, "control": 0, "used": GRANULE + 8192, "peak": GRANULE + 8192,
                 "free": CAPACITY - GRANULE - 8192, "largest_free": s["largest_free"],
                 "objects": 2, "blocks": 2, "names": 1, "grants": 1}
    assert 0 < s["largest_free"] <= CAPACITY - GRANULE - 8192
