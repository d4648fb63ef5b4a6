"""guest_model.buddy ``alloc_blocks_bulk`` against ``alloc_pages`` called block by block.

Two allocators booted alike are driven by the same calls; where one allocates a batch of
same-order blocks with ``alloc_blocks_bulk``, the other calls ``alloc_pages`` for each, stopping
at the first failure. They must return the same pfns in the same order and agree on every
per-page array, list head, tail and count, ``next`` / ``prev`` links (stale ones too), page
contents and dirty log (init_on_alloc), counters and per-cpu lists. Small guests with zones,
reserved holes and heavy use reach every path: segments served at once, fallback steals, the
min watermark, direct reclaim through a shrinker and OOM notifiers.
"""
from __future__ import annotations

import numpy as np
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
)
from tests.guest_model.buddy.test_free_blocks_bulk import twins
from tests.guest_model.buddy.twins import TwinRules

MiB = 1 << 20
MTS = [MIGRATE_UNMOVABLE, MIGRATE_MOVABLE, MIGRATE_RECLAIMABLE]


class BulkAllocTwins(TwinRules):
    """``a`` allocates batches with alloc_blocks_bulk, ``r`` with a loop of alloc_pages."""

    @initialize(init_on_alloc=st.booleans(), ram=st.sampled_from([24 * MiB + 5 * 4096,
                                                                   6 * MiB]))
    def boot(self, init_on_alloc: bool, ram: int) -> None:
        self.a, self.r = twins(ram, reserved=[(1 * MiB, 1 * MiB + 4096)], nr_cpus=2, seed=3,
                               init_on_alloc=init_on_alloc)
        self.held: dict[int, int] = {}  # pfn -> order
        self.isolated: dict[int, int] = {}
        self.notified: tuple[list[int], list[int]] = ([], [])
        # Reclaim and OOM paths: each side keeps its own spare blocks (the same pfns on both)
        # and its shrinker and OOM notifier give them back two at a time.
        for side in (self.a, self.r):
            spare = [side.alloc_pages(2, MIGRATE_UNMOVABLE) for _ in range(12)]
            side.register_shrinker(lambda sp=spare: len(sp) << 2,
                                   lambda n, sd=side, sp=spare: self._give_back(sd, sp))
            side.register_oom_notifier(lambda sd=side, sp=spare: self._give_back(sd, sp))

    @staticmethod
    def _give_back(side: BuddyAllocator, spare: list[int | None]) -> int:
        freed = 0
        for _ in range(2):
            if spare:
                p = spare.pop()
                assert p is not None
                side.free_pages(p, 2)
                freed += 4
        return freed

    @rule(count=st.integers(1, 600), order=st.integers(0, MAX_ORDER - 1),
          mt=st.sampled_from(MTS), cpu=st.integers(0, 1), balloon=st.booleans())
    def alloc_batch(self, count: int, order: int, mt: int, cpu: int, balloon: bool) -> None:
        owner = OWNER_BALLOON if balloon else OWNER_GUEST
        got = self.a.alloc_blocks_bulk(count, order, mt, cpu=cpu, owner=owner)
        ref = []
        for _ in range(count):
            p = self.r.alloc_pages(order, mt, cpu=cpu, owner=owner)
            if p is None:
                break
            ref.append(p)
        np.testing.assert_array_equal(got, np.array(ref, dtype=np.int64))
        for p in ref:
            self.held[p] = order

    @precondition(lambda self: getattr(self, "held", None))
    @rule(data=st.data())
    def free_some(self, data: st.DataObject) -> None:
        ps = sorted(self.held)
        sel = data.draw(st.lists(st.sampled_from(ps), min_size=1, max_size=40, unique=True))
        for p in sel:
            o = self.held.pop(p)
            self.a.free_pages(p, o)
            self.r.free_pages(p, o)


TestBulkAllocTwins = BulkAllocTwins.TestCase
TestBulkAllocTwins.settings = settings(max_examples=80, stateful_step_count=30, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])


def test_a_big_batch_is_served_in_few_segments_and_matches() -> None:
    """Thousands of order-3 blocks from a fresh guest: the loop's result, with few single
    calls (the fast path does the work)."""
    a, r = twins(64 * MiB, reserved=[(1 * MiB, 4 * MiB)])
    calls = 0
    orig = a.alloc_pages

    def counting(*args: object, **kw: object) -> int | None:
        nonlocal calls
        calls += 1
        return orig(*args, **kw)  # type: ignore[arg-type]

    a.alloc_pages = counting  # type: ignore[method-assign]
    got = a.alloc_blocks_bulk(1500, 3, MIGRATE_UNMOVABLE)
    ref = [r.alloc_pages(3, MIGRATE_UNMOVABLE) for _ in range(1500)]
    assert got.size == 1500 and got.tolist() == ref
    assert calls < 20  # the steals that claim pageblocks for unmovable; the rest in segments
    from tests.guest_model.buddy.twins import assert_same
    assert_same(a, r)
    a.check()
