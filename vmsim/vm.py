"""One simulated VM, assembled from the parts, and one migration of it: ``run_scenario``.

Theory of operation
-------------------
``SimVM`` builds, for one scenario and one hinting mode:

* guest memory: RAM ``[0, ram)`` whose page contents are ``guestmem.PageVersions`` with a
  ``DirtyLog``, plus the byte-backed **driver area** (4 MiB at gpa 1 MiB, inside RAM) that holds
  every ring and driver buffer; the guest's allocator keeps those pages reserved;
* the shared clock: one ``guestmem.clock.Scheduler`` for guest and host;
* the host: ``balloon_dev.device.BalloonDevice`` behind ``InProcessTransport`` and the pre-copy
  engine ``balloon_dev.host.precopy.PrecopyMigration``. The engine reaches the device only
  through the device API: its precopy notifications (``PrecopyEvent``) become
  ``dev.precopy_notify(event, vm_running)`` calls delivered by the transport, and the device's
  ``PagesHinted`` and ``HintRoundStopped`` effects become ``engine.hint(cmd_id, ranges)`` and
  ``engine.round_stopped(cmd_id)`` calls (a host listener). Mode ``off`` is QEMU without
  free-page-hint: no precopy notifier at all;
* the guest: ``guest_model.guest.SimGuest`` (Linux's page allocator with the balloon driver,
  hinting by allocate-and-hold in ``capture`` mode, by the seed's free-list walk in ``walk``
  mode, not at all in ``off`` mode), the kernel's boot footprint, and the scenario's workloads.

``run_scenario`` runs the set-up workload phases, starts the background (``during``) workloads,
migrates, verifies at switchover (pages in use = allocated by the guest or reserved; pages the
balloon driver holds are excluded; free pages must read as poison when page poisoning is on) and
returns a ``vmsim.report.RunResult``. A migration the engine cancels because it would not be
over within its time budget (``MigrationParams.time_budget_s``, the scenario's
``migration.time_limit``) returns a result with ``error`` set ("did not converge within N s
simulated ...") and ``verified`` false; ``balloon-hint migrate`` reports it as an error.
A run whose work (scheduler events, pages touched and the like, each weighted by what it costs,
in the units of ``MAX_SIM_COST``) passes its bound raises ``SimulationTooLong``, a usage error
naming the scenario file and the workload that did most of the work: every scenario finishes or
is refused within about a minute.

Workloads (scenario ``[[workload]]`` kinds, ``vmsim.scenario.WORKLOAD_KINDS``) are
``guest_model.workloads`` run through ``SimGuest.add_workload``, set-up phases and background
alike; vmsim only maps the scenario's meaning onto them: ``idle`` moves the clock for its
``duration``, ``dirty`` during migration rewrites pages the guest already uses
(``existing=True``), ``churn`` without a ``lifetime`` lives ``CHURN_LIFETIME_S`` (what scenario
files have always meant) and ticks at ``churn_tick(lifetime)``: a free is at most one tick late,
so the tick follows the lifetime, and a coarser tick keeps the 600 MiB/s of the compile
scenarios cheap (freeing scattered pages costs per call, not per page).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from balloon_dev.device import BalloonDevice, DeviceConfig
from balloon_dev.effects import Effect, HintRoundStopped, PagesHinted, PrecopyEvent
from balloon_dev.host.precopy import (
    NORMAL_PAGE_BYTES,
    ZERO_PAGE_BYTES,
    CostModel,
    MigrationParams,
    PrecopyMigration,
    VerifyResult,
)
from balloon_dev.host.profiles import cost_model
from balloon_dev.transport.inprocess import InProcessTransport
from guest_model.buddy import MIGRATE_MOVABLE, MIGRATE_UNMOVABLE, BuddyAllocator
from guest_model.guest import GuestOptions, SimGuest
from guest_model.workloads import Idle, Workload
from guestmem import POISON, DirtyLog, GuestMemory, PageVersions
from guestmem.clock import Scheduler
from guestmem.units import PAGE_SHIFT, PAGE_SIZE
from protocol.errors import UsageError
from vmsim.report import RunResult
from vmsim.scenario import HINT_MODES, Scenario, WorkloadSpec, format_size

log = logging.getLogger(__name__)

DRIVER_AREA_GPA = 0x100000
DRIVER_AREA_SIZE = 4 << 20
TICK_S = 0.005            # background workload granularity, simulated seconds
RESUME_S = 0.01           # how long the guest runs after switchover (its driver handles DONE)
KERNEL_BASE_BYTES = 96 << 20  # kernel text/data, slab and early allocations of a booted guest
MEMMAP_FRACTION = 64 / PAGE_SIZE  # struct page: 64 bytes per 4 KiB page, allocated at boot
#: Free memory still holding data right after boot: measured on the lab's guest (QEMU 11.1,
#: Debian's 6.1 kernel, busybox initramfs, 512 MiB, init_on_alloc=0) as the non-zero pages of
#: the blocks its first hint round took: 2,363 pages, 9.2 MiB, in two runs (docs/cost-model.md,
#: "The guest at boot").
BOOT_FREE_DIRTY_BYTES = 2363 << PAGE_SHIFT

Progress = Callable[[float, str], None]
#: Host faults a run can inject (``--fault``): accept-stale-hints applies hints that were queued
#: when a bitmap sync happened to the new bitmap (protocol.md 5.7's unsafe case).
FAULTS = ("accept-stale-hints",)
#: A scenario churn without ``lifetime``: each allocation lives 0.5 s on average (vmsim's meaning
#: of the key since scenarios exist; guest_model's own default, 0.05 s, is a unit-test size).
CHURN_LIFETIME_S = 0.5
CHURN_TICK_MAX_S = 0.02  # a churn tick never exceeds this (hint rounds last tens of ms)


#: The simulation's work bound, in cost units of about a microsecond of CPU each: every kind of
#: work a run does (``WORK_KINDS``) is counted and weighted by what one item of it costs
#: (``COST_UNITS_PER``), so that a run's units track its CPU time, and 60,000,000 units are
#: about a minute of CPU on the project's 2-core machine (sooner on a faster one). The work
#: counts, not the clock, so a file and seed always stop at the same point. Calibrated by
#: scripts/calibrate_work.py over 198 runs (every built-in scenario in every mode, 120 campaign
#: scenarios, runaway scenarios, compile-128g at 1 TiB in every mode): over the runs of 5 s of
#: CPU or more, units / CPU us is 0.86-1.09 (docs/reliability.md, "The work bound's
#: calibration"). A 1 TiB compile-128g uses 82% of the bound with hinting off (47-54 s of CPU),
#: 31% in mode walk and 21% in mode capture; the largest built-in scenario (compile-128g, mode
#: off) 10%. A run that reaches the bound stops with ``SimulationTooLong`` naming
#: the workload that did most of the work: scenario limits alone cannot bound it, since how
#: long pre-copy lasts depends on whether it converges.
MAX_SIM_COST = 60_000_000
#: The kinds of work a run counts (``SimVM.work()``): scheduler events (a workload tick, a
#: batch of pre-copy, a driver step), allocator fallback steals (an allocation served from
#: another migratetype's lists, one block at a time) and reclaim runs (an allocation that
#: found no free block), free page hints sent (the walk's visit, a descriptor written and
#: popped, the bitmap cleared), pages the workloads allocate, allocations that failed (a
#: guest out of memory), pages they free and write, churn ticks (beyond their event: a tick
#: draws, sorts and splits its live blocks by age), pages pre-copy sends (version copies) and
#: pages scanned whole-RAM: guest RAM once for set-up and the switchover's verification, and
#: once per pre-copy round (the dirty bitmap's sync and scan).
WORK_KINDS = ("events", "fallback_steals", "reclaim_runs", "hints", "alloc_pages",
              "alloc_failures", "freed_pages", "written_pages", "churn_ticks",
              "migration_pages", "scanned_pages")
#: Cost units (CPU us) per item of each kind: the non-negative least-squares fit of
#: scripts/calibrate_work.py (relative error, runs weighted by the square root of their CPU
#: time), to two figures. A zero is a kind whose cost the fit found covered by the others
#: (reclaim runs come with failed allocations); allocating and freeing a page are strongly
#: correlated in every run, so only their sum (0.12 us) is well determined.
COST_UNITS_PER = {"events": 29.0, "fallback_steals": 7.9, "reclaim_runs": 0.0, "hints": 10.0,
                  "alloc_pages": 0.006, "alloc_failures": 0.13, "freed_pages": 0.12,
                  "written_pages": 0.008, "churn_ticks": 1800.0, "migration_pages": 0.0049,
                  "scanned_pages": 0.0012}
_BUDGET_CHECK_EVERY = 64  # events between two looks at the cost (it sums a few counters)


class SimulationTooLong(UsageError):
    """A scenario whose simulation would run past ``MAX_SIM_COST``: the message names the
    file and the workload (or the migration) that did most of the work."""


def workload_work(w: Workload) -> dict[str, int]:
    """A workload's own work so far by kind (``WORK_KINDS``); its ticks are scheduler events."""
    ticks = w.stats.get("ticks", 0)
    return {"events": ticks, "churn_ticks": ticks if w.name == "churn" else 0,
            **{k: w.stats.get(k, 0)
               for k in ("alloc_pages", "alloc_failures", "freed_pages", "written_pages")}}


