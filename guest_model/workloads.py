"""Seeded guest workloads: what a guest does with its memory before and during a migration.

Theory of operation
-------------------
A workload allocates pages from the guest's ``BuddyAllocator``, writes them through
``PageVersions`` (every write gives the page a new version and marks the dirty log, so the
migration verifier sees it) and frees them. Allocation itself initialises pages when the
allocator has ``init_on_alloc`` (a "zero" write), freeing poisons or zeroes them when configured:
that is the allocator's job, not the workload's.

Every workload runs in one of two ways:

* ``run_phase()``: to completion at once, before migration, without simulated time (fill memory,
  build a page cache, churn for ``duration`` seconds of the workload's own time, ...);
* ``start(sched, until=None)``: as background activity on the VM's ``Scheduler``: every ``tick``
  seconds of simulated time ``step(now, dt)`` does the work its rates give for ``dt`` (bytes/s
  and ops/s turn into pages per tick, with Poisson counts from the seeded generator), so its
  allocations and writes land between the hint walk's reports and the host's page sends.
  ``stop()`` ends it; a workload with a natural end (``fill`` reached its size) stops itself.

Parameters with units are plain numbers: sizes in bytes, rates in bytes/s or operations/s,
times in seconds. Sizes may also be given as a fraction of RAM (``size_fraction``).

Small amounts go through ``alloc_pages`` / ``free_pages`` (per-cpu lists, cpus chosen at
random), large ones through the allocator's bulk calls so a 64 GiB fill stays fast.

"In use" for the migration verifier: ``allocator.in_use_mask()`` (pages in state ``PG_ALLOC``:
held by workloads or anyone but the balloon driver). Each workload also keeps its own holdings
(``held_pages()``).

Registry: ``WORKLOADS[name](allocator, pages, *, seed=0, tick=0.01, **params)`` builds one;
``make_workload(name, allocator, pages, seed=..., **params)`` does the same with a usage error
naming an unknown workload or parameter.
"""
from __future__ import annotations

import inspect
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from guest_model.buddy import (
    MAX_ORDER,
    MIGRATE_MOVABLE,
    MIGRATE_RECLAIMABLE,
    MIGRATE_UNMOVABLE,
    PG_ALLOC,
    BuddyAllocator,
)
from guestmem.clock import ScheduledEvent, Scheduler
from guestmem.pages import PageVersions
from guestmem.units import PAGE_SHIFT
from protocol.errors import UsageError

log = logging.getLogger(__name__)

_SMALL = 64  # up to this many order-0 pages per call go through the per-cpu path


