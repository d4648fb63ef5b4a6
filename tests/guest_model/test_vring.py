"""Driver-side split ring (guest_model/vring.py) against raw memory expectations.

The golden tests spell the bytes the ring must leave in guest memory (protocol.md 1.2). The
behaviour tests drive it with ``RawDevice``, a deliberately tiny device side written here from
the layouts alone (it shares no code with guest_model/vring.py or balloon_dev/virtqueue.py), so a
misunderstanding in the ring shows up as a byte mismatch rather than being mirrored.
"""
from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guest_model.vring import (
    DriverArea,
    DriverVring,
    VringBroken,
    VringFull,
    alloc_vring,
)
from guestmem import DirtyLog, GuestMemory
from protocol.errors import UsageError
from protocol.virtqueue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    VirtqAvail,
    VirtqDesc,
    vring_need_event,
)

AREA = 0x10000
AREA_SIZE = 0x40000


class RawDevice:
    """A minimal device side over raw bytes: pops chains, pushes used elements."""

    def __init__(self, mem: GuestMemory, size: int, desc: int, avail: int, used: int) -> None:
        self.mem, self.n, self.desc, self.avail, self.used = mem, size, desc, avail, used
        self.last_avail = 0
        self.used_idx = 0

    def read_desc(self, base: int, i: int) -> tuple[int, int, int, int]:
        return struct.unpack("<QIHH", self.mem.read(base + 16 * i, 16))

    def pop(self) -> tuple[int, list[tuple[int, int, bool]]]:
        """(head, [(addr, len, writable)]) of the next available chain (there must be one)."""
        aidx = self.mem.read_u16(self.avail + 2)
        assert aidx != self.last_avail, "no chain available"
        head = self.mem.read_u16(self.avail + 4 + 2 * (self.last_avail % self.n))
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        elems = []
        addr, ln, flags, _nxt = self.read_desc(self.desc, head)
        if flags & VIRTQ_DESC_F_INDIRECT:
            base, count, i = addr, ln // 16, 0
            for _ in range(count):
                a, l2, f, nx = self.read_desc(base, i)
                elems.append((a, l2, bool(f & VIRTQ_DESC_F_WRITE)))
                if not f & VIRTQ_DESC_F_NEXT:
                    break
                i = nx
            return head, elems
        i = head
        for _ in range(self.n):
            a, l2, f, nx = self.read_desc(self.desc, i)
            elems.append((a, l2, bool(f & VIRTQ_DESC_F_WRITE)))
            if not f & VIRTQ_DESC_F_NEXT:
                break
            i = nx
        return head, elems

    def push(self, head: int, length: int = 0, publish: bool = True) -> None:
        slot = self.used_idx % self.n
        self.mem.write(self.used + 4 + 8 * slot, struct.pack("<II", head, length))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self) -> None:
        self.mem.write_u16(self.used + 2, self.used_idx)

    def set_avail_event(self, v: int) -> None:
        self.mem.write_u16(self.used + 4 + 8 * self.n, v)

    def used_event(self) -> int:
        return self.mem.read_u16(self.avail + 4 + 2 * self.n)


def make_mem(dirty: bool = False) -> GuestMemory:
    mem = GuestMemory()
    mem.add_region(AREA, bytearray(AREA_SIZE), "driver-area")
    if dirty:
        mem.dirty_log = DirtyLog((AREA + AREA_SIZE) >> 12)
        mem.dirty_log.start()
    return mem


def make_ring(size: int = 8, *, event_idx: bool = False, indirect: bool = False,
              dirty: bool = False) -> tuple[GuestMemory, DriverArea, DriverVring, RawDevice]:
    mem = make_mem(dirty)
    area = DriverArea(mem, AREA, AREA_SIZE)
    vq = alloc_vring(mem, area, size, event_idx=event_idx, indirect=indirect, name="t")
    dev = RawDevice(mem, size, vq.desc_gpa, vq.avail_gpa, vq.used_gpa)
    return mem, area, vq, dev


# -- golden layouts ------------------------------------------------------------------------------

