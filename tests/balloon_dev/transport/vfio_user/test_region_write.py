"""VFIO_USER_REGION_WRITE (protocol.md 7.4, 7.6): register writes reach the device core."""
from __future__ import annotations

import errno
import struct

import pytest

from balloon_dev.effects import HintRoundStopped, Inflated, PagesHinted
from protocol import vfio_user as vu
from protocol import virtio_pci as vp
from tests.balloon_dev.transport.vfio_user.client import BAR4, CFG, Client, perform, signalled
from tests.fdutil import eventfd_count
from vmsim.conformance.rings import WRITE, RawRing

C = vu.Command.REGION_WRITE
NOTIFY = vp.NOTIFY_CFG_OFFSET
PFNS = 0x900000  # a buffer area in the mapped RAM, past the rings


@pytest.fixture
def live(ram: Client) -> tuple[Client, list[int]]:
    fds = ram.driver_init(msix=True)
    return ram, fds


def ring(c: Client, q: int) -> RawRing:
    size, desc, avail, used = c.queue_rings(q)
    return RawRing(c.mem, size, desc, avail, used)


def test_inflate_through_a_notify_write(live: tuple[Client, list[int]]) -> None:
    c, fds = live
    r = ring(c, 0)
    c.mem.write(PFNS, struct.pack("<3I", 0x100, 0x101, 0x2000))
    r.publish(r.chain([(PFNS, 12, 0)]))
    acts = c.write(BAR4, NOTIFY + 0 * vp.NOTIFY_OFF_MULTIPLIER, b"\0\0")
    assert Inflated((0x100, 0x101, 0x2000)) in acts
    assert r.used_idx() == 1 and r.used_elem(0) == (0, 0)
    # The queue's MSI-X vector (1) fired, not the config vector (0).
    assert signalled(acts) == ["irq index 2 vector 1"]
    assert eventfd_count(fds[1]) == 1 and eventfd_count(fds[0]) == 0


def test_posted_write_gets_no_reply_but_acts(live: tuple[Client, list[int]]) -> None:
    c, _ = live
    r = ring(c, 0)
    c.mem.write(PFNS, struct.pack("<I", 0x300))
    r.publish(r.chain([(PFNS, 4, 0)]))
    acts = c.write(BAR4, NOTIFY, b"\0\0", posted=True)
    assert Inflated((0x300,)) in acts


@pytest.mark.spec("D-17")
def test_free_page_hint_round_end_to_end(live: tuple[Client, list[int]]) -> None:
    c, fds = live
    start = perform(c.session.host(lambda d: d.free_page_start()))
    assert signalled(start) == ["irq index 2 vector 0"]
    cmd_id = c.rd(BAR4, vp.DEVICE_CFG_OFFSET + 8, 4)
    assert cmd_id == 0x80000001
    r = ring(c, 3)
    c.mem.write(PFNS, struct.pack("<I", cmd_id))
    c.mem.write(PFNS + 4, struct.pack("<I", 0))
    heads = [r.chain([(PFNS, 4, 0)], start=0),
             r.chain([(0x400000, 0x400000, WRITE)], start=1),
             r.chain([(0x800000, 0x400000, WRITE)], start=2),
             r.chain([(PFNS + 4, 4, 0)], start=3)]
    r.publish(*heads)
    acts = c.write(BAR4, NOTIFY + 3 * vp.NOTIFY_OFF_MULTIPLIER, b"\3\0")
    hinted = [a for a in acts if isinstance(a, PagesHinted)]
    assert [rng for h in hinted for rng in h.ranges] == [(0x400000, 0x400000),
                                                          (0x800000, 0x400000)]
    assert HintRoundStopped(cmd_id) in acts
    assert r.used_idx() == 4
    # D-17: free_page_vq is transport queue 3 (compacted numbering); every element used, len 0.
    assert r.used_elems(0, 4) == [(0, 0), (1, 0), (2, 0), (3, 0)]


