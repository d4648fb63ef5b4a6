"""One simulated VM, assembled from the parts, and one migration of it: ``run_scenario``.

Theory of operation
-------------------
``SimVM`` builds, for one scenario and one hinting mode:

* guest memory: RAM ``[0, ram)`` whose page contents are ``guestmem.PageVersions`` with a
  ``DirtyLog``, plus the byte-backed **driver area** (4 MiB at gpa 1 MiB, inside RAM) that holds
  every ring and driver buffer; the guest's allocator keeps those pages reserved;
* the shared clock: one ``guestmem.clock.Scheduler`` for guest and host;
* the guest: ``guest_model.buddy.BuddyAllocator`` (Linux's page allocator, writing init/poison
  contents through ``PageVersions``), the boot footprint of the kernel, the scenario's workloads
  and, unless the mode is ``off``, the balloon driver (``guest_model``'s driver, hinting by
  allocate-and-hold in ``capture`` mode or by the seed's free-list walk in ``walk`` mode);
* the host: ``balloon_dev.device.BalloonDevice`` behind ``InProcessTransport`` and the pre-copy
  engine ``balloon_dev.migration.PrecopyMigration``. The engine reaches the device only through
  the device API: its precopy notifications become ``dev.precopy_notify(event, vm_running)``
  calls delivered by the transport, and the device's ``PagesHinted`` effects become
  ``engine.hint(cmd_id, ranges)`` calls (a host listener).

``run_scenario`` runs the set-up workload phases, starts the background (``during``) workloads,
migrates, verifies at switchover (pages in use = allocated by the guest or reserved; pages the
balloon driver holds are excluded; free pages must read as poison when page poisoning is on) and
returns a ``vmsim.report.RunResult``.

Workloads (scenario ``[[workload]]`` kinds, see ``vmsim.scenario.WORKLOAD_KINDS``) are carried
out here on the allocator with bulk numpy operations, one tick (``TICK_S``) at a time on the
scheduler, so they interleave with pages being sent and hints arriving.
"""
from __future__ import annotations

import logging
import mmap
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from balloon_dev.device import BalloonDevice, DeviceConfig
from balloon_dev.effects import PagesHinted, PrecopyEvent
from balloon_dev.migration import CostModel, MigrationParams, PrecopyMigration
from balloon_dev.transport.inprocess import InProcessTransport
from guest_model.buddy import (
    MIGRATE_MOVABLE,
    MIGRATE_UNMOVABLE,
    PG_ALLOC,
    PG_BALLOON,
    PG_RESERVED,
    BuddyAllocator,
)
from guest_model.driver import BalloonDriver, DriverOptions
from guest_model.vring import DriverArea
from guestmem import DirtyLog, GuestMemory, PageVersions
from guestmem.clock import Scheduler
from guestmem.units import PAGE_SHIFT, PAGE_SIZE
from vmsim.report import RunResult
from vmsim.scenario import HINT_MODES, Scenario, WorkloadSpec

log = logging.getLogger(__name__)

DRIVER_AREA_GPA = 0x100000
DRIVER_AREA_SIZE = 4 << 20
TICK_S = 0.005            # workload granularity in simulated seconds
GUEST_WRITE_BPS = 5e9     # how fast a set-up phase writes memory (one vCPU, memset-like)
KERNEL_BASE_BYTES = 96 << 20  # kernel text/data, slab and early allocations of a booted guest
MEMMAP_FRACTION = 64 / PAGE_SIZE  # struct page: 64 bytes per 4 KiB page, allocated at boot

Progress = Callable[[float, str], None]
#: Host faults a run can inject (``--fault``): accept-stale-hints applies hints that were queued
#: when a bitmap sync happened to the new bitmap (protocol.md 5.7's unsafe case).
FAULTS = ("accept-stale-hints",)


