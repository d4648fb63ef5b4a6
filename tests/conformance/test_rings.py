"""Device-side ring rules V-1..V-10 (protocol.md 1.6).

V-1..V-9 are checked on balloon_dev.virtqueue.DeviceVirtqueue with raw rings written by
vmsim.conformance.rings; V-10 (no buffer used before DRIVER_OK) is a device-level rule, checked on
balloon_dev.device.BalloonDevice through the device test harness. Each rule is checked both one
chain at a time (pop) and batched (pop_many) where the two paths differ. V-4..V-9 are checked on
packed rings too (balloon_dev.packed_virtqueue, at the end of the file)."""
from __future__ import annotations

import numpy as np
import pytest

from balloon_dev.packed_virtqueue import PackedDeviceVirtqueue
from balloon_dev.virtqueue import DeviceVirtqueue, RingBroken
from guestmem import GuestMemory
from protocol.balloon import BalloonQueue
from tests.balloon_dev.devharness import ACK, DOK, DRV, FOK, Harness, pfn_bytes
from tests.packedringbuilder import AVAIL, RawPackedRing, pack_pdesc
from vmsim.conformance.rings import INDIRECT, NEXT, WRITE, RawRing, make_memory, write_table

MEM = 1 << 20
BUF = 0x80000  # data buffers live here
TBL = 0x90000  # indirect tables live here


def make(size: int = 8, **kw) -> tuple[GuestMemory, RawRing, DeviceVirtqueue]:
    mem = make_memory(MEM)
    r = RawRing.layout(mem, 0x1000, size)
    q = DeviceVirtqueue(mem, size, r.desc, r.driver, r.device, **kw)
    return mem, r, q


def pop_both(build, make=make, **kw):
    """Build the same ring twice (with ``make``: the split ring's, or ``make_packed``); pop it
    once with pop() and once with pop_many(). Returns the chain list (the two asserted equal)
    and the queue of the batched run."""
    results = []
    for batched in (False, True):
        mem, r, q = make(**kw)
        build(mem, r)
        chains = q.pop_many() if batched else list(iter(q.pop, None))
        results.append((chains, q))
    (one, _), (many, q) = results
    assert one == many
    return many, q


@pytest.mark.spec("V-1")
@pytest.mark.parametrize("batched", [False, True])
def test_avail_idx_moving_more_than_size_breaks_ring(batched: bool) -> None:
    """avail.idx moving by N is fine, by N + 1 breaks the ring (RingBroken, counted)."""
    _, r, q = make()
    r.set_desc(0, BUF, 8, WRITE)
    r.publish(*[0] * 8)  # exactly N pending is fine
    assert q.pending() == 8
    q.pop_many()
    r.set_avail_idx(8 + 9)  # then a jump of N + 1
    with pytest.raises(RingBroken):
        q.pop_many() if batched else q.pop()
    assert q.counters["avail_idx_jump"] == 1 and q.last_avail_idx == 8


@pytest.mark.spec("V-1")
def test_avail_idx_wrapping_backwards_breaks_ring() -> None:
    """avail.idx going backwards (a move of 65535) breaks the ring."""
    _, r, q = make()
    r.set_avail_idx(0xFFFF)  # "moved" by 65535: a decrement, never allowed
    with pytest.raises(RingBroken):
        q.pending()


@pytest.mark.spec("V-2")
@pytest.mark.parametrize("batched", [False, True])
def test_head_out_of_range_breaks_ring(batched: bool) -> None:
    """a head >= N in the avail ring breaks the ring and consumes nothing."""
    _, r, q = make()
    r.publish(8)
    with pytest.raises(RingBroken):
        q.pop_many() if batched else q.pop()
    assert q.counters["head_out_of_range"] == 1 and q.last_avail_idx == 0


@pytest.mark.spec("V-3")
@pytest.mark.parametrize("indirect", [False, True])
def test_next_out_of_range_is_chain_error(indirect: bool) -> None:
    """next >= N (or >= table entries) ends the chain as a counted error."""
    def build(mem: GuestMemory, r: RawRing) -> None:
        if indirect:
            # The table has 2 entries, so next = 2 is out of range although 2 < N.
            n = write_table(mem, TBL, [(BUF, 16, NEXT, 2), (BUF, 16, 0)])
            r.set_desc(0, TBL, n, INDIRECT)
        else:
            r.set_desc(0, BUF, 16, NEXT, 8)
        r.publish(0)

    (c,), q = pop_both(build)
    assert c.error.startswith("next_out_of_range")
    assert c.out == ((BUF, 16),) and q.counters["next_out_of_range"] == 1


