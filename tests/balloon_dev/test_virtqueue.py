"""Device-side split ring (balloon_dev/virtqueue.py): normal operation, 16-bit wrap, batching,
notification suppression, push validation, RAM ranges, and the chain errors' counters and logs.
The V-n rules themselves are in tests/conformance/test_rings.py."""
from __future__ import annotations

import logging
import mmap

import numpy as np
import pytest

from balloon_dev.virtqueue import CHAIN_ERROR_COUNTERS, Chain, DeviceVirtqueue, RingBroken
from guestmem import DirtyLog, GuestMemory
from protocol.virtqueue import VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY
from vmsim.conformance.rings import INDIRECT, NEXT, WRITE, RawRing, make_memory, write_table

BUF = 0x80000


def make(size: int = 8, **kw) -> tuple[GuestMemory, RawRing, DeviceVirtqueue]:
    mem = make_memory()
    r = RawRing.layout(mem, 0x1000, size)
    return mem, r, DeviceVirtqueue(mem, size, r.desc, r.driver, r.device, **kw)


def test_pop_push_roundtrip_and_used_len() -> None:
    _, r, q = make()
    r.set_desc(2, BUF, 4, NEXT, 5)
    r.set_desc(5, BUF + 64, 100, WRITE)
    r.publish(2)
    c = q.pop()
    assert c == Chain(2, ((BUF, 4),), ((BUF + 64, 100),))
    assert (c.out_len, c.in_len) == (4, 100)
    assert q.pop() is None and q.pop_many() == []
    q.push(c.head, 7)
    assert r.used_idx() == 1 and r.used_elem(0) == (2, 7)
    assert q.in_flight == 0


@pytest.mark.parametrize("batched", [False, True])
def test_indices_wrap_at_16_bits(batched: bool) -> None:
    _, r, q = make(size=4)
    for i in range(4):
        r.set_desc(i, BUF + 0x10 * i, 8, WRITE)
    r.set_avail_idx(0xFFFE)
    q.last_avail_idx = 0xFFFE
    q.used_idx = 0xFFFE
    r.publish(0, 1, 2)  # avail indices 0xFFFE, 0xFFFF, 0x0000: slots 2, 3, 0
    chains = q.pop_many() if batched else [q.pop(), q.pop(), q.pop()]
    assert [c.head for c in chains] == [0, 1, 2] and q.last_avail_idx == 1
    if batched:
        q.push_many([(c.head, 8) for c in chains])
    else:
        for c in chains:
            q.push(c.head, 8)
    assert r.used_idx() == 1 and q.used_idx == 1
    # Used slots 2, 3 then 0: the batched write is split at the end of the ring.
    assert r.used_elems(0xFFFE, 3) == [(0, 8), (1, 8), (2, 8)]


def test_pop_many_respects_max_n_and_order() -> None:
    _, r, q = make(size=16)
    for i in range(16):
        r.set_desc(i, BUF + 0x100 * i, 0x100, WRITE if i % 2 else 0)
    r.publish(*reversed(range(16)))
    first = q.pop_many(5)
    assert [c.head for c in first] == [15, 14, 13, 12, 11]
    assert q.pending() == 11 and q.last_avail_idx == 5
    rest = q.pop_many()
    assert [c.head for c in rest] == list(reversed(range(11)))
    assert all(c.in_ == ((BUF + 0x100 * c.head, 0x100),) for c in first + rest if c.head % 2)
    assert all(c.out == ((BUF + 0x100 * c.head, 0x100),) for c in first + rest if not c.head % 2)


def _mixed_ring(r: RawRing, mem: GuestMemory) -> list[int]:
    """Heads of valid and malformed chains of every kind, for comparing pop with pop_many."""
    tbl = BUF + 0x8000
    length = write_table(mem, tbl, [(BUF, 8, NEXT, 1), (BUF + 8, 8, WRITE)])
    r.set_desc(0, BUF, 8, WRITE)                        # plain
    r.set_desc(1, BUF, 0, WRITE)                        # zero length
    r.set_desc(2, BUF, 8, NEXT, 3)                      # out then in
    r.set_desc(3, BUF + 8, 8, WRITE)
    r.set_desc(4, tbl, length, INDIRECT)                # indirect
    r.set_desc(5, 1 << 40, 8, WRITE)                    # outside memory
    r.set_desc(6, BUF, 8, NEXT, 6)                      # self loop
    r.set_desc(7, BUF, 8, WRITE | NEXT, 15)             # next out of range
    heads = [0, 1, 2, 4, 5, 6, 7, 0]
    r.publish(*heads)
    return heads


