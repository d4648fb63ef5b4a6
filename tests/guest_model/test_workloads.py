"""guest_model.workloads: seeded guest activity as a phase and on the simulated clock."""
from __future__ import annotations

import numpy as np
import pytest

from guest_model.buddy import (
    MAX_ORDER,
    MIGRATE_RECLAIMABLE,
    PG_ALLOC,
    PG_BUDDY,
    BuddyAllocator,
)
from guest_model.walk import FreeBlockWalker, schedule_walk
from guest_model.workloads import (
    WORKLOADS,
    Churn,
    Dirty,
    Fill,
    MemhogThenFree,
    PageCache,
    make_workload,
    workload_params,
)
from guestmem import DirtyLog
from guestmem.clock import Scheduler
from guestmem.pages import ZERO, PageVersions
from protocol.errors import UsageError

MiB = 1 << 20


def vm(ram: int = 128 * MiB, **kw: object) -> tuple[BuddyAllocator, PageVersions, DirtyLog]:
    n = ram >> 12
    log = DirtyLog(n)
    pv = PageVersions(n, log)
    a = BuddyAllocator(ram, pages=pv, reserved=[(1 * MiB, 4 * MiB)], **kw)  # type: ignore[arg-type]
    return a, pv, log


def test_registry_and_usage_errors() -> None:
    assert set(WORKLOADS) == {"idle", "fill", "page_cache", "churn", "memhog_then_free",
                              "fill_free", "dirty"}
    a, pv, _ = vm()
    for name in WORKLOADS:
        w = make_workload(name, a, pv, seed=1)
        assert w.name == name
        assert "seed" in workload_params(name) and "tick" in workload_params(name)
    with pytest.raises(UsageError, match="unknown workload 'nope'"):
        make_workload("nope", a, pv)
    with pytest.raises(UsageError, match="unknown parameter 'sise'"):
        make_workload("fill", a, pv, sise=1)
    with pytest.raises(UsageError, match="rate="):
        make_workload("fill", a, pv, rate=-1)
    with pytest.raises(UsageError, match="size or size_fraction"):
        make_workload("fill", a, pv, size=1, size_fraction=0.1)


def test_fill_phase_allocates_and_writes() -> None:
    a, pv, _log = vm()
    free0 = a.nr_free_pages()
    w = Fill(a, pv, size=32 * MiB)
    w.run_phase()
    assert w.held_pages() == (32 * MiB) >> 12
    held = w.held.view()
    assert np.all(a.state[held] == PG_ALLOC)
    assert np.all(pv.version[held] >= 2)  # written with data after the zeroing allocation
    assert int(a.in_use_mask().sum()) == held.size
    assert a.nr_free_pages() + a.nr_pcp_pages() == free0 - held.size
    w.release()
    a.drain_pcp()
    assert a.nr_free_pages() == free0
    a.check()


def test_fill_of_huge_pages() -> None:
    a, pv, _ = vm()
    w = Fill(a, pv, size=16 * MiB + 4096, order=9)
    w.run_phase()
    assert len(w.blocks) == 8 and all(p % 512 == 0 for p in w.blocks)
    assert w.held_pages() == 8 * 512
    assert np.all(a.state[np.concatenate([np.arange(p, p + 512) for p in w.blocks])] == PG_ALLOC)
    w.release()
    a.check()


def test_fill_background_rate_on_the_clock() -> None:
    a, pv, _ = vm(256 * MiB)
    sched = Scheduler()
    w = Fill(a, pv, size=200 * MiB, rate=100 * MiB, tick=0.01)
    w.start(sched)
    sched.run_until(0.5)
    # 100 MiB/s for 0.5 s = 50 MiB = 12800 pages (the tick at 0.5 included).
    assert abs(w.held_pages() - 12800) <= 256
    sched.run_until(10.0)
    assert w.finished and w.held_pages() == (200 * MiB) >> 12
    assert sched.pending() == 0


def test_page_cache_turns_over_at_its_size() -> None:
    a, pv, _ = vm()
    w = PageCache(a, pv, size=20 * MiB, rate=50 * MiB, reclaimable_fraction=0.1)
    w.run_phase()
    size = (20 * MiB) >> 12
    assert w.held_pages() == size
    assert a.free_counts()[:, :, MIGRATE_RECLAIMABLE].sum() > 0 or w.slab.count > 0
    first = w.cache.view()[:100].copy()
    v_first = pv.version[first].copy()
    sched = Scheduler()
    w.start(sched, until=1.0)
    sched.run_until(2.0)
    assert w.held_pages() == size  # evicts past its size
    assert w.stats["freed_pages"] > 0 and not w.running
    # 50 MiB read through a 20 MiB cache: the oldest pages were all evicted; a pfn may have
    # come back for a newer read, but then with newer content.
    assert np.all((a.state[first] != PG_ALLOC) | (pv.version[first] != v_first))
    a.check()