@pytest.mark.spec("V-4")
@pytest.mark.parametrize("where", ["table", "indirect"])
def test_descriptor_loop_is_bounded(where: str) -> None:
    """a descriptor loop stops after N (or table-size) descriptors as a counted error."""
    def build(mem: GuestMemory, r: RawRing) -> None:
        if where == "indirect":
            n = write_table(mem, TBL, [(BUF, 16, NEXT, 1), (BUF, 16, NEXT, 0)])
            r.set_desc(0, TBL, n, INDIRECT)
        else:
            r.set_desc(0, BUF, 16, NEXT, 1)
            r.set_desc(1, BUF, 16, NEXT, 0)
        r.publish(0)

    (c,), q = pop_both(build)
    assert c.error.startswith("desc_loop") and q.counters["desc_loop"] == 1
    # The walk stopped after the table's size: N = 8 buffers, or the 2 of the indirect table.
    assert len(c.out) == (8 if where == "table" else 2)


@pytest.mark.spec("V-4")
def test_chain_of_exactly_n_descriptors_is_fine() -> None:
    """a chain of exactly N descriptors is accepted."""
    def build(mem: GuestMemory, r: RawRing) -> None:
        r.chain([(BUF + 0x10 * i, 16, 0) for i in range(8)])
        r.publish(0)

    (c,), _ = pop_both(build)
    assert c.error is None and len(c.out) == 8


@pytest.mark.spec("V-5")
@pytest.mark.parametrize("indirect", [False, True])
def test_readable_after_writable_is_chain_error(indirect: bool) -> None:
    """a readable descriptor after a writable one is a chain error."""
    def build(mem: GuestMemory, r: RawRing) -> None:
        if indirect:
            # Also across the boundary: a writable direct descriptor, then a readable one inside.
            n = write_table(mem, TBL, [(BUF + 16, 16, 0)])
            r.set_desc(0, BUF, 16, WRITE | NEXT, 1)
            r.set_desc(1, TBL, n, INDIRECT)
        else:
            r.set_desc(0, BUF, 16, WRITE | NEXT, 1)
            r.set_desc(1, BUF + 16, 16, 0)
        r.publish(0)

    (c,), q = pop_both(build)
    assert c.error.startswith("readable_after_writable")
    assert c.in_ == ((BUF, 16),) and c.out == ()


@pytest.mark.spec("V-6")
@pytest.mark.parametrize("case,counter", [
    ("len0", "indirect_bad_len"), ("len17", "indirect_bad_len"), ("nested", "indirect_nested"),
    ("with_next", "indirect_with_next"), ("not_negotiated", "indirect_not_negotiated"),
    ("huge", "indirect_too_long")])
def test_indirect_rules(case: str, counter: str) -> None:
    """indirect: len 0 / not a multiple of 16 / nested / with NEXT / not negotiated are errors."""
    def build(mem: GuestMemory, r: RawRing) -> None:
        length = write_table(mem, TBL, [(BUF, 16, 0)])
        flags = INDIRECT
        if case == "len0":
            length = 0
        elif case == "len17":
            length = 17
        elif case == "nested":
            write_table(mem, TBL, [(TBL, 16, INDIRECT)])
        elif case == "with_next":
            flags |= NEXT
        elif case == "huge":
            length = 16 * 32769
        r.set_desc(0, TBL, length, flags, 1)
        r.set_desc(1, BUF, 16, 0)
        r.publish(0)

    (c,), q = pop_both(build, indirect=case != "not_negotiated")
    assert c.error.startswith(counter) and q.counters[counter] == 1


@pytest.mark.spec("V-6")
def test_valid_indirect_chain_after_direct_descriptor() -> None:
    """direct descriptors followed by one indirect table form one valid chain."""
    def build(mem: GuestMemory, r: RawRing) -> None:
        n = write_table(mem, TBL, [(BUF + 0x100, 8, NEXT, 1), (BUF + 0x200, 64, WRITE)])
        r.set_desc(3, BUF, 4, NEXT, 5)
        r.set_desc(5, TBL, n, INDIRECT | WRITE)  # WRITE on the table pointer is ignored
        r.publish(3)

    (c,), _ = pop_both(build)
    assert c.error is None and c.head == 3
    assert c.out == ((BUF, 4), (BUF + 0x100, 8)) and c.in_ == ((BUF + 0x200, 64),)


