"""A scenario's migration with two real QEMUs as the host: ``run_qemu_scenario``.

Theory of operation
-------------------
The guest is the simulator's own guest model (``guest_model.SimGuest``: Linux's allocator, our
balloon driver, the scenario's workloads); the host is QEMU. The source QEMU runs under qtest
with QEMU's own ``virtio-balloon-pci`` (``QemuBalloon``: free-page-hint on in modes walk and
capture, off in mode off, as the simulator's mode off is QEMU without the feature); our driver
reaches it through ``QtestVirtioPci``. The destination is a second qtest QEMU with the same
machine, started with ``-incoming defer``. The migration is QEMU's own: ``migrate`` over a unix
socket with ``max-bandwidth`` and ``downtime-limit`` from the scenario, ``pause-before-switchover``
and migration events on.

*Page contents.* The model keeps one version per page (``guestmem.PageVersions``); a page of
QEMU's RAM holds its version as a 16-byte header at its start (``MAGIC``, version, pfn; the
rest of the page stays zero), and a page of version ``ZERO`` is all zero, so QEMU sends zero
pages and data pages as the model means them (a normal page costs 4 KiB on the wire whatever
its bytes). The set-up phases run as fast as the model can (nothing watches the clock before
the migration), then every page is written once through the shared mapping. From the
migration's start the model runs in wall-clock time (``guestmem.clock.RealTime``) and every page
it writes is written again through qtest (one 16-byte ``write`` per page, pipelined; a run of
pages becoming zero is one ``memset``), so QEMU's dirty log sees it; the driver's rings are
written through the mapping and rewritten through qtest by ``WriteThrough``. Interrupts are
MSI-X mailboxes polled by the loop.

*Switchover.* When QEMU reaches ``pre-switchover`` (VM stopped; its last bitmap sync and RAM
pass come after the pause, so what is flushed in the pause is sent) the loop stops the
workloads, flushes the writes the model made before it noticed, takes the masks the verifier
needs (pages in use, pages the driver holds) and lets QEMU finish
(``migrate-continue``). QEMU's downtime and total time then include that pause; the report
gives them as QEMU says and also without the pause (from the timestamps of QEMU's own
MIGRATION events).

*QEMU's hint thread in the pause.* QEMU pauses after it stopped the VM and *before* its last
dirty-bitmap sync and RAM pass (migration.c ``migration_completion_precopy``: the VM stop,
then the pause, then ``qemu_savevm_state_complete_precopy``). Its free-page-hint iothread is
not stopped with the VM: a turn of its polling loop (virtio-balloon.c
``virtio_ballloon_get_free_page_hints``) that was under way finishes, and when the hint state
is no longer START the loop ends by re-enabling notifications, which with EVENT_IDX stores
``avail_event`` (= the avail index) into the free page queue's used ring, in guest RAM.
Only then does the thread sleep: blocked at its next turn (``block_iothread``, set under the
same lock when the VM stopped) or idle. On a loaded host that store could come after the last
RAM pass: the source page changed after it was sent and the check saw one driver-area page
differ (2 bytes QEMU owns, not a lost guest write). So before ``migrate-continue`` the pause
waits until that thread is seen asleep (``wait_thread_asleep``: Linux's scheduler state and
context-switch counts of the thread QMP ``query-iothreads`` names); nothing wakes it again
before the check (the guest is stopped, so nothing kicks the queue). ``hint_thread`` says how
the wait ended and ``hint_thread_wait_ms`` how long it took.

*max_rounds.* QEMU has no round limit. The simulator switches over after ``max_rounds`` rounds
whatever is left; here, once QEMU's ``dirty-sync-count`` reaches ``max_rounds + 1`` (the set-up
sync plus one per round), ``downtime-limit`` is raised to QEMU's largest, so QEMU switches over
at its next check (``converged`` false, as in the simulator).

*Verification* (the simulator's rule, ``balloon_dev.host.precopy.verify_pages``): at completion
the headers of both RAM files are decoded into versions; every page the guest has in use and
the driver does not hold must match, the driver area byte for byte; with page poisoning, free
pages must hold the poison version on the destination. The source file is also checked
against the model (``source_mismatches``: a page whose write did not reach QEMU; 0 unless this
harness is broken).

*Memory layout.* q35 puts RAM above 0xB0000000 (or 2 GiB for bigger machines) at 4 GiB: for
such a guest the model's RAM spans ``[0, 4 GiB + rest)`` with the gap reserved, so model pfns
are guest-physical addresses. The legacy window ``[0xA0000, 0x100000)`` (qtest writes do not
reach RAM there) is reserved too and left out of every check.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from balloon_dev.host.precopy import verify_pages
from guest_model.buddy import PG_ALLOC, BuddyAllocator
from guest_model.guest import GuestOptions, SimGuest
from guest_model.workloads import Idle, Workload
from guestmem import POISON, ZERO, DirtyLog, PageVersions
from guestmem.clock import RealTime, Scheduler
from guestmem.units import PAGE_SHIFT, PAGE_SIZE
from protocol.errors import EnvironmentFailure, UsageError
from vmsim.qtest.balloon import MAX_DOWNTIME_MS, BalloonDeviceOptions, QemuBalloon
from vmsim.qtest.machine import (
    FOUR_GIB,
    LEGACY_HOLE,
    RESERVED_BYTES,
    QmpError,
    QtestMachine,
    WriteThrough,
    q35_ram_ranges,
)
from vmsim.qtest.qemu import QemuBinary, find_qemu
from vmsim.scenario import HINT_MODES, Scenario, format_size

log = logging.getLogger(__name__)

#: Page header: le32 MAGIC, le32 version, le64 pfn ("BHv1").
MAGIC = 0x31764842
HEADER = np.dtype([("magic", "<u4"), ("version", "<u4"), ("pfn", "<u8")])
#: A page whose header is neither a valid one nor all zero decodes to this (never a version:
#: PageVersions wraps below it).
BAD_VERSION = 0xFFFFFFFF
DRIVER_AREA_GPA = 0x100000
DRIVER_AREA_SIZE = 4 << 20
#: Largest guest ``--host qemu`` runs (two RAM files live in tmpfs).
MAX_QEMU_RAM = 4 << 30
#: Guests larger than this are scaled down to it unless ``ram_bytes`` is given: a bigger one
#: takes minutes on a shared machine (the migration itself runs at QEMU's real speed).
DEFAULT_MAX_RAM = 2 << 30
#: Faults of this host: ``hint-in-use`` makes the driver hint a run of pages the guest uses
#: (a broken driver: the destination check must catch it).
QEMU_FAULTS = ("hint-in-use",)
#: The loop's pause when nothing is due (s), and how often it asks QEMU for its status.
_IDLE_S = 0.001
_QUERY_EVERY_S = 0.02
#: Work per turn of the loop (model events and wall time, pages written through qtest): a model
#: that falls behind catches up over several turns, so QEMU's pre-switchover is noticed soon
#: (the pause counts in QEMU's downtime; the comparison takes it out). Measured here under
#: load: a churn event of small-churn takes up to ~10 ms, a qtest page write 12-170 us.
_EVENTS_PER_TURN = 64
_PAGES_PER_TURN = 1024
_MODEL_S_PER_TURN = 0.01
_WINDOW_PAGES = 4096  # pages written per qtest pipeline
_ZERO_RUN_PAGES = 1024  # most pages one qtest memset zeroes (QEMU allocates its size)
#: The pause's wait for QEMU's hint iothread to sleep: the thread must be seen asleep, not
#: having run, across ``_ASLEEP_QUIET_S``; at most ``_ASLEEP_TIMEOUT_S`` (a thread that needs
#: longer is starved by the host: the run goes on and says so in ``hint_thread``).
_ASLEEP_QUIET_S = 0.005
_ASLEEP_TIMEOUT_S = 5.0

Progress = Callable[[float, str], None]


# -- scaling ------------------------------------------------------------------------------------
_SCALED_KEYS = ("size", "footprint", "rate", "working_set")


def scale_scenario(scn: Scenario, ram_bytes: int) -> tuple[Scenario, float]:
    """The scenario with its guest RAM set to ``ram_bytes`` (a multiple of 2 MiB) and every
    workload size and rate scaled by the same factor (so free, used and dirtied fractions of
    RAM stay as they were); the link, downtime limit and rounds are kept. Returns (scenario,
    factor); factor 1 leaves it unchanged."""
    if ram_bytes <= 0 or ram_bytes % (2 << 20):
        raise UsageError(f"--ram {format_size(ram_bytes)}: must be a positive multiple of 2 MiB")
    f = ram_bytes / scn.guest.ram_bytes
    if ram_bytes == scn.guest.ram_bytes:
        return scn, 1.0
    wl = []
    for w in scn.workloads:
        p = dict(w.params)
        for k in _SCALED_KEYS:
            if isinstance(p.get(k), (int, float)):
                v = p[k] * f
                p[k] = int(v) // PAGE_SIZE * PAGE_SIZE if k != "rate" else v
        wl.append(replace(w, params=p))
    g = scn.guest
    guest = replace(g, ram_bytes=ram_bytes,
                    boot_free_dirty=None if g.boot_free_dirty is None
                    else int(g.boot_free_dirty * f) // PAGE_SIZE * PAGE_SIZE)
    return replace(scn, guest=guest, workloads=tuple(wl)), f


def qemu_ram_for(scn: Scenario, ram_bytes: int | None) -> tuple[int, str | None]:
    """The guest RAM to run ``scn`` with under QEMU, and a sentence when it is scaled."""
    want = scn.guest.ram_bytes
    if ram_bytes is not None:
        if ram_bytes > MAX_QEMU_RAM:
            raise UsageError(f"--ram {format_size(ram_bytes)}: --host qemu runs guests up to "
                             f"{format_size(MAX_QEMU_RAM)} (two RAM files in tmpfs)")
        if ram_bytes != want:
            return ram_bytes, (f"RAM scaled from {format_size(want)} to "
                               f"{format_size(ram_bytes)} (--ram); workload sizes and rates "
                               "scaled by the same factor")
        return want, None
    if want > DEFAULT_MAX_RAM:
        return DEFAULT_MAX_RAM, (f"RAM scaled from {format_size(want)} to "
                                 f"{format_size(DEFAULT_MAX_RAM)} for QEMU under qtest (the "
                                 "model's writes go through qtest, and both QEMUs' RAM is in "
                                 "tmpfs); workload sizes and rates scaled by the same factor; "
                                 f"--ram up to {format_size(MAX_QEMU_RAM)} to change it")
    return want, None


# -- layout -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Model pfns (= guest-physical page numbers) against RAM file pages."""

    ram_bytes: int
    model_bytes: int                            # the model's RAM span, holes included
    pieces: tuple[tuple[int, int, int], ...]    # (first pfn, first file page, pages)
    holes: tuple[tuple[int, int], ...]          # (gpa, size) reserved, never checked

    @classmethod
    def for_ram(cls, ram_bytes: int) -> Layout:
        pieces = []
        for gpa, off, size in q35_ram_ranges(ram_bytes + RESERVED_BYTES):
            size = min(size, max(0, ram_bytes - off))
            if size:
                pieces.append((gpa >> PAGE_SHIFT, off >> PAGE_SHIFT, size >> PAGE_SHIFT))
        holes = [(LEGACY_HOLE[0], LEGACY_HOLE[1] - LEGACY_HOLE[0])]
        end = (pieces[-1][0] + pieces[-1][2]) << PAGE_SHIFT
        if len(pieces) > 1:
            low_end = (pieces[0][0] + pieces[0][2]) << PAGE_SHIFT
            holes.append((low_end, FOUR_GIB - low_end))
        return cls(ram_bytes, end, tuple(pieces), tuple(holes))

    @property
    def model_pages(self) -> int:
        return self.model_bytes >> PAGE_SHIFT

    def hole_mask(self) -> np.ndarray:
        m = np.zeros(self.model_pages, np.bool_)
        for gpa, size in self.holes:
            m[gpa >> PAGE_SHIFT:(gpa + size) >> PAGE_SHIFT] = True
        return m


