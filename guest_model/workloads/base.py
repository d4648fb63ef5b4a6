"""The workload base class: scheduling on the simulated clock, counters, page helpers.

See ``guest_model.workloads`` for how workloads run.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import ClassVar

import numpy as np

from guest_model.buddy import (
    MIGRATE_MOVABLE,
    BuddyAllocator,
)
from guestmem.clock import ScheduledEvent, Scheduler
from guestmem.pages import PageVersions
from guestmem.units import PAGE_SHIFT
from protocol.errors import UsageError

log = logging.getLogger(__name__)

SMALL = 64  # up to this many order-0 pages per call go through the per-cpu path


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
        if n <= SMALL:
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
        if pfns.size <= SMALL:
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
        if self.pages is not None:
            self.pages.switch_mm(self)  # each workload is a process of its own
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


class PageSet:
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


