"""The seed's free-block walker (``walk_free_mem_block``, PATCH v13 4/5, Aug 2017), two ways.

Theory of operation
-------------------
The seed walks every populated zone in order, every order from ``MAX_ORDER - 1`` down to
``min_order``, every migratetype, and pulls one block at a time out of
``zone->free_area[order].free_list[migratetype]`` with ``report_free_page_block``: take the zone
lock, look at the block handed back by the previous call, pick the next one, drop the lock.
Rules for the block handed back (``page``):

* none: the first block of the list;
* still a free block but of another order (split or merged since): start again at the head;
* its ``lru.next`` is the list head: the list is done;
* otherwise: ``lru.next``.

The last rule is where the seed goes wrong (protocol.md 6.5). The lock is dropped between calls,
so the block handed back may have left the free list (allocated, merged into a bigger block, or
moved to another migratetype's list when its pageblock was claimed). The seed still follows
its ``lru.next``, which is then stale. ``guest_model.buddy`` keeps a removed block's links as
they were, so the seed mode (``safe=False``) follows exactly that stale link and we can watch
what it does: report a block that is allocated now, wander into another list, reach another
list's head (in the kernel: treat a ``list_head`` inside ``struct zone`` as a ``struct page``; we
count that as ``wild`` and end the list), or circle among stale blocks (bounded, counted as
``runaway``). Those are counted in ``WalkStats``.

Our walker (``safe=True``, the default) checks, under the same "lock", that the block handed back
is still a free block on *this* list (same order, same zone, pageblock of this type) before
following its link; otherwise it restarts at the list head (counted; a block may then be
reported twice, which hinting tolerates) and gives up on a list after ``max_restarts`` restarts.
Every block it reports is on a free list at that moment. Either walker may report a block that
is allocated right after the report: that race is the seed's accepted one, which the host
handles through dirty logging.

There is no real lock: the model is single-threaded, so "under the zone lock" means "inside one
call". Concurrency comes from the caller: ``FreeBlockWalker.step()`` does one report per call,
and ``schedule_walk`` runs steps on the simulated ``Scheduler`` with a cost in simulated time
per block, so workload events land between two reports.

Every loop is bounded: a list by its block count at the first report plus slack, restarts by
``max_restarts``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from guest_model.buddy import (
    MAX_ORDER,
    MIGRATE_TYPES,
    BuddyAllocator,
    Zone,
    list_id,
    list_sentinel,
)
from guestmem.clock import ScheduledEvent, Scheduler
from protocol.errors import UsageError

log = logging.getLogger(__name__)

Visit = Callable[[object, int, int], None]  # visit(opaque, pfn, nr_pages)


@dataclass
class WalkStats:
    calls: int = 0  # report_free_page_block calls
    reports: int = 0  # blocks handed out
    restarts_split: int = 0  # handed-back block was a free block of another order
    restarts_gone: int = 0  # safe walker: handed-back block had left the list
    stale_links: int = 0  # seed walker: followed lru.next of a block no longer on the list
    wild: int = 0  # seed walker: stale chain reached another list's head
    runaway: int = 0  # a list walk hit its bound (stale cycle, endless restarts)
    lists_abandoned: int = 0  # safe walker gave up on a list after max_restarts


def report_free_page_block(zone: Zone, order: int, migratetype: int, page: int | None, *,
                           safe: bool = True, stats: WalkStats | None = None,
                           max_restarts: int = 16) -> int | None:
    """One free block of ``zone.free_area[order].free_list[migratetype]`` after ``page``.

    Returns the block's first pfn, or None (the seed's -EAGAIN: list empty or done). ``page``
    is the block the previous call returned on this list (None for the first call).
    """
    a = zone.allocator
    assert a is not None, "zone without allocator"
    st = stats if stats is not None else WalkStats()
    st.calls += 1
    lid = list_id(zone.idx, order, migratetype)
    head = list_sentinel(lid)
    first = a.list_first(lid)
    if first < 0:  # list_empty()
        return None
    if page is None:
        return first
    pord = a.page_order(page)
    if safe:
        if a.block_list_id(page) == lid:
            nxt = a.link_next(page)
            return None if nxt == head else nxt
        # Split, merged, allocated or moved to another list since we handed it out: the link
        # means nothing now. Start again at the head (a block may be reported twice).
        if pord >= 0 and pord != order:
            st.restarts_split += 1
        else:
            st.restarts_gone += 1
        if st.restarts_split + st.restarts_gone > max_restarts:
            st.lists_abandoned += 1
            return None
        return first
    # ---- the seed, rule for rule ----
    if pord >= 0 and pord != order:  # PageBuddy(page) && order != page_order(page)
        st.restarts_split += 1
        return first
    nxt = a.link_next(page)
    if nxt == head:  # page->lru.next == free_list
        return None
    if a.block_list_id(page) != lid:
        st.stale_links += 1  # the hazard: page is no longer on this list
    if nxt < 0:
        # The link leads to another list's head: the kernel would now read a list_head inside
        # struct zone as if it were a struct page. Nothing sensible to model: end the list.
        st.wild += 1
        log.warning("seed walk: stale lru.next of pfn %#x leads to the head of list %d "
                    "(zone %d order %d type %d); ending the list", page, -1 - nxt, zone.idx,
                    order, migratetype)
        return None
    return nxt


class FreeBlockWalker:
    """``walk_free_mem_block`` in stepping form: ``step()`` hands out one block at a time.

    ``step()`` returns ``(pfn, nr_pages)`` or None when the walk is over; it calls
    ``report_free_page_block`` for the current list until one block comes back (empty or
    finished lists are passed over in the same step), so one step = one reported block.
    """

    def __init__(self, allocator: BuddyAllocator, min_order: int = 0, *, safe: bool = True,
                 max_restarts: int = 16) -> None:
        if not 0 <= min_order < MAX_ORDER:
            raise UsageError(f"min_order={min_order}: must be 0..{MAX_ORDER - 1}")
        self.allocator = allocator
        self.min_order = min_order
        self.safe = safe
        self.max_restarts = max_restarts
        # Totals of the lists walked to the end, plus reports and runaways; ``stats`` adds the
        # current list's own (kept apart: its restart bound is per list).
        self._totals = WalkStats()
        self._zones = [z for z in allocator.zones if z.populated]  # for_each_populated_zone
        self._zi = 0
        self._order = MAX_ORDER - 1
        self._mt = 0
        self._page: int | None = None
        self._steps_left = -1  # bound for the current list, set at its first report
        self._list_stats = WalkStats()
        self.done = not self._zones

    @property
    def stats(self) -> WalkStats:
        """What the walk did so far (a snapshot)."""
        t, ls = self._totals, self._list_stats
        return WalkStats(**{k: v + getattr(ls, k) for k, v in vars(t).items()})

    def _advance(self) -> None:
        """Next list: migratetypes first, then orders downwards, then zones."""
        t, ls = self._totals, self._list_stats
        for k, v in vars(ls).items():
            if v:
                setattr(t, k, getattr(t, k) + v)
        self._page = None
        self._steps_left = -1
        self._list_stats = WalkStats()
        self._mt += 1
        if self._mt < MIGRATE_TYPES:
            return
        self._mt = 0
        self._order -= 1
        if self._order >= self.min_order:
            return
        self._order = MAX_ORDER - 1
        self._zi += 1
        if self._zi >= len(self._zones):
            self.done = True

    def step(self) -> tuple[int, int] | None:
        while not self.done:
            zone = self._zones[self._zi]
            # The call counts into the list's own stats (its restart bound is per list).
            pfn = report_free_page_block(zone, self._order, self._mt, self._page, safe=self.safe,
                                         stats=self._list_stats,
                                         max_restarts=self.max_restarts)
            if pfn is None:
                self._advance()
                continue
            if self._steps_left < 0:
                lid = list_id(zone.idx, self._order, self._mt)
                # A walk of a list cannot sensibly take more steps than it had blocks, plus
                # slack for blocks freed meanwhile and for restarts.
                self._steps_left = 2 * self.allocator.list_count(lid) + 64
            self._steps_left -= 1
            if self._steps_left < 0:
                self._totals.runaway += 1
                log.warning("walk: list (zone %d order %d type %d) exceeded its step bound at "
                            "pfn %#x; moving on", zone.idx, self._order, self._mt, pfn)
                self._advance()
                continue
            self._page = pfn
            self._totals.reports += 1
            return pfn, 1 << self._order
        return None

    @property
    def position(self) -> tuple[int, int, int] | None:
        """(zone index, order, migratetype) of the list being walked; None when done."""
        if self.done:
            return None
        return self._zones[self._zi].idx, self._order, self._mt


def walk_free_mem_block(opaque: object, min_order: int, visit: Visit, *,
                        allocator: BuddyAllocator, safe: bool = True) -> WalkStats:
    """The seed's entry point: call ``visit(opaque, pfn, nr_pages)`` for every free block of
    order >= ``min_order``. ``visit`` runs "outside the lock": it may allocate or free, which
    is how the seed's hazards show up even without a scheduler."""
    w = FreeBlockWalker(allocator, min_order, safe=safe)
    while (blk := w.step()) is not None:
        visit(opaque, blk[0], blk[1])
    return w.stats


@dataclass
class ScheduledWalk:
    walker: FreeBlockWalker
    started: float
    finished: float | None = None
    cancelled: bool = False
    _event: ScheduledEvent | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self._event is not None:
            Scheduler.cancel(self._event)


def schedule_walk(sched: Scheduler, walker: FreeBlockWalker, *, cost_per_block: float,
                  visit: Visit, opaque: object = None,
                  on_done: Callable[[ScheduledWalk], None] | None = None,
                  start_delay: float = 0.0) -> ScheduledWalk:
    """Run ``walker`` on the simulated clock: one block per event, ``cost_per_block`` seconds
    apart; ``visit`` runs at the instant of the report (nothing can happen in between), other
    events (workloads) run between two reports."""
    if cost_per_block < 0:
        raise UsageError(f"cost_per_block={cost_per_block}: must be >= 0")
    h = ScheduledWalk(walker, sched.now + start_delay)

    def tick() -> None:
        if h.cancelled:
            return
        blk = walker.step()
        if blk is None:
            h.finished = sched.now
            h._event = None
            if on_done is not None:
                on_done(h)
            return
        visit(opaque, blk[0], blk[1])
        h._event = sched.after(cost_per_block, tick)

    h._event = sched.after(start_delay, tick)
    return h
