"""guest_model.workloads.churn against the plain churn it replaces.

``ReferenceChurn`` keeps the live allocations as three arrays sorted by expiry, merging each
tick's survivors in with ``np.insert`` and allocating order 1-3 blocks with one
``alloc_pages`` call each. ``Churn`` uses ``LiveBlocks`` and ``alloc_blocks_bulk``. Driven on
twin allocators with the same seed, they must leave the same allocator (links, counters, page
versions, dirty log), the same statistics and the same live blocks, tick after tick, with and
without a footprint cap, with memory to spare and under pressure.
"""
from __future__ import annotations

import numpy as np
import pytest

from guest_model.workloads import SMALL, Churn
from tests.guest_model.buddy.test_free_blocks_bulk import make
from tests.guest_model.buddy.twins import assert_same

MiB = 1 << 20


class ReferenceChurn(Churn):
    """The live set as sorted arrays (np.insert per tick), higher orders one call each."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self._exp = np.empty(0, dtype=np.float64)
        self._pfn = np.empty(0, dtype=np.int64)
        self._order = np.empty(0, dtype=np.int8)

    def live_blocks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._exp.copy(), self._pfn.copy(), self._order.copy()

    def _free_oldest(self, k: int) -> None:
        if k <= 0:
            return
        self._free_blocks(self._pfn[:k], self._order[:k])
        self._exp, self._pfn, self._order = self._exp[k:], self._pfn[k:], self._order[k:]

    def _alloc_kind(self, count: int, order: int, mt: int) -> np.ndarray:
        if order == 0 and count > SMALL:
            return self.a.alloc_pages_bulk(count, mt)
        got = []
        for c in self.rng.integers(self.a.nr_cpus, size=count).tolist():
            p = self.a.alloc_pages(order, mt, cpu=c)
            if p is None:
                break
            got.append(p)
        return np.array(got, dtype=np.int64)

    def _work(self, now: float, dt: float) -> None:
        self._free_oldest(int(np.searchsorted(self._exp, now, side="right")))
        n = self._poisson(self.alloc_rate * dt)
        if n == 0:
            return
        kinds = self.rng.choice(len(self.mix), size=n, p=self.p)
        lives = self.rng.exponential(self.lifetime, size=n)
        exp = now - dt + self.rng.random(n) * dt + lives
        orders = self._kind_order[kinds]
        size = np.left_shift(1, orders.astype(np.int64))
        if self.cap is not None:
            fits = size <= self.cap
            kinds, exp, orders, size = kinds[fits], exp[fits], orders[fits], size[fits]
        by_exp = np.argsort(exp, kind="stable")
        kinds, exp, orders, size = kinds[by_exp], exp[by_exp], orders[by_exp], size[by_exp]
        early = exp <= now
        if self.cap is not None and self.live_pages + int(size.sum()) > self.cap:
            all_exp = np.concatenate([self._exp, exp])
            all_size = np.concatenate([np.left_shift(1, self._order.astype(np.int64)), size])
            idx = np.argsort(all_exp, kind="stable")
            from_end = np.cumsum(all_size[idx][::-1])[::-1]
            gone = idx[:int(np.count_nonzero(from_end > self.cap))]
            old = self._exp.size
            self._free_oldest(int(np.count_nonzero(gone < old)))
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
        self.write(pages)
        if early.any():
            self._free_blocks(pfn[early], orders[early])
            pfn, orders, exp = pfn[~early], orders[~early], exp[~early]
        at = np.searchsorted(self._exp, exp, side="right")
        self._exp = np.insert(self._exp, at, exp)
        self._pfn = np.insert(self._pfn, at, pfn)
        self._order = np.insert(self._order, at, orders)

    def release(self) -> None:
        self._free_oldest(self._exp.size)


@pytest.mark.parametrize(("ram", "rate", "lifetime", "footprint", "seed"), [
    (64 * MiB, 40 * MiB, 0.5, None, 1),      # memory to spare
    (64 * MiB, 80 * MiB, 1.0, 12 * MiB, 2),  # the footprint cap frees early every tick
    (32 * MiB, 200 * MiB, 2.0, None, 3),     # out of memory: fallback steals, failures
    (48 * MiB, 300 * MiB, 0.3, 20 * MiB, 4),
])
def test_churn_matches_the_reference_tick_by_tick(ram: int, rate: float, lifetime: float,
                                                  footprint: int | None, seed: int) -> None:
    a, pa = make(ram, reserved=[(1 * MiB, 1 * MiB)], seed=seed)
    r, pr = make(ram, reserved=[(1 * MiB, 1 * MiB)], seed=seed)
    a.next[:] = r.next
    a.prev[:] = r.prev
    kw = dict(seed=seed, tick=0.01, rate=rate, lifetime=lifetime, footprint=footprint)
    new, ref = Churn(a, pa, **kw), ReferenceChurn(r, pr, **kw)  # type: ignore[arg-type]
    now = 0.0
    for _ in range(150):
        now += 0.01
        new.step(now, 0.01)
        ref.step(now, 0.01)
        assert new.stats == ref.stats and new.live_pages == ref.live_pages
        for x, y in zip(new.live_blocks(), ref.live_blocks(), strict=True):
            np.testing.assert_array_equal(x, y)
    assert_same(a, r)
    assert ref.stats["freed_pages"] > 0 and ref.stats["alloc_pages"] > 10_000
    new.release()
    ref.release()
    assert_same(a, r)
    a.check()
