"""The device core with packed rings: RING_PACKED offered only when asked, queues packed exactly
when it is negotiated, packed queue sizes, a malformed packed chain used with len 0 and counted,
a broken packed ring setting DEVICE_NEEDS_RESET, nothing used before DRIVER_OK (V-10), and
``serve --features`` parsing."""
from __future__ import annotations

import argparse
import struct

import pytest

from balloon_dev.device import DEFAULT_OFFERED_FEATURES, BalloonDevice, DeviceConfig
from balloon_dev.effects import Inflated, NeedsReset, NotifyQueue
from balloon_dev.packed_virtqueue import PackedDeviceVirtqueue
from balloon_dev.virtqueue import DeviceVirtqueue
from guestmem import GuestMemory
from protocol.balloon import BalloonQueue
from protocol.errors import UsageError
from protocol.virtio import VIRTIO_F_RING_PACKED, feature_mask
from tests.balloon_dev.devharness import ACK, DOK, DRV, FOK, NEEDS_RESET
from tests.packedringbuilder import AVAIL, USED, RawPackedRing
from vmsim.cmd_serve import build_vhost_user, parse_features

PACKED = DEFAULT_OFFERED_FEATURES | feature_mask(VIRTIO_F_RING_PACKED)
BUF = 0x200000


class PackedHarness:
    """A device, 4 MiB of RAM and raw packed rings written by hand."""

    def __init__(self, offered: int = PACKED, accept: int | None = None,
                 sizes: dict[BalloonQueue, int] | None = None, driver_ok: bool = True) -> None:
        self.mem = GuestMemory()
        self.mem.add_region(0, bytearray(4 << 20), "ram")
        self.dev = BalloonDevice(self.mem, DeviceConfig(offered_features=offered))
        d = self.dev
        for st in (0, ACK, ACK | DRV):
            d.write_status(st)
        d.write_driver_features(d.device_features if accept is None else accept)
        d.write_status(ACK | DRV | FOK)
        assert d.status & FOK
        self.rings: dict[BalloonQueue, RawPackedRing] = {}
        self.layout = d.queue_layout()
        for lq, tq in self.layout.items():
            size = (sizes or {}).get(lq, d.queue_max_size(tq))
            r = RawPackedRing.layout(self.mem, 0x100000 + 0x10000 * int(lq), size)
            self.rings[lq] = r
            d.set_queue(tq, size, r.desc, r.driver, r.device)
            d.enable_queue(tq)
        if driver_ok:
            d.write_status(ACK | DRV | FOK | DOK)

    def vq(self, lq: BalloonQueue):
        return self.dev._slots[self.layout[lq]].vq

    def kick(self, lq: BalloonQueue):
        return self.dev.notify(self.layout[lq])


def test_ring_packed_is_not_offered_by_default() -> None:
    assert not DEFAULT_OFFERED_FEATURES >> VIRTIO_F_RING_PACKED & 1
    assert not parse_features(None) >> VIRTIO_F_RING_PACKED & 1
    assert not parse_features("STATS_VQ,FREE_PAGE_HINT") >> VIRTIO_F_RING_PACKED & 1
    assert parse_features("STATS_VQ,RING_PACKED") >> VIRTIO_F_RING_PACKED & 1
    assert parse_features("VIRTIO_F_RING_PACKED") >> VIRTIO_F_RING_PACKED & 1


def test_serve_refuses_ring_packed_over_vhost_user(tmp_path) -> None:
    args = argparse.Namespace(features="RING_PACKED", vhost_user=str(tmp_path / "s"),
                              control=None)
    with pytest.raises(UsageError, match="vfio-user only"):
        build_vhost_user(args)


def test_queues_are_packed_exactly_when_negotiated() -> None:
    h = PackedHarness()
    assert all(isinstance(h.vq(lq), PackedDeviceVirtqueue) for lq in h.layout)
    h2 = PackedHarness(accept=DEFAULT_OFFERED_FEATURES)  # offered, declined
    assert all(isinstance(h2.vq(lq), DeviceVirtqueue) for lq in h2.layout)


def test_packed_queue_size_need_not_be_a_power_of_two() -> None:
    h = PackedHarness(sizes={BalloonQueue.INFLATE: 100})
    assert h.vq(BalloonQueue.INFLATE).size == 100
    h2 = PackedHarness(accept=DEFAULT_OFFERED_FEATURES, sizes={BalloonQueue.INFLATE: 100})
    assert h2.vq(BalloonQueue.INFLATE) is None
    assert h2.dev.counters["queue_bad_size"] == 1


def test_inflate_over_a_packed_ring_and_malformed_chain() -> None:
    h = PackedHarness()
    r = h.rings[BalloonQueue.INFLATE]
    h.mem.write(BUF, struct.pack("<3I", 0x300, 0x301, 0x302))
    r.add([(BUF, 12, 0)], bid=9)
    r.add([(BUF, 0, 0)], bid=4)  # zero length (V-7): used with len 0, counted
    effects = h.kick(BalloonQueue.INFLATE)
    assert Inflated((0x300, 0x301, 0x302)) in effects
    assert NotifyQueue(h.layout[BalloonQueue.INFLATE]) in effects
    assert r.used(0) == (9, 0, AVAIL | USED) and r.used(1) == (4, 0, AVAIL | USED)
    assert h.dev.counters["inflate.zero_len_buffer"] == 1
    assert h.dev.counters["malformed_chain"] == 1


def test_broken_packed_ring_needs_reset() -> None:
    h = PackedHarness()
    r = h.rings[BalloonQueue.DEFLATE]
    r.add([(BUF, 4, 0)] * 2, bid=1, next_on_last=True)
    r.add([(BUF, 4, 0)] * (r.size - 2), bid=2, next_on_last=True)  # NEXT never ends
    effects = h.kick(BalloonQueue.DEFLATE)
    assert any(isinstance(e, NeedsReset) for e in effects)
    assert h.dev.status & NEEDS_RESET
    assert h.dev.counters["deflate.chain_unterminated"] == 1


@pytest.mark.spec("V-10")
def test_packed_no_buffer_used_before_driver_ok() -> None:
    h = PackedHarness(driver_ok=False)
    r = h.rings[BalloonQueue.INFLATE]
    h.mem.write(BUF, struct.pack("<I", 0x300))
    r.add([(BUF, 4, 0)], bid=3)
    assert h.kick(BalloonQueue.INFLATE) == []
    assert r.used(0)[2] == AVAIL  # still the driver's: not used
    effects = h.dev.write_status(ACK | DRV | FOK | DOK)
    assert Inflated((0x300,)) in effects
    assert r.used(0) == (3, 0, AVAIL | USED)