def test_golden_direct_chain_bytes() -> None:
    mem = make_mem()
    mem.fill(AREA, AREA_SIZE, 0xEE)  # the ring must zero its areas itself
    vq = DriverVring(mem, 4, AREA, AREA + 0x100, AREA + 0x200)
    head = vq.add_buf(out=[(0x1000, 4)], in_=[(0x2000, 0x400000), (0x3000, 8)], token="t")
    assert head == 0
    # Three descriptors 0 -> 1 -> 2: readable first, then writable, NEXT on all but the last.
    assert mem.read(AREA, 48) == bytes.fromhex(
        "0010000000000000" "04000000" "0100" "0100"
        "0020000000000000" "00004000" "0300" "0200"
        "0030000000000000" "08000000" "0200" "0000")
    # avail: flags 0, idx 1, ring[0] = 0, rest zero, used_event 0.
    assert mem.read(AREA + 0x100, 6 + 2 * 4) == bytes.fromhex("0000" "0100" "0000" "0000"
                                                               "0000" "0000" "0000")
    parsed = VirtqAvail(4).parse(mem.read(AREA + 0x100, 14))
    assert parsed.idx == 1 and list(parsed.ring) == [0, 0, 0, 0]
    # used ring zeroed by the driver (protocol.md 1.2: driver zeroes used.flags at setup).
    assert mem.read(AREA + 0x200, 6 + 8 * 4) == bytes(38)


def test_golden_indirect_bytes() -> None:
    mem = make_mem()
    area = DriverArea(mem, AREA + 0x1000, 0x1000)
    vq = DriverVring(mem, 4, AREA, AREA + 0x100, AREA + 0x200, indirect=True, area=area)
    head = vq.add_buf(out=[(0x5000, 4)], in_=[(0x6000, 0x1000)])
    assert vq.num_free == 3  # one ring descriptor for the whole chain
    d = VirtqDesc.parse(mem.read(AREA + 16 * head, 16))
    assert d.flags == VIRTQ_DESC_F_INDIRECT and d.len == 32 and d.next == 0
    assert area.gpa <= d.addr < area.gpa + area.size and d.addr % 16 == 0
    # The table: entry 0 readable NEXT -> 1, entry 1 writable, table-relative next.
    assert mem.read(d.addr, 32) == bytes.fromhex(
        "0050000000000000" "04000000" "0100" "0100"
        "0060000000000000" "00100000" "0200" "0000")


def test_golden_batched_hints_match_single_adds() -> None:
    mem1, _, vq1, _ = make_ring(8)
    mem2, _, vq2, _ = make_ring(8)
    addrs = np.array([0x400000, 0x800000, 0xC00000], dtype=np.uint64)
    for a in addrs:
        vq1.add_buf(in_=[(int(a), 0x400000)], token=int(a))
    heads = vq2.add_single_bufs(addrs, np.full(3, 0x400000), writable=True)
    assert heads.tolist() == [0, 1, 2]
    assert mem1.read(AREA, AREA_SIZE) == mem2.read(AREA, AREA_SIZE)
    desc = VirtqDesc.parse(mem2.read(vq2.desc_gpa + 16, 16))
    assert (desc.addr, desc.len, desc.flags, desc.next) == (0x800000, 0x400000,
                                                            VIRTQ_DESC_F_WRITE, 0)


def test_alloc_vring_alignment_and_separation() -> None:
    _mem, _area, vq, _ = make_ring(1024)
    assert vq.desc_gpa % 16 == 0 and vq.avail_gpa % 2 == 0 and vq.used_gpa % 4 == 0
    spans = sorted([(vq.desc_gpa, 16 * 1024), (vq.avail_gpa, 6 + 2048), (vq.used_gpa, 6 + 8192)])
    for (a, n), (b, _) in itertools.pairwise(spans):
        assert a + n <= b
    assert all(AREA <= a and a + n <= AREA + AREA_SIZE for a, n in spans)


# -- behaviour against the raw device --------------------------------------------------------------