@pytest.mark.spec("V-7")
@pytest.mark.parametrize("position", [0, 1])
def test_zero_length_buffer_rejected(position: int) -> None:
    """a zero-length buffer is a chain error (QEMU's rule)."""
    def build(mem: GuestMemory, r: RawRing) -> None:
        bufs = [(BUF, 16, 0), (BUF + 16, 16, WRITE)]
        bufs[position] = (bufs[position][0], 0, bufs[position][2])
        r.chain(bufs)
        r.publish(0)

    (c,), q = pop_both(build)
    assert c.error.startswith("zero_len_buffer") and q.counters["zero_len_buffer"] == 1


@pytest.mark.spec("V-8")
@pytest.mark.parametrize("addr,length", [(MEM - 8, 16), (MEM + 0x1000, 4), (2**64 - 8, 16),
                                         (2**64 - 1, 0xFFFFFFFF), (0xFFFF_FFFF_FFFF_0000, 0x10000)])
def test_buffer_outside_guest_memory(addr: int, length: int) -> None:
    """buffers and indirect tables outside guest memory or wrapping 2^64 are chain errors."""
    def build(mem: GuestMemory, r: RawRing) -> None:
        r.set_desc(0, addr, length, WRITE)          # plain (batched fast path)
        r.set_desc(1, BUF, 16, NEXT, 2)             # inside a chain
        r.set_desc(2, addr, length, 0)
        n = write_table(mem, TBL, [(addr, length, WRITE)])
        r.set_desc(3, TBL, n, INDIRECT)             # inside an indirect table
        r.set_desc(4, addr & ~15, 32, INDIRECT)     # the table itself outside
        r.publish(0, 1, 3, 4)

    chains, q = pop_both(build)
    assert all(c.error.startswith("buffer_outside_memory") for c in chains)
    assert q.counters["buffer_outside_memory"] == 4


@pytest.mark.spec("V-8")
@pytest.mark.parametrize("area", ["desc", "driver", "device"])
def test_ring_areas_outside_memory_break_ring(area: str) -> None:
    """a ring area outside guest memory breaks the ring."""
    mem = make_memory(0x4000)
    gpas = {"desc": 0x1000, "driver": 0x2000, "device": 0x3000}
    gpas[area] = 0x10000
    q = DeviceVirtqueue(mem, 8, gpas["desc"], gpas["driver"], gpas["device"], event_idx=True)
    if area != "driver":
        mem.write_u16(0x2002, 1)  # one entry available, head 0
    with pytest.raises(RingBroken):
        q.pop()
    assert q.counters["ring_outside_memory"] == 1


@pytest.mark.spec("V-9")
@pytest.mark.parametrize("event_idx", [False, True])
def test_device_writes_only_the_used_ring(event_idx: bool) -> None:
    """popping, reading and pushing change no byte outside the used ring."""
    mem, r, q = make(event_idx=event_idx)
    mem.write(BUF, b"\x11" * 0x400)
    n = write_table(mem, TBL, [(BUF + 0x100, 16, 0), (BUF + 0x200, 16, WRITE)])
    r.chain([(BUF, 16, 0), (BUF + 16, 48, WRITE)], start=0)
    r.set_desc(2, TBL, n, INDIRECT)
    r.set_desc(3, BUF, 0, WRITE)  # malformed (V-7): still used with len 0
    r.publish(0, 2, 3, 0)
    backing = np.frombuffer(mem.view(0, MEM), dtype=np.uint8)
    before = backing.copy()
    chains = [q.pop()] + q.pop_many()
    for c in chains:
        q.read_out(c, 64)
    q.push(chains[0].head, 48)
    q.push_many([(c.head, 0) for c in chains[1:]])
    q.should_notify()
    q.disable_notifications()
    q.enable_notifications()
    changed = np.flatnonzero(backing != before)
    lo, length = r.used_area
    assert changed.size and changed.min() >= lo and changed.max() < lo + length


