"""The churn workload: allocations of a size mix arriving at a rate, each living an
exponential lifetime, within an optional footprint."""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from guest_model.buddy import (
    MAX_ORDER,
    MIGRATE_MOVABLE,
    MIGRATE_RECLAIMABLE,
    MIGRATE_UNMOVABLE,
    BuddyAllocator,
)
from guest_model.workloads.base import SMALL, Workload
from guestmem.pages import PageVersions
from guestmem.units import PAGE_SHIFT
from protocol.errors import UsageError


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
    order-0 ones of a migratetype come from one ``alloc_pages_bulk`` call, the higher orders
    of a kind from one ``alloc_blocks_bulk`` call (what the same ``alloc_pages`` calls one by
    one give); one ``write_pfns`` writes them all. The live allocations are a ``LiveBlocks``
    (expiry order without re-copying every tick), so the deaths due by ``now`` and the
    footprint's early deaths both come out soonest first, freed with one
    ``free_pages_bulk``. The allocator records no order for allocated pages and every free
    layout merges to the same blocks, so freeing a block's pages in bulk leaves the buddy lists
    as ``free_pages(pfn, order)`` would, up to where on a list a block sits. Small amounts (at
    most ``SMALL`` pages) use the per-cpu calls."""

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
        self.live = LiveBlocks()
        self.live_pages = 0
        self._local_now = 0.0

    def held_pages(self) -> int:
        return self.live_pages

    def live_blocks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The live allocations as (expiry, first pfn, order) arrays, soonest death first."""
        return self.live.sorted()

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
        if pages.size <= SMALL:
            cpus = self.rng.integers(self.a.nr_cpus, size=pfn.size)
            for p, o, c in zip(pfn.tolist(), order.tolist(), cpus.tolist(), strict=True):
                self.a.free_pages(p, o, cpu=c)
        else:
            self.a.free_pages_bulk(pages)
        self.live_pages -= int(pages.size)
        self.stats["freed_pages"] += int(pages.size)

    def _alloc_kind(self, count: int, order: int, mt: int) -> np.ndarray:
        """Up to ``count`` allocations of one kind, as first pfns (fewer when memory ran out)."""
        if order == 0 and count > SMALL:
            return self.a.alloc_pages_bulk(count, mt)
        cpus = self.rng.integers(self.a.nr_cpus, size=count).tolist()
        if order > 0:
            # The per-cpu lists only serve order 0: every cpu gives the same result, and one
            # call gives what the calls one by one would (stopping at the first failure).
            return self.a.alloc_blocks_bulk(count, order, mt)
        got = []
        for c in cpus:
            p = self.a.alloc_pages(order, mt, cpu=c)
            if p is None:
                break  # the allocator is out of memory: the rest of this kind fails too
            got.append(p)
        return np.array(got, dtype=np.int64)

    # ---- one tick ---------------------------------------------------------------------------
    def _work(self, now: float, dt: float) -> None:
        self._free_blocks(*self.live.pop_due(now))
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
            pfn_gone, order_gone, new_gone = self.live.pop_over(
                self.live_pages + int(size.sum()) - self.cap, exp, size)
            self._free_blocks(pfn_gone, order_gone)
            early[new_gone] = True
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
        self.live.add(exp, pfn, orders)  # sorted by expiry, as the tick's batch is

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
        _, pfn, order = self.live.sorted()
        self.live.clear()
        self._free_blocks(pfn, order)


