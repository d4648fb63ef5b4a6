"""Device-side packed ring (balloon_dev/packed_virtqueue.py): golden layouts, chains and buffer
ids, wrap counters, out-of-order use, event suppression, bad input (counted chain errors and
RingBroken), and the driver side (guest_model/packed_vring.py) against it through memory only."""
from __future__ import annotations

import numpy as np
import pytest

from balloon_dev.packed_virtqueue import (
    CHAIN_ERROR_COUNTERS,
    Chain,
    PackedDeviceVirtqueue,
    RingBroken,
)
from guest_model.packed_vring import PackedDriverVring
from guest_model.vring import DriverArea
from guestmem import GuestMemory
from protocol.virtqueue import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VirtqPackedDesc,
    pack_off_wrap,
)
from tests.packedringbuilder import AVAIL, USED, RawPackedRing, pack_pdesc
from vmsim.conformance.rings import make_memory

BUF = 0x80000
WRITE, NEXT, INDIRECT = VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT


def make(size: int = 8, **kw) -> tuple[GuestMemory, RawPackedRing, PackedDeviceVirtqueue]:
    mem = make_memory()
    r = RawPackedRing.layout(mem, 0x1000, size)
    return mem, r, PackedDeviceVirtqueue(mem, size, r.desc, r.driver, r.device, **kw)


def test_golden_available_and_used_descriptor_bytes() -> None:
    mem, r, q = make()
    r.add([(0x1122334455667788, 0x100, 0)], bid=0xABC)
    # addr le64, len le32, id le16, flags le16 = AVAIL (wrap counter 1, protocol.md 1.8)
    assert r.raw(0) == bytes.fromhex("8877665544332211" "00010000" "bc0a" "8000")
    assert VirtqPackedDesc.parse(r.raw(0)).id == 0xABC
    mem.add_region(0x1122334455667000, bytearray(0x1000), "far")
    c = q.pop()
    assert c == Chain(0xABC, ((0x1122334455667788, 0x100),), ())
    q.push(c.head, 0x42)
    # Used: id and len written, flags AVAIL|USED (= the device wrap counter 1); addr untouched.
    assert r.raw(0) == bytes.fromhex("8877665544332211" "42000000" "bc0a" "8080")


def test_chain_of_consecutive_slots_id_from_last() -> None:
    _, r, q = make()
    r.add([(BUF, 4, 0), (BUF + 0x40, 100, WRITE), (BUF + 0x100, 8, WRITE)], bid=5)
    # A driver may leave ids of non-last descriptors as anything: only the last one counts.
    r.set_desc(1, BUF + 0x40, 100, 0x3333, WRITE | NEXT | AVAIL)
    c = q.pop()
    assert c == Chain(5, ((BUF, 4),), ((BUF + 0x40, 100), (BUF + 0x100, 8)))
    assert q.pop() is None and q.last_avail_idx == 3 and q.in_flight == 1
    q.push(5, 10)
    assert r.used(0) == (5, 10, AVAIL | USED)
    assert q.used_idx == 3  # moved by the chain's slot count
    assert q.in_flight == 0


def test_unpublished_head_is_not_available() -> None:
    _, r, q = make()
    r.add([(BUF, 4, 0), (BUF + 8, 4, WRITE)], bid=1, publish=False)
    assert q.pending() == 0 and q.pop() is None and q.pop_many() == []
    # Flags that say "used" in this lap (AVAIL == USED) are not available either.
    r.set_desc(0, BUF, 4, 1, AVAIL | USED | NEXT)
    assert q.pop() is None


@pytest.mark.parametrize("batched", [False, True])
def test_wrap_counters_flip_at_the_end(batched: bool) -> None:
    _, r, q = make(size=4)
    for lap in range(3):
        for i in range(4):
            r.add([(BUF + 0x10 * i, 8, WRITE)], bid=i)
        chains = q.pop_many() if batched else [q.pop() for _ in range(4)]
        assert [c.head for c in chains] == [0, 1, 2, 3]
        assert q.pop() is None
        if batched:
            q.push_many([(c.head, 8) for c in chains])
        else:
            for c in chains:
                q.push(c.head, 8)
        want = AVAIL | USED if lap % 2 == 0 else 0
        assert [r.used(s) for s in range(4)] == [(i, 8, want) for i in range(4)]
        assert (q.avail_wrap, q.used_wrap) == ((lap + 1) % 2 ^ 1,) * 2
    # after 3 laps the counters flipped 3 times: 1 -> 0
    assert (q.avail_wrap, q.used_wrap) == (0, 0)


