"""Random ring contents: the device side raises nothing but RingBroken and writes only the used ring."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from balloon_dev.virtqueue import DeviceVirtqueue, RingBroken
from guestmem import GuestMemory

SIZE = 8
MEM = 0x10000
DESC, DRIVER, DEVICE = 0x1000, 0x2000, 0x3000

addr_st = st.one_of(st.integers(0, MEM + 0x100), st.integers(2**64 - 0x100, 2**64 - 1),
                    st.sampled_from([DESC, 0x4000, 0x8000]))
desc_st = st.tuples(addr_st, st.one_of(st.integers(0, 0x200), st.sampled_from([16, 32, 0xFFFFFFFF])),
                    st.integers(0, 7), st.integers(0, 12))


@settings(max_examples=300, deadline=None)
@given(descs=st.lists(desc_st, min_size=SIZE, max_size=SIZE),
       heads=st.lists(st.integers(0, 10), max_size=10),
       avail_idx=st.integers(0, 0xFFFF), start=st.integers(0, 0xFFFF),
       event_idx=st.booleans(), batch=st.booleans())
def test_random_rings_never_crash(descs, heads, avail_idx, start, event_idx, batch):
    mem = GuestMemory()
    backing = bytearray(MEM)
    mem.add_region(0, backing)
    table = np.frombuffer(backing, dtype=[("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"),
                                          ("next", "<u2")], count=SIZE, offset=DESC)
    for i, (a, ln, fl, nx) in enumerate(descs):
        table[i] = (a, ln, fl, nx)
    ring = np.frombuffer(backing, dtype="<u2", count=SIZE, offset=DRIVER + 4)
    for i, h in enumerate(heads[:SIZE]):
        ring[i] = h
    mem.write_u16(DRIVER + 2, avail_idx)
    q = DeviceVirtqueue(mem, SIZE, DESC, DRIVER, DEVICE, event_idx=event_idx)
    q.last_avail_idx = start
    q.used_idx = start
    before = bytes(backing)
    try:
        chains = q.pop_many() if batch else [c for c in iter(q.pop, None)]
        for c in chains:
            assert 0 <= c.head < SIZE
            for a, n in c.out + c.in_:
                if c.error is None:
                    assert mem.contains(a, n)
            q.read_out(c, 64)
        q.push_many([(c.head, 0) for c in chains])
        q.should_notify()
        q.enable_notifications()
    except RingBroken:
        pass
    after = bytes(backing)
    lo, hi = DEVICE, DEVICE + 6 + 8 * SIZE
    diff = [i for i in range(MEM) if before[i] != after[i]]
    assert all(lo <= i < hi for i in diff)