def work_cost(work: dict[str, int]) -> float:
    """Work by kind in the units of ``MAX_SIM_COST``."""
    return sum(COST_UNITS_PER[k] * n for k, n in work.items())


def churn_tick(lifetime: float) -> float:
    """The tick of a background churn: 1/50 of the mean lifetime (its frees are at most 2%
    late on average), between ``TICK_S`` and ``CHURN_TICK_MAX_S``."""
    return min(CHURN_TICK_MAX_S, max(TICK_S, lifetime / 50))


def boot_footprint(alloc: BuddyAllocator, pages: PageVersions, ram_bytes: int,
                   base_bytes: int | None = None, memmap: bool = True) -> int:
    """What a booted kernel holds: its image, slab and the memmap (struct pages), written and
    unmovable (``memmap=False``: the allocator keeps the memmap itself, as
    ``guest_model.kernel_data`` does). Returns the pages taken."""
    # A tiny test guest gets a small kernel unless its scenario says otherwise.
    base = min(KERNEL_BASE_BYTES, ram_bytes // 8) if base_bytes is None else base_bytes
    n = (base + (int(ram_bytes * MEMMAP_FRACTION) if memmap else 0)) >> PAGE_SHIFT
    pfns = alloc.alloc_pages_bulk(n, MIGRATE_UNMOVABLE)
    pages.write_pfns(pfns, "data")
    return int(pfns.size)


def boot_free_dirty(alloc: BuddyAllocator, pages: PageVersions, nbytes: int) -> int:
    """Memory the kernel and init wrote during boot and freed again: free, not zero (pages a
    migration without hints sends as data). Returns the pages."""
    pfns = alloc.alloc_pages_bulk(nbytes >> PAGE_SHIFT, MIGRATE_MOVABLE)
    if pfns.size:
        pages.write_pfns(pfns, "data")
        alloc.free_pages_bulk(pfns)
    return int(pfns.size)


@dataclass(slots=True)
class VMOptions:
    mode: str = "capture"
    seed: int = 1
    fault: str | None = None
    cost: CostModel | None = None
    max_cost: float = MAX_SIM_COST


def host_share_in_round(cores: float, vcpus: int, runnable: int) -> float:
    """A busy vCPU thread's share of a host CPU while a hint round runs (1: no contention):
    the vCPUs the workloads and the driver keep busy, QEMU's iothread polling the free page
    queue and the migration thread, on ``cores`` host CPUs (0: as many as they need)."""
    if cores <= 0:
        return 1.0
    busy = min(vcpus, runnable + 1) + 2
    return min(1.0, cores / busy)


class SimVM:
    def __init__(self, scn: Scenario, opts: VMOptions) -> None:
        g = scn.guest
        self.scn = scn
        self.opts = opts
        self.ram_pages = g.ram_bytes >> PAGE_SHIFT
        self.sched = Scheduler()
        self.dirty = DirtyLog(self.ram_pages, scn.host.dirty_log)
        self.pages = PageVersions(self.ram_pages, self.dirty)
        self.mem = GuestMemory()
        self.driver_area = bytearray(DRIVER_AREA_SIZE)
        self.mem.add_region(DRIVER_AREA_GPA, self.driver_area, "driver-area")
        # The rest of RAM has no bytes: its content is PageVersions. The device checks buffers
        # (V-8) against [0, ram) given as ram_pages, and never reads hinted or reported pages.
        self.mem.dirty_log = self.dirty
        # -- host --
        self.dev = BalloonDevice(self.mem, DeviceConfig(ram_pages=self.ram_pages))
        self.transport = InProcessTransport(self.dev)
        self.transport.add_host_listener(self._host_effect)
        params = MigrationParams(bandwidth_Bps=scn.migration.bandwidth_Bps,
                                 downtime_limit_s=scn.migration.downtime_limit_s,
                                 max_rounds=scn.migration.max_rounds,
                                 accept_stale_hints=opts.fault == "accept-stale-hints",
                                 rate_limited=scn.migration.rate_limited,
                                 vcpus=g.vcpus, busy_vcpus=float(min(g.vcpus, g.runnable)))
        if scn.migration.chunk_pages is not None:  # else the engine's default step
            params = replace(params, chunk_pages=scn.migration.chunk_pages)
        if scn.migration.time_limit_s is not None:  # else the engine's default budget
            params = replace(params, time_budget_s=scn.migration.time_limit_s)
        cost = opts.cost if opts.cost is not None else cost_model(scn.host.profile)
        if scn.host.cores is not None:
            cost = replace(cost, host_cores=scn.host.cores)
        if scn.host.guest_memory_bandwidth_Bps is not None:
            cost = replace(cost, guest_memory_bandwidth=scn.host.guest_memory_bandwidth_Bps)
        if scn.host.guest_first_write_s is not None:
            cost = replace(cost, guest_first_write_s=scn.host.guest_first_write_s)
        if opts.mode != "off" and scn.host.poller_cpus:
            # migrate-check's hint poller spins at real-time priority on a CPU of its own for
            # the whole hinted migration (vmsim/hint_capture.py): the VM's threads share the
            # rest. (0 cores would mean "no contention", hence at least 1 must be left.)
            left = cost.host_cores - scn.host.poller_cpus
            if left < 1:
                raise UsageError(f"{scn.name}: [host] poller_cpus = {scn.host.poller_cpus} "
                                 f"needs more host cores than {cost.host_cores:g}")
            cost = replace(cost, host_cores=left)
        self.migration = PrecopyMigration(
            self.pages, self.dirty, self.sched, params, cost,
            notify=self._precopy_notify if opts.mode != "off" else None,
            byte_regions=[(DRIVER_AREA_GPA >> PAGE_SHIFT, memoryview(self.driver_area))],
            on_switchover=self._switchover)
        # -- guest --
        driver: dict[str, float] = {}
        h = scn.hinting
        # The host's memory speed for a vCPU (TCG emulates every store) unless the scenario
        # gives the guest's own.
        bandwidth = h.memory_bandwidth_Bps or cost.guest_memory_bandwidth or None
        for key, value in (("hint_cost_per_block", h.block_cost_s),
                           ("hint_alloc_cost", h.alloc_cost_s), ("hint_post_cost", h.post_cost_s),
                           ("hint_walk_cost", h.walk_cost_s),
                           ("memory_bandwidth", bandwidth)):
            if value is not None:
                driver[key] = value
        # The driver's work item is one more runnable thread on the vCPUs: with more runnable
        # threads than vCPUs the scheduler gives it its fair share of one. On a host with few
        # CPUs its vCPU thread also shares them, during the round, with the other busy vCPUs,
        # QEMU's iothread polling the free page queue and the migration thread.
        driver["cpu_share"] = min(1.0, g.vcpus / (g.runnable + 1)) * host_share_in_round(
            cost.host_cores, g.vcpus, g.runnable)
        if cost.guest_first_write_s:
            driver["hint_first_write_cost"] = cost.guest_first_write_s
        self.guest = SimGuest(self.mem, self.pages, self.sched, self.transport, GuestOptions(
            ram_bytes=g.ram_bytes, seed=opts.seed, init_on_alloc=g.init_on_alloc,
            init_on_free=g.init_on_free, page_poisoning=g.page_poison,
            hint_strategy=opts.mode, min_order=scn.hinting.min_order,
            driver_area=(DRIVER_AREA_GPA, DRIVER_AREA_SIZE), nr_cpus=g.vcpus, driver=driver,
            kernel_data=g.kernel_data))
        self.events = 0  # scheduler events run (the unit of MAX_SIM_COST)
        self.labelled: list[tuple[str, Workload]] = []  # background workloads by scenario label
        self._run_until(self.sched.now + 0.001)  # the probe's queued work
        if self.guest.driver.failed:
            raise RuntimeError(f"the guest balloon driver failed: {self.guest.driver.failed}")
        self.alloc = self.guest.allocator
        self.background: list[Workload] = []
        self.in_use_at_switch = 0
        self.held_at_switch = 0
        # Poison violations on pages the guest hinted (the seed's walk loses their poison).
        self.poison_from_hints = 0

    # -- host wiring ---------------------------------------------------------------------------
    def _precopy_notify(self, event: PrecopyEvent, vm_running: bool) -> None:
        self.transport.host_call(self.dev.precopy_notify, event, vm_running)

    def _host_effect(self, e: Effect) -> None:
        if isinstance(e, PagesHinted):
            self.migration.hint_pages(e.cmd_id, e.first_pfn, e.count)
        elif isinstance(e, HintRoundStopped):
            self.migration.round_stopped(e.cmd_id)

    def _switchover(self, mig: PrecopyMigration) -> None:
        """The VM is stopped: stop the guest's activity and verify the destination."""
        for w in self.background:
            w.stop()
        in_use = self.guest.in_use_mask()
        held = self.guest.held_by_driver_mask()
        self.in_use_at_switch = int(np.count_nonzero(in_use))
        self.held_at_switch = int(np.count_nonzero(held))
        # What free pages must hold follows the settings in force: page poisoning takes
        # precedence over init_on_free (guest_model.buddy.meminit).
        poison = self.guest.allocator.page_poisoning
        res = mig.verify(in_use, held, page_poison=poison, poison_version=POISON)
        if poison and res.poison_violations:
            bad = ~in_use & ~held & (mig.dest_version != POISON)
            self.poison_from_hints = int(np.count_nonzero(bad & self.guest.hinted_mask()))

    # -- running -------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Boot footprint, then the set-up phases, in order."""
        g = self.scn.guest
        boot_footprint(self.alloc, self.pages, g.ram_bytes, g.boot_footprint,
                       memmap=not g.kernel_data)
        for w in self.scn.setup_workloads:
            phase = self.guest.add_workload(w.kind, **w.params)
            if isinstance(phase, Idle):
                # the phase touches no memory; the guest's own activity runs meanwhile
                self._run_until(self.sched.now + phase.duration)
            self._run_until(self.sched.now + 0.001)
        # Free memory the guest wrote and freed besides the scenario's workloads, as measured
        # (at migration time, after the lab's own set-up): added last, so the workloads' later
        # allocations do not reuse it the way Linux reuses recently freed pages first.
        free_dirty = BOOT_FREE_DIRTY_BYTES if g.boot_free_dirty is None else g.boot_free_dirty
        boot_free_dirty(self.alloc, self.pages, free_dirty)

    # -- the work bound ------------------------------------------------------------------------
    def work(self) -> dict[str, int]:
        """Work done so far by kind (``WORK_KINDS``)."""
        st = self.migration.stats
        out = {"events": self.events,
               "fallback_steals": self.alloc.counters.get("fallback_steal", 0),
               "reclaim_runs": self.alloc.counters.get("reclaim_runs", 0),
               "hints": self.guest.driver.counters.get("hints_sent", 0),
               "alloc_pages": 0, "alloc_failures": 0, "freed_pages": 0, "written_pages": 0,
               "churn_ticks": 0,
               "migration_pages": st.pages_sent + st.zero_pages,
               "scanned_pages": self.pages.ram_pages * (st.rounds + 1)}
        for w in self.guest.workloads:
            for k, n in workload_work(w).items():
                if k != "events":  # a workload's ticks are among the scheduler's events
                    out[k] += n
        return out

    def cost(self) -> float:
        """Work done so far in cost units (``MAX_SIM_COST``)."""
        return work_cost(self.work())

    def _run_next(self) -> bool:
        ran = self.sched.run_next()
        self.events += 1
        if self.events % _BUDGET_CHECK_EVERY == 0 and self.cost() > self.opts.max_cost:
            raise SimulationTooLong(self._too_long())
        return ran

    def _run_until(self, t: float) -> None:
        while (nt := self.sched.peek_time()) is not None and nt <= t:
            self._run_next()
        self.sched.run_until(t)  # nothing left before t: only moves the clock

    def _too_long(self) -> str:
        scn = self.scn
        share = [(work_cost(workload_work(w)), label, w) for label, w in self.labelled]
        bound = (f"the simulation's work bound ({self.opts.max_cost:,.0f} units of about 1 us "
                 f"of CPU; the default is about a minute of CPU; `migrate --max-work none` "
                 f"lifts it) at {self.sched.now:.3g} s simulated")
        rnd = self.migration.progress[0] if self.migration.phase != "idle" else 0
        when = f", pre-copy round {rnd}" if rnd else ""
        if share and max(share, key=lambda x: x[0])[0] >= self.cost() / 2:
            _, label, w = max(share, key=lambda x: x[0])
            spec = scn.workloads[int(label[len("workload["):-1]) - 1]
            rate = spec.params.get("rate")
            what = f"{spec.kind} at {format_size(rate)}/s" if rate else spec.kind
            return (f"{scn.source}: {label} ({what}) keeps the simulation busy past {bound}"
                    f"{when}: lower its rate, raise migration.bandwidth or shorten "
                    "migration.time_limit")
        return (f"{scn.source}: the migration keeps the simulation busy past {bound}{when}: "
                "raise migration.bandwidth or shorten migration.time_limit")

    def _start_background(self, w: WorkloadSpec) -> None:
        label = f"workload[{self.scn.workloads.index(w) + 1}]"
        n = len(self.background)
        self._add_background(w)
        self.labelled += [(label, b) for b in self.background[n:]]

    def _add_background(self, w: WorkloadSpec) -> None:
        p = dict(w.params)
        if w.kind == "churn":
            p.setdefault("lifetime", CHURN_LIFETIME_S)
            self.background.append(self.guest.add_workload(
                "churn", background=True, tick=churn_tick(p["lifetime"]), **p))
        elif w.kind == "dirty":
            # scenario "dirty" rewrites memory the guest already uses
            self.background.append(self.guest.add_workload(
                "dirty", background=True, existing=True, tick=TICK_S, **p))
        else:
            raise UsageError(f"workload kind {w.kind!r} cannot run during migration")

    def migrate(self, progress: Progress | None = None) -> None:
        for w in self.scn.during_workloads:
            self._start_background(w)
        mig = self.migration
        mig.start()
        n = 0
        while not mig.done:
            if not self._run_next():
                raise RuntimeError("simulation ran out of events before the migration ended")
            n += 1
            if progress is not None and n % 512 == 0:
                # rounds shrink geometrically: round k is worth half of what is left
                rnd, frac = mig.progress
                progress(min(0.99, 1 - 0.5 ** (rnd - 1) * (1 - frac / 2)), f"round {rnd}")
        # The guest resumes (on the destination): its driver sees DONE and frees what it held.
        self._run_until(self.sched.now + RESUME_S)

    def guest_counters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k, v in self.guest.driver.counters.items():
            if v:
                out[f"driver_{k}"] = int(v)
        for k, v in self.alloc.counters.items():
            if v:
                out[f"buddy_{k}"] = int(v)
        # every workload, set-up and background, is one of the guest's (each counted once)
        for w in self.guest.workloads:
            name = w.name
            for k, v in w.stats.items():
                if v:
                    out[f"{name}_{k}"] = out.get(f"{name}_{k}", 0) + int(v)
        return out


def run_scenario(scn: Scenario, mode: str, *, seed: int | None = None, fault: str | None = None,
                 progress: Progress | None = None, cost: CostModel | None = None,
                 max_cost: float = MAX_SIM_COST) -> RunResult:
    """Build the VM, run the set-up phases, migrate with verification, return the result.
    Raises ``SimulationTooLong`` when the run's work passes ``max_cost``."""
    if mode not in HINT_MODES:
        raise UsageError(f"hinting mode {mode!r}: one of {', '.join(HINT_MODES)}")
    if fault not in (None, *FAULTS):
        raise UsageError(f"fault {fault!r}: one of {', '.join(FAULTS)}")
    t0 = time.perf_counter()
    s = seed if seed is not None else scn.guest.seed
    vm = SimVM(scn, VMOptions(mode=mode, seed=s, fault=fault, cost=cost, max_cost=max_cost))
    vm.prepare()
    setup_s = vm.sched.now
    vm.migrate(progress)
    mig = vm.migration
    st = mig.stats
    vr = mig.verify_result
    if vr is None:
        # Cancelled by the engine's time budget: no switchover happened, nothing was verified.
        # Reported as an error, never as a quiet "verified = false".
        assert mig.error is not None
        vr = VerifyResult(verified=False, mismatched_pages=0, poison_violations=0,
                          checked_pages=0)
    dev_dropped = int(vm.dev.counters.get("hint_outside_round", 0))
    return RunResult(
        scenario=scn.name, mode=mode, guest_ram_bytes=scn.guest.ram_bytes, page_size=PAGE_SIZE,
        rounds=st.rounds, pages_sent=st.pages_sent, zero_pages=st.zero_pages,
        pages_skipped_hint=st.pages_skipped_hint, bytes_sent=st.bytes_sent,
        total_time_s=st.total_time_s, downtime_s=st.downtime_s, hint_rounds=st.hint_rounds,
        hints_received=st.hints_received, hinted_pages=st.hinted_pages,
        stale_hints_dropped=st.stale_hints_dropped + dev_dropped, verified=vr.verified,
        mismatched_pages=vr.mismatched_pages, poison_violations=vr.poison_violations,
        poison_violations_from_hints=vm.poison_from_hints, guest_log=list(vm.guest.boot_log),
        wall_s=time.perf_counter() - t0, converged=st.converged, seed=s, fault=fault,
        stale_hints_applied=st.stale_hints_applied, stale_pages_skipped=st.stale_pages_skipped,
        pages_per_round=mig.round_series(),
        setup_s=setup_s, guest_in_use_pages=vm.in_use_at_switch,
        guest_held_pages=vm.held_at_switch,
        device_counters={k: int(v) for k, v in vm.dev.counters.items() if v},
        guest_counters=vm.guest_counters(), error=mig.error,
        bytes_per_round=[r.zero_pages * ZERO_PAGE_BYTES
                         + (r.pages_sent - r.zero_pages) * NORMAL_PAGE_BYTES for r in mig.rounds],
        skipped_per_round=[r.pages_skipped_hint for r in mig.rounds],
        round_end_us=[round(r.end_s * 1e6) for r in mig.rounds],
    )