@pytest.mark.spec("V-10")
def test_no_buffer_used_before_driver_ok() -> None:
    """no buffer is used and no interrupt sent before DRIVER_OK; used once after it."""
    h = Harness()
    assert h.init(driver_ok=False) == []
    assert not h.dev.status & DOK
    h.post_out(BalloonQueue.INFLATE, pfn_bytes(5, 6))
    effects = h.kick(BalloonQueue.INFLATE)
    # Nothing consumed, nothing used, no interrupt, no host action before DRIVER_OK.
    assert effects == []
    assert h.rings[BalloonQueue.INFLATE].used_idx() == 0
    assert h.used(BalloonQueue.INFLATE) == []
    effects = h.dev.write_status(ACK | DRV | FOK | DOK)
    effects += h.kick(BalloonQueue.INFLATE)
    # After DRIVER_OK the same buffer is used exactly once.
    assert h.used(BalloonQueue.INFLATE) == [(0, 0)]
    assert any(type(e).__name__ == "Inflated" for e in effects)


# -- packed rings (VIRTIO_F_RING_PACKED, protocol.md 1.8) ---------------------------------------
# The same rules on balloon_dev.packed_virtqueue.PackedDeviceVirtqueue, where they apply: V-1,
# V-2 and V-3 have no packed counterpart (no avail index, no head index, no next field: chains
# are consecutive slots).

def make_packed(size: int = 8, **kw) -> tuple[GuestMemory, RawPackedRing, PackedDeviceVirtqueue]:
    mem = make_memory(MEM)
    r = RawPackedRing.layout(mem, 0x1000, size)
    return mem, r, PackedDeviceVirtqueue(mem, size, r.desc, r.driver, r.device, **kw)


def pop_both_packed(build, **kw):
    """As pop_both, on a packed ring."""
    return pop_both(build, make_packed, **kw)


@pytest.mark.spec("V-4")
@pytest.mark.parametrize("batched", [False, True])
def test_packed_chain_without_end_breaks_ring(batched: bool) -> None:
    """packed: a chain whose NEXT flags run past all N slots breaks the ring, consuming nothing."""
    _, r, q = make_packed()
    r.add([(BUF + 0x10 * i, 16, 0) for i in range(8)], bid=1, next_on_last=True)
    with pytest.raises(RingBroken):
        q.pop_many() if batched else q.pop()
    assert q.counters["chain_unterminated"] == 1 and q.last_avail_idx == 0


@pytest.mark.spec("V-4")
def test_packed_chain_of_exactly_n_descriptors_is_fine() -> None:
    """packed: a chain of exactly N descriptors is accepted."""
    (c,), _ = pop_both_packed(
        lambda mem, r: r.add([(BUF + 0x10 * i, 16, 0) for i in range(8)], bid=3))
    assert c.error is None and len(c.out) == 8 and c.head == 3


@pytest.mark.spec("V-5")
@pytest.mark.parametrize("indirect", [False, True])
def test_packed_readable_after_writable_is_chain_error(indirect: bool) -> None:
    """packed: a readable descriptor after a writable one is a chain error."""
    def build(mem: GuestMemory, r: RawPackedRing) -> None:
        if indirect:
            mem.write(TBL, pack_pdesc(BUF, 16, 0, WRITE) + pack_pdesc(BUF + 16, 16, 0, 0))
            r.add([(TBL, 32, INDIRECT)], bid=1)
        else:
            r.add([(BUF, 16, WRITE), (BUF + 16, 16, 0)], bid=1)

    (c,), q = pop_both_packed(build)
    assert c.error.startswith("readable_after_writable")
    assert c.in_ == ((BUF, 16),) and c.out == ()


@pytest.mark.spec("V-6")
@pytest.mark.parametrize("case,counter", [
    ("len0", "indirect_bad_len"), ("len17", "indirect_bad_len"), ("nested", "indirect_nested"),
    ("with_next", "indirect_with_next"), ("not_negotiated", "indirect_not_negotiated"),
    ("huge", "indirect_too_long")])
def test_packed_indirect_rules(case: str, counter: str) -> None:
    """packed indirect: bad len / nested / in a NEXT chain / not negotiated are chain errors."""
    def build(mem: GuestMemory, r: RawPackedRing) -> None:
        mem.write(TBL, pack_pdesc(BUF, 16, 0, INDIRECT if case == "nested" else 0))
        length = {"len0": 0, "len17": 17, "huge": 16 * 32769}.get(case, 16)
        bufs = [(TBL, length, INDIRECT)]
        if case == "with_next":
            bufs.append((BUF, 16, 0))
        r.add(bufs, bid=2)

    (c,), q = pop_both_packed(build, indirect=case != "not_negotiated")
    assert c.error.startswith(counter) and q.counters[counter] == 1


