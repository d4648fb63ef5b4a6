"""The simple workloads: idle, fill, page cache, memhog-then-free (fill_free), dirty."""
from __future__ import annotations

import logging

import numpy as np

from guest_model.buddy import (
    MAX_ORDER,
    MIGRATE_MOVABLE,
    MIGRATE_RECLAIMABLE,
    PG_ALLOC,
    BuddyAllocator,
)
from guest_model.workloads.base import PageSet, Workload
from guestmem.pages import PageVersions
from guestmem.units import PAGE_SHIFT
from protocol.errors import UsageError

log = logging.getLogger(__name__)


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
        self.held = PageSet()
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
        self.cache = PageSet()
        self.slab = PageSet()
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
        self.held = PageSet()
        self.kept = PageSet()  # the ``keep`` share, still allocated after the free
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
        self.ws = PageSet()  # pages this workload allocated
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