def _file_pages(machine: QtestMachine) -> np.ndarray:
    """The machine's whole RAM file as (pages, 4096) bytes (a view of the shared mapping)."""
    ram = machine._ram  # noqa: SLF001 (the machine's own mapping; nothing is copied)
    if ram is None:
        raise EnvironmentFailure("the QEMU's RAM is no longer mapped")
    return np.frombuffer(ram, np.uint8).reshape(-1, PAGE_SIZE)


def decode_versions(machine: QtestMachine, layout: Layout) -> np.ndarray:
    """Each model page's version as the machine's RAM file holds it (``BAD_VERSION`` when the
    page holds something this harness never writes: a header for another pfn, or garbage)."""
    pages = _file_pages(machine)
    out = np.zeros(layout.model_pages, np.uint32)
    for pfn0, fpage0, n in layout.pieces:
        raw = np.ascontiguousarray(pages[fpage0:fpage0 + n, :HEADER.itemsize])
        h = raw.view(HEADER).reshape(n)
        ok = (h["magic"] == MAGIC) & (h["pfn"] == np.arange(pfn0, pfn0 + n, dtype=np.uint64))
        zero = ~raw.any(axis=1)
        out[pfn0:pfn0 + n] = np.where(ok, h["version"], np.where(zero, 0, BAD_VERSION))
    return out