class ScenarioWorkloads:
    """The scenario's workload kinds on top of the buddy allocator (bulk, numpy)."""

    def __init__(self, alloc: BuddyAllocator, pages: PageVersions, sched: Scheduler,
                 rng: np.random.Generator) -> None:
        self.alloc = alloc
        self.pages = pages
        self.sched = sched
        self.rng = rng
        self.filled: list[np.ndarray] = []   # pages the fill phases keep in use
        self.running = True
        self.reclaim: Callable[[int], int] | None = None  # the balloon shrinker, if any
        self.counters = {"workload_pages_written": 0, "workload_alloc_failed": 0,
                         "workload_reclaimed": 0,
                         "churn_pages_allocated": 0, "churn_pages_freed": 0}

    def _alloc(self, n: int, mt: int = MIGRATE_MOVABLE) -> np.ndarray:
        pfns = self.alloc.alloc_pages_bulk(n, mt)
        if pfns.size < n and self.reclaim is not None:
            # direct reclaim: shrinkers give memory back, then the allocation is retried
            got = self.reclaim(n - int(pfns.size))
            self.counters["workload_reclaimed"] += int(got)
            more = self.alloc.alloc_pages_bulk(n - int(pfns.size), mt)
            pfns = np.concatenate([pfns, more])
        if pfns.size < n:
            self.counters["workload_alloc_failed"] += n - int(pfns.size)
        return pfns

    def _write(self, pfns: np.ndarray) -> None:
        self.pages.write_pfns(pfns, "data")
        self.counters["workload_pages_written"] += int(pfns.size)

    def boot(self, ram_bytes: int) -> None:
        """What a booted kernel holds: its image, slab and the memmap (struct pages)."""
        base = min(KERNEL_BASE_BYTES, ram_bytes // 8)  # a tiny test guest gets a small kernel
        n = (base + int(ram_bytes * MEMMAP_FRACTION)) >> PAGE_SHIFT
        pfns = self._alloc(n, MIGRATE_UNMOVABLE)
        self._write(pfns)

    # -- set-up phases -------------------------------------------------------------------------
    def run_phase(self, w: WorkloadSpec) -> None:
        p = w.params
        if w.kind == "fill":
            pfns = self._alloc(p["size"] >> PAGE_SHIFT)
            self._write(pfns)
            self.filled.append(pfns)
            self._advance(p["size"] / GUEST_WRITE_BPS)
        elif w.kind == "fill_free":
            pfns = self._alloc(p["size"] >> PAGE_SHIFT)
            self._write(pfns)
            keep = p.get("keep", 0.0)
            if keep > 0:
                kept = self.rng.random(pfns.size) < keep
                self.filled.append(pfns[kept])
                pfns = pfns[~kept]
            self.alloc.free_pages_bulk(pfns)
            self._advance(p["size"] / GUEST_WRITE_BPS)
        elif w.kind == "idle":
            self._advance(p["duration"])
        else:
            raise ValueError(f"workload kind {w.kind!r} is not a set-up phase")

    def _advance(self, dt: float) -> None:
        self.sched.run_until(self.sched.now + dt)

    # -- background activity -------------------------------------------------------------------
    def start_background(self, w: WorkloadSpec) -> None:
        p = w.params
        if w.kind == "dirty":
            self._start_dirty(p["rate"], p.get("working_set"))
        elif w.kind == "churn":
            self._start_churn(p["rate"], p.get("lifetime", 0.5), p.get("footprint"))
        else:
            raise ValueError(f"workload kind {w.kind!r} cannot run during migration")

    def _start_dirty(self, rate: float, working_set: int | None) -> None:
        ws = np.concatenate(self.filled) if self.filled else np.flatnonzero(
            self.alloc.state == PG_ALLOC)
        if working_set is not None:
            ws = ws[: max(1, working_set >> PAGE_SHIFT)]
        per_tick = rate * TICK_S / PAGE_SIZE
        carry = [0.0]

        def tick() -> None:
            if not self.running or ws.size == 0:
                return
            carry[0] += per_tick
            k = int(carry[0])
            carry[0] -= k
            if k:
                # the set of pages written this tick (a page written twice is one dirty page)
                live = ws[self.alloc.state[ws] == PG_ALLOC]
                if live.size:
                    self._write(np.unique(live[self.rng.integers(0, live.size, k)]))
            self.sched.after(TICK_S, tick)
        self.sched.after(TICK_S, tick)

    def _start_churn(self, rate: float, lifetime: float, footprint: int | None) -> None:
        per_tick = rate * TICK_S / PAGE_SIZE
        cap = footprint >> PAGE_SHIFT if footprint is not None else None
        live: deque[tuple[float, np.ndarray]] = deque()
        live_pages = [0]
        carry = [0.0]

        def tick() -> None:
            if not self.running:
                return
            now = self.sched.now
            while live and (live[0][0] <= now or (cap is not None and live_pages[0] > cap)):
                _, old = live.popleft()
                self.alloc.free_pages_bulk(old)
                live_pages[0] -= old.size
                self.counters["churn_pages_freed"] += int(old.size)
            carry[0] += per_tick
            k = int(carry[0])
            carry[0] -= k
            if k:
                pfns = self._alloc(k)
                if pfns.size:
                    self._write(pfns)
                    live.append((now + lifetime, pfns))
                    live_pages[0] += int(pfns.size)
                    self.counters["churn_pages_allocated"] += int(pfns.size)
            self.sched.after(TICK_S, tick)
        self.sched.after(TICK_S, tick)


@dataclass(slots=True)
class VMOptions:
    mode: str = "capture"
    seed: int = 1
    fault: str | None = None
    cost: CostModel | None = None


class SimVM:
    def __init__(self, scn: Scenario, opts: VMOptions) -> None:
        g = scn.guest
        self.scn = scn
        self.opts = opts
        self.ram_pages = g.ram_bytes >> PAGE_SHIFT
        self.sched = Scheduler()
        self.dirty = DirtyLog(self.ram_pages)
        self.pages = PageVersions(self.ram_pages, self.dirty)
        self.mem = GuestMemory()
        self.driver_area = bytearray(DRIVER_AREA_SIZE)
        self.mem.add_region(DRIVER_AREA_GPA, self.driver_area, "driver-area")
        # The rest of RAM: the device checks every buffer against guest memory (V-8), hint
        # buffers included, but never reads RAM pages (their content is PageVersions). So it is
        # backed by a sparse anonymous mapping nothing touches: no host memory is used.
        end = DRIVER_AREA_GPA + DRIVER_AREA_SIZE
        self._sparse = [_sparse_map(DRIVER_AREA_GPA), _sparse_map(g.ram_bytes - end)]
        self.mem.add_region(0, self._sparse[0], "ram-low")
        self.mem.add_region(end, self._sparse[1], "ram")
        self.mem.dirty_log = self.dirty
        self.alloc = BuddyAllocator(
            g.ram_bytes, pages=self.pages, reserved=[(DRIVER_AREA_GPA, DRIVER_AREA_SIZE)],
            seed=opts.seed, init_on_alloc=g.init_on_alloc, init_on_free=g.init_on_free,
            page_poisoning=g.page_poison, nr_cpus=g.vcpus)
        self.rng = np.random.default_rng(opts.seed)
        self.workloads = ScenarioWorkloads(self.alloc, self.pages, self.sched, self.rng)
        self.dev = BalloonDevice(self.mem, DeviceConfig(ram_pages=self.ram_pages))
        self.transport = InProcessTransport(self.dev)
        self.guest_driver: BalloonDriver | None = None
        if opts.mode != "off":
            self.guest_driver = _attach_driver(self, opts.mode, scn.hinting.min_order)
        params = MigrationParams(bandwidth_Bps=scn.migration.bandwidth_Bps,
                                 downtime_limit_s=scn.migration.downtime_limit_s,
                                 max_rounds=scn.migration.max_rounds,
                                 accept_stale_hints=opts.fault == "accept-stale-hints")
        self.migration = PrecopyMigration(
            self.pages, self.dirty, self.sched, params, opts.cost,
            notify=self._precopy_notify if opts.mode != "off" else None,
            byte_regions=[(DRIVER_AREA_GPA >> PAGE_SHIFT, memoryview(self.driver_area))],
            on_switchover=self._switchover)
        self.transport.add_host_listener(self._host_effect)
        self.in_use_at_switch = 0
        self.held_at_switch = 0

    # -- host wiring ---------------------------------------------------------------------------
    def _precopy_notify(self, event: str, vm_running: bool) -> None:
        self.transport.host_call(self.dev.precopy_notify, PrecopyEvent[event], vm_running)

    def _host_effect(self, e: object) -> None:
        if isinstance(e, PagesHinted):
            self.migration.hint(e.cmd_id, e.ranges)

    def _switchover(self, mig: PrecopyMigration) -> None:
        """The VM is stopped: stop the guest's activity and verify the destination."""
        self.workloads.running = False
        st = self.alloc.state
        in_use = (st == PG_ALLOC) | (st == PG_RESERVED)
        held = st == PG_BALLOON
        self.in_use_at_switch = int(np.count_nonzero(in_use))
        self.held_at_switch = int(np.count_nonzero(held))
        g = self.scn.guest
        mig.verify(in_use, held, page_poison=g.page_poison,
                   poison_version=1 if not g.init_on_free else 0)

    # -- running -------------------------------------------------------------------------------
    def prepare(self) -> None:
        self.workloads.boot(self.scn.guest.ram_bytes)
        for w in self.scn.setup_workloads:
            self.workloads.run_phase(w)
        if self.guest_driver is not None:
            _driver_ready(self)

    def migrate(self, progress: Progress | None = None) -> None:
        for w in self.scn.during_workloads:
            self.workloads.start_background(w)
        mig = self.migration
        mig.start()
        n = 0
        while not mig.done:
            if not self.sched.run_next():
                raise RuntimeError("simulation ran out of events before the migration ended")
            n += 1
            if progress is not None and n % 512 == 0:
                # rounds shrink geometrically: round k is worth half of what is left
                rnd, frac = mig.progress
                progress(min(0.99, 1 - 0.5 ** (rnd - 1) * (1 - frac / 2)), f"round {rnd}")


def _sparse_map(size: int) -> mmap.mmap:
    """An anonymous private mapping that reserves no memory (pages appear only if touched)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if sys.platform.startswith("linux"):
        flags |= getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python 3.11 lacks it
    return mmap.mmap(-1, size, flags=flags)


def _attach_driver(vm: SimVM, mode: str, min_order: int) -> BalloonDriver:
    """The guest's balloon driver (guest_model), hinting in ``mode`` (walk or capture)."""
    g = vm.scn.guest
    area = DriverArea(vm.mem, DRIVER_AREA_GPA, DRIVER_AREA_SIZE)
    opts = DriverOptions(hint_strategy=mode, min_order=min_order,
                         page_poisoning=g.page_poison, init_on_free=g.init_on_free)
    if vm.scn.hinting.block_cost_s is not None:
        opts.hint_cost_per_block = vm.scn.hinting.block_cost_s
    drv = BalloonDriver(vm.transport, vm.mem, vm.alloc, vm.sched, area, opts)
    # Memory pressure: the kernel's reclaim calls the balloon's shrinker, which gives held
    # hint blocks back (protocol.md 6.3); the workloads call this when an allocation falls short.
    vm.workloads.reclaim = drv.shrink
    return drv


def _driver_ready(vm: SimVM) -> None:
    drv = vm.guest_driver
    assert drv is not None
    drv.probe()
    vm.sched.run_until(vm.sched.now + 0.001)
    if drv.failed:
        raise RuntimeError(f"the guest balloon driver failed to probe: {drv.failed}")


def run_scenario(scn: Scenario, mode: str, *, seed: int | None = None, fault: str | None = None,
                 progress: Progress | None = None, cost: CostModel | None = None) -> RunResult:
    """Build the VM, run the set-up phases, migrate with verification, return the result."""
    if mode not in HINT_MODES:
        raise ValueError(f"hinting mode {mode!r}: one of {', '.join(HINT_MODES)}")
    if fault not in (None, *FAULTS):
        raise ValueError(f"fault {fault!r}: one of {', '.join(FAULTS)}")
    t0 = time.perf_counter()
    s = seed if seed is not None else scn.guest.seed
    vm = SimVM(scn, VMOptions(mode=mode, seed=s, fault=fault, cost=cost))
    vm.prepare()
    setup_s = vm.sched.now
    vm.migrate(progress)
    mig = vm.migration
    st = mig.stats
    vr = mig.verify_result
    assert vr is not None
    dev_dropped = int(vm.dev.counters.get("hint_outside_round", 0))
    return RunResult(
        scenario=scn.name, mode=mode, guest_ram_bytes=scn.guest.ram_bytes, page_size=PAGE_SIZE,
        rounds=st.rounds, pages_sent=st.pages_sent, zero_pages=st.zero_pages,
        pages_skipped_hint=st.pages_skipped_hint, bytes_sent=st.bytes_sent,
        total_time_s=st.total_time_s, downtime_s=st.downtime_s, hint_rounds=st.hint_rounds,
        hints_received=st.hints_received, hinted_pages=st.hinted_pages,
        stale_hints_dropped=st.stale_hints_dropped + dev_dropped, verified=vr.verified,
        mismatched_pages=vr.mismatched_pages, poison_violations=vr.poison_violations,
        wall_s=time.perf_counter() - t0, converged=st.converged, seed=s, fault=fault,
        stale_hints_applied=st.stale_hints_applied, pages_per_round=mig.round_series(),
        setup_s=setup_s, guest_in_use_pages=vm.in_use_at_switch,
        guest_held_pages=vm.held_at_switch,
        device_counters={k: int(v) for k, v in vm.dev.counters.items() if v},
        guest_counters={**{k: int(v) for k, v in vm.workloads.counters.items()},
                        **{f"buddy_{k}": int(v) for k, v in vm.alloc.counters.items() if v}},
    )