def test_churn_holds_rate_times_lifetime() -> None:
    a, pv, _ = vm(256 * MiB)
    sched = Scheduler()
    w = Churn(a, pv, seed=3, rate=100 * MiB, lifetime=0.05)
    w.start(sched)
    sched.run_until(0.5)
    # Little's law: about rate * lifetime = 5 MiB = 1280 pages alive.
    assert 900 <= w.held_pages() <= 1700
    _, _, orders = w.live_blocks()
    assert w.held_pages() == int((1 << orders.astype(np.int64)).sum())
    assert set(orders.tolist()) >= {0, 2}
    w.stop()
    w.release()
    a.drain_pcp()
    assert a.in_use_mask().sum() == 0
    a.check()


def test_churn_phase_frees_at_the_end_and_dirties_free_memory() -> None:
    a, pv, _ = vm()
    w = Churn(a, pv, seed=1, rate=20 * MiB, duration=0.2)
    w.run_phase()
    assert w.stats["alloc_pages"] > 0 and w.live_blocks()[0].size == 0
    assert a.in_use_mask().sum() == 0
    free = a.free_mask()
    assert np.any(pv.version[free] >= 2)  # free pages still hold the build's data
    a.check()


def test_memhog_then_free_phase_and_background() -> None:
    a, pv, _ = vm()
    free0 = a.nr_free_pages()
    w = MemhogThenFree(a, pv, fraction=0.8)
    w.run_phase()
    a.drain_pcp()
    assert a.nr_free_pages() == free0 and a.in_use_mask().sum() == 0
    assert int(np.count_nonzero(pv.version >= 2)) >= int(free0 * 0.8) - 1
    # With init_on_free the same run leaves free memory zeroed.
    b, pv2, _ = vm(init_on_free=True)
    MemhogThenFree(b, pv2, fraction=0.8).run_phase()
    assert np.all(pv2.version[b.free_mask()] == ZERO)
    # Background: fills at its rate, holds, frees.
    c, pv3, _ = vm()
    sched = Scheduler()
    m = MemhogThenFree(c, pv3, fraction=0.5, rate=1024 * MiB, hold=0.1)
    m.start(sched)
    sched.run_until(0.04)
    assert m.target is not None and 0 < m.held_pages() < m.target
    sched.run_until(1.0)
    assert m.finished and m.held_pages() == 0
    c.check()


def test_dirty_writes_at_its_rate_into_the_log() -> None:
    a, pv, log = vm()
    w = Dirty(a, pv, seed=2, working_set=16 * MiB, rate=40 * MiB)
    w.run_phase()
    ws = w.ws.view()
    log.start()
    sched = Scheduler()
    w.start(sched)
    sched.run_until(1.0)
    # 40 MiB/s for 1 s = 10240 page writes, Poisson: within a few percent.
    writes = w.stats["written_pages"] - ws.size
    assert 9500 <= writes <= 11000
    dirty = np.flatnonzero(log.peek())
    assert set(dirty.tolist()) <= set(ws.tolist())
    # 10240 uniform writes over 4096 pages touch almost all of them.
    assert dirty.size > 0.9 * ws.size