class Workload:
    """Base: scheduling, counters, page helpers. Subclasses implement ``run_phase``/``step``."""

    name: ClassVar[str] = "workload"

    def __init__(self, allocator: BuddyAllocator, pages: PageVersions | None = None, *,
                 seed: int = 0, tick: float = 0.01) -> None:
        if tick <= 0:
            raise UsageError(f"{self.name}: tick={tick}: must be > 0 seconds")
        self.a = allocator
        self.pages = pages
        self.rng = np.random.default_rng(seed)
        self.tick = float(tick)
        self.stats: dict[str, int] = {"alloc_pages": 0, "freed_pages": 0, "written_pages": 0,
                                      "alloc_failures": 0, "ticks": 0}
        self.sched: Scheduler | None = None
        self.until: float | None = None
        self.running = False
        self.finished = False
        self._event: ScheduledEvent | None = None
        self._t_last = 0.0

    # ---- sizes ------------------------------------------------------------------------------
    def _pages_of(self, size: int | None, size_fraction: float | None, default_fraction: float,
                  key: str) -> int:
        if size is not None and size_fraction is not None:
            raise UsageError(f"{self.name}: give {key} or {key}_fraction, not both")
        if size is not None:
            if size < 0:
                raise UsageError(f"{self.name}: {key}={size}: must be >= 0 bytes")
            return int(size) >> PAGE_SHIFT
        frac = default_fraction if size_fraction is None else float(size_fraction)
        if not 0.0 <= frac <= 1.0:
            raise UsageError(f"{self.name}: {key}_fraction={frac}: must be in [0, 1]")
        return int(self.a.ram_pages * frac)

    # ---- page helpers -----------------------------------------------------------------------
    def _cpu(self) -> int:
        return int(self.rng.integers(self.a.nr_cpus)) if self.a.nr_cpus > 1 else 0

    def alloc0(self, n: int, mt: int = MIGRATE_MOVABLE) -> np.ndarray:
        """``n`` order-0 pages (fewer on failure, counted)."""
        if n <= 0:
            return np.empty(0, dtype=np.int64)
        if n <= _SMALL:
            got = []
            for _ in range(n):
                p = self.a.alloc_pages(0, mt, cpu=self._cpu())
                if p is None:
                    break
                got.append(p)
            out = np.array(got, dtype=np.int64)
        else:
            out = self.a.alloc_pages_bulk(n, mt)
        self.stats["alloc_pages"] += int(out.size)
        if out.size < n:
            self.stats["alloc_failures"] += 1
        return out

    def free0(self, pfns: np.ndarray) -> None:
        if pfns.size == 0:
            return
        if pfns.size <= _SMALL:
            for p in pfns.tolist():
                self.a.free_pages(p, 0, cpu=self._cpu())
        else:
            self.a.free_pages_bulk(pfns)
        self.stats["freed_pages"] += int(pfns.size)

    def write(self, pfns: np.ndarray) -> None:
        if self.pages is not None and pfns.size:
            self.pages.write_pfns(pfns, "data")
        self.stats["written_pages"] += int(pfns.size)

    def write_block(self, pfn: int, order: int) -> None:
        if self.pages is not None:
            self.pages.write_range(pfn, 1 << order, "data")
        self.stats["written_pages"] += 1 << order

    def _poisson(self, mean: float) -> int:
        return int(self.rng.poisson(mean)) if mean > 0 else 0

    # ---- the two ways to run ----------------------------------------------------------------
    def run_phase(self) -> None:
        """Run to completion now (no simulated time)."""
        raise NotImplementedError

    def step(self, now: float, dt: float) -> bool:
        """Do ``dt`` seconds of background work at time ``now``; False when finished."""
        raise NotImplementedError

    def start(self, sched: Scheduler, *, until: float | None = None) -> None:
        """Run as background activity on ``sched`` from now until ``until`` or ``stop()``."""
        if self.running:
            raise UsageError(f"{self.name}: already running")
        self.sched = sched
        self.until = until
        self.running = True
        self.finished = False
        self._t_last = sched.now
        self._event = sched.after(self.tick, self._on_tick)

    def stop(self) -> None:
        self.running = False
        if self._event is not None:
            Scheduler.cancel(self._event)
            self._event = None

    def _on_tick(self) -> None:
        assert self.sched is not None
        if not self.running:
            return
        now = self.sched.now
        dt = now - self._t_last
        self._t_last = now
        self.stats["ticks"] += 1
        more = self.step(now, dt)
        if not more:
            self.finished = True
        if more and (self.until is None or now + self.tick <= self.until):
            self._event = self.sched.after(self.tick, self._on_tick)
        else:
            self.running = False
            self._event = None

    # ---- holdings ---------------------------------------------------------------------------
    def held_pages(self) -> int:
        return 0

    def release(self) -> None:
        """Free everything the workload holds (process exit)."""


