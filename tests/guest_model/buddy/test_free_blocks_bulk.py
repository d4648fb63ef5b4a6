"""guest_model.buddy ``free_blocks_bulk`` against ``free_pages`` called block by block.

Two allocators are booted alike and driven by the same calls; where one frees a batch of
same-order blocks with ``free_blocks_bulk``, the other calls ``free_pages`` for each block in the
same order. After every step they must agree on every per-page array, list head, tail and count,
``next`` / ``prev`` links included (stale ones too), the page contents and dirty log written
on free (init_on_free / page_poisoning), the counters, the per-cpu lists and the orders the free
notifiers were told. The held hint blocks the balloon driver frees at DONE are the case this is
for (order 10, many at once); lower orders exercise the merge and head/tail rules.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule

from guest_model.buddy import (
    MAX_ORDER,
    MIGRATE_MOVABLE,
    MIGRATE_RECLAIMABLE,
    MIGRATE_UNMOVABLE,
    OWNER_BALLOON,
    OWNER_GUEST,
    BuddyAllocator,
    BuddyError,
)
from guestmem.dirty import DirtyLog
from guestmem.pages import POISON, ZERO, PageVersions
from tests.guest_model.buddy.twins import TwinRules, assert_same

MiB = 1 << 20

MTS = [MIGRATE_UNMOVABLE, MIGRATE_MOVABLE, MIGRATE_RECLAIMABLE]


def make(ram: int, **kw: object) -> tuple[BuddyAllocator, PageVersions]:
    log = DirtyLog(ram >> 12)
    log.start()
    pages = PageVersions(ram >> 12, log)
    return BuddyAllocator(ram, pages=pages, **kw), pages  # type: ignore[arg-type]


def twins(ram: int, **kw: object) -> tuple[BuddyAllocator, BuddyAllocator]:
    a, _ = make(ram, **kw)
    r, _ = make(ram, **kw)
    # Links start uninitialised away from free-block heads; make the garbage equal too.
    a.next[:] = r.next
    a.prev[:] = r.prev
    return a, r


class BulkFreeTwins(TwinRules):
    """``a`` frees batches with free_blocks_bulk, ``r`` with a loop of free_pages."""

    @initialize(init=st.sampled_from(["none", "init_on_free", "poison"]), shuffle=st.booleans())
    def boot(self, init: str, shuffle: bool) -> None:
        # DMA with a reserved hole, some DMA32 and a ragged end (a partial max-order block);
        # 2 cpus so order-0 batches go through per-cpu lists and their flushes.
        self.a, self.r = twins(24 * MiB + 5 * 4096, reserved=[(1 * MiB, 3 * MiB + 4096)],
                               nr_cpus=2, seed=3, shuffle=shuffle,
                               init_on_free=init == "init_on_free",
                               page_poisoning=init == "poison")
        self.held: dict[int, int] = {}  # pfn -> order
        self.isolated: dict[int, int] = {}
        self.notified: tuple[list[int], list[int]] = ([], [])
        self.a.register_free_notifier(self.notified[0].append)
        self.r.register_free_notifier(self.notified[1].append)

    @rule(order=st.integers(0, MAX_ORDER - 1), mt=st.sampled_from(MTS), cpu=st.integers(0, 1),
          times=st.integers(1, 12), balloon=st.booleans())
    def alloc(self, order: int, mt: int, cpu: int, times: int, balloon: bool) -> None:
        owner = OWNER_BALLOON if balloon else OWNER_GUEST
        for _ in range(times):
            p = self.a.alloc_pages(order, mt, cpu=cpu, owner=owner, noretry=balloon)
            assert p == self.r.alloc_pages(order, mt, cpu=cpu, owner=owner, noretry=balloon)
            if p is None:
                break
            self.held[p] = order

    @rule(n=st.integers(1, 3000), mt=st.sampled_from(MTS))
    def alloc_bulk(self, n: int, mt: int) -> None:
        got = self.a.alloc_pages_bulk(n, mt)
        np.testing.assert_array_equal(got, self.r.alloc_pages_bulk(n, mt))
        for p in got.tolist():
            self.held[p] = 0

    @precondition(lambda self: self.held)
    @rule(data=st.data(), cpu=st.integers(0, 1))
    def free_batch(self, data: st.DataObject, cpu: int) -> None:
        orders = sorted(set(self.held.values()))
        order = data.draw(st.sampled_from(orders))
        mine = sorted(p for p, o in self.held.items() if o == order)
        how = data.draw(st.sampled_from(["all", "prefix", "stride", "random"]))
        if how == "all":
            sel = mine
        elif how == "prefix":
            sel = mine[:data.draw(st.integers(1, len(mine)))]
        elif how == "stride":
            sel = mine[data.draw(st.integers(0, 1))::data.draw(st.integers(2, 4))] or mine[:1]
        else:
            rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
            sel = rng.choice(mine, size=int(rng.integers(1, len(mine) + 1)),
                             replace=False).tolist()
        if data.draw(st.booleans()):
            sel = sel[::-1]
        for p in sel:
            del self.held[p]
        self.a.free_blocks_bulk(np.array(sel, dtype=np.int64), order, cpu=cpu)
        for p in sel:
            self.r.free_pages(p, order, cpu=cpu)


TestBulkFreeTwins = BulkFreeTwins.TestCase
TestBulkFreeTwins.settings = settings(max_examples=80, stateful_step_count=30, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])


def _no_per_block_frees(a: BuddyAllocator, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kw: object) -> None:
        raise AssertionError("free_blocks_bulk fell back to free_pages")
    monkeypatch.setattr(a, "free_pages", refuse)


@pytest.mark.parametrize("init", ["none", "init_on_free", "poison"])
def test_held_hint_blocks_take_the_batched_path_and_match(
        init: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DONE case: every free max-order block captured as the balloon does, then all freed
    most recent first. No per-block fallback, and the result is the loop's, writes included."""
    a, r = twins(64 * MiB + 3 * 4096, reserved=[(1 * MiB, 4 * MiB)],
                 init_on_free=init == "init_on_free", page_poisoning=init == "poison")
    notified: tuple[list[int], list[int]] = ([], [])
    a.register_free_notifier(notified[0].append)
    r.register_free_notifier(notified[1].append)
    held = []
    while True:
        p = a.alloc_pages(MAX_ORDER - 1, MIGRATE_UNMOVABLE, noretry=True, owner=OWNER_BALLOON)
        assert p == r.alloc_pages(MAX_ORDER - 1, MIGRATE_UNMOVABLE, noretry=True,
                                  owner=OWNER_BALLOON)
        if p is None:
            break
        held.append(p)
    assert len(held) >= 10
    order = np.array(held[::-1], dtype=np.int64)
    _no_per_block_frees(a, monkeypatch)
    a.free_blocks_bulk(order, MAX_ORDER - 1)
    for p in order.tolist():
        r.free_pages(p, MAX_ORDER - 1)
    assert_same(a, r)
    assert notified[0] == notified[1] == [MAX_ORDER - 1] * len(held)
    assert a.pages is not None
    want = {"none": None, "init_on_free": ZERO, "poison": POISON}[init]
    if want is not None:
        assert bool(np.all(a.pages.version[order[:, None] + np.arange(1024)] == want))
    a.check()


