"""A buffer published while the device drains a queue, before it re-enables notifications, gets
no kick of its own (its avail idx is already past the avail_event the device wrote). The device
must look at the ring once more after re-enabling, or a concurrent guest stalls (seen with a real
Linux guest over vfio-user: a hint round stuck with every block posted)."""
from __future__ import annotations

import pytest

from balloon_dev.device import DeviceConfig
from balloon_dev.effects import Inflated, NeedsReset, NotifyQueue
from balloon_dev.status import NEEDS_RESET
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


def _guest_posts_during_reenable(h: Harness, lq: BalloonQueue, act) -> None:
    """Hook the queue so that ``act()`` runs (once) just before the device re-enables
    notifications: a concurrent guest's move between two drain passes."""
    vq = h.dev._slots[h.tq(lq)].vq  # noqa: SLF001 - the race needs the hook
    real_enable = vq.enable_notifications
    done = []

    def enable_with_concurrent_guest() -> None:
        if not done:
            done.append(act())
        real_enable()

    vq.enable_notifications = enable_with_concurrent_guest


@pytest.mark.spec("D-3")
def test_host_effects_of_every_pass_come_before_the_one_notification():
    h = Harness(DeviceConfig())
    h.init()
    _guest_posts_during_reenable(
        h, BalloonQueue.INFLATE, lambda: h.post_out(BalloonQueue.INFLATE, pfn_bytes(0x300)))
    h.post_out(BalloonQueue.INFLATE, pfn_bytes(0x200))
    effects = h.kick(BalloonQueue.INFLATE)
    # Both passes' pages reach the host before the guest hears of any used buffer.
    assert effects == [Inflated((0x200,)), Inflated((0x300,)),
                       NotifyQueue(h.tq(BalloonQueue.INFLATE))]


def test_ring_broken_in_a_later_pass_keeps_the_earlier_passes_effects():
    h = Harness(DeviceConfig())
    h.init()
    ring = h.rings[BalloonQueue.INFLATE]

    def bad_head() -> None:  # V-2: the next pass pops a head >= the queue size
        ring.publish(ring.size + 5)

    _guest_posts_during_reenable(h, BalloonQueue.INFLATE, bad_head)
    h.post_out(BalloonQueue.INFLATE, pfn_bytes(0x200))
    effects = h.kick(BalloonQueue.INFLATE)
    # The first pass's buffer was used and its pfn is in the balloon: the host must hear of it.
    assert effects[:2] == [Inflated((0x200,)), NotifyQueue(h.tq(BalloonQueue.INFLATE))]
    assert any(isinstance(e, NeedsReset) for e in effects[2:])
    assert h.dev.status & NEEDS_RESET
    assert len(h.used(BalloonQueue.INFLATE)) == 1
