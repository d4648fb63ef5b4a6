"""Free page reporting, the guest's side (Linux ``mm/page_reporting.c`` and
``virtballoon_free_page_report``; protocol.md 3.7).

Theory of operation
-------------------
A pass runs ``report_interval`` (2 s) after it is requested: at probe, and whenever a free
leaves a block of order >= 9 (the allocator's free notifier calls ``request``). A pass isolates
free blocks of order 9 or 10 not yet reported off the free lists without writing them
(``BuddyAllocator.isolate_free_block``), posts them 32 to a chain of writable elements, and puts
them back, marked reported, when the device used the chain (``ack``). The allocator clears the
mark when a block is allocated (or merged), so memory reused and freed again is reported again.
``_work`` says what a pass does (zones, watermark, budget).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from guest_model.buddy import MAX_ORDER, MIGRATE_ISOLATE, MIGRATE_TYPES, WMARK_LOW, pageblock_order
from guest_model.vring import VringBroken, VringFull
from guestmem.clock import ScheduledEvent, Scheduler
from guestmem.units import pages_to_bytes, pfn_to_gpa
from protocol.balloon import BalloonQueue

if TYPE_CHECKING:
    from guest_model.driver import BalloonDriver

log = logging.getLogger(__name__)

#: Linux's PAGE_REPORTING_CAPACITY: blocks per reporting chain.
PAGE_REPORTING_CAPACITY = 32
#: Linux's page_reporting_order default: pageblock_order (2 MiB on x86-64).
PAGE_REPORTING_ORDER = pageblock_order

# Linux's page_reporting states.
_REPORTING_IDLE, _REPORTING_REQUESTED, _REPORTING_ACTIVE = 0, 1, 2


@dataclass(slots=True)
class _ReportPass:
    """Where a reporting pass is: zone (index into ``zones``), order (-1: zone not entered),
    migratetype, the current list's chain budget, and the chain being filled."""

    zones: list[int]
    zone_i: int = 0
    order: int = -1
    mt: int = 0
    budget: int | None = None
    sgl: list[tuple[int, int]] = field(default_factory=list)


