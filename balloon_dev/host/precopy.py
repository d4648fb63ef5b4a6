"""The host's pre-copy live migration, modelled on QEMU's RAM pre-copy (simulated).

Theory of operation
-------------------
The engine owns three page-granular numpy arrays over guest RAM:

* ``to_send`` (bool): QEMU's migration bitmap, "pages still to send in this round";
* ``dest_version`` (uint32): what the destination holds for each page (a fresh destination's RAM
  reads as zero, so it starts as ``ZERO``);
* the source's content is read from ``guestmem.PageVersions`` (one version per page); pages that
  are real bytes (the driver area holding the rings) are copied byte for byte into a destination
  buffer, because their versions never change.

Writes made by the guest while pre-copy runs are recorded by ``guestmem.DirtyLog`` (KVM's dirty
log), which the engine only reads with ``sync()`` between rounds. So "written since the last sync"
is a record the engine never edits: a free page hint only clears bits of ``to_send``
(protocol.md 5.7, 4.4 rule 5). A page hinted in round *k* and written later is in the dirty log
and the sync that closes round *k* sets its bit again.

Memory: besides those arrays the engine allocates nothing RAM-sized. A sync ORs the dirty log
into ``to_send`` in place (``DirtyLog.merge_into``), and the sender and the verifier work in
pieces of ``SEND_PIECE`` pages (a fully marked piece is sent with slices only).

Time is the shared simulated clock: the engine sends one chunk of the bitmap (``chunk_pages``
positions) at a time and schedules the next chunk after the chunk's cost (``CostModel``), so the
guest's workload and its balloon driver run between chunks on the same ``Scheduler`` and a hint
that arrives while a round runs skips the pages the cursor has not reached yet.

Phases (QEMU's names: ``balloon_dev.effects.PrecopyEvent`` values go out through the ``notify``
hook exactly as QEMU's precopy notifier raises them, protocol.md 5.4):

1. set-up: SETUP; dirty logging on; every page to send; BEFORE_BITMAP_SYNC, the set-up sync,
   AFTER_BITMAP_SYNC (VM running: the device starts hint round 1 during the bulk pass, 5.6);
2. iterations (QEMU's migration_iteration_run): before each, compare the pages left in
   ``to_send`` (x 4 KiB) with the threshold, the bandwidth measured over the last 100 ms window
   x the downtime limit; below it, sync: BEFORE_BITMAP_SYNC (the device publishes STOP),
   ``to_send |= dirty``, AFTER_BITMAP_SYNC (new command id), and compare again. Still below, or
   nothing left, or ``max_rounds`` syncs done: stop-and-copy. Otherwise send for one iteration
   (``iteration_s``, QEMU's MAX_WAIT) from the cursor on, wrapping at the end of RAM. A *round*
   is the span between two syncs; the switchover can come in the middle of a pass;
3. stop-and-copy: the VM stops (no guest event runs), BEFORE_BITMAP_SYNC, final sync,
   AFTER_BITMAP_SYNC with the VM stopped (the device publishes DONE), send everything left,
   COMPLETE; the verifier runs on the state at switchover; CLEANUP.

Hints reach the engine through ``hint(cmd_id, ranges)`` and the end of each hint round through
``round_stopped(cmd_id)``: the wiring turns the device's ``PagesHinted`` and ``HintRoundStopped``
effects into these calls. Applying a hint to the bitmap is work done on the host's hint thread
(QEMU's iothread) under ``bitmap_mutex``, which the migration thread holds while it sends a
batch: a hint is queued and applied when the mutex is free (at the latest, between two batches).
Each ``PagesHinted`` effect is one queued batch (``hint_pages``: first pfns and page counts as
arrays), applied by ``clear_pages``: runs of adjacent blocks as slices, scattered blocks as
rows of a view, a few numpy calls whatever the batch's size.
A hint is *current* when it arrived while a round is open (between AFTER_BITMAP_SYNC and the
next BEFORE_BITMAP_SYNC), after the last sync, and its round had not been reported stopped
when it arrived. Anything else is stale and dropped (4.4 rule 6): the hints still queued when a
sync starts belong to the round that just ended. The fault ``accept_stale_hints`` keeps them and
applies them to the bitmap the sync just built, which is the unsafe behaviour 5.7 warns about (a
page written between the hint and the sync loses its new content); the verifier must catch it.

Time budget: ``MigrationParams.time_budget_s`` bounds the simulated time of the whole migration,
switchover included. A migration that will not be over by then (a link far too slow for the
guest's RAM, or a dirty rate that keeps every round long) would otherwise make its caller run the
guest's workloads for days of simulated time, i.e. for ever in wall time. The engine checks
the budget each time it schedules its own next step (the next chunk, the next round, the
stop-and-copy) and at switchover: as soon as a step would end past ``start + time_budget_s`` the
migration is *cancelled* at once (what a management layer does to a migration that overruns):
no switchover, no verification, CLEANUP raised with the VM running (the device publishes DONE, as
QEMU's notifier does on cancel), ``stats.timed_out`` set and ``error`` saying so. Cancelling at
the first step that cannot fit, rather than at the deadline itself, spends no simulated time on
a result that is already known.

Verification (``verify``): at switchover every page the guest has in use, except pages the balloon
driver holds for hinting, must have on the destination the version (or bytes) the source has;
with page poisoning on, every free page must read as the poison value on the destination
(otherwise the guest's next allocation of it would report corruption).
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from balloon_dev.effects import PrecopyEvent
from balloon_dev.host import MigrationError
from balloon_dev.host.verify import VerifyResult, verify_pages
from guestmem.clock import ScheduledEvent, Scheduler
from guestmem.dirty import DirtyLog
from guestmem.pages import POISON, ZERO, PageVersions
from guestmem.units import PAGE_SHIFT, PAGE_SIZE, whole_pages_in

log = logging.getLogger(__name__)

# QEMU's RAM stream: each page record starts with a be64 "offset | flags" word; a zero page
# (RAM_SAVE_FLAG_ZERO) adds one byte (the fill value), a normal page (RAM_SAVE_FLAG_PAGE) the page.
PAGE_HEADER_BYTES = 8
ZERO_PAGE_BYTES = PAGE_HEADER_BYTES + 1
NORMAL_PAGE_BYTES = PAGE_HEADER_BYTES + PAGE_SIZE
#: Pages one numpy pass of the sender or the verifier covers: bounds their temporaries (a few
#: bytes per page, so tens of MiB) whatever the RAM size.
SEND_PIECE = 1 << 22


@dataclass(frozen=True, slots=True)
class CostModel:
    """Simulated time each piece of work costs. docs/cost-model.md derives every constant.

    ``zero_page_s`` is the one calibrated constant (on the published 8 GB idle, no-hint migration
    time); the others are estimates from first principles, documented there.
    """

    zero_page_s: float = 1.261e-6       # read a page, find it zero, queue a 9-byte record
    copy_page_s: float = 0.40e-6        # extra CPU for a normal page: copy 4 KiB into the stream
    bitmap_bit_s: float = 0.25e-9       # walk one bit of the migration bitmap (find_next_bit)
    log_start_page_s: float = 0.09e-6   # per RAM page, once: dirty logging on (write-protect)
    sync_page_s: float = 1.0e-9         # per RAM page: fetch and merge KVM's dirty bitmap
    sync_dirty_page_s: float = 0.09e-6  # per dirty page: write-protect it again (KVM)
    host_hint_s: float = 2.0e-6         # host: pop one hint element, clear its bits, push it back
    host_hint_page_s: float = 0.25e-9   # host: per page of a hint (bitmap clear)
    setup_s: float = 0.005              # QEMU set-up: allocate bitmaps, connect
    check_period_s: float = 0.1         # QEMU's BUFFER_DELAY: the bandwidth measuring window
    iteration_s: float = 0.05           # QEMU's MAX_WAIT: one ram_save_iterate call at most
    switchover_s: float = 0.03          # stop vCPUs, device states, destination resumes
    #: Host CPUs shared by the VM's vCPU threads, QEMU's hint iothread and the migration thread
    #: (0: more than they need, no contention). A busy thread gets min(1, cores / busy
    #: threads) of a CPU, so the migration thread's CPU work stretches when the guest's vCPUs
    #: and the iothread are busy too (docs/cost-model.md, "Host CPU contention").
    host_cores: float = 0.0
    #: Bytes/s one vCPU clears memory at on this host when it has a CPU to itself (0: the
    #: guest's own figure, [hinting] memory_bandwidth). Under TCG the host emulates every
    #: store, so this is a property of the host, not of the guest.
    guest_memory_bandwidth: float = 0.0
    #: Extra cost of a vCPU's first write to a page the host has not backed yet (a host page
    #: fault: file-backed guest RAM is allocated on first touch); 0: none.
    guest_first_write_s: float = 0.0

    def page_cost(self, bandwidth_Bps: float) -> tuple[float, float]:
        """(zero page, normal page) time: CPU work and wire time happen one after the other in
        QEMU's single migration thread, so they add."""
        z = self.zero_page_s + ZERO_PAGE_BYTES / bandwidth_Bps
        n = self.zero_page_s + self.copy_page_s + NORMAL_PAGE_BYTES / bandwidth_Bps
        return z, n

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class MigrationParams:
    bandwidth_Bps: float = 100e9 / 8     # link speed, bytes per second
    downtime_limit_s: float = 0.3
    max_rounds: int = 30
    chunk_pages: int = 16384             # bitmap positions sent between two scheduler steps
    accept_stale_hints: bool = False     # fault: apply hints that arrive after a sync
    # Safety budget on simulated time for the whole migration (see the module docstring): one
    # hour. A pre-copy migration still running after an hour is one an operator cancels (QEMU
    # itself has no limit), and every simulated hour costs the simulator minutes of wall time
    # when the guest runs background workloads (measured: a 64 MiB guest churning 50 MiB/s
    # over a 150 kbit/s link, 2 h simulated = 453 s wall). vmsim refuses up front a scenario
    # whose first round alone exceeds the same hour (vmsim.scenario.MAX_FIRST_ROUND_S).
    time_budget_s: float = 3600.0
    #: ``bandwidth_Bps`` is QEMU's max-bandwidth throttle rather than the link: the migration
    #: thread sends until a window's byte budget is spent and then sleeps, so its CPU work
    #: overlaps the waiting and a batch costs the larger of its CPU time and its wire time
    #: (False: they add, as for the published runs, whose link was the limit).
    rate_limited: bool = False
    #: The VM's vCPU threads, and how many of them the guest's workloads keep busy (the host
    #: sees busy threads; with ``CostModel.host_cores`` they compete with the migration thread).
    vcpus: int = 1
    busy_vcpus: float = 0.0