def test_buffers_published_after_the_pop_are_not_left_behind(
        live: tuple[Client, list[int]]) -> None:
    # A driver on another CPU publishes while the device is between its last pop and re-enabling
    # notifications; it will not kick for that buffer (its avail idx is past the avail_event the
    # device wrote). One notify write must still use it: the core re-checks the ring after
    # re-enabling (device.py _process), so the transport passes the kick on exactly once.
    c, _ = live
    r = ring(c, 0)
    c.mem.write(PFNS, struct.pack("<2I", 0x10, 0x11))
    vq = c.dev._slots[0].vq  # noqa: SLF001 - the race needs the hook (inflate is queue 0)
    assert vq is not None
    real_enable = vq.enable_notifications
    posted: list[int] = []

    def enable_with_concurrent_guest() -> None:
        if not posted:
            posted.append(r.chain([(PFNS + 4, 4, 0)], start=5))
            r.publish(posted[0])  # no kick follows
        real_enable()

    vq.enable_notifications = enable_with_concurrent_guest  # type: ignore[method-assign]
    real_notify = c.dev.notify
    calls: list[int] = []

    def counting_notify(q: int) -> list:
        calls.append(q)
        return real_notify(q)

    c.dev.notify = counting_notify  # type: ignore[method-assign]
    r.publish(r.chain([(PFNS, 4, 0)]))
    acts = c.write(BAR4, NOTIFY, b"\0\0")
    assert [a.pfns for a in acts if isinstance(a, Inflated)] == [(0x10,), (0x11,)]
    assert r.used_idx() == 2 and calls == [0]
    # With EVENT_IDX the device asks for a kick on the next buffer: a buffer published after the
    # notify returned is the driver's to kick for, not a transport re-check's.
    assert r.avail_event() == r.avail_idx == 2


def test_notify_for_a_missing_queue_is_counted(live: tuple[Client, list[int]]) -> None:
    c, _ = live
    assert c.write(BAR4, NOTIFY + 9 * vp.NOTIFY_OFF_MULTIPLIER, b"\x09\0") == []
    assert c.write(BAR4, NOTIFY + 2, b"\0\0") == []  # not on a queue's slot
    assert c.pci.counters["bad_notify"] == 2


def test_config_vector_out_of_range_reads_no_vector(client: Client) -> None:
    client.wr(BAR4, vp.COMMON_MSIX, 7, 2)
    assert client.rd(BAR4, vp.COMMON_MSIX, 2) == vp.VIRTIO_MSI_NO_VECTOR
    client.wr(BAR4, vp.COMMON_Q_MSIX, 2, 2)
    assert client.rd(BAR4, vp.COMMON_Q_MSIX, 2) == vp.VIRTIO_MSI_NO_VECTOR
    client.wr(BAR4, vp.COMMON_Q_MSIX, 1, 2)
    assert client.rd(BAR4, vp.COMMON_Q_MSIX, 2) == 1


def test_enabled_queue_setup_cannot_change(live: tuple[Client, list[int]]) -> None:
    c, _ = live
    c.wr(BAR4, vp.COMMON_Q_SELECT, 0, 2)
    desc = c.rd(BAR4, vp.COMMON_Q_DESCLO, 4)
    c.wr(BAR4, vp.COMMON_Q_DESCLO, 0x5000, 4)
    c.wr(BAR4, vp.COMMON_Q_SIZE, 8, 2)
    assert c.rd(BAR4, vp.COMMON_Q_DESCLO, 4) == desc
    assert c.rd(BAR4, vp.COMMON_Q_SIZE, 2) == 128
    c.wr(BAR4, vp.COMMON_Q_ENABLE, 0, 2)  # only RING_RESET may disable
    assert c.rd(BAR4, vp.COMMON_Q_ENABLE, 2) == 1