def test_chain_across_the_end_of_the_ring() -> None:
    _, r, q = make(size=4)
    r.add([(BUF, 8, WRITE)], bid=0)
    r.add([(BUF, 8, WRITE)], bid=1)
    r.add([(BUF, 8, WRITE)], bid=2)
    q.push_many([(c.head, 0) for c in q.pop_many()])
    r.add([(BUF, 4, 0), (BUF + 8, 8, WRITE), (BUF + 16, 8, WRITE)], bid=3)  # slots 3, 0, 1
    c = q.pop()
    assert c == Chain(3, ((BUF, 4),), ((BUF + 8, 8), (BUF + 16, 8)))
    assert (q.last_avail_idx, q.avail_wrap) == (2, 0)
    q.push(3, 16)
    assert r.used(3) == (3, 16, AVAIL | USED) and (q.used_idx, q.used_wrap) == (2, 0)


def test_out_of_order_use_moves_by_each_chains_slots() -> None:
    _, r, q = make(size=8)
    r.add([(BUF, 4, 0), (BUF + 8, 4, WRITE)], bid=7)  # slots 0-1
    r.add([(BUF, 4, WRITE)], bid=2)                   # slot 2
    r.add([(BUF, 4, 0), (BUF, 4, 0), (BUF + 8, 4, WRITE)], bid=4)  # slots 3-5
    assert q.pending() == 3
    chains = q.pop_many()
    assert [c.head for c in chains] == [7, 2, 4]
    q.push_many([(4, 1), (7, 2)])  # the 3-slot chain first
    assert r.used(0) == (4, 1, AVAIL | USED) and r.used(3) == (7, 2, AVAIL | USED)
    assert q.used_idx == 5 and q.in_flight == 1
    q.push(2, 3)
    assert r.used(5) == (2, 3, AVAIL | USED) and q.used_idx == 6


def test_pop_many_respects_max_n_and_matches_pop() -> None:
    def fill(r: RawPackedRing, mem: GuestMemory) -> None:
        tbl = BUF + 0x8000
        mem.write(tbl, pack_pdesc(BUF, 8, 0, 0) + pack_pdesc(BUF + 8, 8, 0, WRITE))
        r.add([(BUF, 8, WRITE)], bid=0)                    # plain
        r.add([(BUF, 0, WRITE)], bid=1)                    # zero length
        r.add([(BUF, 8, 0), (BUF + 8, 8, WRITE)], bid=2)   # out then in
        r.add([(tbl, 32, INDIRECT)], bid=3)                # indirect
        r.add([(1 << 40, 8, WRITE)], bid=4)                # outside memory
        r.add([(BUF, 8, WRITE), (BUF, 8, 0)], bid=5)       # readable after writable
        r.add([(BUF, 8, WRITE)], bid=6)
    mem1, r1, q1 = make(size=16)
    mem2, r2, q2 = make(size=16)
    fill(r1, mem1)
    fill(r2, mem2)
    assert q1.pending() == 7
    many = q1.pop_many(2) + q1.pop_many()
    one = [q2.pop() for _ in range(7)]
    assert many == one and q2.pop() is None
    assert [c.error is None for c in many] == [True, False, True, True, False, False, True]
    assert many[3] == Chain(3, ((BUF, 8),), ((BUF + 8, 8),))
    assert q1.counters == q2.counters
    assert (q1.last_avail_idx, q1.in_flight) == (q2.last_avail_idx, q2.in_flight) == (9, 7)