def test_same_seed_same_guest() -> None:
    def run(seed: int) -> tuple[bytes, bytes]:
        a, pv, _ = vm()
        sched = Scheduler()
        for name, params in [("page_cache", {"size": 8 * MiB}), ("churn", {"rate": 12 * MiB}),
                             ("dirty", {"working_set": 4 * MiB})]:
            w = make_workload(name, a, pv, seed=seed, **params)
            w.run_phase() if name == "page_cache" else None
            w.start(sched, until=0.3)
        sched.run_until(0.5)
        return a.state.tobytes(), pv.version.tobytes()

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_walk_with_workloads_in_between_reports_free_blocks() -> None:
    """The safe walk on the clock with churn + page cache + dirty running between reports:
    each block is free when reported; some get allocated and written afterwards (the accepted
    race), and those writes are in the dirty log."""
    a, pv, log = vm(256 * MiB)
    Fill(a, pv, size_fraction=0.3).run_phase()
    sched = Scheduler()
    log.start()
    for w in (Churn(a, pv, seed=5, rate=200 * MiB, lifetime=0.02, tick=0.0005),
              PageCache(a, pv, seed=5, size=64 * MiB, rate=400 * MiB, tick=0.0005)):
        w.run_phase() if isinstance(w, PageCache) else None
        w.start(sched)
    reports: list[tuple[int, int]] = []
    bad = 0

    def visit(_: object, pfn: int, n: int) -> None:
        nonlocal bad
        bad += int(not np.all(a.state[pfn:pfn + n] == PG_BUDDY))
        reports.append((pfn, n))

    h = schedule_walk(sched, FreeBlockWalker(a, 0), cost_per_block=0.0002, visit=visit)
    for _ in range(2_000_000):
        if h.finished is not None or not sched.run_next():
            break
    assert h.finished is not None and reports and bad == 0
    dirty = log.peek()
    later_used = [(p, n) for p, n in reports if np.any(a.state[p:p + n] == PG_ALLOC)]
    assert later_used, "no reported block was reused: the race was not exercised"
    for p, n in later_used:
        used = a.state[p:p + n] == PG_ALLOC
        assert np.all(dirty[p:p + n][used]), f"write after report to {p:#x} not logged"
    assert max(n for _, n in reports) == 1 << (MAX_ORDER - 1)


def test_churn_footprint_and_fixed_order() -> None:
    a, pv, _ = vm(256 * MiB)
    sched = Scheduler()
    w = Churn(a, pv, seed=4, rate=400 * MiB, lifetime=1.0, footprint=8 * MiB, order=2)
    w.start(sched)
    sched.run_until(0.3)
    # 120 MiB allocated, at most 8 MiB live at once, every allocation order 2.
    assert w.stats["alloc_pages"] > 20000
    assert w.held_pages() <= 2048 and set(w.live_blocks()[2].tolist()) == {2}
    assert int(a.in_use_mask().sum()) == w.held_pages()


def test_fill_free_keeps_a_fragmenting_share() -> None:
    a, pv, _ = vm()
    w = make_workload("fill_free", a, pv, seed=9, size=64 * MiB, keep=0.25)
    w.run_phase()
    assert isinstance(w, MemhogThenFree)
    kept = w.kept.view()
    assert abs(kept.size - 4096) < 300 and w.held_pages() == kept.size
    assert int(a.in_use_mask().sum()) == kept.size
    a.drain_pcp()
    # The kept pages are scattered: the freed memory is in small blocks around them.
    counts = a.free_counts().sum(axis=(0, 2))
    assert counts[:4].sum() > 1000
    a.check()


def test_dirty_over_existing_pages_skips_freed_ones() -> None:
    a, pv, log = vm()
    fill = Fill(a, pv, size=8 * MiB)
    fill.run_phase()
    w = Dirty(a, pv, seed=3, rate=80 * MiB, existing=True)
    sched = Scheduler()
    log.start()
    w.start(sched)
    sched.run_until(0.2)
    first_half = fill.held.view()[:1024].copy()
    a.free_pages_bulk(first_half)
    log.sync()
    sched.run_until(0.6)
    dirty = np.flatnonzero(log.sync())
    assert dirty.size > 0
    assert not np.isin(dirty, first_half).any()  # nobody writes pages after their free
    assert np.isin(dirty, fill.held.view()[1024:]).all()


def _every_tick(sched: Scheduler, w: Churn, check: object, until: float) -> None:
    """Run ``sched`` to ``until``, calling ``check(now)`` right after each of ``w``'s ticks."""
    t = 0.0
    while t < until:
        t += w.tick
        sched.run_until(t + w.tick / 2)
        check(sched.now)  # type: ignore[operator]