def test_bad_queue_size_leaves_the_queue_disabled(ram: Client) -> None:
    ram.wr(BAR4, vp.COMMON_STATUS, 1 | 2, 1)
    ram.wr(BAR4, vp.COMMON_GFSELECT, 1, 4)
    ram.wr(BAR4, vp.COMMON_GF, 1, 4)  # VERSION_1
    ram.wr(BAR4, vp.COMMON_STATUS, 1 | 2 | 8, 1)
    ram.wr(BAR4, vp.COMMON_Q_SELECT, 0, 2)
    ram.wr(BAR4, vp.COMMON_Q_SIZE, 100, 2)  # not a power of two
    ram.wr(BAR4, vp.COMMON_Q_DESCLO, 0x100000, 4)
    ram.wr(BAR4, vp.COMMON_Q_ENABLE, 1, 2)
    assert ram.rd(BAR4, vp.COMMON_Q_ENABLE, 2) == 0
    assert ram.dev.counters["queue_bad_size"] == 1


def test_status_zero_resets_transport_registers(live: tuple[Client, list[int]]) -> None:
    c, _ = live
    c.wr(BAR4, vp.COMMON_STATUS, 0, 1)
    assert c.rd(BAR4, vp.COMMON_STATUS, 1) == 0
    assert c.rd(BAR4, vp.COMMON_MSIX, 2) == vp.VIRTIO_MSI_NO_VECTOR
    c.wr(BAR4, vp.COMMON_Q_SELECT, 0, 2)
    assert c.rd(BAR4, vp.COMMON_Q_ENABLE, 2) == 0 and c.rd(BAR4, vp.COMMON_Q_DESCLO, 4) == 0


def test_isr_is_read_to_clear(live: tuple[Client, list[int]]) -> None:
    c, _ = live
    c.session.host(lambda d: d.set_target(5))
    assert c.rd(BAR4, vp.ISR_CFG_OFFSET, 1) == vp.VIRTIO_PCI_ISR_CONFIG
    assert c.rd(BAR4, vp.ISR_CFG_OFFSET, 1) == 0


def test_config_space_write_masks(client: Client) -> None:
    client.wr(CFG, vp.PCI_VENDOR_ID, 0xDEAD, 2)
    assert client.rd(CFG, vp.PCI_VENDOR_ID, 2) == 0x1AF4
    client.wr(CFG, vp.PCI_COMMAND, 0xFFFF, 2)
    assert client.rd(CFG, vp.PCI_COMMAND, 2) == 0x0407
    client.wr(CFG, vp.PCI_INTERRUPT_LINE, 11, 1)
    assert client.rd(CFG, vp.PCI_INTERRUPT_LINE, 1) == 11
    assert client.rd(CFG, vp.PCI_INTERRUPT_PIN, 1) == 1


def test_bar_sizing_probe(client: Client) -> None:
    for reg, size, typ in ((0x14, 0x1000, 0), (0x20, 0x4000, 0xC)):
        client.wr(CFG, reg, 0xFFFFFFFF, 4)
        assert client.rd(CFG, reg, 4) == (~(size - 1) & 0xFFFFFFFF) | typ
    client.wr(CFG, 0x20, 0xFEB00000, 4)
    client.wr(CFG, 0x24, 0x1, 4)
    assert client.rd(CFG, 0x20, 4) == 0xFEB0000C and client.rd(CFG, 0x24, 4) == 1
    client.wr(CFG, 0x10, 0xFFFFFFFF, 4)  # unused BAR0 stays 0
    assert client.rd(CFG, 0x10, 4) == 0