def test_round_trip_tokens_and_lengths() -> None:
    _, _, vq, dev = make_ring(8)
    vq.add_buf(out=[(0x1000, 4)], token="start")
    vq.add_buf(in_=[(0x2000, 0x100), (0x3000, 0x100)], token="two")
    assert vq.num_free == 5 and vq.in_flight == 2
    h, elems = dev.pop()
    assert elems == [(0x1000, 4, False)]
    dev.push(h, 0)
    h2, elems2 = dev.pop()
    assert elems2 == [(0x2000, 0x100, True), (0x3000, 0x100, True)]
    assert vq.get_buf() == ("start", 0)
    assert vq.get_buf() is None
    dev.push(h2, 0x180)
    assert vq.get_buf() == ("two", 0x180)
    assert vq.num_free == 8 and vq.in_flight == 0


def test_out_of_order_completion_frees_right_chains() -> None:
    _, _, vq, dev = make_ring(8)
    for t in range(3):
        vq.add_buf(in_=[(0x1000 * (t + 1), 16)] * (t + 1), token=t)
    chains = [dev.pop() for _ in range(3)]
    for h, _ in reversed(chains):
        dev.push(h, 0)
    toks, lens = vq.get_bufs()
    assert toks == [2, 1, 0] and lens == [0, 0, 0]
    assert vq.num_free == 8
    # Reused descriptors must form correct chains again.
    vq.add_buf(in_=[(0xA000, 1)] * 8, token="all")
    assert dev.pop()[1] == [(0xA000, 1, True)] * 8


def test_ring_full_raises_and_num_free() -> None:
    _, _, vq, _dev = make_ring(4)
    vq.add_buf(in_=[(0x1000, 1)] * 3)
    with pytest.raises(VringFull):
        vq.add_buf(in_=[(0x1000, 1)] * 2)
    with pytest.raises(VringFull):
        vq.add_single_bufs(np.array([1, 2]), np.array([1, 1]), writable=True)
    assert vq.num_free == 1
    vq.add_buf(in_=[(0x1000, 1)])
    assert vq.num_free == 0


def test_usage_errors() -> None:
    _, _, vq, _ = make_ring(4)
    with pytest.raises(UsageError):
        vq.add_buf()
    with pytest.raises(UsageError):
        vq.add_buf(in_=[(0x1000, 1)] * 5)  # longer than the queue
    with pytest.raises(UsageError):
        vq.add_buf(in_=[(0x1000, 0)])
    with pytest.raises(UsageError):
        DriverVring(make_mem(), 6, AREA, AREA + 0x100, AREA + 0x200)


def test_indirect_used_only_for_long_chains_and_table_recycled() -> None:
    _, area, vq, dev = make_ring(4, indirect=True)
    vq.add_buf(in_=[(0x1000, 8)])
    assert vq.counters["added_indirect"] == 0 and vq.num_free == 3
    before = area.in_use
    vq.add_buf(in_=[(0x1000 * i, 0x1000) for i in range(1, 5)], token="report")
    assert vq.counters["added_indirect"] == 1 and vq.num_free == 2
    assert area.in_use > before
    h0, _ = dev.pop()
    h, elems = dev.pop()
    assert elems == [(0x1000 * i, 0x1000, True) for i in range(1, 5)]
    dev.push(h0)
    dev.push(h, 0x4000)
    assert vq.get_bufs() == ([0, "report"], [0, 0x4000])
    assert area.in_use == before and vq.num_free == 4
    # The freed table is reused for the next chain of the same class.
    vq.add_buf(in_=[(0x9000, 1)] * 3)
    assert area.in_use == before + 64


def test_indirect_falls_back_to_direct_when_area_is_full() -> None:
    mem = make_mem()
    area = DriverArea(mem, AREA + 0x1000, 64)
    area.alloc(64)
    vq = DriverVring(mem, 4, AREA, AREA + 0x100, AREA + 0x200, indirect=True, area=area)
    vq.add_buf(in_=[(0x1000, 1)] * 3)
    assert vq.counters["added_indirect"] == 0 and vq.num_free == 1


# -- notifications ------------------------------------------------------------------------------

def test_kick_honours_no_notify_without_event_idx() -> None:
    mem, _, vq, _dev = make_ring(8)
    assert vq.kick_prepare() is False  # nothing added
    vq.add_buf(in_=[(0x1000, 1)])
    assert vq.kick_prepare() is True
    mem.write_u16(vq.used_gpa, VIRTQ_USED_F_NO_NOTIFY)
    vq.add_buf(in_=[(0x1000, 1)])
    assert vq.kick_prepare() is False
    assert vq.counters["kicks"] == 1 and vq.counters["kicks_suppressed"] == 1