def test_pop_many_gives_what_pop_gives() -> None:
    mem1, r1, q1 = make()
    mem2, r2, q2 = make()
    heads = _mixed_ring(r1, mem1)
    _mixed_ring(r2, mem2)
    many = q1.pop_many()
    one = [q2.pop() for _ in heads]
    assert many == one and q2.pop() is None
    assert [c.error is None for c in many] == [True, False, True, True, False, False, False, True]
    assert q1.counters == q2.counters


def test_bad_head_in_batch_consumes_nothing() -> None:
    _, r, q = make()
    r.set_desc(0, BUF, 8, WRITE)
    r.publish(0, 0, 9, 0)
    with pytest.raises(RingBroken, match="head_out_of_range"):
        q.pop_many()
    assert q.last_avail_idx == 0 and q.counters["head_out_of_range"] == 1
    # One at a time, the two good chains come out before the ring is found broken.
    assert q.pop().head == 0 and q.pop().head == 0
    with pytest.raises(RingBroken):
        q.pop()


def test_pending_over_size_is_broken_even_in_batch() -> None:
    _, r, q = make()
    r.set_avail_idx(0x8000)
    with pytest.raises(RingBroken, match="avail_idx_jump"):
        q.pop_many()
    with pytest.raises(RingBroken):
        q.pending()
    assert q.counters["avail_idx_jump"] == 2


def test_event_idx_notify_rule() -> None:
    _, r, q = make(event_idx=True)
    r.set_desc(0, BUF, 8, WRITE)
    for _ in range(3):
        r.publish(0)
    chains = q.pop_many()
    r.set_used_event(1)  # interrupt wanted when entry 1 is written
    q.push(chains[0].head, 0)
    assert not q.should_notify()  # used idx 0 -> 1: only entry 0 written
    q.push_many([(c.head, 0) for c in chains[1:]])
    assert q.should_notify()  # 1 -> 3 passes entry 1
    assert not q.should_notify()  # nothing new


def test_event_idx_decision_after_external_used_idx_change_notifies() -> None:
    _, r, q = make(event_idx=True)
    r.set_desc(0, BUF, 8, WRITE)
    r.set_avail_idx(0x100)
    q.last_avail_idx = 0x100
    q.used_idx = 0x100  # e.g. restored state: the old decision point means nothing now
    r.set_used_event(0x50)  # would say "no" if old were taken as 0x100
    r.publish(0)
    q.push(q.pop().head, 0)
    assert q.should_notify()


def test_no_interrupt_flag_without_event_idx() -> None:
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
    assert not q.should_notify()  # no new used entry since


def test_notification_suppression_words_without_event_idx() -> None:
    _, r, q = make()
    q.disable_notifications()
    assert r.used_flags() == VIRTQ_USED_F_NO_NOTIFY
    q.enable_notifications()
    assert r.used_flags() == 0
    assert r.avail_event() == 0  # the event word is not ours to use without EVENT_IDX


def test_avail_event_follows_pops_while_enabled() -> None:
    _, r, q = make(event_idx=True)
    r.set_desc(0, BUF, 8, WRITE)
    r.publish(0, 0, 0)
    q.pop()
    assert r.avail_event() == 1  # kick me for the first entry I have not consumed
    q.disable_notifications()
    q.pop_many()
    assert r.avail_event() == 1 and r.used_flags() == 0  # disabled: left behind, flags stay 0
    q.enable_notifications()
    assert r.avail_event() == 3 == q.last_avail_idx


def test_push_validation_is_a_usage_error() -> None:
    _, r, q = make()
    r.set_desc(0, BUF, 8, WRITE)
    r.publish(0)
    with pytest.raises(ValueError):
        q.push(0, 0)  # nothing popped yet
    c = q.pop()
    for head, written in ((8, 0), (-1, 0), (0, 1 << 32), (0, -1)):
        with pytest.raises(ValueError):
            q.push(head, written)
        with pytest.raises(ValueError):
            q.push_many([(head, written)])
    with pytest.raises(ValueError):
        q.push_many([(c.head, 0), (c.head, 0)])
    assert r.used_idx() == 0
    q.push_many([(c.head, 0xFFFFFFFF)])
    assert r.used_elem(0) == (0, 0xFFFFFFFF)


def test_used_ring_writes_reach_the_dirty_log() -> None:
    mem, r, q = make()
    mem.dirty_log = DirtyLog(256)
    mem.dirty_log.start()
    r.set_desc(0, BUF, 8, WRITE)
    r.publish(0, 0)
    mem.dirty_log.sync()
    chains = q.pop_many()
    assert not mem.dirty_log.sync().any()  # popping writes nothing (no EVENT_IDX)
    q.push_many([(c.head, 0) for c in chains])
    assert np.flatnonzero(mem.dirty_log.sync()).tolist() == [r.device >> 12]