def _headers(pfns: np.ndarray, versions: np.ndarray) -> np.ndarray:
    h = np.zeros(pfns.size, HEADER)
    data = versions != 0
    h["magic"][data] = MAGIC
    h["version"] = versions
    h["pfn"][data] = pfns[data]
    return h


def write_pages_mapped(machine: QtestMachine, layout: Layout, pfns: np.ndarray,
                       versions: np.ndarray) -> None:
    """Write headers through the shared mapping (not dirty-logged: before a migration only)."""
    pages = _file_pages(machine)
    h = _headers(pfns, versions).view(np.uint8).reshape(-1, HEADER.itemsize)
    for pfn0, fpage0, n in layout.pieces:
        sel = (pfns >= pfn0) & (pfns < pfn0 + n)
        if sel.any():
            pages[pfns[sel] - pfn0 + fpage0, :HEADER.itemsize] = h[sel]


def write_pages_qtest(machine: QtestMachine, pfns: np.ndarray, versions: np.ndarray) -> None:
    """Write headers through qtest (dirty-logged by QEMU): one 16-byte write per page, except
    that a run of consecutive pages (``pfns`` unique) becoming zero is one ``memset`` of at most
    ``_ZERO_RUN_PAGES``. The rest of a page is zero already, so QEMU's RAM ends the same; but a
    guest zeroing many pages at once (init_on_alloc=1 when the driver takes the free pages to
    hint) reached QEMU 0.2-0.3 s late with one command per page, stretching QEMU's rounds."""
    if not pfns.size:
        return
    zero = versions == ZERO
    zp = np.sort(pfns[zero])
    cmds: list[str] = []
    if zp.size:
        # starts of runs: a gap before the page, or a run already _ZERO_RUN_PAGES long
        new_run = np.concatenate(([True], np.diff(zp) != 1))
        run_id = np.cumsum(new_run) - 1
        first = np.flatnonzero(new_run)
        new_run |= (np.arange(zp.size) - first[run_id]) % _ZERO_RUN_PAGES == 0
        starts = np.flatnonzero(new_run)
        lens = np.diff(np.concatenate((starts, [zp.size])))
        cmds += [f"memset {a << PAGE_SHIFT:#x} {n << PAGE_SHIFT:#x} 0x0"
                 for a, n in zip(zp[starts].tolist(), lens.tolist(), strict=True)]
    dp = pfns[~zero]
    hexes = _headers(dp, versions[~zero]).tobytes().hex()
    w = 2 * HEADER.itemsize
    cmds += [f"write {p << PAGE_SHIFT:#x} {HEADER.itemsize:#x} 0x{hexes[i * w:(i + 1) * w]}"
             for i, p in enumerate(dp.tolist())]
    for a in range(0, len(cmds), _WINDOW_PAGES):
        machine.qt.pipeline(cmds[a:a + _WINDOW_PAGES])