@pytest.mark.parametrize(("event", "expect"), [(10, True), (11, True), (12, True), (13, False),
                                               (9, False)])
def test_kick_with_event_idx_follows_avail_event(event: int, expect: bool) -> None:
    mem, _, vq, dev = make_ring(16, event_idx=True)
    # Move to avail idx 10 with kicks taken.
    for _ in range(10):
        vq.add_buf(in_=[(0x1000, 1)])
        dev.push(dev.pop()[0])
        vq.get_buf()
    vq.kick_prepare()
    mem.write_u16(vq.used_gpa, VIRTQ_USED_F_NO_NOTIFY)  # ignored with EVENT_IDX
    dev.set_avail_event(event)
    for _ in range(3):
        vq.add_buf(in_=[(0x1000, 1)])
    # old=10, new=13: the device asked for a kick when idx passes `event` (protocol.md 1.4).
    assert vq.kick_prepare() is expect
    assert vring_need_event(event, 13, 10) is expect


def test_no_interrupt_flag_without_event_idx() -> None:
    mem, _, vq, dev = make_ring(8)
    vq.disable_cb()
    assert mem.read_u16(vq.avail_gpa) == VIRTQ_AVAIL_F_NO_INTERRUPT
    vq.add_buf(in_=[(0x1000, 1)])
    dev.push(dev.pop()[0])
    assert vq.enable_cb() is False  # something arrived while disabled
    assert mem.read_u16(vq.avail_gpa) == 0
    vq.get_buf()
    assert vq.enable_cb() is True


def test_used_event_tracks_last_used_with_event_idx() -> None:
    mem, _, vq, dev = make_ring(8, event_idx=True)
    for _ in range(3):
        vq.add_buf(in_=[(0x1000, 1)])
    for _ in range(3):
        dev.push(dev.pop()[0])
    vq.get_bufs()
    assert dev.used_event() == 3  # interrupt me when you write used entry 3
    vq.disable_cb()
    assert mem.read_u16(vq.avail_gpa) == 0  # flags stay 0 with EVENT_IDX
    assert dev.used_event() == 2  # behind last_used: the device would have to wrap to match
    assert not vring_need_event(dev.used_event(), 3 + 100, 3)
    assert vq.enable_cb() is True and dev.used_event() == 3


# -- 16-bit wrap ----------------------------------------------------------------------------------

def test_indices_wrap_at_65536() -> None:
    mem, _, vq, dev = make_ring(4, event_idx=True)
    # Start both sides just below the wrap (a ring after 65530 round trips looks like this).
    start = 0xFFFA
    vq.avail_idx = vq.last_used_idx = start
    mem.write_u16(vq.avail_gpa + 2, start)
    dev.last_avail = dev.used_idx = start
    dev.publish()
    seen = []
    for i in range(12):
        vq.add_buf(in_=[(0x1000 * (i + 1), 8)], token=i)
        h, _elems = dev.pop()
        dev.push(h, 8)
        seen.append(vq.get_buf())
        assert dev.used_event() == vq.last_used_idx
    assert seen == [(i, 8) for i in range(12)]
    assert vq.avail_idx == (start + 12) & 0xFFFF == mem.read_u16(vq.avail_gpa + 2) == 6
    assert vq.last_used_idx == 6 and vq.num_free == 4


# -- device faults ---------------------------------------------------------------------------------

def test_bad_used_id_breaks_ring_but_keeps_good_prefix() -> None:
    _, _, vq, dev = make_ring(4)
    vq.add_buf(in_=[(0x1000, 8)], token="a")
    vq.add_buf(in_=[(0x2000, 8)], token="b")
    dev.pop()
    dev.pop()
    dev.push(0, 0, publish=False)
    dev.push(3, 0)  # head 3 was never posted
    toks, _ = vq.get_bufs()
    assert toks == ["a"]
    assert vq.broken and vq.counters["bad_used_id"] == 1
    assert vq.get_buf() is None
    with pytest.raises(VringBroken):
        vq.add_buf(in_=[(0x1000, 8)])