def test_ram_ranges_accept_buffers_beyond_byte_backed_memory() -> None:
    mem = make_memory()
    r = RawRing.layout(mem, 0x1000, 8)
    ram = [(0, 1 << 32)]  # 4 GiB of RAM, only the first MiB byte-backed
    q = DeviceVirtqueue(mem, 8, r.desc, r.driver, r.device, ram=ram)
    r.set_desc(0, 0x4000_0000, 0x40_0000, WRITE)       # a 4 MiB hint in RAM
    r.set_desc(1, (1 << 32) - 0x1000, 0x2000, WRITE)   # straddles the end of RAM
    r.set_desc(2, 0x4000_0000, 0x100, INDIRECT)        # a table must be readable bytes
    r.publish(0, 1, 2, 0)
    a, b, c, d = q.pop_many()
    assert a.error is None and a.in_ == ((0x4000_0000, 0x40_0000),)
    assert b.error.startswith("buffer_outside_memory")
    assert c.error.startswith("buffer_outside_memory")
    assert d == a
    r.publish(0)
    assert q.pop() == a


def test_read_out_gathers_in_order_up_to_max_len() -> None:
    mem, r, q = make()
    mem.write(BUF, b"abcd")
    mem.write(BUF + 0x100, b"efgh")
    r.chain([(BUF, 4, 0), (BUF + 0x100, 4, 0), (BUF + 0x200, 16, WRITE)])
    r.publish(0)
    c = q.pop()
    assert q.read_out(c, 100) == b"abcdefgh"
    assert q.read_out(c, 6) == b"abcdef"
    assert q.read_out(c, 0) == b""


def test_read_out_survives_vanished_memory() -> None:
    mem, r, q = make()
    mem.add_region(1 << 30, bytearray(4096), "extra")
    mem.write(1 << 30, b"abcd")
    r.set_desc(0, 1 << 30, 4, 0)
    r.publish(0)
    c = q.pop()
    assert c.error is None
    mem.remove_region(1 << 30)
    assert q.read_out(c, 4) == b""
    assert q.counters["buffer_vanished"] == 1


def test_zero_length_allowed_when_not_rejected() -> None:
    _, r, q = make(reject_zero_len=False)
    r.chain([(BUF, 0, 0), (BUF + 8, 0, WRITE)])
    r.publish(0)
    assert q.pop() == Chain(0, ((BUF, 0),), ((BUF + 8, 0),))


def test_chain_too_long_total_length() -> None:
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
    assert c.error and c.error.startswith("chain_too_long")
    assert c.out == ((0x10000, 0x80000000),)  # what was valid before the fault
    assert q.counters["chain_too_long"] == 1


def test_chain_error_is_counted_and_logged_in_hex(caplog: pytest.LogCaptureFixture) -> None:
    _, r, q = make()
    r.set_desc(3, BUF, 8, NEXT, 0x1234)
    r.publish(3)
    with caplog.at_level(logging.WARNING, logger="balloon_dev.virtqueue"):
        c = q.pop()
    assert c.error == "next_out_of_range: desc 0x3: next 0x1234 >= 0x8 (V-3)"
    assert q.counters["next_out_of_range"] == 1
    assert sum(q.counters[k] for k in CHAIN_ERROR_COUNTERS) == 1
    assert "0x1234" in caplog.text and "head 0x3" in caplog.text


def test_indirect_table_is_copied_once() -> None:
    """The guest rewriting its indirect table after the device read it changes nothing."""

    class Racing(GuestMemory):
        table_reads = 0

        def read(self, gpa: int, length: int) -> bytes:
            data = super().read(gpa, length)
            if gpa == TBL:
                Racing.table_reads += 1
                # The guest now points entry 1 outside memory and makes entry 0 loop.
                write_table(self, TBL, [(BUF, 8, NEXT, 0), (1 << 50, 8, WRITE)])
            return data

    TBL = BUF + 0x4000
    mem = Racing()
    mem.add_region(0, bytearray(1 << 20))
    r = RawRing.layout(mem, 0x1000, 8)
    q = DeviceVirtqueue(mem, 8, r.desc, r.driver, r.device)
    n = write_table(mem, TBL, [(BUF, 8, NEXT, 1), (BUF + 8, 8, WRITE)])
    r.set_desc(0, TBL, n, INDIRECT)
    r.publish(0)
    assert q.pop() == Chain(0, ((BUF, 8),), ((BUF + 8, 8),))
    assert Racing.table_reads == 1


