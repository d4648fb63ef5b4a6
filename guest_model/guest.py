"""A simulated guest: page allocator + balloon driver, assembled for vmsim (docs/interfaces.md
"SimGuest").

Theory of operation: ``SimGuest`` is only assembly. It takes what the VM builder owns (guest
memory with the byte-backed driver area already mapped, page contents, the shared scheduler, a
virtio transport to the balloon device) and builds the guest side: a ``BuddyAllocator`` that
keeps the driver area reserved (or one the caller already built), a ``DriverArea`` over that
region for rings and driver buffers, and a ``BalloonDriver`` with the chosen hint strategy,
which it probes at once. The driver's shrinker is registered with the allocator, so direct
reclaim gives held hint blocks back before an allocation fails, as in Linux; workloads act on
``allocator`` directly (or through ``add_workload``) and may also call ``reclaim``.

The allocator resolves init_on_alloc, init_on_free and page poisoning as Linux does (poisoning
takes precedence; ``boot_log`` has the kernel's message) and the driver is configured with the
settings in force, so the device is told the ``poison_val`` the guest really uses and
``free_page_version`` is what the verifier must find in free pages.

Two masks serve the migration verifier: ``in_use_mask()`` is every page whose content the guest
relies on (allocated by the guest, plus reserved pages: firmware and the driver area), and
``held_by_driver_mask()`` is every page the balloon driver owns (held hint blocks, balloon pages),
whose content the guest does not rely on. Free blocks isolated for a report in flight are in
neither: they are free memory whose content (the poison pattern under page poisoning) the
guest still checks when it allocates them, so the verifier must treat them as free.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from guest_model.buddy import PG_ALLOC, PG_BALLOON, PG_RESERVED, BuddyAllocator
from guest_model.driver import BalloonDriver, BlockWalker, DriverOptions
from guest_model.kernel_data import KernelDataAllocator
from guest_model.transport import VirtioTransport
from guest_model.vring import DriverArea
from guest_model.workloads import Workload, make_workload
from guestmem import GuestMemory, PageVersions
from guestmem.clock import Scheduler
from guestmem.units import PAGE_MASK, gpa_to_pfn
from protocol.errors import UsageError

#: vmsim's default driver area: 4 MiB at 1 MiB (docs/interfaces.md).
DEFAULT_DRIVER_AREA = (0x100000, 4 << 20)


@dataclass(slots=True)
class GuestOptions:
    ram_bytes: int
    seed: int = 0
    init_on_alloc: bool = True
    init_on_free: bool = False
    page_poisoning: bool = False
    #: "off" (no hinting; the driver still inflates, deflates and sends stats), "walk", "capture".
    hint_strategy: str = "capture"
    #: Smallest order the walk strategy hints.
    min_order: int = 10
    #: (gpa, size) of the byte-backed driver area, already a region of the guest memory.
    driver_area: tuple[int, int] = DEFAULT_DRIVER_AREA
    nr_cpus: int = 2
    #: The kernel's own data (zone, per-CPU counters, memmap) lives in RAM and is written by
    #: every allocation and free (``guest_model.kernel_data``).
    kernel_data: bool = False
    #: Extra ``DriverOptions`` fields (costs, batch size, accepted features, ...).
    driver: dict[str, Any] = field(default_factory=dict)


class SimGuest:
    def __init__(self, mem: GuestMemory, pages: PageVersions, sched: Scheduler,
                 transport: VirtioTransport, options: GuestOptions, *,
                 allocator: BuddyAllocator | None = None,
                 walker_factory: Callable[[int], BlockWalker] | None = None) -> None:
        o = options
        gpa, size = o.driver_area
        if not (0 <= gpa and gpa + size <= o.ram_bytes):
            raise UsageError(f"GuestOptions.driver_area [{gpa:#x}, +{size:#x}) is not inside "
                             f"RAM of {o.ram_bytes:#x} bytes")
        self.mem = mem
        self.pages = pages
        self.sched = sched
        self.options = o
        if allocator is None:
            kind = KernelDataAllocator if o.kernel_data else BuddyAllocator
            allocator = kind(o.ram_bytes, pages=pages, reserved=[o.driver_area],
                             seed=o.seed, init_on_alloc=o.init_on_alloc,
                             init_on_free=o.init_on_free,
                             page_poisoning=o.page_poisoning, nr_cpus=o.nr_cpus)
        elif (allocator.state[gpa_to_pfn(gpa):gpa_to_pfn(gpa + size + PAGE_MASK)]
              != PG_RESERVED).any():
            raise UsageError("the allocator given to SimGuest does not keep the driver area "
                             "reserved")
        self.allocator = allocator
        self.area = DriverArea(mem, gpa, size)
        dopts = DriverOptions(hint_strategy=o.hint_strategy, min_order=o.min_order,
                              page_poisoning=allocator.page_poisoning,
                              init_on_free=allocator.init_on_free, **o.driver)
        self.driver = BalloonDriver(transport, mem, allocator, sched, self.area, dopts,
                                    walker_factory=walker_factory)
        # Direct reclaim reaches the balloon's shrinker (protocol.md 6.3): held hint blocks
        # are the first memory a guest under pressure gets back. (The OOM notifier for
        # DEFLATE_ON_OOM is registered by the driver at probe, only if negotiated.)
        allocator.register_shrinker(self.driver.shrink_count, self.driver.shrink)
        self.driver.probe()
        self.workloads: list[Workload] = []

    def add_workload(self, name: str, *, background: bool = False, until: float | None = None,
                     **params: Any) -> Workload:
        """Run workload ``name`` (guest_model.workloads) on this guest: to completion now, or
        with ``background=True`` as events on the scheduler. Each gets its own seed derived from
        ``GuestOptions.seed``, so a run is a pure function of the options and calls."""
        w = make_workload(name, self.allocator, self.pages,
                          seed=self.options.seed * 1000 + len(self.workloads), **params)
        self.workloads.append(w)
        if background:
            w.start(self.sched, until=until)
        else:
            self.pages.switch_mm(w)  # a set-up phase is a process of its own
            w.run_phase()
        return w

    def in_use_mask(self) -> np.ndarray:
        """Pages whose content the guest relies on: guest-allocated or reserved."""
        st = self.allocator.state
        return (st == PG_ALLOC) | (st == PG_RESERVED)

    def held_by_driver_mask(self) -> np.ndarray:
        """Pages the balloon driver owns (hint blocks held, balloon pages). Blocks isolated for
        free page reporting are ``PG_ISOLATED``: free, not held (see the module docstring)."""
        return self.allocator.state == PG_BALLOON

    @property
    def boot_log(self) -> tuple[str, ...]:
        """The kernel log lines of this guest's boot that the model produces (memory
        auto-initialisation: ``guest_model.buddy.meminit``)."""
        return self.allocator.meminit.boot_log

    @property
    def free_page_version(self) -> int | None:
        """What every free page holds (``POISON`` under page poisoning, ``ZERO`` under
        init_on_free, None when anything goes): the settings in force, not those asked for."""
        return self.allocator.meminit.free_version

    def hinted_mask(self) -> np.ndarray:
        """Pages the driver hinted at some time (``guest_model.hinting``)."""
        return self.driver.hint.hinted_mask(self.allocator.ram_pages)

    def reclaim(self, nr_pages: int) -> int:
        """Memory pressure: the shrinker gives held hint blocks back; returns pages freed."""
        return self.driver.shrink(nr_pages)

    @property
    def counters(self) -> dict[str, int]:
        return dict(self.driver.counters)