class LiveBlocks:
    """A churn's live allocations (expiry, first pfn, order), taken out soonest death first,
    without re-copying all of them every tick.

    A sorted run holds most of them; each tick's survivors arrive as a batch already sorted
    by expiry and wait in a list of batches. Taking the deaths due by a time is a prefix of
    the run (``searchsorted``) and of each batch, put in expiry order among themselves; the
    run is only a view after that (no copy). The batches are merged into the run when they
    hold more than an eighth of it, so each entry is copied a bounded number of times
    instead of once per tick. Expiries are random floats, so no two are equal and "soonest
    first" is one order whatever the layout; what comes out is what one array kept sorted by
    ``searchsorted`` inserts gives.
    """

    def __init__(self) -> None:
        self._run: tuple[np.ndarray, np.ndarray, np.ndarray] = _empty_blocks()
        self._batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._batched = 0

    def __len__(self) -> int:
        return int(self._run[0].size) + self._batched

    def add(self, exp: np.ndarray, pfn: np.ndarray, order: np.ndarray) -> None:
        """Add blocks sorted by expiry."""
        if exp.size == 0:
            return
        self._batches.append((exp, pfn, order))
        self._batched += int(exp.size)
        if self._batched * 8 > self._run[0].size:
            self._run = self.sorted()
            self._batches, self._batched = [], 0

    def sorted(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every live block, soonest expiry first (copies).

        The run and the batches are each sorted, so a stable sort of their concatenation is
        a merge of sorted runs (numpy's stable sort finds them: about linear time)."""
        if not self._batches:
            return tuple(a.copy() for a in self._run)  # type: ignore[return-value]
        parts = [self._run, *self._batches]
        idx = np.argsort(np.concatenate([x[0] for x in parts]), kind="stable")
        exp, pfn, order = (np.concatenate([x[i] for x in parts])[idx] for i in range(3))
        return exp, pfn, order

    def clear(self) -> None:
        self._run, self._batches, self._batched = _empty_blocks(), [], 0

    def _take_prefixes(self, run_k: int, batch_k: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Remove the first ``run_k`` of the run and ``batch_k[i]`` of batch i; their (pfn,
        order), soonest expiry first."""
        taken = [tuple(a[:run_k] for a in self._run)]
        self._run = tuple(a[run_k:] for a in self._run)  # type: ignore[assignment]
        rest = []
        for (e, p, o), k in zip(self._batches, batch_k, strict=True):
            if k:
                taken.append((e[:k], p[:k], o[:k]))
                self._batched -= k
            if k < e.size:
                rest.append((e[k:], p[k:], o[k:]))
        self._batches = rest
        exp = np.concatenate([t[0] for t in taken])
        idx = np.argsort(exp, kind="stable")
        return (np.concatenate([t[1] for t in taken])[idx],
                np.concatenate([t[2] for t in taken])[idx])

    def pop_due(self, now: float) -> tuple[np.ndarray, np.ndarray]:
        """Remove the blocks with expiry <= ``now``: (pfn, order), soonest first."""
        run_k = int(np.searchsorted(self._run[0], now, side="right"))
        batch_k = [int(np.searchsorted(b[0], now, side="right")) for b in self._batches]
        return self._take_prefixes(run_k, batch_k)

    def pop_over(self, excess: int, new_exp: np.ndarray,
                 new_size: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Over the live blocks and a new batch (``new_exp`` sorted, ``new_size`` pages each)
        together, the soonest to die go: the shortest prefix in expiry order holding at least
        ``excess`` pages (``excess`` is at most all of them). Live ones are removed and
        returned as (pfn, order) soonest first; the new ones as indices into the batch.
        """
        # Candidates: a front of the run holding at least ``excess`` pages (blocks behind it
        # expire after all of it, so the prefix ends inside it or before), every batch, the
        # new batch.
        run_e, run_p, run_o = self._run
        k = 0
        while True:
            k = min(run_e.size, max(2 * k, 1024))
            if k == run_e.size or int(np.left_shift(1, run_o[:k].astype(np.int64)).sum()) \
                    >= excess:
                break
        parts_e = [run_e[:k]] + [b[0] for b in self._batches] + [new_exp]
        parts_s = [np.left_shift(1, run_o[:k].astype(np.int64))] + \
            [np.left_shift(1, b[2].astype(np.int64)) for b in self._batches] + [new_size]
        src = np.concatenate([np.full(e.size, i, dtype=np.int64) for i, e in enumerate(parts_e)])
        pos = np.concatenate([np.arange(e.size, dtype=np.int64) for e in parts_e])
        idx = np.argsort(np.concatenate(parts_e), kind="stable")
        removed = np.cumsum(np.concatenate(parts_s)[idx])
        # Remove while what remains is over the cap: item i goes if removed[i-1] < excess.
        g = int(np.searchsorted(removed, excess, side="left")) + 1
        g = min(g, idx.size)
        gone_src, gone_pos = src[idx[:g]], pos[idx[:g]]
        counts = np.bincount(gone_src, minlength=len(parts_e))
        new_gone = gone_pos[gone_src == len(parts_e) - 1]
        pfn, order = self._take_prefixes(int(counts[0]), [int(c) for c in counts[1:-1]])
        return pfn, order, np.sort(new_gone)


def _empty_blocks() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.empty(0, dtype=np.float64), np.empty(0, dtype=np.int64),
            np.empty(0, dtype=np.int8))
