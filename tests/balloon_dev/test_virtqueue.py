"""Device-side split ring: normal operation, wrap, event idx, batching, bad input."""
from __future__ import annotations

import pytest

from balloon_dev.virtqueue import DeviceVirtqueue, RingBroken
from guestmem import GuestMemory
from protocol.virtqueue import VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY
from tests.ringbuilder import NEXT, WRITE, RawRing

BUF = 0x80000


def make(size=8, **kw):
    mem = GuestMemory()
    mem.add_region(0, bytearray(1 << 20))
    r = RawRing.layout(mem, 0x1000, size)
    return mem, r, DeviceVirtqueue(mem, size, r.desc, r.driver, r.device, **kw)


def test_pop_push_roundtrip_and_used_len():
    _, r, q = make()
    r.set_desc(2, BUF, 4, NEXT, 5)
    r.set_desc(5, BUF + 64, 100, WRITE)
    r.publish(2)
    c = q.pop()
    assert (c.head, c.out, c.in_, c.error) == (2, ((BUF, 4),), ((BUF + 64, 100),), None)
    assert q.pop() is None
    q.push(c.head, 7)
    assert r.used_idx() == 1 and r.used_elem(0) == (2, 7)


def test_indices_wrap_at_16_bits():
    _, r, q = make(size=4)
    r.set_desc(0, BUF, 8, WRITE)
    r.avail_idx = 0xFFFE
    r.set_avail_idx(0xFFFE)
    q.last_avail_idx = 0xFFFE
    q.used_idx = 0xFFFE
    r.publish(0, 0, 0)  # 0xFFFE, 0xFFFF, 0x0000
    chains = q.pop_many()
    assert len(chains) == 3 and q.last_avail_idx == 1
    q.push_many([(c.head, 0) for c in chains])
    assert r.used_idx() == 1


def test_pop_many_matches_pop():
    _, r, q = make(size=16)
    for i in range(16):
        r.set_desc(i, BUF + 0x100 * i, 0x100, WRITE if i % 2 else 0)
    r.publish(*range(16))
    many = q.pop_many()
    _, r2, q2 = make(size=16)
    for i in range(16):
        r2.set_desc(i, BUF + 0x100 * i, 0x100, WRITE if i % 2 else 0)
    r2.publish(*range(16))
    one = [q2.pop() for _ in range(16)]
    assert many == one


def test_pending_over_size_is_broken_even_in_batch():
    _, r, q = make()
    r.set_avail_idx(0x8000)
    with pytest.raises(RingBroken):
        q.pop_many()


def test_event_idx_notify_rule():
    _, r, q = make(event_idx=True)
    r.set_desc(0, BUF, 8, WRITE)
    for _ in range(3):
        r.publish(0)
    chains = q.pop_many()
    r.set_used_event(1)  # interrupt wanted when entry 1 is written
    q.push(chains[0].head, 0)
    assert not q.should_notify()  # used idx 0 -> 1: entry 0 written
    q.push_many([(c.head, 0) for c in chains[1:]])
    assert q.should_notify()  # 1 -> 3 passes entry 1
    assert not q.should_notify()  # nothing new


def test_no_interrupt_flag_without_event_idx():
    _, r, q = make()
    r.set_desc(0, BUF, 8, WRITE)
    r.publish(0)
    q.push(q.pop().head, 0)
    r.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    assert not q.should_notify()
    r.publish(0)
    q.push(q.pop().head, 0)
    r.set_avail_flags(0)
    assert q.should_notify()


def test_notification_suppression_words():
    _, r, q = make()
    q.disable_notifications()
    assert r.used_flags() == VIRTQ_USED_F_NO_NOTIFY
    q.enable_notifications()
    assert r.used_flags() == 0
    _, r, q = make(event_idx=True)
    r.set_desc(0, BUF, 8, WRITE)
    r.publish(0, 0)
    q.pop()
    q.enable_notifications()
    assert r.avail_event() == 2  # kick me when entry 2 (the next new one) is added


def test_chain_too_long_total_length():
    import mmap

    big = GuestMemory()
    # A sparse anonymous mapping backs two 2 GiB buffers whose sum reaches 2^32.
    m = mmap.mmap(-1, 3 << 31)
    big.add_region(0, m)
    r = RawRing.layout(big, 0x1000, 4)
    q = DeviceVirtqueue(big, 4, r.desc, r.driver, r.device)
    r.set_desc(0, 0x10000, 0x80000000, NEXT, 1)
    r.set_desc(1, 0x10000, 0x80000000, 0)
    r.publish(0)
    c = q.pop()
    assert c.error and "chain_too_long" in c.error


def test_read_out_survives_vanished_memory():
    mem, r, q = make()
    mem.add_region(1 << 30, bytearray(4096), "extra")
    mem.write(1 << 30, b"abcd")
    r.set_desc(0, 1 << 30, 4, 0)
    r.publish(0)
    c = q.pop()
    mem.remove_region(1 << 30)
    assert q.read_out(c, 4) == b""
    assert q.counters["buffer_vanished"] == 1


def test_bad_queue_size():
    mem = GuestMemory()
    with pytest.raises(RingBroken):
        DeviceVirtqueue(mem, 6, 0, 0, 0)
