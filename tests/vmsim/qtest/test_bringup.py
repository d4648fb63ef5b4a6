"""QEMU under qtest as a peer: start-up, PCI, shared RAM, and our driver probing and using
QEMU's own virtio-balloon (no guest boots). Skipped only when no QEMU can run qtest (the skip
reason names the missing piece)."""
from __future__ import annotations

import struct
import time

import numpy as np
import pytest

from guest_model.guest import GuestOptions, SimGuest
from guestmem import PageVersions
from guestmem.clock import Scheduler, SimClock
from protocol.balloon import CFG_ACTUAL, BalloonQueue
from protocol.virtio import DeviceStatus
from vmsim.qtest.balloon import BalloonDeviceOptions, QemuBalloon
from vmsim.qtest.machine import QtestMachine, WriteThrough, q35_ram_ranges
from vmsim.qtest.pci import enumerate_bus0

RAM = 64 << 20
AREA = (0x100000, 4 << 20)


def pump(peer: QemuBalloon, sched: Scheduler, until, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        peer.transport.poll_interrupts()
        sched.run_until(sched.now + 1e-3)
        if until():
            return True
        if not sched.peek_time():
            peer.transport.wait_interrupt(0.005)
    return False


@pytest.fixture
def peer(qtest_qemu):
    with QemuBalloon(qtest_qemu, ram_bytes=RAM) as p:
        yield p


@pytest.fixture
def guest(peer):
    sched = Scheduler(SimClock(0.0))
    g = SimGuest(peer.mem, PageVersions(RAM // 4096), sched, peer.transport,
                 GuestOptions(ram_bytes=RAM, driver_area=AREA, driver={}))
    return g, sched


def test_q35_ram_layout():
    assert q35_ram_ranges(64 << 20) == [(0, 0, 64 << 20)]
    assert q35_ram_ranges(0xB0000000) == [(0, 0, 0x80000000), (1 << 32, 0x80000000, 0x30000000)]
    assert q35_ram_ranges(4 << 30) == [(0, 0, 2 << 30), (1 << 32, 2 << 30, 2 << 30)]


def test_machine_starts_fast_and_shares_its_ram(qtest_qemu):
    t0 = time.monotonic()
    with QtestMachine(qtest_qemu, ram_bytes=RAM) as m:
        started = time.monotonic() - t0
        # Generous bound for a loaded CI machine; the note records the typical ~0.1 s.
        assert started < 5.0, f"QEMU took {started:.2f} s to start"
        assert m.alive()
        # A qtest store is in our mapping at once, and a store into the mapping is what
        # QEMU reads: one memory, two views.
        m.qt.writel(0x200000, 0x12345678)
        assert m.mem.read_u32(0x200000) == 0x12345678
        m.mem.write(0x300000, b"\xaa\xbb\xcc\xdd")
        assert m.qt.readl(0x300000) == 0xDDCCBBAA
        m.write(0x400000, bytes(range(200)))
        assert m.mem.read(0x400000, 200) == bytes(range(200))
        m.fill(0x500000, 8192, 0x5A)
        assert m.mem.read(0x500000 + 8191, 1) == b"\x5a"
        # The reserved top is RAM QEMU has but the guest model does not.
        assert not m.mem.contains(m.reserved_gpa, 1)
        m.qt.writel(m.reserved_gpa, 7)
        assert bytes(m.reserved_view()[:4]) == b"\x07\0\0\0"
        # WriteThrough rewrites what the guest marked dirty, through qtest.
        wt = WriteThrough(m)
        m.mem.dirty_log = wt  # type: ignore[assignment]
        m.mem.write(0x600000, b"x" * 5000)
        assert wt.pending() == 2
        ops = m.qt.ops
        assert wt.flush() == 2 and m.qt.ops == ops + 1  # one run of two pages, one command
        assert m.qt.readb(0x600000 + 4999) == ord("x")


def test_pci_enumeration_finds_the_modern_balloon(peer):
    fns = enumerate_bus0(peer.machine.qt)
    ids = {(f.vendor_id, f.device_id) for f in fns}
    assert (0x8086, 0x29C0) in ids  # q35's host bridge
    assert (0x1AF4, 0x1045) in ids  # virtio-balloon, modern only (disable-legacy=on)
    tr = peer.transport
    assert set(tr.caps) >= {1, 2, 3, 4}
    assert tr.msix_table_size == 2
    for addr, length, _ in tr.caps.values():
        assert 0xE0000000 <= addr and addr + length <= 0x100000000


def test_transport_is_the_drivers_virtio_transport(peer):
    """The same interface the in-process and vfio-user transports give our driver."""
    from guest_model.transport import VirtioTransport

    assert isinstance(peer.transport, VirtioTransport)


def test_queue_layout_is_qemus(peer):
    """QEMU: inflate, deflate, stats (always offered), free page (1024 entries)."""
    tr = peer.transport
    assert tr.num_queues() == 4
    assert [tr.queue_max_size(q) for q in range(5)] == [128, 128, 128, 1024, 0]


def test_driver_probes_inflates_and_answers_stats(peer, guest):
    g, sched = guest
    d = g.driver
    assert d.ready and d.failed is None
    assert d.qindex == {BalloonQueue.INFLATE: 0, BalloonQueue.DEFLATE: 1,
                        BalloonQueue.STATS: 2, BalloonQueue.FREE_PAGE: 3}
    peer.set_target(256)
    assert pump(peer, sched, lambda: d.s.num_pages == 256)
    assert pump(peer, sched, lambda: struct.unpack(
        "<I", peer.transport.read_config(CFG_ACTUAL, 4))[0] == 256)
    info = peer.machine.qmp("query-balloon")
    assert info["actual"] == peer.machine.total_bytes - 256 * 4096
    peer.request_stats()
    assert pump(peer, sched, lambda: d.counters["stats_buffers"] >= 1)
    stats = peer.host("stats")["guest_stats"]
    assert stats["MEMTOT"] == RAM
    assert not peer.transport.get_status() & DeviceStatus.DEVICE_NEEDS_RESET


def test_hint_round_through_qemus_migration(peer, guest):
    """A migration publishes a command id; our driver hints blocks under it, QEMU uses them
    all, and cancelling the migration publishes DONE, on which the driver frees the blocks."""
    g, sched = guest
    d = g.driver
    cid = peer.hint_start()
    assert cid == 0x80000001  # QEMU's first id
    assert peer.migration_status() == "active"
    assert pump(peer, sched, lambda: d.counters["stop_sent"] >= 1)
    assert d.counters["hints_sent"] > 0
    vq = d.vqs[BalloonQueue.FREE_PAGE]
    assert pump(peer, sched, lambda: vq.mem.read_u16(vq.used_gpa + 2) == vq.avail_idx)
    held = len(d.s.held_blocks)
    peer.hint_done()
    assert peer.read_cmd_id() == 1
    assert pump(peer, sched, lambda: not d.s.held_blocks)
    assert d.counters["hint_blocks_returned_done"] == held
    assert peer.hint_start() == 0x80000002


def test_msix_mailboxes_count_interrupts(peer, guest):
    g, sched = guest
    tr = peer.transport
    before = list(tr.irq_counts)
    peer.set_target(16)
    assert tr.wait_interrupt(2.0)
    tr.discard_interrupts()
    assert tr.irq_counts[tr.config_vector] == before[tr.config_vector] + 1
    mbox = np.frombuffer(peer.machine.reserved_view(), dtype="<u4", count=2)
    assert not mbox.any()  # consumed


def test_per_queue_vectors(qtest_qemu):
    with QemuBalloon(qtest_qemu, ram_bytes=RAM, device=BalloonDeviceOptions(vectors=5)) as p:
        sched = Scheduler(SimClock(0.0))
        g = SimGuest(p.mem, PageVersions(RAM // 4096), sched, p.transport,
                     GuestOptions(ram_bytes=RAM, driver_area=AREA, driver={}))
        assert g.driver.ready
        assert p.transport.queue_vectors == {0: 1, 1: 2, 2: 3, 3: 4}