class _PageSet:
    """A FIFO of order-0 page chunks (oldest first), for LRU-like eviction and bulk release."""

    def __init__(self) -> None:
        self.chunks: deque[np.ndarray] = deque()
        self.count = 0

    def add(self, pfns: np.ndarray) -> None:
        if pfns.size:
            self.chunks.append(pfns)
            self.count += int(pfns.size)

    def take_oldest(self, n: int) -> np.ndarray:
        out = []
        while n > 0 and self.chunks:
            c = self.chunks[0]
            if c.size <= n:
                out.append(self.chunks.popleft())
                n -= int(c.size)
            else:
                out.append(c[:n])
                self.chunks[0] = c[n:]
                n = 0
        res = np.concatenate(out) if out else np.empty(0, dtype=np.int64)
        self.count -= int(res.size)
        return res

    def all(self) -> np.ndarray:
        return self.take_oldest(self.count)

    def view(self) -> np.ndarray:
        return np.concatenate(list(self.chunks)) if self.chunks else np.empty(0, dtype=np.int64)


class Idle(Workload):
    """A guest doing nothing: no allocation, no write. ``duration`` (seconds) is how long the
    idle phase lasts; moving the clock is the VM's business (``run_phase`` touches no memory)."""

    name = "idle"

    def __init__(self, allocator: BuddyAllocator, pages: PageVersions | None = None, *,
                 seed: int = 0, tick: float = 0.01, duration: float = 0.0) -> None:
        super().__init__(allocator, pages, seed=seed, tick=tick)
        if duration < 0:
            raise UsageError(f"idle: duration={duration}: must be >= 0 seconds")
        self.duration = float(duration)

    def run_phase(self) -> None:
        return

    def step(self, now: float, dt: float) -> bool:
        return True


class Fill(Workload):
    """Anonymous memory: allocate ``size`` bytes (or ``size_fraction`` of RAM, default 0.5) of
    movable pages and write each; ``rate`` bytes/s in the background (default 2 GiB/s).
    ``order`` (default 0) allocates blocks of that order instead: 9 is what transparent huge
    pages do (2 MiB)."""

    name = "fill"

    def __init__(self, allocator: BuddyAllocator, pages: PageVersions | None = None, *,
                 seed: int = 0, tick: float = 0.01, size: int | None = None,
                 size_fraction: float | None = None, rate: float = 2 * 2**30,
                 order: int = 0) -> None:
        super().__init__(allocator, pages, seed=seed, tick=tick)
        if rate <= 0:
            raise UsageError(f"fill: rate={rate}: must be > 0 bytes/s")
        if not 0 <= order < MAX_ORDER:
            raise UsageError(f"fill: order={order}: must be 0..{MAX_ORDER - 1}")
        self.target = self._pages_of(size, size_fraction, 0.5, "size")
        self.rate_pages = rate / (1 << PAGE_SHIFT)
        self.order = order
        self.target = self.target >> order << order
        self.held = _PageSet()
        self.blocks: list[int] = []  # first pfns of the blocks when order > 0
        self._carry = 0.0

    def held_pages(self) -> int:
        return self.held.count + (len(self.blocks) << self.order)

    def _grow(self, n: int) -> bool:
        """Allocate and write ``n`` more pages; False when memory ran out."""
        if self.order:
            for _ in range(n >> self.order):
                p = self.a.alloc_pages(self.order, MIGRATE_MOVABLE, cpu=self._cpu())
                if p is None:
                    self.stats["alloc_failures"] += 1
                    return False
                self.stats["alloc_pages"] += 1 << self.order
                self.blocks.append(p)
                self.write_block(p, self.order)
            return True
        got = self.alloc0(n)
        self.write(got)
        self.held.add(got)
        return got.size == n

    def run_phase(self) -> None:
        self._grow(self.target - self.held_pages())

    def step(self, now: float, dt: float) -> bool:
        want = self.rate_pages * dt + self._carry
        n = min(int(want), self.target - self.held_pages())
        n = n >> self.order << self.order  # whole blocks; the rest carries over
        self._carry = want - n
        ok = self._grow(n) if n > 0 else True
        return ok and self.held_pages() < self.target

    def release(self) -> None:
        self.free0(self.held.all())
        for p in self.blocks:
            self.a.free_pages(p, self.order, cpu=self._cpu())
            self.stats["freed_pages"] += 1 << self.order
        self.blocks.clear()