@dataclass(slots=True)
class RoundRecord:
    index: int                 # 1-based; the stop-and-copy pass is the last one
    start_s: float
    end_s: float = 0.0
    pages_sent: int = 0
    zero_pages: int = 0
    pages_skipped_hint: int = 0
    dirty_at_sync: int = 0
    stop_and_copy: bool = False


@dataclass(slots=True)
class MigrationStats:
    rounds: int = 0
    pages_sent: int = 0
    zero_pages: int = 0
    pages_skipped_hint: int = 0
    bytes_sent: int = 0
    total_time_s: float = 0.0
    downtime_s: float = 0.0
    hint_rounds: int = 0
    hints_received: int = 0
    hinted_pages: int = 0
    stale_hints_dropped: int = 0
    stale_hints_applied: int = 0
    stale_pages_skipped: int = 0  # fault only: pages a stale hint took out of the round
    bad_hints: int = 0
    converged: bool = False
    timed_out: bool = False    # cancelled: it would not be over within params.time_budget_s


#: QEMU's precopy notifier: (event, whether the VM is running).
NotifyHook = Callable[[PrecopyEvent, bool], None]


class PrecopyMigration:
    """One pre-copy migration of one simulated VM; ``start()`` then drive the scheduler until
    ``done`` (or call ``run()``)."""

    def __init__(
        self,
        versions: PageVersions,
        dirty_log: DirtyLog,
        sched: Scheduler,
        params: MigrationParams | None = None,
        cost: CostModel | None = None,
        *,
        notify: NotifyHook | None = None,
        byte_regions: Sequence[tuple[int, memoryview]] = (),
        on_switchover: Callable[[PrecopyMigration], None] | None = None,
    ) -> None:
        """``notify(event, vm_running)`` is the precopy notifier (None: no hinting device).
        ``byte_regions`` lists (first_pfn, bytes) of byte-backed pages (the driver area): their
        content is compared byte for byte. ``on_switchover`` runs with the VM stopped, after the
        last page is sent (the caller verifies there)."""
        if dirty_log.ram_pages != versions.ram_pages:
            raise MigrationError("dirty log and page versions cover different RAM sizes")
        self.params = params or MigrationParams()
        if self.params.bandwidth_Bps <= 0 or self.params.chunk_pages <= 0:
            raise MigrationError("bandwidth and chunk size must be positive")
        if not self.params.time_budget_s > 0:  # also refuses nan
            raise MigrationError("the time budget must be positive")
        self.cost = cost or CostModel()
        self.versions = versions
        self.dirty_log = dirty_log
        self.sched = sched
        self.notify_hook = notify
        self.on_switchover = on_switchover
        self.ram_pages = versions.ram_pages
        self.to_send = np.zeros(self.ram_pages, dtype=np.bool_)
        self.dest_version = np.zeros(self.ram_pages, dtype=np.uint32)  # fresh RAM reads zero
        self._byte_regions: list[tuple[int, int, memoryview, np.ndarray]] = []
        for first_pfn, buf in byte_regions:
            mv = memoryview(buf).cast("B")
            npages = mv.nbytes >> PAGE_SHIFT
            if first_pfn < 0 or first_pfn + npages > self.ram_pages or mv.nbytes % PAGE_SIZE:
                raise MigrationError(f"byte region at pfn {first_pfn:#x} is not whole RAM pages")
            self._byte_regions.append((first_pfn, npages, mv, np.zeros(mv.nbytes, np.uint8)))
        self._zero_cost, self._normal_cost = self.cost.page_cost(self.params.bandwidth_Bps)
        self.stats = MigrationStats()
        self.rounds: list[RoundRecord] = []
        self.verify_result: VerifyResult | None = None
        self.error: str | None = None  # why the migration was cancelled (None: it completed)
        self.phase = "idle"  # idle, precopy, stopped (stop-and-copy), done, cancelled
        self.done = False
        self._cursor = 0
        self._round: RoundRecord | None = None
        # QEMU's migration_dirty_pages: set bits of to_send, kept up to date, not recounted
        self._dirty_pages = 0
        self._threshold_bytes = 0.0  # bandwidth x downtime limit; 0 until a window is over
        self._win_t0 = 0.0           # the current bandwidth window: start, bytes sent by then
        self._win_bytes0 = 0
        self._iter_t0 = 0.0          # when the current ram_save_iterate call began
        # QEMU's hint iothread polls the free page queue while a hint round runs (from the
        # round's start to the driver's STOP or the host's): one more busy host thread.
        self._polling = False
        self._t0 = 0.0
        self._accepting = False      # a hint round is open (between AFTER and BEFORE sync)
        self._cmd_ids_seen: set[int] = set()
        self._stopped_ids: set[int] = set()  # rounds the device reported over: later hints stale
        # hint batches waiting for the host's hint thread: (sync generation the batch arrived in
        # or -1 if its round was over by then, cmd_id, first pfns, page counts)
        self._queue: deque[tuple[int, int, np.ndarray, np.ndarray]] = deque()
        self._sync_gen = 0  # bumped by every bitmap sync: a hint from an older one is stale
        # QEMU's migration thread holds bitmap_mutex while it sends a batch of pages; hints wait.
        self._mutex_busy_until = 0.0
        self._hint_event: ScheduledEvent | None = None  # the hint thread's next run
        self._chunk_event: ScheduledEvent | None = None

    # -- the precopy notifier ------------------------------------------------------------------
    def _notify(self, event: PrecopyEvent, vm_running: bool) -> None:
        if self.notify_hook is not None:
            self.notify_hook(event, vm_running)

    # -- set-up --------------------------------------------------------------------------------
    def start(self) -> None:
        if self.phase != "idle":
            raise MigrationError("migration already started")
        self._t0 = self.sched.now
        self.phase = "precopy"
        self._notify(PrecopyEvent.SETUP, True)
        self.dirty_log.start()
        self.to_send[:] = True  # the bulk pass: every page is to send
        # ram_init_bitmaps() syncs once with the notifiers around it; logging only just started,
        # so the sync finds nothing, but AFTER_BITMAP_SYNC opens hint round 1 for the bulk pass.
        self._sync(vm_running=True)
        t = (self.sched.now + self.cost.setup_s + self.ram_pages * self.cost.log_start_page_s
             + self._sync_cost(0))
        self._win_t0 = t
        if self._begin_round(t):
            self._chunk_event = self.sched.at(t, self._iterate)

    def run(self, max_events: int | None = None) -> MigrationStats:
        """Start (if needed) and run the scheduler until the migration is over."""
        if self.phase == "idle":
            self.start()
        n = 0
        while not self.done:
            if not self.sched.run_next():
                raise MigrationError("scheduler ran dry before the migration finished")
            n += 1
            if max_events is not None and n >= max_events:
                raise MigrationError(f"migration not finished after {max_events} events")
        return self.stats

    # -- rounds ---------------------------------------------------------------------------------
    # QEMU's migration thread loops over migration_iteration_run() (migration/migration.c): it
    # compares what is left in the bitmap (migration_dirty_pages x page size, "pending") with
    # ``threshold_size`` = measured bandwidth x downtime limit; below it, it syncs the bitmap
    # (ram_state_pending_exact -> migration_bitmap_sync_precopy, with the precopy notifiers)
    # and compares again; still below (or nothing pending), it completes (stops the VM);
    # otherwise it runs one ram_save_iterate() call: send pages from where the last call
    # stopped, wrapping at the end of RAM, for at most MAX_WAIT (``iteration_s``) or until no
    # page is left. So a round here is the time between two syncs, and the switchover can
    # come in the middle of a pass: with hints, once the free memory is gone from the bitmap
    # the rest of the pass "fits" the threshold and is sent with the VM stopped.
    def _begin_round(self, t: float) -> bool:
        """Open the round (sync interval) that starts at ``t``; False if that is past the
        budget (the migration is then cancelled)."""
        if self._over_budget(t, f"round {len(self.rounds) + 1} would start"):
            return False
        self._round = RoundRecord(index=len(self.rounds) + 1, start_s=t - self._t0)
        self.rounds.append(self._round)
        return True

    def _update_counters(self, now: float) -> None:
        """QEMU's migration_update_counters: once a ``check_period_s`` (BUFFER_DELAY) window
        is over, the bytes it sent over its length give the bandwidth, and the threshold is
        that bandwidth x the downtime limit; then a new window starts. Until the first window
        is over the threshold is 0."""
        span = now - self._win_t0
        if span < self.cost.check_period_s or span <= 0:
            return
        bw = (self.stats.bytes_sent - self._win_bytes0) / span
        self._threshold_bytes = bw * self.params.downtime_limit_s
        self._win_t0 = now
        self._win_bytes0 = self.stats.bytes_sent

    def _iterate(self) -> None:
        """One turn of QEMU's migration loop: complete, or send for one more iteration."""
        self._chunk_event = None
        now = self.sched.now
        self._update_counters(now)
        rnd = self._round
        assert rnd is not None
        pending = self._dirty_pages * PAGE_SIZE
        t = now
        synced = False
        if pending < self._threshold_bytes:
            rnd.end_s = now - self._t0
            n_dirty = self._sync(vm_running=True)
            rnd.dirty_at_sync = n_dirty
            t += self._sync_cost(n_dirty)
            pending = self._dirty_pages * PAGE_SIZE
            synced = True
        converged = pending == 0 or pending < self._threshold_bytes
        if converged or len(self.rounds) >= self.params.max_rounds:
            self.stats.converged = converged
            if not synced:
                rnd.end_s = now - self._t0
            self.stats.rounds = len(self.rounds)
            if not self._over_budget(t, "the stop-and-copy would start"):
                self._chunk_event = self.sched.at(t, self._stop_and_copy)
            return
        if synced and not self._begin_round(t):
            return
        self._iter_t0 = t
        self._chunk_event = self.sched.at(t, self._send_chunk)

    def _send_chunk(self) -> None:
        """Send the set bits of the next ``chunk_pages`` positions from the cursor (wrapping at
        the end of RAM, as QEMU's page search does); after ``iteration_s`` of sending, or when
        no page is left, go back to the loop's check."""
        rnd = self._round
        assert rnd is not None
        # Between two batches the hint thread gets the mutex: queued hints land first.
        dt = self._drain_hints()
        lo = self._cursor
        hi = min(lo + self.params.chunk_pages, self.ram_pages)
        dt += self._send_range(lo, hi, rnd)
        self._mutex_busy_until = self.sched.now + dt
        self._cursor = 0 if hi >= self.ram_pages else hi
        if self._over_budget(self.sched.now + dt, f"round {rnd.index} would still be sending"):
            return
        end = self.sched.now + dt
        if self._dirty_pages == 0 or end - self._iter_t0 >= self.cost.iteration_s:
            self._chunk_event = self.sched.after(dt, self._iterate)
        else:
            self._chunk_event = self.sched.after(dt, self._send_chunk)

    def _send_range(self, lo: int, hi: int, rnd: RoundRecord) -> float:
        """Send every page still marked in ``to_send[lo:hi]``; return the simulated time it takes.
        The destination gets the content as of now; writes during the transfer are in the dirty
        log and go again next round. Works in pieces of ``SEND_PIECE`` pages, so a whole-RAM
        call (the stop-and-copy) makes no RAM-sized temporaries."""
        nz = nn = 0
        for a in range(lo, hi, SEND_PIECE):
            z, n = self._send_piece(a, min(hi, a + SEND_PIECE))
            nz += z
            nn += n
        if nz or nn:
            rnd.pages_sent += nz + nn
            rnd.zero_pages += nz
            self._dirty_pages -= nz + nn
            self.stats.pages_sent += nz + nn
            self.stats.zero_pages += nz
            self.stats.bytes_sent += nz * ZERO_PAGE_BYTES + nn * NORMAL_PAGE_BYTES
        return self._batch_cost(hi - lo, nz, nn)

    def _batch_cost(self, positions: int, nz: int, nn: int) -> float:
        """Time to walk ``positions`` bitmap bits and send ``nz`` zero and ``nn`` normal pages."""
        share = self.cpu_share()
        if not self.params.rate_limited:
            if share == 1.0:
                return (positions * self.cost.bitmap_bit_s + nz * self._zero_cost
                        + nn * self._normal_cost)
            cpu, wire = self._cpu_and_wire(positions, nz, nn)
            return cpu / share + wire
        cpu, wire = self._cpu_and_wire(positions, nz, nn)
        return max(cpu / share, wire)

    def _cpu_and_wire(self, positions: int, nz: int, nn: int) -> tuple[float, float]:
        cpu = (positions * self.cost.bitmap_bit_s + (nz + nn) * self.cost.zero_page_s
               + nn * self.cost.copy_page_s)
        wire = (nz * ZERO_PAGE_BYTES + nn * NORMAL_PAGE_BYTES) / self.params.bandwidth_Bps
        return cpu, wire

    def busy_threads(self) -> float:
        """Host threads busy besides the migration thread: the vCPUs the guest keeps busy
        (its workloads, plus the one running the balloon driver while a hint round runs) and
        QEMU's iothread polling the free page queue during the round. None with the VM
        stopped."""
        if self.phase != "precopy":
            return 0.0
        if not self._polling:
            return min(float(self.params.vcpus), self.params.busy_vcpus)
        return min(float(self.params.vcpus), self.params.busy_vcpus + 1.0) + 1.0

    def cpu_share(self) -> float:
        """The migration thread's share of a host CPU now (1: no contention)."""
        cores = self.cost.host_cores
        if cores <= 0:
            return 1.0
        return min(1.0, cores / (1.0 + self.busy_threads()))

    def _send_piece(self, lo: int, hi: int) -> tuple[int, int]:
        """Send the marked pages of ``to_send[lo:hi]``: (zero pages, normal pages)."""
        window = self.to_send[lo:hi]
        nset = int(np.count_nonzero(window))
        if nset == 0:
            return 0, 0
        pages_of = [(first, np.frombuffer(mv, np.uint8).reshape(npages, PAGE_SIZE),
                     dest.reshape(npages, PAGE_SIZE), first + npages)
                    for first, npages, mv, dest in self._byte_regions]
        if nset == hi - lo:
            # Every page marked (the bulk pass, a heavily written range): slices only.
            src = self.versions.version[lo:hi]
            self.dest_version[lo:hi] = src
            window[:] = False
            is_zero = src == ZERO
            for first, pages, dest_pages, end in pages_of:
                a, b = max(lo, first), min(hi, end)
                if a < b:
                    # Pages that are real bytes: copy them; their zero-ness is their bytes'.
                    chunk = pages[a - first:b - first]
                    dest_pages[a - first:b - first] = chunk
                    is_zero[a - lo:b - lo] = ~chunk.any(axis=1)
        else:
            pfns = np.flatnonzero(window) + lo
            window[pfns - lo] = False
            src = self.versions.version[pfns]
            self.dest_version[pfns] = src
            is_zero = src == ZERO
            for first, pages, dest_pages, end in pages_of:
                sel = (pfns >= first) & (pfns < end)
                if sel.any():
                    rel = pfns[sel] - first
                    chunk = pages[rel]
                    dest_pages[rel] = chunk
                    is_zero[sel] = ~chunk.any(axis=1)
        nz = int(np.count_nonzero(is_zero))
        return nz, nset - nz

    def _sync_cost(self, dirty: int) -> float:
        return self.ram_pages * self.cost.sync_page_s + dirty * self.cost.sync_dirty_page_s

    def _sync(self, vm_running: bool) -> int:
        """BEFORE_BITMAP_SYNC, merge the dirty log into ``to_send``, AFTER_BITMAP_SYNC. Returns
        the number of pages the dirty log held."""
        self._notify(PrecopyEvent.BEFORE_BITMAP_SYNC, vm_running)
        # protocol.md 4.4 rule 6: from here on nothing of the old round may touch the bitmap.
        self._accepting = False
        self._polling = False
        self._close_hint_queue()
        n = self.dirty_log.merge_into(self.to_send)  # no copy of the log
        self._dirty_pages = int(np.count_nonzero(self.to_send))
        self._sync_gen += 1
        if vm_running:
            self._accepting = True  # the device opens a new hint round in AFTER_BITMAP_SYNC
            self._polling = self.notify_hook is not None
        self._notify(PrecopyEvent.AFTER_BITMAP_SYNC, vm_running)
        if self.params.accept_stale_hints:
            self._apply_queue_now()  # the fault: what was queued lands on the new bitmap
        return n

    def _stop_and_copy(self) -> None:
        """The VM is stopped: no scheduler event runs until the switchover is over."""
        self.phase = "stopped"
        t_stop = self.sched.now
        rnd = RoundRecord(index=len(self.rounds) + 1, start_s=t_stop - self._t0,
                          stop_and_copy=True)
        self.rounds.append(rnd)
        n_dirty = self._sync(vm_running=False)  # the device publishes DONE (5.4)
        rnd.dirty_at_sync = n_dirty
        dt = self._sync_cost(n_dirty)
        dt += self._send_range(0, self.ram_pages, rnd)
        dt += self.cost.switchover_s
        rnd.end_s = rnd.start_s + dt
        self.stats.rounds = len(self.rounds)
        self.stats.hint_rounds = len(self._cmd_ids_seen)
        if self._over_budget(t_stop + dt, "the stop-and-copy would end"):
            return  # the source VM resumes; what was sent is thrown away
        self.stats.downtime_s = dt
        self.stats.total_time_s = (t_stop - self._t0) + dt
        self._notify(PrecopyEvent.COMPLETE, False)
        if self.on_switchover is not None:
            self.on_switchover(self)
        self._notify(PrecopyEvent.CLEANUP, False)
        self.phase = "done"
        self.done = True
        self.dirty_log.stop()
        self._cancel_hint_thread()

    # -- the time budget -----------------------------------------------------------------------
    def _over_budget(self, t: float, what: str) -> bool:
        """If a step ending at ``t`` overruns the budget, cancel the migration now; say so."""
        budget = self.params.time_budget_s
        if t - self._t0 <= budget:
            return False
        self.error = (f"did not converge within {budget:g} s simulated: {what} at "
                      f"{t - self._t0:.6g} s ({len(self.rounds)} round(s) begun, "
                      f"{self.stats.pages_sent} pages sent)")
        log.warning("migration cancelled: %s", self.error)
        self._cancel()
        return True

    def _cancel(self) -> None:
        """End the migration without switchover (QEMU's migrate_cancel): the VM runs on."""
        if self._chunk_event is not None:
            self.sched.cancel(self._chunk_event)
            self._chunk_event = None
        self._cancel_hint_thread()
        self._queue.clear()
        self._accepting = False
        if self.rounds and not self.rounds[-1].end_s:
            self.rounds[-1].end_s = self.sched.now - self._t0  # the round cut short
        self.stats.timed_out = True
        self.stats.converged = False
        self.stats.rounds = len(self.rounds)
        self.stats.hint_rounds = len(self._cmd_ids_seen)
        self.stats.total_time_s = self.sched.now - self._t0
        self.stats.downtime_s = 0.0
        # QEMU's notifier on cleanup after a cancel: the device publishes DONE so the guest
        # frees the pages its driver holds for hinting.
        self._notify(PrecopyEvent.CLEANUP, True)
        self.phase = "cancelled"
        self.done = True
        self.dirty_log.stop()

    # -- hints ---------------------------------------------------------------------------------
    def hint(self, cmd_id: int, ranges: Iterable[tuple[int, int]]) -> None:
        """Free page hints as ranges [(gpa, len)] under ``cmd_id``: the pages wholly inside
        each range (``hint_pages``). A range outside RAM, or empty, is a bad hint."""
        if self.phase in ("idle", "done", "cancelled"):
            return
        firsts: list[int] = []
        counts: list[int] = []
        received = bad = 0
        for gpa, length in ranges:
            received += 1
            if gpa < 0 or length <= 0 or gpa + length > self.ram_pages << PAGE_SHIFT:
                bad += 1
                log.warning("hint outside RAM: gpa=%#x len=%#x", gpa, length)
                continue
            first, count = whole_pages_in(gpa, length)
            firsts.append(first)
            counts.append(count)
        self.stats.hints_received += received
        self.stats.bad_hints += bad
        self._queue_hints(cmd_id, np.array(firsts, np.int64), np.array(counts, np.int64))

    def hint_pages(self, cmd_id: int, first_pfn: np.ndarray, count: np.ndarray) -> None:
        """The device's ``PagesHinted``: ``count[i]`` free pages from ``first_pfn[i]`` under
        ``cmd_id`` may be skipped in this round (QEMU ``qemu_guest_free_page_hint``). Hints
        reaching past RAM are bad hints."""
        if self.phase in ("idle", "done", "cancelled"):
            # No migration running: QEMU ignores hints then (5.5).
            return
        n = int(first_pfn.size)
        self.stats.hints_received += n
        bad = (first_pfn < 0) | (count < 0) | (first_pfn > self.ram_pages - count)
        if bad.any():
            k = int(np.argmax(bad))
            self.stats.bad_hints += int(np.count_nonzero(bad))
            log.warning("hint outside RAM: first pfn %#x, %#x pages (%d such hints)",
                        int(first_pfn[k]), int(count[k]), int(np.count_nonzero(bad)))
            first_pfn, count = first_pfn[~bad], count[~bad]
        self._queue_hints(cmd_id, first_pfn, count)

    def _queue_hints(self, cmd_id: int, first: np.ndarray, count: np.ndarray) -> None:
        """Queue one batch of hints for the hint thread (those with at least one page)."""
        keep = count > 0
        if not keep.all():
            first, count = first[keep], count[keep]
        if count.size:
            gen = -1 if cmd_id in self._stopped_ids else self._sync_gen
            self._queue.append((gen, cmd_id, first, count))
            self.stats.hinted_pages += int(count.sum())
        self._kick_hint_thread()

    def round_stopped(self, cmd_id: int) -> None:
        """The device reports hint round ``cmd_id`` over (``HintRoundStopped``): hints tagged
        with it that arrive from now on are stale. Those already queued stay valid until the
        next sync, as in QEMU, where a hint is applied when it arrives."""
        self._stopped_ids.add(cmd_id)
        # The round the device reports over is the one the last sync opened (the old one's
        # report comes inside the sync, before the new round starts): the iothread sleeps.
        self._polling = False

    def _kick_hint_thread(self) -> None:
        if self._hint_event is None and self._queue and self.phase == "precopy":
            count = int(self._queue[0][3][0])  # the thread starts with the first queued hint
            dt = self.cost.host_hint_s + count * self.cost.host_hint_page_s
            start = max(self.sched.now + dt, self._mutex_busy_until)
            self._hint_event = self.sched.at(start, self._hint_thread)

    def _hint_thread(self) -> None:
        """The host's hint thread takes ``bitmap_mutex`` and applies what is queued. While the
        migration thread holds the mutex (a chunk is being sent) it waits for the chunk's end."""
        self._hint_event = None
        if self.sched.now < self._mutex_busy_until:
            self._hint_event = self.sched.at(self._mutex_busy_until, self._hint_thread)
            return
        self._drain_hints()

    def _drain_hints(self) -> float:
        """Apply every queued hint; return the host time that took."""
        dt = 0.0
        while self._queue:
            gen, cmd_id, first, count = self._queue.popleft()
            # Each hint costs host_hint_s + its pages; summed in order, as one hint at a time
            # would (np.add.accumulate adds left to right, like a loop).
            per = self.cost.host_hint_s + count * self.cost.host_hint_page_s
            dt = float(np.add.accumulate(np.concatenate(([dt], per)))[-1])
            self._apply(gen, cmd_id, first, count)
        self._cancel_hint_thread()  # nothing left for it to do
        return dt

    def _cancel_hint_thread(self) -> None:
        if self._hint_event is not None:
            self.sched.cancel(self._hint_event)
            self._hint_event = None

    def _apply(self, gen: int, cmd_id: int, first: np.ndarray, count: np.ndarray) -> None:
        """Apply one batch of hints (``gen``: the sync generation it arrived in, -1 if its
        round had already been reported stopped then)."""
        n = int(count.size)
        stale = not (self._accepting and gen == self._sync_gen)
        if stale and not self.params.accept_stale_hints:
            self.stats.stale_hints_dropped += n
            return
        if stale:
            self.stats.stale_hints_applied += n
        self._cmd_ids_seen.add(cmd_id)
        # 4.4 rule 5 / 5.7: only "to send in this round" is cleared, never the dirty log.
        cleared = clear_pages(self.to_send, first, count)
        if cleared:
            self._dirty_pages -= cleared
            self.stats.pages_skipped_hint += cleared
            if stale:
                self.stats.stale_pages_skipped += cleared
            if self._round is not None:
                self._round.pages_skipped_hint += cleared

    def _close_hint_queue(self) -> None:
        """A sync is about to happen: hints of the ending round still waiting are stale."""
        if self.params.accept_stale_hints:
            return
        self.stats.stale_hints_dropped += sum(int(b[3].size) for b in self._queue)
        self._queue.clear()
        self._cancel_hint_thread()

    def _apply_queue_now(self) -> None:
        # Only under the accept-stale-hints fault: the queued hints of the old round land on the
        # bitmap the sync just built.
        while self._queue:
            self._apply(*self._queue.popleft())

    # -- verification --------------------------------------------------------------------------
    def verify(self, in_use: np.ndarray, held: np.ndarray | None = None, *,
               page_poison: bool = False, poison_version: int = POISON) -> VerifyResult:
        """Check the destination against the source at switchover; see ``verify_pages``."""
        res = verify_pages(self.versions.version, self.dest_version, in_use, held,
                           page_poison=page_poison, poison_version=poison_version,
                           byte_regions=self._byte_regions)
        self.verify_result = res
        return res

    @property
    def progress(self) -> tuple[int, float]:
        """(round number, fraction of this round's bitmap walked), for progress displays."""
        return len(self.rounds), self._cursor / self.ram_pages if self.ram_pages else 1.0

    def round_series(self) -> list[int]:
        return [r.pages_sent for r in self.rounds]


