"""External device, ring validation seen from the driver: V-1 .. V-9 (protocol.md 1.6).

Each check writes one malformed ring entry by hand and kicks. The device may answer the way
QEMU does (``virtio_error``: DEVICE_NEEDS_RESET, with a config interrupt since DRIVER_OK is set,
protocol.md 2.2) or, for a malformed chain (V-3 .. V-8), by using the chain with len 0 and
going on. What it must never do: use entries that do not exist (V-1, V-2), report a length, use
a wrong id, write guest memory the driver did not hand it as writable (V-9), stop answering, or
stop serving the queue without NEEDS_RESET."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from protocol.balloon import BalloonQueue
from protocol.virtio import VIRTIO_F_RING_INDIRECT_DESC
from protocol.virtqueue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from vmsim.conformance.harness import (
    DRIVER_AREA,
    NEEDS_RESET,
    QUIET,
    WAIT,
    Canary,
    RawGuest,
    pfn_bytes,
    qemu_behaviour,
    wait_for,
    wait_irq,
)
from vmsim.conformance.rings import write_table

Q = BalloonQueue
W, N, IND = VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT


def settle(raw: RawGuest, q: Q, timeout: float = WAIT) -> tuple[bool, list[tuple[int, int]]]:
    """Wait for the device's answer: (needs_reset, new used elements)."""
    r = raw.rings[q]
    first = raw.seen_used[q]
    wait_for(lambda: r.used_idx() != first or bool(raw.status() & NEEDS_RESET), timeout, raw.c)
    if not raw.status() & NEEDS_RESET:
        # A device answering by use may still be writing; give it a moment to finish.
        wait_for(lambda: False, 0.05)
    return bool(raw.status() & NEEDS_RESET), raw.wait_used(q, 0, 0)


def assert_reset_signalled(raw: RawGuest, irq_before: int) -> None:
    cv = raw.c.config_vector
    assert wait_irq(raw.c, cv, irq_before), \
        "DEVICE_NEEDS_RESET set after DRIVER_OK without a config interrupt (protocol.md 2.2)"


def assert_still_serves(raw: RawGuest, q: Q) -> None:
    """A well-formed buffer posted now is used with len 0."""
    a, n = raw.buf(pfn_bytes(0x3000))
    head = raw.rings[q].size - 1
    raw.post(q, [(a, n, 0)], head=head)
    used = raw.wait_used(q)
    assert used and used[-1] == (head, 0), f"queue stopped serving after the bad chain: {used}"


def check_chain_error(raw: RawGuest, q: Q, head: int, irq_before: int) -> None:
    """V-3 .. V-8: NEEDS_RESET (signalled), or the chain used with len 0 and the queue alive."""
    reset, used = settle(raw, q)
    if reset:
        assert_reset_signalled(raw, irq_before)
        return
    assert used, "the malformed chain was neither used nor answered with DEVICE_NEEDS_RESET"
    assert used == [(head, 0)], f"malformed chain answered with {used}, expected [({head}, 0)]"
    assert_still_serves(raw, q)


def live(raw: RawGuest, **kw) -> int:
    raw.start(**kw)
    raw.c.discard_interrupts()
    return raw.c.irq_counts[raw.c.config_vector]


@pytest.mark.spec("V-1")
def test_avail_index_jump_beyond_queue_size(raw: RawGuest, target):
    """avail.idx moved by more than N: nothing is used; NEEDS_RESET (signalled) or ignored"""
    irq = live(raw)
    r = raw.rings[Q.DEFLATE]
    a, n = raw.buf(pfn_bytes(0x3100))
    for i in range(r.size):
        r.set_desc(i, a, n)
        r.set_ring(i, i)
    r.set_avail_idx(r.size + 1)
    raw.kick(Q.DEFLATE)
    reset, used = settle(raw, Q.DEFLATE)
    if target.kind == "qemu" and not reset and len(used) == r.size + 1:
        # The spec puts the limit on the driver only; QEMU's pop path (virtqueue_split_pop)
        # checks in-flight elements, not the avail distance, and the balloon returns each
        # element at once, so it walks N + 1 entries, the last one re-reading slot 0.
        assert used == [(i % r.size, 0) for i in range(r.size + 1)], used
        qemu_behaviour(target, f"uses all {len(used)} entries of an avail.idx N + 1 ahead, "
                       "len 0, no NEEDS_RESET")
        return
    assert not used, f"the device used {len(used)} entries of an impossible avail index"
    if reset:
        assert_reset_signalled(raw, irq)


@pytest.mark.spec("V-2")
def test_head_index_out_of_range(raw: RawGuest):
    """a head >= N in the avail ring: never used as an id; NEEDS_RESET (signalled) or ignored"""
    irq = live(raw)
    r = raw.rings[Q.INFLATE]
    r.publish(r.size + 3)
    raw.kick(Q.INFLATE)
    reset, used = settle(raw, Q.INFLATE, WAIT)
    assert all(i < r.size for i, _ in used), f"used ids out of range: {used}"
    assert all(length == 0 for _, length in used)
    if reset:
        assert_reset_signalled(raw, irq)
    else:
        assert_still_serves(raw, Q.INFLATE)


@pytest.mark.spec("V-3")
def test_next_out_of_range(raw: RawGuest):
    """a descriptor's next >= N"""
    irq = live(raw)
    r = raw.rings[Q.INFLATE]
    a, n = raw.buf(pfn_bytes(0x3200))
    r.set_desc(0, a, n, N, r.size + 5)
    r.publish(0)
    raw.kick(Q.INFLATE)
    check_chain_error(raw, Q.INFLATE, 0, irq)