@pytest.mark.parametrize(("bufs", "counter"), [
    ([(BUF, 0, WRITE)], "zero_len_buffer"),
    ([(1 << 40, 8, 0)], "buffer_outside_memory"),
    ([(BUF, 8, WRITE), (BUF, 8, 0)], "readable_after_writable"),
    ([(BUF, 0x10, INDIRECT), (BUF, 8, WRITE)], "indirect_with_next"),
    ([(BUF, 8, 0), (BUF, 0x10, INDIRECT)], "indirect_with_next"),
    ([(BUF, 0x18, INDIRECT)], "indirect_bad_len"),
    ([(BUF, 0, INDIRECT)], "indirect_bad_len"),
    ([(BUF, 0x10 * 0x8001, INDIRECT)], "indirect_too_long"),
    ([(1 << 40, 0x10, INDIRECT)], "buffer_outside_memory"),
    ([(BUF, 0xFFFFFFFF - 0xF, 0), (BUF, 0x20, 0)], "chain_too_long"),
])
@pytest.mark.parametrize("batched", [False, True])
def test_malformed_chain_is_counted_and_skipped(bufs, counter: str, batched: bool,
                                                caplog: pytest.LogCaptureFixture) -> None:
    mem, r, q = make(size=8, ram=[(0, 1 << 33)] if counter == "chain_too_long" else None)
    r.add(bufs, bid=6)
    r.add([(BUF, 8, WRITE)], bid=1)  # the next chain is found right after the bad one
    chains = q.pop_many() if batched else [q.pop(), q.pop()]
    assert chains[0].head == 6 and chains[0].error is not None
    assert chains[0].error.startswith(counter)
    assert chains[1] == Chain(1, (), ((BUF, 8),))
    assert q.counters[counter] == 1
    assert sum(q.counters[c] for c in CHAIN_ERROR_COUNTERS) == 1
    assert "guest error " + counter in caplog.text
    q.push_many([(6, 0), (1, 0)])
    assert q.used_idx == len(bufs) + 1


def test_indirect_table_errors() -> None:
    mem, r, q = make(indirect=False)
    mem.write(BUF + 0x1000, pack_pdesc(BUF, 8, 0, 0))
    r.add([(BUF + 0x1000, 16, INDIRECT)], bid=1)
    assert q.pop().error.startswith("indirect_not_negotiated")
    mem2, r2, q2 = make()
    mem2.write(BUF + 0x1000, pack_pdesc(BUF, 8, 0, WRITE) + pack_pdesc(BUF, 8, 0, INDIRECT))
    r2.add([(BUF + 0x1000, 32, INDIRECT)], bid=1)
    c = q2.pop()
    assert c.error.startswith("indirect_nested") and c.in_ == ((BUF, 8),)
    mem2.write(BUF + 0x2000, pack_pdesc(BUF, 8, 0, WRITE) + pack_pdesc(BUF, 8, 0, 0))
    r2.add([(BUF + 0x2000, 32, INDIRECT)], bid=2)
    assert q2.pop().error.startswith("readable_after_writable")
    # NEXT and ids inside a table mean nothing (virtio 1.3 2.8.19): ignored.
    mem2.write(BUF + 0x3000, pack_pdesc(BUF, 8, 77, NEXT) + pack_pdesc(BUF, 8, 99, NEXT | WRITE))
    r2.add([(BUF + 0x3000, 32, INDIRECT)], bid=3)
    assert q2.pop() == Chain(3, ((BUF, 8),), ((BUF, 8),))


@pytest.mark.parametrize("batched", [False, True])
def test_unterminated_chain_breaks_the_ring_and_consumes_nothing(batched: bool) -> None:
    _, r, q = make(size=4)
    r.add([(BUF, 8, WRITE)], bid=0)
    r.add([(BUF, 8, 0)] * 3, bid=1, next_on_last=True)  # NEXT on every slot: never ends
    if batched:
        with pytest.raises(RingBroken, match="chain_unterminated"):
            q.pop_many()
        assert q.last_avail_idx == 0 and q.in_flight == 0
    else:
        assert q.pop().head == 0
        with pytest.raises(RingBroken, match="chain_unterminated"):
            q.pop()
        assert q.last_avail_idx == 1
    with pytest.raises(RingBroken):
        q.pending()


