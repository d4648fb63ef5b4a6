"""Driver-side packed ring (guest_model/packed_vring.py) against raw memory expectations.

Golden tests spell the bytes the driver must leave in guest memory (protocol.md 1.8); behaviour
tests play the device by hand with a few struct writes (no code shared with
balloon_dev/packed_virtqueue.py), so a misreading of the layout shows up as a byte mismatch."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guest_model.packed_vring import PackedDriverVring, alloc_packed_vring
from guest_model.vring import DriverArea, VringFull
from guestmem import DirtyLog, GuestMemory
from protocol.virtqueue import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VirtqPackedDesc,
    pack_off_wrap,
)

AVAIL, USED = 1 << 7, 1 << 15
NEXT, WRITE, INDIRECT = 1, 2, 4
AREA, AREA_SIZE = 0x10000, 0x40000
BUF = 0x80000


def make(size: int = 4, *, event_idx: bool = False, indirect: bool = False
         ) -> tuple[GuestMemory, PackedDriverVring]:
    mem = GuestMemory()
    mem.add_region(0, bytearray(1 << 20), "ram")
    area = DriverArea(mem, AREA, AREA_SIZE)
    return mem, alloc_packed_vring(mem, area, size, event_idx=event_idx, indirect=indirect,
                                   name="t")


def desc(mem: GuestMemory, v: PackedDriverVring, slot: int) -> tuple[int, int, int, int]:
    d = VirtqPackedDesc.parse(mem.read(v.desc_gpa + 16 * slot, 16))
    return d.addr, d.len, d.id, d.flags


def use(mem: GuestMemory, v: PackedDriverVring, slot: int, bid: int, length: int,
        wrap: int) -> None:
    """Play the device: write a used descriptor at ``slot``."""
    mem.write(v.desc_gpa + 16 * slot + 8, struct.pack("<IHH", length, bid,
                                                        AVAIL | USED if wrap else 0))


def test_golden_chain_bytes() -> None:
    mem, v = make()
    bid = v.add_buf(out=[(0x1122334455667788, 4)], in_=[(BUF, 0x100)], token="x")
    assert bid == 0
    assert mem.read(v.desc_gpa, 32) == bytes.fromhex(
        "8877665544332211" "04000000" "0000" "8100"    # NEXT | AVAIL (wrap 1)
        "0000080000000000" "00010000" "0000" "8200")   # WRITE | AVAIL
    assert mem.read(v.avail_gpa, 8) == bytes(8)          # both event areas start zeroed


def test_wrap_flips_avail_bits_and_used_detection() -> None:
    mem, v = make(size=4)
    ids = [v.add_buf(in_=[(BUF + 0x100 * i, 8)], token=i) for i in range(3)]
    for slot, bid in enumerate(ids):
        use(mem, v, slot, bid, 8, 1)
    assert v.get_bufs() == ([0, 1, 2], [8, 8, 8])
    # Slot 3 (lap 1), then slots 0 and 1 (lap 2: AVAIL clear, USED set).
    ids = [v.add_buf(in_=[(BUF, 8)], token=t) for t in ("a", "b", "c")]
    assert [desc(mem, v, s)[3] for s in (3, 0, 1)] == [WRITE | AVAIL, WRITE | USED, WRITE | USED]
    assert (v.next_avail, v.avail_wrap) == (2, 0)
    use(mem, v, 3, ids[0], 0, 1)
    use(mem, v, 0, ids[1], 0, 1)  # the old lap's used marking: not used in lap 2
    assert v.get_bufs() == (["a"], [0])
    use(mem, v, 0, ids[1], 0, 0)  # lap 2 used: AVAIL == USED == 0
    use(mem, v, 1, ids[2], 0, 0)
    assert v.get_bufs() == (["b", "c"], [0, 0])
    assert (v.last_used, v.used_wrap) == (2, 0) and v.in_flight == 0


def test_used_moves_by_chain_slots_and_out_of_order() -> None:
    mem, v = make(size=8)
    a = v.add_buf(out=[(BUF, 4)] * 3, token="a")   # slots 0-2
    b = v.add_buf(in_=[(BUF, 16)], token="b")      # slot 3
    assert v.num_free == 4
    use(mem, v, 0, b, 9, 1)   # the device used b first, at slot 0
    use(mem, v, 1, a, 0, 1)   # then a, at slot 1 (a's 3 slots: next used at 4)
    assert v.get_bufs() == (["b", "a"], [9, 0])
    assert v.last_used == 4 and v.num_free == 8


def test_indirect_table_layout() -> None:
    mem, v = make(indirect=True)
    bid = v.add_buf(out=[(BUF, 4)], in_=[(BUF + 0x100, 8), (BUF + 0x200, 8)])
    addr, length, got_id, flags = desc(mem, v, 0)
    assert (length, got_id, flags) == (48, bid, INDIRECT | AVAIL)
    table = [VirtqPackedDesc.parse(mem.read(addr + 16 * i, 16)) for i in range(3)]
    assert [(d.addr, d.len, d.flags) for d in table] == [
        (BUF, 4, 0), (BUF + 0x100, 8, WRITE), (BUF + 0x200, 8, WRITE)]  # WRITE only
    assert v.counters["added_indirect"] == 1 and v.num_free == 3


def test_batch_add_and_full() -> None:
    mem, v = make(size=4)
    mem.dirty_log = DirtyLog(256)
    mem.dirty_log.start()
    ids = v.add_single_bufs(np.array([BUF, BUF + 0x1000]), np.array([0x1000, 0x1000]),
                            writable=True)
    assert ids.tolist() == [0, 1]
    assert [desc(mem, v, s) for s in (0, 1)] == [
        (BUF, 0x1000, 0, WRITE | AVAIL), (BUF + 0x1000, 0x1000, 1, WRITE | AVAIL)]
    assert mem.dirty_log.peek()[v.desc_gpa >> 12]
    with pytest.raises(VringFull):
        v.add_single_bufs(np.array([BUF] * 3), np.array([8] * 3), writable=False)
    with pytest.raises(VringFull):
        v.add_buf(out=[(BUF, 4)] * 3)
    v.add_buf(out=[(BUF, 4)] * 2)
    assert v.num_free == 0


def test_kick_and_interrupt_suppression_words() -> None:
    mem, v = make(size=4, event_idx=True)
    v.add_buf(in_=[(BUF, 8)])
    assert v.kick_prepare()  # device area zero: ENABLE
    mem.write(v.used_gpa, struct.pack("<HH", 0, RING_EVENT_FLAGS_DISABLE))
    v.add_buf(in_=[(BUF, 8)])
    assert not v.kick_prepare()
    # The device wants a kick when slot 3 of lap 1 is published; 2 -> 3 does not reach it.
    mem.write(v.used_gpa, struct.pack("<HH", pack_off_wrap(3, 1), RING_EVENT_FLAGS_DESC))
    v.add_buf(in_=[(BUF, 8)])
    assert not v.kick_prepare()
    v.add_buf(in_=[(BUF, 8)])   # slot 3: 3 -> 0 (lap 2) passes it
    assert v.kick_prepare()
    v.disable_cb()
    assert struct.unpack("<HH", mem.read(v.avail_gpa, 4))[1] == RING_EVENT_FLAGS_DISABLE
    assert v.enable_cb()
    assert struct.unpack("<HH", mem.read(v.avail_gpa, 4)) == (pack_off_wrap(0, 1),
                                                              RING_EVENT_FLAGS_DESC)
    use(mem, v, 0, 0, 0, 1)
    assert not v.enable_cb()  # a used buffer arrived: reap first
    v.get_bufs()
    assert struct.unpack("<HH", mem.read(v.avail_gpa, 4)) == (pack_off_wrap(1, 1),
                                                              RING_EVENT_FLAGS_DESC)
    _, v2 = make(event_idx=False)
    v2.enable_cb()
    assert struct.unpack("<HH", v2.mem.read(v2.avail_gpa, 4))[1] == RING_EVENT_FLAGS_ENABLE


def test_bad_used_id_and_len_from_the_device() -> None:
    mem, v = make()
    v.add_buf(in_=[(BUF, 8)], token="a")
    v.add_buf(in_=[(BUF, 8)], token="b")
    use(mem, v, 0, 0, 100, 1)  # len beyond the buffer: clamped and counted
    assert v.get_bufs() == (["a"], [8]) and v.counters["used_len_too_big"] == 1
    use(mem, v, 1, 0, 0, 1)    # id 0 is no longer in flight
    assert v.get_bufs() == ([], [])
    assert v.broken and v.counters["bad_used_id"] == 1


def test_detach_unused_starts_over() -> None:
    mem, v = make(indirect=True)
    v.add_buf(out=[(BUF, 4)] * 2, token="a")
    v.add_buf(in_=[(BUF, 4)], token="b")
    assert sorted(v.detach_unused()) == ["a", "b"]
    assert (v.num_free, v.in_flight, v.next_avail, v.avail_wrap) == (4, 0, 0, 1)
    assert mem.read(v.desc_gpa, 64) == bytes(64)


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 6), nbufs=st.integers(0, 6),
       writes=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 0xFFFF),
                                 st.integers(0, 0xFFFFFFFF),
                                 st.sampled_from([0, AVAIL, USED, AVAIL | USED, 0xFFFF])),
                       max_size=12))
def test_any_device_writes_are_survived(size: int, nbufs: int,
                                        writes: list[tuple[int, int, int, int]]) -> None:
    """Whatever the device scribbles over the ring, reaping never raises, never returns a buffer
    twice or one not in flight, and keeps the free-slot books: a bad id breaks the ring."""
    mem, v = make(size=size)
    toks = []
    for i in range(min(nbufs, size)):
        v.add_buf(in_=[(BUF + 0x100 * i, 16)], token=("t", i))
        toks.append(("t", i))
    for slot, bid, length, flags in writes:
        if slot < size:
            mem.write(v.desc_gpa + 16 * slot + 8, struct.pack("<IHH", length, bid, flags))
    got: list[object] = []
    for _ in range(3):
        t, lens = v.get_bufs()
        got += t
        assert all(0 <= n <= 16 for n in lens)
    assert len(got) == len(set(got)) and set(got) <= set(toks)
    assert v.in_flight == len(toks) - len(got)
    assert v.num_free == size - v.in_flight  # one-slot buffers
    if v.broken:
        assert v.counters["bad_used_id"] == 1


def _reference_reap(v: PackedDriverVring, ring: np.ndarray, slots_of: dict[int, int],
                    in_bytes: dict[int, int], tokens: dict[int, object],
                    max_n: int | None) -> tuple[list[object], list[int], bool]:
    """The reaping rule one buffer at a time, over a copy of the ring and of the driver's
    shadow (slots per id in flight, writable bytes, tokens): what ``get_bufs`` must return in
    batches."""
    in_flight = len(slots_of)
    limit = in_flight if max_n is None else min(max_n, in_flight)
    idx, wrap = v.last_used, v.used_wrap
    toks: list[object] = []
    lens: list[int] = []
    while len(toks) < limit:
        flags, bid, ln = int(ring["flags"][idx]), int(ring["id"][idx]), int(ring["len"][idx])
        if (flags & (AVAIL | USED)) != (AVAIL | USED if wrap else 0):
            return toks, lens, False
        if bid not in slots_of:
            return toks, lens, True  # bad id: the ring breaks
        toks.append(tokens[bid])
        lens.append(min(ln, in_bytes[bid]))
        end = idx + slots_of.pop(bid)
        idx, wrap = end % v.size, (wrap + end // v.size) & 1
    return toks, lens, False


@settings(max_examples=300, deadline=None)
@given(size=st.integers(2, 16),
       chains=st.lists(st.integers(1, 3), min_size=1, max_size=16),
       order=st.randoms(use_true_random=False),
       scribbles=st.lists(st.tuples(st.integers(0, 15), st.integers(0, 20),
                                    st.integers(0, 0x30)), max_size=3),
       max_n=st.one_of(st.none(), st.integers(1, 8)),
       laps=st.integers(0, 2))
def test_batched_reap_matches_one_at_a_time(size: int, chains: list[int], order: object,
                                            scribbles: list[tuple[int, int, int]],
                                            max_n: int | None, laps: int) -> None:
    """A device that uses buffers in any order, some chains of several slots, ids repeated or
    made up: the batched reap returns what reaping one buffer at a time returns, breaks the
    ring in the same cases and keeps the same books."""
    import random
    assert isinstance(order, random.Random)
    mem, v = make(size=size)
    # Start somewhere in a later lap so runs cross the ring's end.
    for _ in range(laps * size + order.randrange(size)):
        v.add_buf(in_=[(BUF, 16)])
        use(mem, v, v.last_used, int(v._ring["id"][v.last_used]), 0, v.used_wrap)
        v.get_bufs()
    posted: list[tuple[int, int]] = []  # (id, slots)
    for i, n in enumerate(chains):
        try:
            bid = v.add_buf(in_=[(BUF + 0x100 * i, 16)] * min(n, size), token=("t", i))
        except VringFull:
            break
        posted.append((bid, min(n, size)))
    # The device uses them in a shuffled order, in consecutive slots from last_used on.
    order.shuffle(posted)
    idx, wrap = v.last_used, v.used_wrap
    for bid, n in posted[:order.randrange(len(posted) + 1)]:
        use(mem, v, idx, bid, order.randrange(40), wrap)
        end = idx + n
        idx, wrap = end % size, (wrap + end // size) & 1
    for k, bid, ln in scribbles:
        k %= size
        use(mem, v, k, bid, ln, order.randrange(2))
    want_toks, want_lens, want_broken = _reference_reap(
        v, v._ring.copy(), {b: int(v._slots[b]) for b in range(size) if v._slots[b]},
        {b: int(v._in_bytes[b]) for b in range(size)}, {b: v._tokens[b] for b in range(size)},
        max_n)
    in_flight = v.in_flight
    toks, lens = v.get_bufs(max_n)
    assert (toks, lens, v.broken) == (want_toks, want_lens, want_broken)
    assert v.in_flight == in_flight - len(toks)
    assert len(v._free_ids) == len(set(v._free_ids)) == size - v.in_flight
    assert v._nfree == size - int(v._slots.sum())