@pytest.mark.spec("V-4")
def test_looped_chain(raw: RawGuest):
    """a chain that loops (0 -> 1 -> 0)"""
    irq = live(raw)
    r = raw.rings[Q.DEFLATE]
    a, n = raw.buf(pfn_bytes(0x3300))
    r.set_desc(0, a, n, N, 1)
    r.set_desc(1, a, n, N, 0)
    r.publish(0)
    raw.kick(Q.DEFLATE)
    check_chain_error(raw, Q.DEFLATE, 0, irq)


@pytest.mark.spec("V-5")
def test_readable_after_writable(raw: RawGuest):
    """a readable descriptor after a writable one"""
    irq = live(raw)
    a, n = raw.buf(pfn_bytes(0x3400))
    b, m = raw.buf(64)
    head = raw.post(Q.INFLATE, [(b, m, W), (a, n, 0)])
    check_chain_error(raw, Q.INFLATE, head, irq)


@pytest.mark.spec("V-6")
@pytest.mark.parametrize("bad", ["len_not_multiple_of_16", "nested", "indirect_and_next"])
def test_bad_indirect_descriptor(raw: RawGuest, bad: str):
    """an indirect descriptor with a bad length, a nested table, or INDIRECT|NEXT"""
    raw.negotiate()
    if not raw.offered >> VIRTIO_F_RING_INDIRECT_DESC & 1:
        pytest.skip("the target does not offer RING_INDIRECT_DESC")
    irq = live(raw)
    a, n = raw.buf(pfn_bytes(0x3500))
    tbl, _ = raw.buf(64)
    r = raw.rings[Q.INFLATE]
    if bad == "len_not_multiple_of_16":
        length = write_table(raw.mem, tbl, [(a, n)])
        r.set_desc(0, tbl, length - 1, IND)
    elif bad == "nested":
        inner, _ = raw.buf(32)
        write_table(raw.mem, inner, [(a, n)])
        length = write_table(raw.mem, tbl, [(inner, 16, IND)])
        r.set_desc(0, tbl, length, IND)
    else:
        length = write_table(raw.mem, tbl, [(a, n)])
        r.set_desc(0, tbl, length, IND | N, 1)
        r.set_desc(1, a, n)
    r.publish(0)
    raw.kick(Q.INFLATE)
    check_chain_error(raw, Q.INFLATE, 0, irq)


@pytest.mark.spec("V-7")
def test_zero_length_buffer(raw: RawGuest):
    """a zero-length element: refused (QEMU) or harmless; never a non-zero used len"""
    irq = live(raw)
    a, _ = raw.buf(pfn_bytes(0x3600))
    head = raw.post(Q.DEFLATE, [(a, 0, 0)])
    check_chain_error(raw, Q.DEFLATE, head, irq)


@pytest.mark.spec("V-8")
def test_buffer_outside_guest_ram(raw: RawGuest):
    """a buffer beyond the DMA-mapped RAM: the device must not read it as data or die"""
    irq = live(raw)
    head = raw.post(Q.INFLATE, [(1 << 40, 8, 0)])
    check_chain_error(raw, Q.INFLATE, head, irq)


@pytest.mark.spec("V-9")
def test_device_writes_only_used_rings_and_writable_buffers(raw: RawGuest):
    """over inflate, deflate, stats, hints and reports, the device writes nothing but the used
    rings: not the descriptor tables, avail rings, readable buffers, nor guest RAM (hint and
    report buffers are writable, but a balloon device never writes them)"""
    raw.start()
    area_lo, area_n = DRIVER_AREA
    ram = Canary(raw.mem)
    a, n = raw.buf(pfn_bytes(0x3700, 0x3701, 0x3702, 0x3703))
    stats, sn = raw.buf(struct.pack("<HQ", 4, 1 << 30) * 3)
    posted = [(Q.INFLATE, [(a, n, 0)]), (Q.DEFLATE, [(a, n, 0)]), (Q.STATS, [(stats, sn, 0)]),
              (Q.FREE_PAGE, [(0x2000000, 0x400000, W)]), (Q.REPORTING, [(0x2800000, 0x200000, W)])]
    posted = [(q, b) for q, b in posted if q in raw.rings]
    for q, b in posted:
        raw.post(q, b, kick=False)
    # Snapshot after the driver's writes and before any kick, then let the device work.
    snap = raw.mem.read(area_lo, area_n)
    for q, _ in posted:
        raw.kick(q)
    for q in (Q.INFLATE, Q.DEFLATE, Q.FREE_PAGE, Q.REPORTING):
        if q in raw.rings:
            assert raw.wait_used(q), f"{q.name}: buffer never used"
    wait_for(lambda: False, QUIET)
    now = raw.mem.read(area_lo, area_n)
    diff = np.frombuffer(snap, np.uint8) != np.frombuffer(now, np.uint8)
    for g, n_ in raw.used_areas():
        diff[g - area_lo:g - area_lo + n_] = False  # the device's own area
    where = np.nonzero(diff)[0]
    assert not where.size, "device wrote driver-owned bytes at " + \
        ", ".join(f"{area_lo + int(i):#x}" for i in where[:8])
    # D-3: the device may change pages it saw on the inflate queue (QEMU discards them: they
    # read as zero afterwards); no other page may change.
    changed = ram.changed_pages(skip=[(p * 4096, 4096) for p in (0x3700, 0x3701, 0x3702, 0x3703)])
    assert not changed, f"device changed guest RAM pages {changed[:8]} it was never given " \
        "to write"