@pytest.mark.spec("V-7")
@pytest.mark.parametrize("position", [0, 1])
def test_packed_zero_length_buffer_rejected(position: int) -> None:
    """packed: a zero-length buffer is a chain error."""
    def build(mem: GuestMemory, r: RawPackedRing) -> None:
        bufs = [(BUF, 16, 0), (BUF + 16, 16, WRITE)]
        bufs[position] = (bufs[position][0], 0, bufs[position][2])
        r.add(bufs, bid=1)

    (c,), q = pop_both_packed(build)
    assert c.error.startswith("zero_len_buffer") and q.counters["zero_len_buffer"] == 1


@pytest.mark.spec("V-8")
@pytest.mark.parametrize("addr,length", [(MEM - 8, 16), (MEM + 0x1000, 4), (2**64 - 8, 16),
                                         (0xFFFF_FFFF_FFFF_0000, 0x10000)])
def test_packed_buffer_outside_guest_memory(addr: int, length: int) -> None:
    """packed: buffers and indirect tables outside guest memory are chain errors."""
    def build(mem: GuestMemory, r: RawPackedRing) -> None:
        r.add([(addr, length, WRITE)], bid=0)              # plain (batched fast path)
        r.add([(BUF, 16, 0), (addr, length, 0)], bid=1)    # inside a chain
        mem.write(TBL, pack_pdesc(addr, length, 0, WRITE))
        r.add([(TBL, 16, INDIRECT)], bid=2)                # inside an indirect table
        r.add([(addr & ~15, 32, INDIRECT)], bid=3)         # the table itself outside

    chains, q = pop_both_packed(build)
    assert [c.head for c in chains] == [0, 1, 2, 3]
    assert all(c.error.startswith("buffer_outside_memory") for c in chains)
    assert q.counters["buffer_outside_memory"] == 4


@pytest.mark.spec("V-8")
@pytest.mark.parametrize("area", ["desc", "driver", "device"])
def test_packed_ring_areas_outside_memory_break_ring(area: str) -> None:
    """packed: a ring or event area outside guest memory breaks the ring."""
    mem = make_memory(0x4000)
    gpas = {"desc": 0x1000, "driver": 0x2000, "device": 0x3000}
    gpas[area] = 0x10000
    q = PackedDeviceVirtqueue(mem, 8, gpas["desc"], gpas["driver"], gpas["device"],
                              event_idx=True)
    if area != "desc":
        mem.write(0x1000, pack_pdesc(BUF & 0x3FF0, 16, 0, WRITE | AVAIL))
    with pytest.raises(RingBroken):
        if area == "driver":
            q.push(q.pop().head, 0)
            q.should_notify()
        else:
            q.pop()
    assert q.counters["ring_outside_memory"] == 1


@pytest.mark.spec("V-9")
@pytest.mark.parametrize("event_idx", [False, True])
def test_packed_device_writes_only_used_descriptors_and_its_event_area(event_idx: bool) -> None:
    """packed: the device writes only len/id/flags of used slots and its own event area."""
    mem, r, q = make_packed(event_idx=event_idx)
    mem.write(BUF, b"\x11" * 0x400)
    mem.write(TBL, pack_pdesc(BUF + 0x100, 16, 0, 0) + pack_pdesc(BUF + 0x200, 16, 0, WRITE))
    r.add([(BUF, 16, 0), (BUF + 16, 48, WRITE)], bid=4)   # slots 0-1
    r.add([(TBL, 32, INDIRECT)], bid=5)                   # slot 2
    r.add([(BUF, 0, WRITE)], bid=6)                       # slot 3, malformed (V-7)
    backing = np.frombuffer(mem.view(0, MEM), dtype=np.uint8)
    before = backing.copy()
    chains = [q.pop()] + q.pop_many()
    for c in chains:
        q.read_out(c, 64)
    q.push(chains[0].head, 48)
    q.push_many([(c.head, 0) for c in chains[1:]])
    q.should_notify()
    q.disable_notifications()
    q.enable_notifications()
    changed = np.flatnonzero(backing != before).tolist()
    used_slots = {0, 2, 3}  # used descriptors at the starts of the three chains
    assert changed
    for b in changed:
        if r.device <= b < r.device + 4:
            continue
        off = b - r.desc
        assert 0 <= off < 16 * 8 and off % 16 >= 8 and off // 16 in used_slots, hex(b)
