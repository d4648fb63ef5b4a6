"""A buffer published while the device drains a queue, before it re-enables notifications, gets
no kick of its own (its avail idx is already past the avail_event the device wrote). The device
must look at the ring once more after re-enabling, or a concurrent guest stalls (seen with a real
Linux guest over vfio-user: a hint round stuck with every block posted)."""
from __future__ import annotations

from balloon_dev.device import DeviceConfig
from protocol.balloon import BalloonQueue
from protocol.virtio import VIRTIO_F_RING_EVENT_IDX
from tests.balloon_dev.devharness import Harness, pfn_bytes


def test_buffer_published_before_reenable_is_used_in_the_same_kick():
    h = Harness(DeviceConfig())
    h.init()
    assert h.dev.driver_features >> VIRTIO_F_RING_EVENT_IDX & 1
    vq = h.dev._slots[h.tq(BalloonQueue.INFLATE)].vq  # noqa: SLF001 - the race needs the hook
    real_enable = vq.enable_notifications
    posted = []

    def enable_with_concurrent_guest() -> None:
        if not posted:  # the guest adds a buffer just before the device re-enables
            posted.append(h.post_out(BalloonQueue.INFLATE, pfn_bytes(0x300)))
        real_enable()

    vq.enable_notifications = enable_with_concurrent_guest
    h.post_out(BalloonQueue.INFLATE, pfn_bytes(0x200))
    h.kick(BalloonQueue.INFLATE)
    assert len(h.used(BalloonQueue.INFLATE)) == 2