def test_chain_may_not_run_into_slots_in_flight() -> None:
    _, r, q = make(size=4)
    r.add([(BUF, 8, WRITE)], bid=0)
    r.add([(BUF, 8, WRITE)], bid=1)
    q.pop_many()
    # Two free slots; a chain that claims three (wrapping onto in-flight slot 0) is broken.
    r.add([(BUF, 8, 0)] * 2, bid=2, next_on_last=True)
    with pytest.raises(RingBroken, match="chain_unterminated"):
        q.pop()


def test_ring_outside_memory_is_broken() -> None:
    mem = make_memory()
    q = PackedDeviceVirtqueue(mem, 8, 1 << 30, 0x100, 0x200)
    for call in (q.pop, q.pop_many, q.pending):
        with pytest.raises(RingBroken, match="ring_outside_memory"):
            call()
    _, r, q2 = make(event_idx=True)
    q2.device = 1 << 30
    r.add([(BUF, 8, WRITE)], bid=0)
    with pytest.raises(RingBroken, match="ring_outside_memory"):
        q2.pop()
    assert q2.last_avail_idx == 0 and q2.in_flight == 0


def test_size_need_not_be_a_power_of_two_but_bounded() -> None:
    _, r, q = make(size=5)
    for lap in range(2):
        for i in range(5):
            r.add([(BUF, 8, WRITE)], bid=i)
        q.push_many([(c.head, 0) for c in q.pop_many()])
        assert q.avail_wrap == lap % 2
    for bad in (0, 32769):
        with pytest.raises(RingBroken):
            PackedDeviceVirtqueue(make_memory(), bad, 0x1000, 0, 0)


def test_push_validation_is_a_usage_error() -> None:
    _, r, q = make()
    r.add([(BUF, 8, WRITE)], bid=3)
    with pytest.raises(ValueError):
        q.push(3, 0)  # nothing popped yet
    q.pop()
    for bid, written in ((4, 0), (-1, 0), (0x10000, 0), (3, 1 << 32), (3, -1)):
        with pytest.raises(ValueError):
            q.push(bid, written)
    with pytest.raises(ValueError):
        q.push_many([(3, 0), (3, 0)])  # once in flight, once returned
    assert q.in_flight == 1
    q.push(3, 0)


# -- event suppression ----------------------------------------------------------------------
def test_device_area_without_event_idx() -> None:
    _, r, q = make()
    q.disable_notifications()
    assert r.device_event() == (0, RING_EVENT_FLAGS_DISABLE)
    q.enable_notifications()
    assert r.device_event() == (0, RING_EVENT_FLAGS_ENABLE)


def test_device_area_with_event_idx_follows_pops() -> None:
    _, r, q = make(size=4, event_idx=True)
    for i in range(3):
        r.add([(BUF, 8, WRITE)], bid=i)
    q.pop()
    assert r.device_event() == (pack_off_wrap(1, 1), RING_EVENT_FLAGS_DESC)
    q.disable_notifications()
    q.pop_many()
    assert r.device_event() == (pack_off_wrap(1, 1), RING_EVENT_FLAGS_DISABLE)
    q.push_many([(i, 0) for i in range(3)])
    r.add([(BUF, 8, WRITE)], bid=3)
    q.enable_notifications()
    assert r.device_event() == (pack_off_wrap(3, 1), RING_EVENT_FLAGS_DESC)
    q.pop()
    assert r.device_event() == (pack_off_wrap(0, 0), RING_EVENT_FLAGS_DESC)  # wrapped


def test_should_notify_by_driver_flags() -> None:
    _, r, q = make()
    for i in range(3):
        r.add([(BUF, 8, WRITE)], bid=i)
    q.pop_many()
    r.set_driver_event(0, RING_EVENT_FLAGS_DISABLE)
    q.push(0, 0)
    assert not q.should_notify()
    r.set_driver_event(0, RING_EVENT_FLAGS_ENABLE)
    q.push(1, 0)
    assert q.should_notify()
    assert not q.should_notify()  # nothing new
    r.set_driver_event(pack_off_wrap(5, 1), RING_EVENT_FLAGS_DESC)  # DESC without EVENT_IDX
    q.push(2, 0)
    assert q.should_notify()