def test_churn_at_compile_rate_uses_bulk_calls_with_exponential_lifetimes_and_mixed_orders(
) -> None:
    """600 MiB/s (the compile scenarios) goes through the allocator's bulk calls: only the
    order 1-3 allocations and the small order-0 kinds of a tick take one call each. The
    semantics stay: Poisson arrivals of the kernel-build mix, exponential lifetimes (the
    residual life of what is live is exponential too, same mean), every death freed at the
    first tick at or after it, every allocation written."""
    a, pv, log = vm(1024 * MiB, nr_cpus=4)
    log.start()
    sched = Scheduler()
    w = Churn(a, pv, seed=6, rate=600 * MiB, lifetime=0.2, tick=0.005)
    w.start(sched)
    late: list[float] = []
    residual: list[np.ndarray] = []

    def check(now: float) -> None:
        exp, _, _ = w.live_blocks()
        late.append(float(exp[0]) - now if exp.size else 1.0)
        if now > 0.5:
            residual.append(exp - now)
        assert np.all(np.diff(exp) >= 0)

    _every_tick(sched, w, check, 1.0)
    assert min(late) > -w.tick / 2  # nothing overstays a tick: due deaths are all freed
    # ~153,600 pages allocated in 1 s; Little's law: rate x lifetime = 120 MiB = 30,720 live
    assert 140_000 <= w.stats["alloc_pages"] <= 168_000
    assert 25_000 <= w.held_pages() <= 36_000
    res = np.concatenate(residual)
    assert 0.17 <= float(res.mean()) <= 0.23  # memoryless: mean residual life = lifetime
    assert 0.55 <= float(np.mean(res < 0.2)) <= 0.72  # P(residual < mean) = 1 - 1/e = 0.63
    _, pfn, orders = w.live_blocks()
    share = np.bincount(orders, minlength=4) / orders.size
    assert 0.87 <= share[0] <= 0.93 and 0.04 <= share[2] <= 0.06 and share[3] > 0.01
    assert np.all(pfn % (1 << orders.astype(np.int64)) == 0)  # blocks aligned to their order
    # the bulk calls did the order-0 movable work and nearly all frees; per-call ones are few
    allocs = w.stats["alloc_pages"]
    assert a.counters["bulk_alloc_pages"] > 0.5 * allocs  # order-0 movable: 57% of the pages
    assert a.counters["bulk_free_pages"] > 0.9 * w.stats["freed_pages"]
    assert a.counters["alloc"] < 0.25 * allocs
    # every page allocated was written: the live ones carry data, in the dirty log
    live = w._block_pages(pfn, orders)
    assert np.all(pv.version[live] >= 2) and np.all(log.peek()[live])
    assert int(a.in_use_mask().sum()) == w.held_pages() == live.size
    assert w.stats["written_pages"] == allocs
    w.stop()
    w.release()
    assert w.held_pages() == 0 and int(a.in_use_mask().sum()) == 0
    assert w.stats["freed_pages"] == allocs
    a.check()


def test_churn_footprint_frees_the_soonest_deaths_and_is_never_exceeded() -> None:
    """With the cap binding (400 MiB/s x 1 s >> 16 MiB) what is live never exceeds it after a
    tick, and what survives is the longest-lived: the early deaths were the soonest due."""
    a, pv, _ = vm(256 * MiB)
    sched = Scheduler()
    w = Churn(a, pv, seed=8, rate=400 * MiB, lifetime=1.0, footprint=16 * MiB, tick=0.005)
    w.start(sched)
    peak = 0
    floor: list[float] = []

    def check(now: float) -> None:
        nonlocal peak
        peak = max(peak, w.held_pages())
        exp, _, _ = w.live_blocks()
        floor.append(float(exp[0]) - now)

    _every_tick(sched, w, check, 0.5)
    assert peak <= 4096 and w.held_pages() > 3900
    # surviving the cap takes a long life: once it has been binding for 0.2 s the shortest
    # residual life left is above the mean of an uncapped churn (1 s), and still rising
    assert min(floor[40:]) > 1.0 and floor[-1] > floor[40]
    assert w.stats["alloc_pages"] > 40_000 and int(a.in_use_mask().sum()) == w.held_pages()
    a.check()


def test_churn_is_deterministic_at_bulk_rates() -> None:
    def run(seed: int) -> tuple[bytes, bytes, dict[str, int]]:
        a, pv, _ = vm(256 * MiB)
        sched = Scheduler()
        w = Churn(a, pv, seed=seed, rate=300 * MiB, lifetime=0.1, footprint=24 * MiB)
        w.start(sched, until=0.3)
        sched.run_until(0.4)
        return a.state.tobytes(), pv.version.tobytes(), dict(w.stats)

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_churn_out_of_memory_counts_failures_and_survives() -> None:
    """A churn that cannot fit (16 MiB guest, 200 MiB/s for 1 s lifetimes) gets what memory
    there is, counts each allocation it could not make, and its books stay right."""
    a, pv, _ = vm(16 * MiB)
    sched = Scheduler()
    w = Churn(a, pv, seed=2, rate=200 * MiB, lifetime=1.0)
    w.start(sched)
    sched.run_until(0.2)
    assert w.stats["alloc_failures"] > 0
    assert int(a.in_use_mask().sum()) == w.held_pages() > 1000
    w.stop()
    w.release()
    assert int(a.in_use_mask().sum()) == 0
    a.check()