#: Runs of adjacent blocks are cleared as slices when there are at most one run per this many
#: blocks; more scattered blocks go as rows of a view (one gather and one scatter).
_BLOCKS_PER_SLICE = 8


def clear_pages(bits: np.ndarray, first: np.ndarray, count: np.ndarray) -> int:
    """Clear ``bits[first[i]:first[i] + count[i]]`` for every i; return how many bits were set
    before (each page counted once, however many ranges cover it).

    Linux hints blocks of one order, aligned to their size: rows of a (blocks, size) view of
    ``bits`` (``_clear_blocks``). A guest hinting a large free memory hands them out in
    free-list order, which after boot is address order, so a batch is mostly a few runs of
    adjacent blocks (the simulated guest's batches: about 16 hints per run), each cleared with
    one count and one fill over a slice; scattered blocks go as one gather and one scatter.
    Ranges of any other shape are sorted and merged into disjoint runs, cleared as slices."""
    n = int(count.size)
    if n == 0:
        return 0
    c = int(count[0])
    if c > 0 and c & (c - 1) == 0 and (count == c).all() and not (first & (c - 1)).any():
        return _clear_blocks(bits, first // c, c)
    if n > 1 and not (first[1:] >= first[:-1]).all():
        order = np.argsort(first, kind="stable")
        first, count = first[order], count[order]
    # A range extends the run before it when it starts at or before the furthest end so far
    # (overlapping or adjacent); the furthest end at a run's last range is the run's end.
    reach = np.maximum.accumulate(first + count)
    new = np.empty(n, np.bool_)
    new[0] = True
    np.greater(first[1:], reach[:-1], out=new[1:])
    idx = np.flatnonzero(new)
    ends = np.append(reach[idx[1:] - 1], reach[-1])
    return _clear_slices(bits, first[idx].tolist(), ends.tolist())


def _clear_blocks(bits: np.ndarray, rows: np.ndarray, size: int) -> int:
    """Clear rows ``rows`` of ``bits`` seen as (blocks, size); the bits that were set."""
    if rows.size > 1 and not (rows[1:] > rows[:-1]).all():
        rows = np.sort(rows)
        rows = rows[np.append(True, rows[1:] != rows[:-1])]  # a page covered twice counts once
    # runs of adjacent rows: a new run wherever a row does not follow the one before it
    brk = np.flatnonzero(rows[1:] != rows[:-1] + 1)
    if not brk.size:  # one run (a batch of adjacent blocks, the common case)
        return _clear_slices(bits, [int(rows[0]) * size], [(int(rows[-1]) + 1) * size])
    if (brk.size + 1) * _BLOCKS_PER_SLICE <= rows.size:
        starts = rows[np.append(0, brk + 1)] * size
        ends = (rows[np.append(brk, rows.size - 1)] + 1) * size
        return _clear_slices(bits, starts.tolist(), ends.tolist())
    blocks = bits[:bits.size - bits.size % size].reshape(-1, size)
    k = int(np.count_nonzero(blocks[rows]))
    if k:
        blocks[rows] = False
    return k


def _clear_slices(bits: np.ndarray, starts: list[int], ends: list[int]) -> int:
    """Clear ``bits[starts[i]:ends[i]]`` (disjoint); the bits that were set."""
    cleared = 0
    for a, b in zip(starts, ends, strict=True):
        window = bits[a:b]
        k = int(np.count_nonzero(window))
        if k:
            window[:] = False
            cleared += k
    return cleared
