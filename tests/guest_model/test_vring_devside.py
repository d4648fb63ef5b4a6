"""The driver ring (guest_model/vring.py) against the independently written device ring
(balloon_dev/virtqueue.py): they share nothing but guest memory and protocol/virtqueue.py.

Tests may import both sides; the packages themselves may not import each other.
"""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from balloon_dev.virtqueue import Chain, DeviceVirtqueue
from guest_model.vring import DriverArea, DriverVring, alloc_vring
from guestmem import GuestMemory

AREA = 0x100000
AREA_SIZE = 0x80000


def pair(size: int, *, event_idx: bool = False,
         indirect: bool = False) -> tuple[DriverVring, DeviceVirtqueue]:
    mem = GuestMemory()
    mem.add_region(AREA, bytearray(AREA_SIZE), "driver-area")
    area = DriverArea(mem, AREA, AREA_SIZE)
    vq = alloc_vring(mem, area, size, event_idx=event_idx, indirect=indirect, name="drv")
    dq = DeviceVirtqueue(mem, size, vq.desc_gpa, vq.avail_gpa, vq.used_gpa,
                         event_idx=event_idx, indirect=indirect, name="dev")
    return vq, dq


def popped(dq: DeviceVirtqueue) -> Chain:
    """The next chain, which the test knows is there."""
    c = dq.pop()
    assert c is not None
    return c


def test_hint_batch_reaches_device_intact() -> None:
    vq, dq = pair(1024)
    vq.add_buf(out=[(AREA, 4)], token="start")
    # The device checks every buffer lies in guest memory (V-8), so hint inside the region.
    addrs = np.arange(16, dtype=np.uint64) * 0x4000 + AREA + 0x40000
    vq.add_single_bufs(addrs, np.full(16, 0x4000), writable=True)
    chains = dq.pop_many()
    assert [c.error for c in chains] == [None] * 17
    assert chains[0].out == ((AREA, 4),) and chains[0].in_ == ()
    assert [c.in_ for c in chains[1:]] == [((int(a), 0x4000),) for a in addrs]
    dq.push_many([(c.head, 0) for c in chains])
    toks, lens = vq.get_bufs()
    assert toks == ["start", *[int(a) for a in addrs]] and lens == [0] * 17
    assert vq.num_free == 1024


def test_indirect_chain_reaches_device() -> None:
    vq, dq = pair(32, indirect=True)
    elems = [(AREA + 0x40000 + 0x1000 * i, 0x1000) for i in range(32)]
    vq.add_buf(in_=elems, token="report")
    assert vq.counters["added_indirect"] == 1
    (c,) = dq.pop_many()
    assert c.error is None and list(c.in_) == elems
    dq.push(c.head, 0)
    assert vq.get_buf() == ("report", 0)


def test_notification_decisions_agree_with_event_idx() -> None:
    vq, dq = pair(8, event_idx=True)
    dq.enable_notifications()  # device: kick me for the next entry
    vq.add_buf(in_=[(AREA + 0x40000, 8)])
    assert vq.kick_prepare() is True
    dq.disable_notifications()
    vq.add_buf(in_=[(AREA + 0x40000, 8)])
    # avail_event stayed at 0 -> the driver passed it already: no second kick.
    assert vq.kick_prepare() is False
    chains = dq.pop_many()
    dq.push(chains[0].head, 0)
    assert dq.should_notify() is True  # used_event 0 was armed at setup
    vq.get_bufs()  # re-arms used_event at last_used
    dq.push(chains[1].head, 0)
    assert dq.should_notify() is True
    vq.disable_cb()
    vq.add_buf(in_=[(AREA + 0x40000, 8)])
    dq.push(popped(dq).head, 0)
    assert dq.should_notify() is False


def test_notification_flags_agree_without_event_idx() -> None:
    vq, dq = pair(8)
    dq.disable_notifications()
    vq.add_buf(in_=[(AREA + 0x40000, 8)])
    assert vq.kick_prepare() is False
    dq.enable_notifications()
    vq.add_buf(in_=[(AREA + 0x40000, 8)])
    assert vq.kick_prepare() is True
    vq.disable_cb()
    dq.push(popped(dq).head, 0)
    assert dq.should_notify() is False
    assert vq.enable_cb() is False  # one arrived meanwhile
    dq.push(popped(dq).head, 0)
    assert dq.should_notify() is True


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 6)), max_size=80),
       st.booleans(), st.booleans())
def test_random_traffic_round_trips(ops: list[tuple[int, int]], event_idx: bool,
                                    indirect: bool) -> None:
    vq, dq = pair(8, event_idx=event_idx, indirect=indirect)
    sent: dict[int, tuple[tuple[int, int], ...]] = {}
    held = []
    tok = 0
    reaped = 0
    for op, n in ops:
        if op <= 1:
            elems = [(AREA + 0x40000 + 0x100 * (tok % 64) + 0x10 * j, 0x10) for j in range(n)]
            if (vq.num_free < n) and not (indirect and n >= 2 and vq.num_free >= 1):
                continue
            vq.add_buf(in_=elems, token=tok)
            sent[tok] = tuple(elems)
            tok += 1
        elif op == 2:
            for c in dq.pop_many(n):
                assert c.error is None
                held.append(c)
        else:
            k = min(n, len(held))
            dq.push_many([(c.head, c.in_len) for c in held[:k]])
            held = held[k:]
            toks, lens = vq.get_bufs()
            for t, ln in zip(toks, lens, strict=True):
                assert ln == sum(x for _, x in sent.pop(t))
                reaped += 1
    assert not vq.broken
    assert vq.in_flight == len(sent)