def byte_mismatches(src: np.ndarray, dst: np.ndarray, base_gpa: int, pfns: list[int],
                    limit: int = 8) -> list[int]:
    """Guest-physical addresses of the first ``limit`` bytes that differ between ``src`` and
    ``dst`` (the same region, starting at ``base_gpa``) within pages ``pfns``."""
    out: list[int] = []
    for pfn in sorted(pfns):
        o = (pfn << PAGE_SHIFT) - base_gpa
        out.extend((np.flatnonzero(src[o:o + PAGE_SIZE] != dst[o:o + PAGE_SIZE]) + base_gpa + o)
                   .tolist())
        if len(out) >= limit:
            break
    return out[:limit]


# -- QEMU's threads ---------------------------------------------------------------------------
def thread_sched(tid: int) -> tuple[str, int] | None:
    """Linux thread ``tid``'s scheduler state letter (``R`` running or runnable, ``S`` asleep,
    ...) and how many times it was switched out so far; None once the thread is gone."""
    try:
        with open(f"/proc/{tid}/status", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    state, switches = "", 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "State":
            state = value.strip()[:1]
        elif key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            switches += int(value)
    return state, switches


def wait_thread_asleep(tid: int, timeout: float = _ASLEEP_TIMEOUT_S, *,
                       quiet_s: float = _ASLEEP_QUIET_S,
                       sched: Callable[[int], tuple[str, int] | None] = thread_sched,
                       ) -> tuple[str, float]:
    """Wait until thread ``tid`` is asleep and stays so, without running, for ``quiet_s``:
    ``S`` at both ends and no context switch in between (a thread woken in between is switched
    out again when it sleeps, so the count moves). Returns (outcome, seconds waited): outcome
    ``asleep``, ``busy`` (not seen so within ``timeout``) or ``gone`` (no such thread)."""
    t0 = time.monotonic()
    prev = sched(tid)
    while prev is not None:
        time.sleep(quiet_s)
        cur = sched(tid)
        if cur is None:
            break
        if prev[0] == "S" and cur[0] == "S" and cur[1] == prev[1]:
            return "asleep", time.monotonic() - t0
        if time.monotonic() - t0 >= timeout:
            return "busy", time.monotonic() - t0
        prev = cur
    return "gone", time.monotonic() - t0


# -- results ------------------------------------------------------------------------------------
@dataclass
class QemuRunResult:
    """One mode of a scenario migrated by real QEMU (docs/interfaces.md, "--host qemu")."""

    scenario: str
    mode: str
    seed: int
    guest_ram_bytes: int
    qemu: str                         # QEMU's version string
    verified: bool = False
    error: str | None = None
    mismatched_pages: int = 0
    poison_violations: int = 0
    poison_violations_from_hints: int = 0  # on pages the walk hinted (the seed's known loss)
    checked_pages: int = 0
    first_mismatches: list[int] = field(default_factory=list)
    source_mismatches: int = 0        # source file vs the model (harness self-check)
    # QEMU's query-migrate at completion
    transferred_bytes: int = 0
    normal_pages: int = 0
    zero_pages: int = 0
    total_time_ms: int = 0
    downtime_ms: int = 0
    setup_time_ms: int = 0
    dirty_sync_count: int = 0
    downtime_bytes: int = 0           # sent with the VM stopped (QEMU's downtime-bytes)
    pause_ms: float = 0.0             # our pause before switchover (QEMU's event to continue),
                                      # inside QEMU's downtime and total time
    #: How the pause's wait for QEMU's free-page-hint iothread ended: "asleep" (seen asleep,
    #: so it stores nothing more into the used ring after the last RAM pass), "busy" (not
    #: within the bound: a late store may make the check fail), "none" (no hint thread: mode
    #: off, or QEMU names none)
    hint_thread: str = "none"
    hint_thread_wait_ms: float = 0.0  # inside pause_ms
    #: With a mismatch in the driver area: guest-physical addresses of its first differing
    #: bytes (for diagnosis)
    first_byte_mismatches: list[int] = field(default_factory=list)
    #: From QEMU's event timestamps: VM stop -> pre-switchover, migrate-continue -> completed
    downtime_parts: dict[str, float] = field(default_factory=dict)
    forced_switchover: bool = False   # max_rounds reached: downtime-limit raised
    query_migrate: dict[str, Any] = field(default_factory=dict)
    # the guest model
    pages_written: int = 0            # page writes through qtest during the migration
    write_lag_s: float = 0.0          # how far the model fell behind the wall clock
    hints_sent: int = 0
    hinted_pages: int = 0
    hint_rounds: int = 0
    guest_in_use_pages: int = 0
    guest_held_pages: int = 0
    wall_s: float = 0.0

    @property
    def total_time_s(self) -> float:
        return self.total_time_ms / 1e3

    @property
    def downtime_s(self) -> float:
        return self.downtime_ms / 1e3

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the run ------------------------------------------------------------------------------------
class _Run:
    def __init__(self, scn: Scenario, mode: str, seed: int, qemu: QemuBinary,
                 fault: str | None, timeout: float, progress: Progress | None) -> None:
        self.scn, self.mode, self.seed, self.q = scn, mode, seed, qemu
        self.fault, self.timeout, self.progress = fault, timeout, progress
        g = scn.guest
        self.layout = Layout.for_ram(g.ram_bytes)
        self.res = QemuRunResult(scenario=scn.name, mode=mode, seed=seed,
                                 guest_ram_bytes=g.ram_bytes, qemu=qemu.check())
        self.dev = BalloonDeviceOptions(free_page_hint=mode != "off",
                                        page_poison=g.page_poison)

    # -- machines ---------------------------------------------------------------------------
    def start(self) -> None:
        g = self.scn.guest
        self.src = QemuBalloon(self.q, ram_bytes=g.ram_bytes, device=self.dev, ballast_bytes=0)
        self.dst = QtestMachine(self.q, ram_bytes=g.ram_bytes, reserved_bytes=RESERVED_BYTES,
                                objects=["iothread,id=io0"],  # as QemuBalloon's
                                devices=[self.dev.device_arg()], incoming="defer",
                                # paused after the migration: a destination that ran would
                                # move on (its device uses the hints still queued) before the
                                # check compares it with the source at switchover
                                extra_args=["-S"])
        m = self.src.machine
        #: QEMU's free-page-hint iothread (Linux thread id), waited for in the pause
        self._hint_tid = None
        if self.dev.free_page_hint:
            tids = [t.get("thread-id") for t in m.qmp("query-iothreads") if t.get("id") == "io0"]
            self._hint_tid = tids[0] if tids and isinstance(tids[0], int) else None
        self.wt = WriteThrough(m)
        self.src.mem.dirty_log = self.wt  # type: ignore[assignment]
        lay = self.layout
        self.sched = Scheduler()
        self.dirty = DirtyLog(lay.model_pages)
        self.pages = PageVersions(lay.model_pages, self.dirty)
        #: pages written by the model, not yet through qtest (the driver area is bytes:
        #: ``WriteThrough`` rewrites it, so it is never pending)
        self._pending = np.zeros(lay.model_pages, np.bool_)
        self._area = (DRIVER_AREA_GPA >> PAGE_SHIFT,
                      (DRIVER_AREA_GPA + DRIVER_AREA_SIZE) >> PAGE_SHIFT)
        reserved = [(DRIVER_AREA_GPA, DRIVER_AREA_SIZE), *lay.holes]
        alloc = BuddyAllocator(lay.model_bytes, pages=self.pages, reserved=reserved, seed=self.seed,
                               init_on_alloc=g.init_on_alloc, init_on_free=g.init_on_free,
                               page_poisoning=g.page_poison, nr_cpus=g.vcpus)
        h = self.scn.hinting
        driver: dict[str, float] = {}
        for key, value in (("hint_cost_per_block", h.block_cost_s),
                           ("hint_alloc_cost", h.alloc_cost_s), ("hint_post_cost", h.post_cost_s),
                           ("hint_walk_cost", h.walk_cost_s),
                           ("memory_bandwidth", h.memory_bandwidth_Bps)):
            if value is not None:
                driver[key] = value
        driver["cpu_share"] = min(1.0, g.vcpus / (g.runnable + 1))
        self.guest = SimGuest(self.src.mem, self.pages, self.sched, self.src.transport,
                              GuestOptions(ram_bytes=lay.model_bytes, seed=self.seed,
                                           init_on_alloc=g.init_on_alloc,
                                           init_on_free=g.init_on_free,
                                           page_poisoning=g.page_poison, hint_strategy=self.mode,
                                           min_order=h.min_order,
                                           driver_area=(DRIVER_AREA_GPA, DRIVER_AREA_SIZE),
                                           nr_cpus=g.vcpus, driver=driver),
                              allocator=alloc)
        self._pump(0.01)
        if self.guest.driver.failed:
            raise EnvironmentFailure(f"our balloon driver failed against QEMU's device: "
                                     f"{self.guest.driver.failed}")

    def close(self) -> None:
        for m in (getattr(self, "src", None), getattr(self, "dst", None)):
            if m is not None:
                m.close()

    def _pump(self, seconds: float) -> None:
        """Simulated time (set-up phases): interrupts in, events run, nothing real-time."""
        end = self.sched.now + seconds
        while True:
            self.src.transport.poll_interrupts()
            nt = self.sched.peek_time()
            if nt is None or nt > end:
                break
            self.sched.run_next()
        self.sched.run_until(end)

    # -- phases -----------------------------------------------------------------------------
    def prepare(self) -> None:
        from vmsim.vm import BOOT_FREE_DIRTY_BYTES, boot_footprint, boot_free_dirty
        g = self.scn.guest
        alloc = self.guest.allocator
        boot_footprint(alloc, self.pages, g.ram_bytes, g.boot_footprint)
        boot_free_dirty(alloc, self.pages,
                        BOOT_FREE_DIRTY_BYTES if g.boot_free_dirty is None else g.boot_free_dirty)
        for w in self.scn.setup_workloads:
            phase = self.guest.add_workload(w.kind, **w.params)
            self._pump(phase.duration if isinstance(phase, Idle) else 0.001)
        # Everything the set-up wrote, into QEMU's RAM through the mapping (no migration yet).
        pfns = np.flatnonzero(self.pages.version).astype(np.int64)
        write_pages_mapped(self.src.machine, self.layout, pfns, self.pages.version[pfns])
        self.wt.flush()

    def _start_background(self) -> list[Workload]:
        from vmsim.vm import CHURN_LIFETIME_S, TICK_S, churn_tick
        out = []
        for w in self.scn.during_workloads:
            p = dict(w.params)
            if w.kind == "churn":
                p.setdefault("lifetime", CHURN_LIFETIME_S)
                out.append(self.guest.add_workload("churn", background=True,
                                                   tick=churn_tick(p["lifetime"]), **p))
            elif w.kind == "dirty":
                out.append(self.guest.add_workload("dirty", background=True, existing=True,
                                                   tick=TICK_S, **p))
            else:
                raise UsageError(f"workload kind {w.kind!r} cannot run during migration")
        return out

    def _install_fault(self) -> None:
        """``hint-in-use``: the first batch of every round also hints the pages the guest uses
        and holds data in, as runs of up to 1024 pages, highest first (QEMU's pass reaches them
        last), as many as the ring takes."""
        hint = self.guest.driver.hint
        alloc = self.guest.allocator
        post = hint._post_hints  # noqa: SLF001 (the fault replaces the driver's own posting)
        posted_rounds: set[int] = set()

        def broken(vq: Any, pfns: np.ndarray, nr: np.ndarray) -> None:
            r = hint.round
            if r is not None and r.cmd_id not in posted_rounds:
                posted_rounds.add(r.cmd_id)
                used = (alloc.state == PG_ALLOC) & (self.pages.version > POISON)
                # runs of consecutive used pages, cut at 1024 pages
                edges = np.flatnonzero(np.diff(np.concatenate(([0], used.view(np.int8), [0]))))
                starts, ends = edges[0::2], edges[1::2]
                first = [np.arange(a, b, 1024) for a, b in zip(starts, ends, strict=True)]
                if first:
                    f = np.concatenate(first)[::-1]
                    run_end = np.repeat(ends, [x.size for x in first])[::-1]
                    n = np.minimum(1024, run_end - f)
                    room = max(0, vq.num_free - 1 - pfns.size)
                    pfns = np.concatenate([f[:room], pfns]).astype(np.int64)
                    nr = np.concatenate([n[:room], nr]).astype(np.int64)
            post(vq, pfns, nr)
        hint._post_hints = broken  # type: ignore[method-assign,assignment]

    def migrate(self) -> None:
        scn, res = self.scn, self.res
        m, dst = self.src.machine, self.dst
        if self.fault == "hint-in-use":
            self._install_fault()
        background = self._start_background()
        self.dirty.start()
        self.wt.flush()
        limit_ms = max(1, round(scn.migration.downtime_limit_s * 1000))
        m.migrate_to(dst, parameters={"max-bandwidth": int(scn.migration.bandwidth_Bps),
                                      "downtime-limit": limit_ms},
                     capabilities={"pause-before-switchover": True, "events": True})
        rt = RealTime(self.sched)
        t0 = time.monotonic()
        next_query = 0.0
        written = 0
        while True:
            self.src.transport.poll_interrupts()
            # Back-pressure: the model runs only while qtest keeps up with its writes, so a
            # guest writing faster than qtest can carry falls behind the wall clock (lag).
            if np.count_nonzero(self._pending) < _PAGES_PER_TURN:
                rt.run_due(_EVENTS_PER_TURN, max_wall_s=_MODEL_S_PER_TURN)
            written += self._flush(_PAGES_PER_TURN)
            now = time.monotonic()
            if now >= next_query:
                next_query = now + _QUERY_EVERY_S
                info = m.qmp("query-migrate")
                st = info.get("status")
                if st == "pre-switchover":
                    break
                if st in ("failed", "cancelled"):
                    raise QmpError(f"QEMU's migration {st}: {info.get('error-desc', info)}")
                ram = info.get("ram", {})
                syncs = int(ram.get("dirty-sync-count", 0))
                if not res.forced_switchover and syncs >= scn.migration.max_rounds + 1:
                    res.forced_switchover = True
                    m.qmp("migrate-set-parameters", **{"downtime-limit": MAX_DOWNTIME_MS})
                if self.progress is not None and ram.get("total"):
                    self.progress(min(0.99, ram.get("transferred", 0) / ram["total"]),
                                  f"sync {syncs}")
                if now - t0 > self.timeout:
                    m.qmp("migrate_cancel")
                    raise _Timeout(f"QEMU's migration did not reach switchover within "
                                   f"{self.timeout:g} s (status {st}, {syncs} dirty syncs)")
            wait = rt.next_in()
            if wait is None or wait > 0:
                time.sleep(_IDLE_S if wait is None else min(_IDLE_S, wait))
        # VM stopped: the guest stops too; what it wrote before we noticed goes to QEMU now.
        t_pause = time.time()
        for w in background:
            w.stop()
        written += self._flush()
        in_use = self.guest.in_use_mask()
        held = self.guest.held_by_driver_mask()
        self._settle_hint_thread()
        t_cont = time.time()
        m.qmp("migrate-continue", state="pre-switchover")
        log.info("pause: %.1f ms to flush and take the masks (%d pages)",
                 (t_cont - t_pause) * 1e3, written)
        info = m.wait_migration(["completed"], timeout=self.timeout)
        dst.wait_migration(["completed"], timeout=self.timeout)
        res.pause_ms = self._pause_ms(t_pause, t_cont)
        res.pages_written = written
        res.write_lag_s = rt.lag
        self._collect(info)
        self._verify(in_use, held)

    def _settle_hint_thread(self) -> None:
        """In the pause: wait until QEMU's hint iothread sleeps, so that its last store into
        the free page queue's used ring lands before QEMU's last dirty-bitmap sync (theory of
        operation, "QEMU's hint thread in the pause")."""
        if self._hint_tid is None or not os.path.isdir("/proc/self/task"):
            return
        outcome, waited = wait_thread_asleep(self._hint_tid)
        self.res.hint_thread = "none" if outcome == "gone" else outcome
        self.res.hint_thread_wait_ms = waited * 1e3
        if outcome == "busy":
            log.warning("QEMU's hint iothread (thread %d) still ran after %.1f s in the pause",
                        self._hint_tid, waited)

    def _pause_ms(self, t_noticed: float, t_cont: float) -> float:
        """From QEMU's pre-switchover event (its own timestamp) to our migrate-continue; also
        fills the result's ``downtime_parts`` from the events' timestamps."""
        ts: dict[str, float] = {}
        for ev in self.src.machine.qmp_events:
            name = ev.get("event")
            if name == "MIGRATION":
                name = ev.get("data", {}).get("status")
            t = ev.get("timestamp", {})
            t_ev = t.get("seconds", 0) + t.get("microseconds", 0) / 1e6
            if name and t_ev > 0:
                ts.setdefault(name, t_ev)
        parts = self.res.downtime_parts
        if "STOP" in ts and "pre-switchover" in ts:
            parts["vm_stop_to_pre_switchover_ms"] = (ts["pre-switchover"] - ts["STOP"]) * 1e3
        if "completed" in ts:
            parts["continue_to_completed_ms"] = (ts["completed"] - t_cont) * 1e3
        if "pre-switchover" not in ts:
            return (t_cont - t_noticed) * 1e3
        parts["noticed_after_ms"] = (t_noticed - ts["pre-switchover"]) * 1e3
        return max(0.0, (t_cont - ts["pre-switchover"]) * 1e3)

    def _flush(self, limit: int | None = None) -> int:
        """Pages the model wrote and QEMU has not seen yet, through qtest (at most ``limit``,
        lowest first; the rest stay pending), and the driver's ring bytes. Returns the pages
        written."""
        self.dirty.merge_into(self._pending)
        self._pending[self._area[0]:self._area[1]] = False
        pfns = np.flatnonzero(self._pending)
        if limit is not None:
            pfns = pfns[:limit]
        self._pending[pfns] = False
        write_pages_qtest(self.src.machine, pfns.astype(np.int64), self.pages.version[pfns])
        self.wt.flush()
        return int(pfns.size)

    def _collect(self, info: dict[str, Any]) -> None:
        r = self.res
        ram = info.get("ram", {})
        r.query_migrate = info
        r.transferred_bytes = int(ram.get("transferred", 0))
        r.normal_pages = int(ram.get("normal", 0))
        r.zero_pages = int(ram.get("duplicate", 0))
        r.dirty_sync_count = int(ram.get("dirty-sync-count", 0))
        r.downtime_bytes = int(ram.get("downtime-bytes", 0))
        r.total_time_ms = int(info.get("total-time", 0))
        r.downtime_ms = int(info.get("downtime", 0))
        r.setup_time_ms = int(info.get("setup-time", 0))
        d = self.guest.driver.counters
        r.hints_sent = int(d.get("hints_sent", 0))
        r.hinted_pages = int(d.get("hinted_pages", 0))
        r.hint_rounds = int(d.get("rounds", 0))

    def _verify(self, in_use: np.ndarray, held: np.ndarray) -> None:
        r, lay = self.res, self.layout
        src_v = decode_versions(self.src.machine, lay)
        dst_v = decode_versions(self.dst, lay)
        skip = lay.hole_mask()
        lo, hi = DRIVER_AREA_GPA >> PAGE_SHIFT, (DRIVER_AREA_GPA + DRIVER_AREA_SIZE) >> PAGE_SHIFT
        skip_model = skip.copy()
        skip_model[lo:hi] = True
        r.source_mismatches = int(np.count_nonzero(~skip_model & (src_v != self.pages.version)))
        src_area = self.src.machine.mem.view(DRIVER_AREA_GPA, DRIVER_AREA_SIZE)
        dst_area = np.frombuffer(self.dst.mem.view(DRIVER_AREA_GPA, DRIVER_AREA_SIZE),
                                 np.uint8).copy()
        g = self.scn.guest
        # The holes are neither in use nor free: out of both checks (as pages the driver holds).
        vr = verify_pages(src_v, dst_v, in_use & ~skip, held | skip, page_poison=g.page_poison,
                          poison_version=POISON,
                          byte_regions=[(lo, hi - lo, src_area, dst_area)])
        r.mismatched_pages = vr.mismatched_pages
        r.first_byte_mismatches = byte_mismatches(
            np.frombuffer(src_area, np.uint8), dst_area, DRIVER_AREA_GPA,
            [p for p in vr.first_mismatches if lo <= p < hi])
        r.poison_violations = vr.poison_violations
        if g.page_poison and vr.poison_violations:
            bad = ~in_use & ~held & ~skip & (dst_v != POISON)
            r.poison_violations_from_hints = int(np.count_nonzero(bad & self.guest.hinted_mask()))
        r.checked_pages = vr.checked_pages
        r.first_mismatches = vr.first_mismatches
        r.guest_in_use_pages = int(np.count_nonzero(in_use & ~skip))
        r.guest_held_pages = int(np.count_nonzero(held))
        r.verified = vr.verified and r.source_mismatches == 0


class _Timeout(EnvironmentFailure):
    pass


def run_qemu_scenario(scn: Scenario, mode: str, *, seed: int | None = None,
                      qemu: QemuBinary | str | None = None, fault: str | None = None,
                      timeout: float = 300.0, progress: Progress | None = None) -> QemuRunResult:
    """Migrate ``scn`` (already scaled: see ``scale_scenario``) in hinting ``mode`` with two
    QEMUs under qtest as the host; the result has QEMU's figures and the verdict. A migration
    that does not reach switchover within ``timeout`` wall seconds is cancelled: the result's
    ``error`` says so. QEMU that cannot run qtest: ``QtestUnavailable``."""
    if mode not in HINT_MODES:
        raise UsageError(f"hinting mode {mode!r}: one of {', '.join(HINT_MODES)}")
    if fault not in (None, *QEMU_FAULTS):
        raise UsageError(f"fault {fault!r} with --host qemu: one of {', '.join(QEMU_FAULTS)}")
    if scn.guest.ram_bytes > MAX_QEMU_RAM:
        raise UsageError(f"{scn.name}: {format_size(scn.guest.ram_bytes)} of RAM; --host qemu "
                         f"runs guests up to {format_size(MAX_QEMU_RAM)} (scale_scenario)")
    if scn.guest.ram_bytes % (2 << 20):
        raise UsageError(f"{scn.name}: RAM must be a multiple of 2 MiB for QEMU")
    if scn.host.dirty_log != "exact" or scn.guest.kernel_data:
        # The host here is a real QEMU with its own dirty log, and the guest model over qtest
        # keeps the kernel's bookkeeping outside RAM: the scenario would model neither.
        raise UsageError(f"{scn.name}: [host] dirty_log and [guest] kernel_data model another "
                         "host and guest than --host qemu runs; use --host sim")
    q = qemu if isinstance(qemu, QemuBinary) else find_qemu(qemu)
    t0 = time.perf_counter()
    run = _Run(scn, mode, scn.guest.seed if seed is None else seed, q, fault, timeout, progress)
    try:
        run.start()
        run.prepare()
        run.migrate()
    except _Timeout as e:
        run.res.error = str(e)
    finally:
        run.close()
    run.res.wall_s = time.perf_counter() - t0
    return run.res


# -- side by side -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompareRow:
    """One figure of the simulator and of QEMU for the same scenario, mode and seed."""

    name: str
    unit: str
    simulator: float
    qemu: float

    @property
    def rel_diff(self) -> float | None:
        """(QEMU - simulator) / simulator; None when the simulator's figure is 0."""
        return None if self.simulator == 0 else (self.qemu - self.simulator) / self.simulator

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "simulator": self.simulator,
                "qemu": self.qemu, "rel_diff": self.rel_diff}


