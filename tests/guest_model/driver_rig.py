"""The rig for driver tests: the guest balloon driver against the real device core, through the
in-process transport, over a real buddy allocator. Edge cases the device never produces on its
own (a stalled queue) are made by wrapping the transport.
"""
from __future__ import annotations

import mmap
from typing import Any

from balloon_dev.device import DEFAULT_OFFERED_FEATURES, BalloonDevice, DeviceConfig
from balloon_dev.effects import PagesHinted
from balloon_dev.transport.inprocess import InProcessTransport
from guest_model.buddy import BuddyAllocator
from guest_model.driver import BalloonDriver, DriverOptions
from guest_model.vring import DriverArea
from guestmem import GuestMemory, PageVersions
from guestmem.clock import Scheduler
from protocol.balloon import (
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_REPORTING,
    BalloonQueue,
)
from protocol.virtio import feature_mask

RAM = 64 << 20


AREA_GPA = 0x100000


AREA_SIZE = 4 << 20


class StallableTransport(InProcessTransport):
    """The in-process transport, with kicks of chosen queues held back (a device that is slow
    to look at a queue) until ``release(q)``."""

    def __init__(self, dev: BalloonDevice) -> None:
        super().__init__(dev)
        self.stalled: set[int] = set()
        self.held_kicks: list[int] = []
        self.gen_bump = False

    def notify(self, q: int) -> None:
        if q in self.stalled:
            self.held_kicks.append(q)
            return
        super().notify(q)

    def release(self, q: int) -> None:
        self.stalled.discard(q)
        super().notify(q)

    def config_generation(self) -> int:
        g = super().config_generation()
        if self.gen_bump:
            self._bump = getattr(self, "_bump", 0) + 1
            return g + self._bump
        return g


class Rig:
    def __init__(self, *, offered: int = DEFAULT_OFFERED_FEATURES, strategy: str = "capture",
                 ram: int = RAM, queue_sizes: tuple[int, ...] | None = None,
                 qemu_cmd_id_read: bool = False, **opts: Any) -> None:
        self.mem = GuestMemory()
        # Big guests: a sparse mapping (only the driver area is ever touched).
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        self.mem.add_region(0, bytearray(ram) if ram <= RAM else mmap.mmap(-1, ram, flags=flags),
                            "ram")
        self.pages = PageVersions(ram >> 12)
        poisoning = opts.get("page_poisoning", False)
        self.alloc = BuddyAllocator(ram, pages=self.pages, reserved=[(AREA_GPA, AREA_SIZE)],
                                    page_poisoning=poisoning,
                                    init_on_free=opts.get("init_on_free", False))
        kw: dict[str, Any] = {"offered_features": offered, "ram_pages": ram >> 12,
                              "qemu_cmd_id_read": qemu_cmd_id_read}
        if queue_sizes is not None:
            kw["queue_sizes"] = queue_sizes
        self.dev = BalloonDevice(self.mem, DeviceConfig(**kw))
        self.t = StallableTransport(self.dev)
        self.effects: list[Any] = []
        self.t.add_host_listener(self.effects.append)
        self.sched = Scheduler()
        self.area = DriverArea(self.mem, AREA_GPA, AREA_SIZE)
        # These tests time rounds against one flat 5 us per block (the model before the guest's
        # costs were split up); tests/guest_model/test_hinting_costs.py checks the split costs.
        opts.setdefault("hint_cost_per_block", 5e-6)
        self.drv = BalloonDriver(self.t, self.mem, self.alloc, self.sched, self.area,
                                 DriverOptions(hint_strategy=strategy, **opts))

    def probe(self) -> Rig:
        self.drv.probe()
        self.run(0.001)
        return self

    def host(self, fn: Any, *args: Any) -> None:
        self.t.host_call(fn, *args)

    def run(self, dt: float) -> None:
        self.sched.run_until(self.sched.now + dt)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.effects if isinstance(e, kind)]

    def hinted_blocks(self) -> list[tuple[int, int]]:
        return [r for e in self.of(PagesHinted) for r in e.ranges]


REPORTING = DEFAULT_OFFERED_FEATURES | feature_mask(VIRTIO_BALLOON_F_REPORTING)


OOM = DEFAULT_OFFERED_FEATURES | feature_mask(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)


def break_inflateq(r: Rig) -> None:
    """Corrupt our own avail.idx so the device sees a jump past the queue size (V-1)."""
    vq = r.drv.vqs[BalloonQueue.INFLATE]
    r.mem.write_u16(vq.avail_gpa + 2, 500)
    r.t.notify(r.drv.qindex[BalloonQueue.INFLATE])
