"""Device-side ring rules V-1..V-9 (protocol.md 1.6), checked on balloon_dev.virtqueue.

V-10 (no buffer use before DRIVER_OK) is a device-level rule: tests/conformance/test_device_*.py."""
from __future__ import annotations

import pytest

from balloon_dev.virtqueue import DeviceVirtqueue, RingBroken
from guestmem import GuestMemory
from tests.ringbuilder import INDIRECT, NEXT, WRITE, RawRing

MEM = 1 << 20
BUF = 0x80000  # data buffers live here


def make(size: int = 8, **kw) -> tuple[GuestMemory, RawRing, DeviceVirtqueue]:
    mem = GuestMemory()
    mem.add_region(0, bytearray(MEM), "ram")
    r = RawRing.layout(mem, 0x1000, size)
    q = DeviceVirtqueue(mem, size, r.desc, r.driver, r.device, **kw)
    return mem, r, q


@pytest.mark.spec("V-1")
def test_avail_idx_moving_more_than_size_breaks_ring():
    _, r, q = make()
    r.set_avail_idx(9)
    with pytest.raises(RingBroken):
        q.pop()
    assert q.counters["avail_idx_jump"] == 1


@pytest.mark.spec("V-2")
def test_head_out_of_range_breaks_ring():
    _, r, q = make()
    r.publish(8)
    with pytest.raises(RingBroken):
        q.pop_many()
    assert q.counters["head_out_of_range"] == 1


@pytest.mark.spec("V-3")
@pytest.mark.parametrize("indirect", [False, True])
def test_next_out_of_range_is_chain_error(indirect):
    mem, r, q = make()
    if indirect:
        tbl = BUF + 0x1000
        mem.write(tbl, bytes(32))
        t = RawRing(mem, 2, tbl, 0, 0)
        t.set_desc(0, BUF, 16, NEXT, 2)  # table has 2 entries: next 2 is out of range
        r.set_desc(0, tbl, 32, INDIRECT)
    else:
        r.set_desc(0, BUF, 16, NEXT, 8)
    r.publish(0)
    c = q.pop()
    assert c.error and "next_out_of_range" in c.error


@pytest.mark.spec("V-4")
def test_descriptor_loop_is_bounded():
    _, r, q = make()
    r.set_desc(0, BUF, 16, NEXT, 1)
    r.set_desc(1, BUF, 16, NEXT, 0)
    r.publish(0)
    c = q.pop()
    assert c.error and "desc_loop" in c.error


@pytest.mark.spec("V-5")
def test_readable_after_writable_is_chain_error():
    _, r, q = make()
    r.set_desc(0, BUF, 16, WRITE | NEXT, 1)
    r.set_desc(1, BUF + 16, 16, 0)
    r.publish(0)
    c = q.pop()
    assert c.error and "readable_after_writable" in c.error


@pytest.mark.spec("V-6")
@pytest.mark.parametrize("case", ["len0", "len17", "nested", "with_next", "not_negotiated"])
def test_indirect_rules(case):
    mem, r, q = make(indirect=case != "not_negotiated")
    tbl = BUF + 0x1000
    t = RawRing(mem, 4, tbl, 0, 0)
    t.set_desc(0, BUF, 16, 0)
    length, flags = 16, INDIRECT
    if case == "len0":
        length = 0
    elif case == "len17":
        length = 17
    elif case == "nested":
        t.set_desc(0, tbl, 16, INDIRECT)
    elif case == "with_next":
        flags |= NEXT
    r.set_desc(0, tbl, length, flags, 1)
    r.set_desc(1, BUF, 16, 0)
    r.publish(0)
    c = q.pop()
    assert c.error is not None


def test_valid_indirect_chain_after_direct_descriptor():
    mem, r, q = make()
    tbl = BUF + 0x1000
    t = RawRing(mem, 2, tbl, 0, 0)
    t.set_desc(0, BUF + 0x100, 8, NEXT, 1)
    t.set_desc(1, BUF + 0x200, 64, WRITE)
    r.set_desc(3, BUF, 4, NEXT, 5)
    r.set_desc(5, tbl, 32, INDIRECT)
    r.publish(3)
    c = q.pop()
    assert c.error is None and c.head == 3
    assert c.out == ((BUF, 4), (BUF + 0x100, 8)) and c.in_ == ((BUF + 0x200, 64),)


@pytest.mark.spec("V-7")
def test_zero_length_buffer_rejected():
    _, r, q = make()
    r.set_desc(0, BUF, 0, WRITE)
    r.publish(0)
    c = q.pop()
    assert c.error and "zero_len" in c.error


@pytest.mark.spec("V-8")
@pytest.mark.parametrize("addr,length", [(MEM - 8, 16), (MEM + 0x1000, 4), (2**64 - 8, 16),
                                         (2**64 - 1, 0xFFFFFFFF)])
def test_buffer_outside_guest_memory(addr, length):
    _, r, q = make()
    r.set_desc(0, addr, length, WRITE)
    r.set_desc(1, BUF, 16, NEXT, 2)
    r.set_desc(2, addr, length, 0)
    r.publish(0, 1)
    c1, c2 = q.pop_many()
    assert c1.error and "outside" in c1.error
    assert c2.error and "outside" in c2.error


@pytest.mark.spec("V-8")
def test_ring_areas_outside_memory_break_ring():
    mem = GuestMemory()
    mem.add_region(0, bytearray(0x2000))
    q = DeviceVirtqueue(mem, 8, 0x1000, 0x5000, 0x6000)
    with pytest.raises(RingBroken):
        q.pop()


@pytest.mark.spec("V-9")
def test_device_writes_only_the_used_ring():
    mem, r, q = make()
    mem.write(BUF, b"\x11" * 64)
    r.set_desc(0, BUF, 16, NEXT, 1)
    r.set_desc(1, BUF + 16, 48, WRITE)
    r.publish(0)
    before = mem.read(0, MEM)
    c = q.pop()
    q.push(c.head, 0)
    after = mem.read(0, MEM)
    changed = [i for i in range(0, MEM, 4) if before[i:i + 4] != after[i:i + 4]]
    used_lo, used_hi = r.device, r.device + 6 + 8 * r.size
    assert changed and all(used_lo <= i < used_hi for i in changed)