def test_should_notify_event_idx_off_wrap() -> None:
    _, r, q = make(size=4, event_idx=True)
    for i in range(4):
        r.add([(BUF, 8, WRITE)], bid=i)
    q.pop_many()
    r.set_driver_event(pack_off_wrap(2, 1), RING_EVENT_FLAGS_DESC)
    q.push(0, 0)
    assert not q.should_notify()  # used 0 -> 1 does not pass slot 2
    q.push_many([(1, 0), (2, 0)])
    assert q.should_notify()  # 1 -> 3 passes slot 2
    q.push(3, 0)  # 3 -> 4 = slot 0 of the next lap
    assert not q.should_notify()
    # Second lap: an event named with the old wrap bit is a slot of the previous lap: passed.
    for i in range(2):
        r.add([(BUF, 8, WRITE)], bid=i)
    q.pop_many()
    r.set_driver_event(pack_off_wrap(1, 0), RING_EVENT_FLAGS_DESC)
    q.push(0, 0)
    assert not q.should_notify()  # 0 -> 1 (lap 2) does not pass slot 1 of lap 2
    q.push(1, 0)
    assert q.should_notify()      # 1 -> 2 passes it
    r.add([(BUF, 8, WRITE)], bid=2)
    q.pop()
    r.set_driver_event(pack_off_wrap(3, 1), RING_EVENT_FLAGS_DESC)  # wrap 1 = previous lap
    q.push(2, 0)
    assert not q.should_notify()


def test_should_notify_event_idx_across_the_wrap() -> None:
    _, r, q = make(size=4, event_idx=True)
    for i in range(3):
        r.add([(BUF, 8, WRITE)], bid=i)
    q.push_many([(c.head, 0) for c in q.pop_many()])
    q.should_notify()
    for i in range(2):
        r.add([(BUF, 8, WRITE)], bid=i)
    q.pop_many()
    r.set_driver_event(pack_off_wrap(0, 0), RING_EVENT_FLAGS_DESC)  # slot 0 of the next lap
    q.push_many([(0, 0), (1, 0)])  # used 3 (lap 1) -> 1 (lap 2): passes slot 0 of lap 2
    assert q.should_notify()


def test_state_restore_roundtrip() -> None:
    _, r, q = make(size=4, event_idx=True)
    for i in range(3):
        r.add([(BUF, 8, WRITE)] * (1 + i % 2), bid=i)
    q.pop_many()
    q.push(1, 0)
    st = q.state()
    q2 = PackedDeviceVirtqueue(q.mem, 4, r.desc, r.driver, r.device, event_idx=True)
    q2.restore(st)
    assert q2.state() == st and q2.in_flight == 2
    q2.push_many([(0, 0), (2, 0)])
    assert q2.in_flight == 0 and q2.used_idx == 0 and q2.used_wrap == 0


# -- the driver side against the device, through memory only -----------------------------------
def _pair(size: int, *, event_idx: bool, indirect: bool):
    mem = make_memory(1 << 21)
    area = DriverArea(mem, 0x100000, 0x100000)
    desc = area.alloc(16 * size, 16)
    drv_ev, dev_ev = area.alloc(4, 4), area.alloc(4, 4)
    d = PackedDriverVring(mem, size, desc, drv_ev, dev_ev, event_idx, indirect, area=area,
                          name="t")
    q = PackedDeviceVirtqueue(mem, size, desc, drv_ev, dev_ev, event_idx=event_idx,
                              indirect=indirect)
    return mem, d, q