def test_lower_order_without_buddies_is_batched_with_tail_placement(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Order-3 blocks whose buddies stay allocated: no merge, so the batched path runs; blocks
    whose parent's buddy is a free order-4 block go to the list tail (buddy_merge_likely)."""
    a, r = twins(24 * MiB, reserved=[(1 * MiB, 3 * MiB)])
    blocks = []
    for _ in range(64):
        p = a.alloc_pages(3, MIGRATE_MOVABLE)
        assert p == r.alloc_pages(3, MIGRATE_MOVABLE)
        blocks.append(p)
    # Free every other block's buddy pair parent first, leaving free order-4 neighbours for
    # some blocks (tail) and none for others (head): free both halves of some order-4 parents.
    blocks.sort()
    pairs = [(p, p ^ 8) for p in blocks if p & 8 == 0 and (p ^ 8) in blocks]
    assert len(pairs) >= 8
    for lo, hi in pairs[::4]:
        for x in (a, r):
            x.free_pages(lo, 3)
            x.free_pages(hi, 3)
        blocks.remove(lo)
        blocks.remove(hi)
    # One of each remaining pair: its buddy stays allocated, so nothing can merge.
    batch = [lo for lo, hi in pairs if lo in blocks][::-1]
    assert len(batch) >= 4
    _no_per_block_frees(a, monkeypatch)
    a.free_blocks_bulk(np.array(batch, dtype=np.int64), 3)
    for p in batch:
        r.free_pages(p, 3)
    assert_same(a, r)
    a.check()


@pytest.mark.parametrize("bad", ["outside", "misaligned", "twice", "free", "reserved"])
def test_a_bad_batch_raises_and_frees_nothing(bad: str) -> None:
    a, _ = make(24 * MiB, reserved=[(1 * MiB, 3 * MiB)])
    held = [a.alloc_pages(2, MIGRATE_MOVABLE) for _ in range(6)]
    assert all(p is not None for p in held)
    pfns = [int(p) for p in held if p is not None]
    extra = {"outside": a.ram_pages, "misaligned": pfns[0] + 1, "twice": pfns[2],
             "free": pfns[-1], "reserved": 1 * MiB >> 12}[bad]
    if bad == "free":
        a.free_pages(pfns.pop(), 2)
    before = (a.state.copy(), a.buddy_order.copy(), list(a._count), dict(a.counters))
    with pytest.raises(BuddyError):
        a.free_blocks_bulk(np.array(pfns + [extra], dtype=np.int64), 2)
    np.testing.assert_array_equal(a.state, before[0])
    np.testing.assert_array_equal(a.buddy_order, before[1])
    assert (list(a._count), dict(a.counters)) == before[2:]
    with pytest.raises(BuddyError):
        a.free_blocks_bulk(np.array(pfns, dtype=np.int64), MAX_ORDER)
    a.free_blocks_bulk(np.array(pfns, dtype=np.int64), 2)
    a.free_blocks_bulk(np.empty(0, dtype=np.int64), 2)
    a.check()


@pytest.mark.parametrize("poison", [False, True])
def test_scattered_batch_checked_block_by_block_matches(poison: bool) -> None:
    """More than 64 runs of adjacent blocks: the checks and state go through the gathered
    per-block rows instead of slices; same result, and a bad block in it is still refused."""
    a, r = twins(24 * MiB, reserved=[(1 * MiB, 3 * MiB)], page_poisoning=poison)
    got = []
    for _ in range(600):
        p = a.alloc_pages(2, MIGRATE_MOVABLE)
        assert p == r.alloc_pages(2, MIGRATE_MOVABLE)
        got.append(p)
    blocks = sorted(int(p) for p in got if p is not None)
    batch = [p for p in blocks if p & 4 == 0 and (p ^ 4) in blocks]  # buddies stay allocated
    assert len(batch) > 100
    with pytest.raises(BuddyError, match="not allocated"):
        a.free_blocks_bulk(np.array(batch + [1 * MiB >> 12], dtype=np.int64), 2)
    a.free_blocks_bulk(np.array(batch, dtype=np.int64), 2)
    for p in batch:
        r.free_pages(p, 2)
    assert_same(a, r)
    a.check()