class PageCache(Workload):
    """File reads filling the page cache up to ``size`` bytes (default a quarter of RAM):
    movable pages with file data, plus ``reclaimable_fraction`` of reclaimable slab pages
    (dentries, inodes). In the background it keeps reading at ``rate`` bytes/s and evicts the
    oldest pages past ``size`` (LRU), so the cache turns over."""

    name = "page_cache"

    def __init__(self, allocator: BuddyAllocator, pages: PageVersions | None = None, *,
                 seed: int = 0, tick: float = 0.01, size: int | None = None,
                 size_fraction: float | None = None, rate: float = 200 * 2**20,
                 reclaimable_fraction: float = 0.05) -> None:
        super().__init__(allocator, pages, seed=seed, tick=tick)
        if rate < 0:
            raise UsageError(f"page_cache: rate={rate}: must be >= 0 bytes/s")
        if not 0 <= reclaimable_fraction <= 1:
            raise UsageError(f"page_cache: reclaimable_fraction={reclaimable_fraction}: 0..1")
        self.target = self._pages_of(size, size_fraction, 0.25, "size")
        self.rate_pages = rate / (1 << PAGE_SHIFT)
        self.recl = reclaimable_fraction
        self.cache = _PageSet()
        self.slab = _PageSet()
        self._carry = 0.0

    def held_pages(self) -> int:
        return self.cache.count + self.slab.count

    def _read(self, n: int) -> None:
        ns = round(n * self.recl)
        slab = self.alloc0(ns, MIGRATE_RECLAIMABLE)
        self.write(slab)
        self.slab.add(slab)
        got = self.alloc0(n - ns, MIGRATE_MOVABLE)
        self.write(got)  # the file's contents arrive in the page
        self.cache.add(got)

    def _evict(self) -> None:
        over = self.held_pages() - self.target
        if over > 0:
            ns = min(self.slab.count, round(over * self.recl))
            self.free0(self.slab.take_oldest(ns))
            self.free0(self.cache.take_oldest(over - ns))

    def run_phase(self) -> None:
        self._read(max(0, self.target - self.held_pages()))

    def step(self, now: float, dt: float) -> bool:
        want = self.rate_pages * dt + self._carry
        self._carry = want - int(want)
        self._read(int(want))
        self._evict()
        return True

    def release(self) -> None:
        self.free0(self.cache.all())
        self.free0(self.slab.all())