def test_pci_cfg_window_reaches_bar4(client: Client) -> None:
    cap = next(pos for pos in range(0x40, 0x100, 4)
               if client.rd(CFG, pos, 1) == vp.PCI_CAP_ID_VNDR
               and client.rd(CFG, pos + 3, 1) == vp.VIRTIO_PCI_CAP_PCI_CFG)
    client.wr(CFG, cap + 4, vp.MODERN_BAR, 1)
    client.wr(CFG, cap + 8, vp.COMMON_NUMQ, 4)
    client.wr(CFG, cap + 12, 2, 4)
    assert client.rd(CFG, cap + 16, 2) == 4
    client.wr(CFG, cap + 8, vp.COMMON_Q_SELECT, 4)
    client.wr(CFG, cap + 16, 3, 2)
    assert client.rd(BAR4, vp.COMMON_Q_SELECT, 2) == 3
    client.wr(CFG, cap + 12, 3, 4)  # an undefined length does nothing
    client.wr(CFG, cap + 16, 1, 2)
    assert client.rd(BAR4, vp.COMMON_Q_SELECT, 2) == 3
    assert client.pci.counters["bad_pci_cfg_access"] == 1


def test_malformed_writes_are_einval(client: Client) -> None:
    for payload in (
        vu.build_region_access(0, BAR4, 4, b"\0\0"),          # count disagrees with data
        vu.build_region_access(0x3FFE, BAR4, 4, b"\0" * 4),   # past the BAR
        vu.build_region_access(0, 2, 4, b"\0" * 4),           # BAR2 has no size
        vu.build_region_access(0, BAR4, 0),                   # empty
        b"\0" * 12,                                           # short
    ):
        assert client.error(C, payload) == errno.EINVAL, payload
    # A posted write that fails gets no reply either; it is still counted.
    h, _, _ = client.request(C, vu.build_region_access(0, 2, 1, b"\0"),
                             flags=vu.VFIO_USER_F_NO_REPLY)
    assert h is None
    assert client.session.counters["peer_errors"] == 6


def test_kick_before_driver_ok_reaches_the_core_once(ram: Client) -> None:
    # Linux kicks the stats queue before DRIVER_OK; the core defers it (D-16). The transport
    # passes the notify write on once and does not kick the core again for it.
    ram.wr(BAR4, vp.COMMON_STATUS, 1 | 2, 1)
    ram.wr(BAR4, vp.COMMON_GFSELECT, 1, 4)
    ram.wr(BAR4, vp.COMMON_GF, 1, 4)
    ram.wr(BAR4, vp.COMMON_GFSELECT, 0, 4)
    ram.wr(BAR4, vp.COMMON_GF, 1 << 1, 4)  # STATS_VQ
    ram.wr(BAR4, vp.COMMON_STATUS, 1 | 2 | 8, 1)
    ram.wr(BAR4, vp.COMMON_Q_SELECT, 2, 2)
    for off, val in ((vp.COMMON_Q_DESCLO, 0x100000), (vp.COMMON_Q_AVAILLO, 0x101000),
                     (vp.COMMON_Q_USEDLO, 0x102000)):
        ram.wr(BAR4, off, val, 4)
    ram.wr(BAR4, vp.COMMON_Q_ENABLE, 1, 2)
    r = ring(ram, 2)
    r.publish(r.chain([(PFNS, 10, 0)]))
    ram.write(BAR4, NOTIFY + 2 * vp.NOTIFY_OFF_MULTIPLIER, b"\2\0")
    assert ram.dev.counters["notify_before_driver_ok"] == 1


def test_kick_after_needs_reset_is_counted_once(live: tuple[Client, list[int]]) -> None:
    c, _ = live
    r = ring(c, 0)
    r.publish(r.chain([(PFNS, 4, 0)], start=0))
    r.set_avail_idx(r.avail_idx + 500)  # V-1: more pending than the queue holds -> broken
    r.avail_idx += 500
    c.write(BAR4, NOTIFY, b"\0\0")
    assert c.dev.status & 64  # DEVICE_NEEDS_RESET
    c.write(BAR4, NOTIFY, b"\0\0")
    assert c.dev.counters["notify_while_needs_reset"] == 1