class FreePageReporting:
    """One driver's reporting passes (see the module docstring)."""

    def __init__(self, driver: BalloonDriver) -> None:
        self.d = driver
        self.event: ScheduledEvent | None = None
        self.inflight: list[tuple[int, int]] | None = None  # (pfn, order) isolated
        self._state = _REPORTING_IDLE
        self._pass: _ReportPass | None = None

    def cancel(self) -> None:
        """Stop scheduling passes (the device needs a reset). Blocks isolated for a chain in
        flight stay isolated: Linux's worker waits for the used buffer forever."""
        if self.event is not None:
            Scheduler.cancel(self.event)
        self.event = None

    def request(self, order: int = PAGE_REPORTING_ORDER) -> None:
        """Linux ``__page_reporting_notify`` (the allocator's free notifier, and the initial
        request at probe): ask for a pass in ``report_interval`` unless one is asked for or
        running (a running pass then ends by scheduling the next one)."""
        d = self.d
        if not d.ready or self._state == _REPORTING_REQUESTED:
            return
        prev, self._state = self._state, _REPORTING_REQUESTED
        if prev == _REPORTING_IDLE:
            self.event = d.sched.after(d.opts.report_interval, self._work)

    def _work(self) -> None:
        """One step of a reporting pass (Linux ``page_reporting_process``): fill the next chain
        and post it, or end the pass.

        A pass walks zones low to high; a zone is skipped unless it keeps more than its low
        watermark plus a full chain of pageblocks free; in a zone, orders from
        ``pageblock_order`` up and every migratetype but isolate; each list gets a budget of
        ``ceil(blocks of that order / (32 * 16))`` full chains (so a pass reports about a
        sixteenth of a large free list), and a list that still has unreported blocks when the
        budget is spent asks for another pass. Blocks already reported are skipped; isolation
        writes nothing, so the pages keep what they held (the poison pattern under page
        poisoning: DR-13, protocol.md 3.6, 3.7). A chain holds blocks of one zone: the zone's
        leftover is reported before the next zone. After the last zone the pass goes idle,
        unless a free notified meanwhile or a budget ran out: then the next pass comes
        ``report_interval`` later. Not modelled: the list rotation Linux does so the next pass
        starts where this one stopped (reported blocks are skipped instead).
        """
        d = self.d
        self.event = None
        if not d.ready or self.inflight is not None or not d.vq_ok(BalloonQueue.REPORTING):
            return
        if self._pass is None:
            self._state = _REPORTING_ACTIVE
            self._pass = _ReportPass([z.idx for z in d.alloc.zones if z.populated])
        chain = self._fill(self._pass)
        if chain is None:
            self._pass = None
            if self._state == _REPORTING_REQUESTED:
                self.event = d.sched.after(d.opts.report_interval, self._work)
            else:
                self._state = _REPORTING_IDLE
            return
        elems = [(pfn_to_gpa(p), pages_to_bytes(1 << o)) for p, o in chain]
        try:
            d.vqs[BalloonQueue.REPORTING].add_buf(in_=elems, token="report")
        except (VringFull, VringBroken) as e:
            log.warning("virtio-balloon: cannot post report: %s", e)
            for pfn, order in chain:
                d.alloc.putback_block(pfn, order)
            self._pass = None
            self._state = _REPORTING_IDLE
            return
        self.inflight = chain
        d.kick(BalloonQueue.REPORTING)

    def _fill(self, p: _ReportPass) -> list[tuple[int, int]] | None:
        """Isolate blocks until a chain is full or a zone is done; None when the pass is."""
        a = self.d.alloc
        while p.zone_i < len(p.zones):
            z = p.zones[p.zone_i]
            if p.order < 0:
                zone = a.zones[z]
                need = zone.watermark[WMARK_LOW] + (PAGE_REPORTING_CAPACITY
                                                    << PAGE_REPORTING_ORDER)
                if a.nr_free_pages(z) <= need:
                    p.zone_i += 1
                    continue
                p.order, p.mt, p.budget = PAGE_REPORTING_ORDER, 0, None
            while p.order < MAX_ORDER:
                while p.mt < MIGRATE_TYPES:
                    if p.mt == MIGRATE_ISOLATE:
                        p.mt += 1
                        continue
                    if p.budget is None:
                        nr_free = int(a.free_counts()[z, p.order].sum())
                        p.budget = -(-nr_free // (PAGE_REPORTING_CAPACITY * 16))
                    while a.nr_unreported_blocks(z, p.order, p.mt) > 0:
                        if p.budget < 0:
                            self._state = _REPORTING_REQUESTED  # more next pass
                            break
                        pfn = a.isolate_free_block(p.order, zone=z, migratetype=p.mt)
                        if pfn is None:
                            break  # the zone is at its min watermark
                        p.sgl.append((pfn, p.order))
                        if len(p.sgl) == PAGE_REPORTING_CAPACITY:
                            p.budget -= 1
                            chain, p.sgl = p.sgl, []
                            return chain
                    p.mt += 1
                    p.budget = None
                p.order += 1
                p.mt = 0
            p.zone_i += 1
            p.order = -1
            if p.sgl:  # the zone's leftover, before going on
                chain, p.sgl = p.sgl, []
                return chain
        return None

    def ack(self) -> None:
        """The device used buffers on reporting_vq: put the chain in flight back."""
        d = self.d
        if self.inflight is None or not d.vq_ok(BalloonQueue.REPORTING):
            return
        toks, _ = d.vqs[BalloonQueue.REPORTING].get_bufs()
        if "report" not in toks:
            return
        got = self.inflight
        self.inflight = None
        # DR-13: only now may the pages be used again. Put back (to the tail), marked reported
        # unless they merged with a neighbour (then the bigger block is new to the host).
        for pfn, order in got:
            d.alloc.putback_block(pfn, order, reported=True)
        d.counters["reports"] += 1
        d.counters["reported_pages"] += sum(1 << o for _, o in got)
        # The pass goes on once the driver has done its part of the work.
        self.event = d.sched.after(len(got) * d.opts.report_cost_per_block, self._work)

    def isolated_pfn_ranges(self) -> list[tuple[int, int]]:
        """(first pfn, count) of the free blocks isolated for a chain the device has not used
        yet."""
        return [(p, 1 << o) for p, o in self.inflight or ()]