class Churn(Workload):
    """Many short-lived allocations of mixed orders, like a kernel build: ``rate`` bytes/s
    allocated (default 80 MiB/s), each allocation written when made and freed after an
    exponential time of mean ``lifetime`` seconds (default 0.05). The mix: mostly order-0
    movable (anonymous memory), some order-0 reclaimable and unmovable (slab), order-1..3
    unmovable (kernel stacks, slab caches), up to ``max_order``; ``order`` makes every
    allocation movable of that one order instead. ``footprint`` (bytes) caps what is live at
    once: past it the allocations due to die first are freed early. ``run_phase`` runs
    ``duration`` seconds of it (default 1.0), then frees what is still alive unless
    ``keep_alive``.

    How it stays fast (600 MiB/s is ~116,000 allocations per simulated second): every tick
    draws its arrivals as arrays (Poisson count, kinds, arrival instants, lifetimes); the
    order-0 ones of a migratetype come from one ``alloc_pages_bulk`` call, only the higher
    orders (a tenth of the mix) are allocated one by one; one ``write_pfns`` writes them all.
    The live allocations are three parallel arrays kept sorted by expiry (a tick's arrivals are
    merged in with ``searchsorted``), so the deaths due by ``now`` and the footprint's early
    deaths are both a prefix, freed with one ``free_pages_bulk``. The allocator records no order
    for allocated pages and every free layout merges to the same blocks, so freeing a block's
    pages in bulk leaves the buddy lists as ``free_pages(pfn, order)`` would, up to where on a
    list a block sits. Small amounts (at most ``_SMALL`` pages) use the per-cpu calls."""

    name = "churn"
    # (order, migratetype, weight)
    MIX: ClassVar[tuple[tuple[int, int, float], ...]] = (
        (0, MIGRATE_MOVABLE, 0.75), (0, MIGRATE_RECLAIMABLE, 0.08), (0, MIGRATE_UNMOVABLE, 0.07),
        (1, MIGRATE_UNMOVABLE, 0.03), (2, MIGRATE_UNMOVABLE, 0.05), (3, MIGRATE_UNMOVABLE, 0.02),
    )

    def __init__(self, allocator: BuddyAllocator, pages: PageVersions | None = None, *,
                 seed: int = 0, tick: float = 0.01, rate: float = 80 * 2**20,
                 lifetime: float = 0.05, duration: float = 1.0, keep_alive: bool = False,
                 max_order: int = 3, order: int | None = None,
                 footprint: int | None = None) -> None:
        super().__init__(allocator, pages, seed=seed, tick=tick)
        if rate < 0 or lifetime <= 0 or duration < 0:
            raise UsageError(f"churn: rate={rate} >= 0 bytes/s, lifetime={lifetime} > 0 s, "
                             f"duration={duration} >= 0 s required")
        if not 0 <= max_order < MAX_ORDER:
            raise UsageError(f"churn: max_order={max_order}: 0..{MAX_ORDER - 1}")
        if order is not None and not 0 <= order < MAX_ORDER:
            raise UsageError(f"churn: order={order}: 0..{MAX_ORDER - 1}")
        if footprint is not None and footprint < 0:
            raise UsageError(f"churn: footprint={footprint}: must be >= 0 bytes")
        if order is not None:
            mix = [(order, MIGRATE_MOVABLE, 1.0)]
        else:
            mix = [m for m in self.MIX if m[0] <= max_order]
        w = np.array([m[2] for m in mix])
        self.mix = [(m[0], m[1]) for m in mix]
        self.p = w / w.sum()
        self._kind_order = np.array([o for o, _ in self.mix], dtype=np.int8)
        # Allocations per second = bytes/s over the mean allocation size of the mix.
        mean_pages = float(np.dot(self.p, [1 << o for o, _ in self.mix]))
        self.alloc_rate = rate / (1 << PAGE_SHIFT) / mean_pages
        self.lifetime = lifetime
        self.duration = duration
        self.keep_alive = keep_alive
        self.cap = None if footprint is None else int(footprint) >> PAGE_SHIFT
        # The live allocations, sorted by expiry (the first dies first).
        self._exp = np.empty(0, dtype=np.float64)
        self._pfn = np.empty(0, dtype=np.int64)
        self._order = np.empty(0, dtype=np.int8)
        self.live_pages = 0
        self._local_now = 0.0

    def held_pages(self) -> int:
        return self.live_pages

    def live_blocks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The live allocations as (expiry, first pfn, order) arrays, soonest death first."""
        return self._exp.copy(), self._pfn.copy(), self._order.copy()

    # ---- page blocks ------------------------------------------------------------------------
    @staticmethod
    def _block_pages(pfn: np.ndarray, order: np.ndarray) -> np.ndarray:
        """Every page of the blocks ``(pfn, order)``."""
        n = np.left_shift(1, order.astype(np.int64))
        if not bool(np.any(n > 1)):
            return pfn
        starts = np.cumsum(n) - n
        return np.repeat(pfn, n) + (np.arange(int(n.sum()), dtype=np.int64) - np.repeat(starts, n))

    def _free_blocks(self, pfn: np.ndarray, order: np.ndarray) -> None:
        if pfn.size == 0:
            return
        pages = self._block_pages(pfn, order)
        if pages.size <= _SMALL:
            cpus = self.rng.integers(self.a.nr_cpus, size=pfn.size)
            for p, o, c in zip(pfn.tolist(), order.tolist(), cpus.tolist(), strict=True):
                self.a.free_pages(p, o, cpu=c)
        else:
            self.a.free_pages_bulk(pages)
        self.live_pages -= int(pages.size)
        self.stats["freed_pages"] += int(pages.size)

    def _free_oldest(self, k: int) -> None:
        """Free the ``k`` live allocations due to die first."""
        if k <= 0:
            return
        self._free_blocks(self._pfn[:k], self._order[:k])
        self._exp, self._pfn, self._order = self._exp[k:], self._pfn[k:], self._order[k:]

    def _alloc_kind(self, count: int, order: int, mt: int) -> np.ndarray:
        """Up to ``count`` allocations of one kind, as first pfns (fewer when memory ran out)."""
        if order == 0 and count > _SMALL:
            return self.a.alloc_pages_bulk(count, mt)
        cpus = self.rng.integers(self.a.nr_cpus, size=count).tolist()
        got = []
        for c in cpus:
            p = self.a.alloc_pages(order, mt, cpu=c)
            if p is None:
                break  # the allocator is out of memory: the rest of this kind fails too
            got.append(p)
        return np.array(got, dtype=np.int64)

    # ---- one tick ---------------------------------------------------------------------------
    def _work(self, now: float, dt: float) -> None:
        self._free_oldest(int(np.searchsorted(self._exp, now, side="right")))
        n = self._poisson(self.alloc_rate * dt)
        if n == 0:
            return
        kinds = self.rng.choice(len(self.mix), size=n, p=self.p)
        lives = self.rng.exponential(self.lifetime, size=n)
        # Arrivals spread over the tick: expiry from the arrival instant.
        exp = now - dt + self.rng.random(n) * dt + lives
        orders = self._kind_order[kinds]
        size = np.left_shift(1, orders.astype(np.int64))
        if self.cap is not None:
            fits = size <= self.cap  # one allocation bigger than the cap never happens
            kinds, exp, orders, size = kinds[fits], exp[fits], orders[fits], size[fits]
        # This tick's allocations in expiry order, as the live arrays are.
        by_exp = np.argsort(exp, kind="stable")
        kinds, exp, orders, size = kinds[by_exp], exp[by_exp], orders[by_exp], size[by_exp]
        # New allocations that die within this tick: made, written and freed now (else they
        # would live on to the next tick).
        early = exp <= now
        if self.cap is not None and self.live_pages + int(size.sum()) > self.cap:
            # Past the footprint the allocations due to die first go early: over the live ones
            # and this tick's together, keep the longest-lived that fit and free the rest.
            all_exp = np.concatenate([self._exp, exp])
            all_size = np.concatenate([np.left_shift(1, self._order.astype(np.int64)), size])
            idx = np.argsort(all_exp, kind="stable")
            from_end = np.cumsum(all_size[idx][::-1])[::-1]
            gone = idx[:int(np.count_nonzero(from_end > self.cap))]
            old = self._exp.size
            self._free_oldest(int(np.count_nonzero(gone < old)))  # a prefix: they are sorted
            early[gone[gone >= old] - old] = True
        pfn = np.full(exp.size, -1, dtype=np.int64)
        for k, (order, mt) in enumerate(self.mix):
            sel = np.flatnonzero(kinds == k)
            if sel.size == 0:
                continue
            got = self._alloc_kind(int(sel.size), order, mt)
            pfn[sel[:got.size]] = got
            self.stats["alloc_failures"] += int(sel.size - got.size)
        ok = pfn >= 0
        pfn, orders, exp, early = pfn[ok], orders[ok], exp[ok], early[ok]
        pages = self._block_pages(pfn, orders)
        self.stats["alloc_pages"] += int(pages.size)
        self.live_pages += int(pages.size)
        self.write(pages)  # each allocation is written when made
        if early.any():
            self._free_blocks(pfn[early], orders[early])
            pfn, orders, exp = pfn[~early], orders[~early], exp[~early]
        # Merge the survivors into the live arrays (both sorted by expiry).
        at = np.searchsorted(self._exp, exp, side="right")
        self._exp = np.insert(self._exp, at, exp)
        self._pfn = np.insert(self._pfn, at, pfn)
        self._order = np.insert(self._order, at, orders)

    def run_phase(self) -> None:
        steps = round(self.duration / self.tick)
        for _ in range(steps):
            self._local_now += self.tick
            self._work(self._local_now, self.tick)
        if not self.keep_alive:
            self.release()

    def step(self, now: float, dt: float) -> bool:
        self._work(now, dt)
        return True

    def release(self) -> None:
        self._free_oldest(self._exp.size)


class MemhogThenFree(Workload):
    """Touch most of RAM, then free it (``memhog``): allocate ``fraction`` of the free memory
    (default 0.9) or ``size`` bytes, write every page, keep it ``hold`` seconds, free it.
    ``keep`` (default 0) leaves that random fraction of the pages allocated (memory partly
    reclaimed: fragmented free lists). Afterwards free memory is full of old data (unless
    init_on_free/poisoning wipe it). In the background it allocates at ``rate`` bytes/s
    (default 4 GiB/s)."""

    name = "memhog_then_free"

    def __init__(self, allocator: BuddyAllocator, pages: PageVersions | None = None, *,
                 seed: int = 0, tick: float = 0.01, fraction: float = 0.9,
                 size: int | None = None, keep: float = 0.0, rate: float = 4 * 2**30,
                 hold: float = 0.0) -> None:
        super().__init__(allocator, pages, seed=seed, tick=tick)
        if not 0 <= fraction <= 1 or rate <= 0 or hold < 0 or not 0 <= keep <= 1:
            raise UsageError(f"{self.name}: fraction={fraction} in [0,1], keep={keep} in [0,1],"
                             f" rate={rate} > 0, hold={hold} >= 0 required")
        if size is not None and size < 0:
            raise UsageError(f"{self.name}: size={size}: must be >= 0 bytes")
        self.fraction = fraction
        self.keep = keep
        self.rate_pages = rate / (1 << PAGE_SHIFT)
        self.hold = hold
        self.held = _PageSet()
        self.kept = _PageSet()  # the ``keep`` share, still allocated after the free
        self.target: int | None = None if size is None else int(size) >> PAGE_SHIFT
        self._full_at: float | None = None
        self._carry = 0.0

    def held_pages(self) -> int:
        return self.held.count + self.kept.count

    def _target(self) -> int:
        if self.target is None:
            self.target = int((self.a.nr_free_pages() + self.a.nr_pcp_pages()) * self.fraction)
        return self.target

    def _free_all_but_kept(self) -> None:
        pfns = self.held.all()
        if self.keep > 0 and pfns.size:
            kept = self.rng.random(pfns.size) < self.keep
            self.kept.add(pfns[kept])
            pfns = pfns[~kept]
        self.free0(pfns)

    def run_phase(self) -> None:
        got = self.alloc0(self._target())
        self.write(got)
        self.held.add(got)
        self._free_all_but_kept()

    def step(self, now: float, dt: float) -> bool:
        target = self._target()
        if self._full_at is None:
            want = self.rate_pages * dt + self._carry
            n = min(int(want), target - self.held.count)
            self._carry = want - int(want)
            got = self.alloc0(n)
            self.write(got)
            self.held.add(got)
            if self.held.count >= target or got.size < n:
                self._full_at = now
            return True
        if now - self._full_at >= self.hold:
            self._free_all_but_kept()
            return False
        return True

    def release(self) -> None:
        self.free0(self.held.all())
        self.free0(self.kept.all())


class FillFree(MemhogThenFree):
    """``memhog_then_free`` by the scenario files' name: ``size`` bytes allocated, written and
    freed again, ``keep`` of them left allocated."""

    name = "fill_free"


class Dirty(Workload):
    """A write rate over a working set while migration runs: ``rate`` bytes/s (default
    100 MiB/s) of writes to pages picked uniformly at random from the working set (a page may
    be written again before the host sends it). The working set is ``working_set`` bytes (or
    ``working_set_fraction`` of RAM, default 0.1) allocated and written once, or with
    ``existing=True`` pages already in use by the guest at start (the first ``working_set``
    bytes of them, all by default); writes skip pages their owner has freed since."""

    name = "dirty"

    def __init__(self, allocator: BuddyAllocator, pages: PageVersions | None = None, *,
                 seed: int = 0, tick: float = 0.01, working_set: int | None = None,
                 working_set_fraction: float | None = None, rate: float = 100 * 2**20,
                 existing: bool = False) -> None:
        super().__init__(allocator, pages, seed=seed, tick=tick)
        if rate < 0:
            raise UsageError(f"dirty: rate={rate}: must be >= 0 bytes/s")
        self.existing = existing
        if existing and working_set is None and working_set_fraction is None:
            self.target = -1  # all pages in use
        else:
            self.target = self._pages_of(working_set, working_set_fraction, 0.1, "working_set")
        self.rate_pages = rate / (1 << PAGE_SHIFT)
        self.ws = _PageSet()  # pages this workload allocated
        self._ws_arr: np.ndarray | None = None

    def held_pages(self) -> int:
        return self.ws.count

    def _ensure_ws(self) -> np.ndarray:
        if self._ws_arr is None:
            if self.existing:
                used = np.flatnonzero(self.a.in_use_mask())
                self._ws_arr = used if self.target < 0 else used[:self.target]
            else:
                got = self.alloc0(self.target)
                self.write(got)
                self.ws.add(got)
                self._ws_arr = self.ws.view()
        return self._ws_arr

    def run_phase(self) -> None:
        self._ensure_ws()

    def step(self, now: float, dt: float) -> bool:
        ws = self._ensure_ws()
        n = self._poisson(self.rate_pages * dt)
        if n and ws.size:
            pick = ws[self.rng.integers(0, ws.size, size=n)]
            if self.existing:
                # Only the owner writes its pages; a freed page is nobody's to write.
                pick = pick[self.a.state[pick] == PG_ALLOC]
            self.write(pick)
        return True

    def release(self) -> None:
        self.free0(self.ws.all())
        self._ws_arr = None


WorkloadFactory = Callable[..., Workload]
WORKLOADS: dict[str, WorkloadFactory] = {
    cls.name: cls for cls in (Idle, Fill, PageCache, Churn, MemhogThenFree, FillFree, Dirty)
}


def workload_params(name: str) -> list[str]:
    """The parameter names a workload accepts (besides allocator, pages)."""
    sig = inspect.signature(WORKLOADS[name])
    return [p for p in sig.parameters if p not in ("allocator", "pages")]


def make_workload(name: str, allocator: BuddyAllocator, pages: PageVersions | None = None, *,
                  seed: int = 0, **params: Any) -> Workload:
    """Build workload ``name`` from scenario parameters; a usage error names the bad key."""
    if name not in WORKLOADS:
        raise UsageError(f"unknown workload {name!r}; known: {', '.join(sorted(WORKLOADS))}")
    known = set(workload_params(name))
    for k in params:
        if k not in known:
            raise UsageError(f"workload {name!r}: unknown parameter {k!r}; "
                             f"known: {', '.join(sorted(known))}")
    return WORKLOADS[name](allocator, pages, seed=seed, **params)