def test_duplicate_used_id_breaks_ring() -> None:
    _, _, vq, dev = make_ring(4)
    vq.add_buf(in_=[(0x1000, 8)], token="a")
    vq.add_buf(in_=[(0x2000, 8)], token="b")
    dev.push(0, 0, publish=False)
    dev.push(0, 0)
    assert vq.get_bufs()[0] == ["a"]
    assert vq.broken


def test_used_idx_beyond_in_flight_breaks_ring() -> None:
    _, _, vq, dev = make_ring(4)
    vq.add_buf(in_=[(0x1000, 8)])
    dev.used_idx = 3
    dev.publish()
    assert vq.get_bufs() == ([], [])
    assert vq.broken and vq.counters["bad_used_idx"] == 1


def test_used_len_over_report_is_counted_and_clamped() -> None:
    _, _, vq, dev = make_ring(4)
    vq.add_buf(out=[(0x1000, 4)], in_=[(0x2000, 8)], token="x")
    dev.push(dev.pop()[0], 100)
    assert vq.get_buf() == ("x", 8)
    assert vq.counters["used_len_too_big"] == 1 and not vq.broken


def test_detach_unused_returns_tokens_and_frees_everything() -> None:
    _, area, vq, _ = make_ring(4, indirect=True)
    base = area.in_use
    vq.add_buf(in_=[(0x1000, 8)] * 3, token="ind")
    vq.add_buf(in_=[(0x1000, 8)], token="one")
    assert sorted(vq.detach_unused()) == ["ind", "one"]
    assert vq.num_free == 4 and area.in_use == base


def test_writes_are_dirty_logged() -> None:
    mem, _, vq, _ = make_ring(8, dirty=True)
    assert mem.dirty_log is not None
    mem.dirty_log.sync()
    vq.add_single_bufs(np.array([0x400000]), np.array([0x400000]), writable=True)
    bits = mem.dirty_log.sync()
    assert bits[vq.desc_gpa >> 12] and bits[vq.avail_gpa >> 12]


# -- property: any interleaving of add / complete / reap keeps the ring consistent ---------------

@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "done", "reap"]), st.integers(1, 5),
                          st.booleans()), max_size=60),
       st.booleans(), st.booleans())
def test_random_interleavings_conserve_descriptors(ops: list[tuple[str, int, bool]],
                                                   event_idx: bool, indirect: bool) -> None:
    _, area, vq, dev = make_ring(8, event_idx=event_idx, indirect=indirect)
    base = area.in_use
    posted: dict[int, list[tuple[int, int, bool]]] = {}
    popped: list[tuple[int, list[tuple[int, int, bool]]]] = []
    next_tok = 0
    got: list[int] = []
    reaped: list[int] = []
    for op, n, flag in ops:
        if op == "add":
            elems = [(0x1000 * (next_tok + 1) + 16 * j, 8) for j in range(n)]
            try:
                if flag:
                    vq.add_buf(out=elems[:1], in_=elems[1:], token=next_tok)
                else:
                    vq.add_buf(in_=elems, token=next_tok)
            except VringFull:
                continue
            posted[next_tok] = [(a, ln, not (flag and j == 0)) for j, (a, ln) in enumerate(elems)]
            next_tok += 1
            c = dev.pop()
            assert c is not None
            popped.append(c)
        elif op == "done" and popped:
            h, chain = popped.pop(n % len(popped))
            tok = next(t for t, e in posted.items() if e == chain)
            dev.push(h, 0)
            got.append(tok)
        elif op == "reap":
            toks, _ = vq.get_bufs(n)
            reaped.extend(toks)
            for t in toks:
                posted.pop(t)
    toks, _ = vq.get_bufs()
    reaped.extend(toks)
    for t in toks:
        posted.pop(t)
    assert not vq.broken
    assert reaped == got  # used-ring order is completion order
    cost = sum(1 if indirect and len(e) >= 2 else len(e) for e in posted.values())
    assert vq.num_free == 8 - cost
    assert vq.in_flight == len(posted)
    if not posted:
        assert area.in_use == base