def compare_rows(sim: Any, q: QemuRunResult) -> list[CompareRow]:
    """QEMU's ``query-migrate`` figures beside the simulator's ``vmsim.report.RunResult``.

    QEMU's total time and downtime are taken without our pause before switchover
    (``pause_ms``). Both count the guest's RAM; QEMU's also count its ROMs, the reserved top of
    the RAM file (1 MiB: MSI-X mailboxes) and device state, so a few hundred zero pages and
    some KiB more. Bitmap syncs: the simulator syncs once at set-up, once per round and once
    at the stop-and-copy (``rounds + 1``); QEMU 11.1's ``dirty-sync-count`` was seen to leave
    the stop-and-copy's sync out (2 for a one-pass migration: its MIGRATION_PASS events), so
    the two differ by one for the same behaviour. Sent in downtime: the simulator's
    stop-and-copy round, QEMU's ``downtime-bytes``."""
    return [
        CompareRow("transferred", "bytes", sim.bytes_sent, q.transferred_bytes),
        CompareRow("normal pages", "pages", sim.pages_sent - sim.zero_pages, q.normal_pages),
        CompareRow("zero pages", "pages", sim.zero_pages, q.zero_pages),
        CompareRow("total time", "ms", round(sim.total_time_s * 1e3, 3),
                   round(q.total_time_ms - q.pause_ms, 3)),
        CompareRow("downtime", "ms", round(sim.downtime_s * 1e3, 3),
                   round(max(0.0, q.downtime_ms - q.pause_ms), 3)),
        CompareRow("sent in downtime", "bytes",
                   sim.bytes_per_round[-1] if sim.bytes_per_round else 0, q.downtime_bytes),
        CompareRow("dirty syncs", "", sim.rounds + 1, q.dirty_sync_count),
        CompareRow("hinted pages", "pages", sim.hinted_pages, q.hinted_pages),
    ]