@pytest.mark.parametrize("size", [1, 2, 7])
@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("indirect", [False, True])
def test_driver_and_device_agree_over_many_laps(size: int, event_idx: bool,
                                                indirect: bool) -> None:
    mem, d, q = _pair(size, event_idx=event_idx, indirect=indirect)
    rng = np.random.default_rng(size)
    expect: dict[object, tuple[tuple, tuple]] = {}
    held: list[Chain] = []
    kicks = 0
    for step in range(300):
        for _ in range(int(rng.integers(0, 4))):
            nout, nin = int(rng.integers(0, 3)), int(rng.integers(0, 3))
            if nout + nin == 0:
                nin = 1
            nout = min(nout, size - 1 if nin else size)
            nin = min(nin, size - nout)
            out = tuple((BUF + 0x100 * k, 8 + k) for k in range(nout))
            in_ = tuple((BUF + 0x1000 + 0x100 * k, 16 + k) for k in range(nin))
            if d.num_free < (1 if indirect else nout + nin):
                break
            tok = ("t", step, _)
            d.add_buf(out, in_, token=tok)
            expect[tok] = (out, in_)
        kicks += d.kick_prepare()
        held += q.pop_many()
        rng.shuffle(held)  # the device uses chains out of order
        k = int(rng.integers(0, len(held) + 1))
        done, held = held[:k], held[k:]
        q.push_many([(c.head, c.in_len) for c in done])
        q.should_notify()
        toks, lens = d.get_bufs()
        for t, ln in zip(toks, lens, strict=True):
            out, in_ = expect.pop(t)
            assert ln == sum(n for _, n in in_)
    assert all(c.error is None for c in held)
    assert d.broken is False and kicks > 0
    assert sum(q.counters.values()) == 0
    assert d.in_flight == len(expect) == q.in_flight


def test_driver_kick_suppression_with_event_idx() -> None:
    mem, d, q = _pair(8, event_idx=True, indirect=False)
    d.add_buf(in_=[(BUF, 8)])
    assert d.kick_prepare()  # device area zero = ENABLE
    q.pop()
    # The device asked for a kick at slot 1 (its next); the driver adds at 1: kick.
    d.add_buf(in_=[(BUF, 8)])
    assert d.kick_prepare()
    q.disable_notifications()
    d.add_buf(in_=[(BUF, 8)])
    assert not d.kick_prepare()
    assert d.counters["kicks_suppressed"] == 1


def test_driver_breaks_on_bad_used_id() -> None:
    mem, d, q = _pair(4, event_idx=False, indirect=False)
    d.add_buf(in_=[(BUF, 8)], token="a")
    c = q.pop()
    mem.write(d.desc_gpa + 12, (3).to_bytes(2, "little"))  # a device naming id 3, not in flight
    q.push(c.head, 0)
    mem.write(d.desc_gpa + 12, (3).to_bytes(2, "little"))
    assert d.get_bufs() == ([], [])
    assert d.broken and d.counters["bad_used_id"] == 1


def test_chain_tail_need_not_be_marked_available() -> None:
    """Only the head's flags publish a chain (QEMU reads the rest without checking them); one
    pop_many gives every chain a run of pops gives."""
    _, r, q = make()
    r.add([(BUF, 4, 0), (BUF + 8, 4, WRITE)], bid=1)
    r.set_desc(1, BUF + 8, 4, 1, WRITE)  # tail without AVAIL
    r.add([(BUF, 4, WRITE)], bid=2)
    assert q.pending() == 2
    assert [c.head for c in q.pop_many()] == [1, 2]


@pytest.mark.parametrize("batched", [False, True])
def test_id_reused_while_in_flight_is_returned_once_per_chain(batched: bool) -> None:
    """A driver reusing an id still in flight (its bug): every chain still goes back once, the
    oldest first, each moving used_idx by its own slot count."""
    _, r, q = make(size=8)
    r.add([(BUF, 4, 0), (BUF, 4, 0)], bid=5)  # slots 0-1
    r.add([(BUF, 4, 0)], bid=5)               # slot 2
    r.add([(BUF, 4, 0)], bid=6)               # slot 3
    assert [c.head for c in q.pop_many()] == [5, 5, 6]
    st = q.state()
    assert st.in_flight == ((5, (2, 1)), (6, (1,)))
    if batched:
        q.push_many([(6, 0), (5, 1), (5, 2)])
    else:
        for bid, n in ((6, 0), (5, 1), (5, 2)):
            q.push(bid, n)
    assert [r.used(s)[:2] for s in (0, 1, 3)] == [(6, 0), (5, 1), (5, 2)]
    assert q.used_idx == 4 and q.in_flight == 0
    with pytest.raises(ValueError):
        q.push(5, 0)
    q2 = PackedDeviceVirtqueue(q.mem, 8, r.desc, r.driver, r.device)
    q2.restore(st)
    assert q2.state() == st and q2.in_flight == 3