def test_reset_forgets_indices_keeps_counters() -> None:
    _, r, q = make(event_idx=True)
    r.set_desc(0, BUF, 0, WRITE)
    r.publish(0)
    q.pop()
    q.disable_notifications()
    q.reset()
    assert (q.last_avail_idx, q.used_idx, q.in_flight) == (0, 0, 0)
    assert q.counters["zero_len_buffer"] == 1


def test_bad_queue_size() -> None:
    mem = GuestMemory()
    for size in (0, 6, 65536):
        with pytest.raises(RingBroken):
            DeviceVirtqueue(mem, size, 0, 0, 0)


def test_state_restore_resumes_where_saved() -> None:
    mem, r, q = make(event_idx=True)
    r.set_desc(0, BUF, 8, WRITE)
    r.publish(0, 0, 0)
    q.push(q.pop().head, 0)
    q.should_notify()
    q.disable_notifications()
    saved = q.state()
    # A second queue object on the same memory (a restarted device) picks up from there.
    q2 = DeviceVirtqueue(mem, 8, r.desc, r.driver, r.device, event_idx=True)
    q2.restore(saved)
    assert q2.state() == saved and q2.in_flight == 0 and q2.pending() == 2
    r.set_used_event(1)
    q2.push_many([(c.head, 0) for c in q2.pop_many()])
    assert r.avail_event() == 1  # notifications stayed disabled: avail_event did not move
    assert q2.should_notify()  # 1 -> 3 passes used_event 1, same as q would decide
    assert r.used_idx() == 3


def _table_chain(mem: GuestMemory, r: RawRing, entries: list[tuple[int, int, int]],
                 direct: list[tuple[int, int, int]] = ()) -> None:
    """Direct descriptors (if any) then an INDIRECT one to a linear table of ``entries``."""
    tbl = BUF + 0x10000
    n = write_table(mem, tbl, [(a, ln, f | (NEXT if k < len(entries) - 1 else 0), k + 1)
                               for k, (a, ln, f) in enumerate(entries)])
    r.chain(list(direct) + [(tbl, n, INDIRECT)])
    r.publish(0)


TABLE_CASES = {
    "valid": ([(BUF + 0x100 * k, 0x100, WRITE if k >= 3 else 0) for k in range(32)], []),
    "direct_prefix": ([(BUF + 0x100 * k, 0x100, WRITE) for k in range(16)], [(BUF, 4, 0)]),
    "readable_after_writable": ([(BUF + 0x100 * k, 0x100, WRITE if k != 20 else 0)
                                 for k in range(32)], []),
    "after_direct_writable": ([(BUF + 0x100 * k, 0x100, 0) for k in range(16)],
                              [(BUF, 4, WRITE)]),
    "zero_len": ([(BUF + 0x100 * k, 0x100 if k != 9 else 0, WRITE) for k in range(16)], []),
    "outside": ([(BUF + 0x100 * k if k != 30 else 1 << 40, 0x100, WRITE) for k in range(32)], []),
    "too_long": ([(0, 0x8000_0000, 0)] * 2 + [(0, 0x100, 0)] * 14, []),
}


@pytest.mark.parametrize("case", sorted(TABLE_CASES))
def test_indirect_table_batch_check_agrees_with_the_walk(case: str) -> None:
    entries, direct = TABLE_CASES[case]
    results = []
    for batch_min in (1, 1 << 20):  # batched table check, then the entry-by-entry walk only
        mem = make_memory(16 << 20) if case != "too_long" else None
        if mem is None:
            mem = GuestMemory()
            mem.add_region(0, mmap.mmap(-1, 3 << 31))
        r = RawRing.layout(mem, 0x1000, 8)
        q = DeviceVirtqueue(mem, 8, r.desc, r.driver, r.device)
        q.indirect_batch_min = batch_min
        _table_chain(mem, r, entries, direct)
        results.append((q.pop(), dict(q.counters)))
    (batched, c1), (walked, c2) = results
    assert batched == walked and c1 == c2
    assert (batched.error is None) == (case in ("valid", "direct_prefix"))
    if case == "valid":
        assert len(batched.out) == 3 and len(batched.in_) == 29


def test_used_ring_outside_memory_breaks_ring_without_consuming() -> None:
    mem = make_memory(0x3000)
    r = RawRing(mem, 8, 0x1000, 0x2000, 0x10000)  # the used ring lies outside memory
    q = DeviceVirtqueue(mem, 8, r.desc, r.driver, r.device, event_idx=True)
    r.set_desc(0, 0x1800, 8, WRITE)
    r.publish(0)
    for pop in (q.pop, q.pop_many):
        with pytest.raises(RingBroken, match="ring_outside_memory"):
            pop()
        assert q.last_avail_idx == 0
    assert q.counters["ring_outside_memory"] == 2
