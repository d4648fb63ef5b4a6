"""BuddyAllocator as a whole: random single, bulk and isolation calls keep every invariant
(hypothesis state machine; counts against a brute-force recount, lists walked by check()).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from guest_model.buddy import (
    MAX_ORDER,
    MIGRATE_MOVABLE,
    MIGRATE_RECLAIMABLE,
    MIGRATE_UNMOVABLE,
    OWNER_BALLOON,
    PG_ALLOC,
    PG_BALLOON,
    PG_ISOLATED,
    BuddyAllocator,
    BuddyError,
    pageblock_order,
)
from tests.guest_model.buddy.checks import MiB, assert_maximal, recount


class AllocatorMachine(RuleBasedStateMachine):
    """Random alloc/free/bulk/drain sequences against a model of who holds what."""

    def __init__(self) -> None:
        super().__init__()
        # 24 MiB: all of DMA (with a reserved hole) and a little DMA32, 2 cpus.
        self.a = BuddyAllocator(24 * MiB + 5 * 4096, reserved=[(1 * MiB, 3 * MiB + 4096)],
                                nr_cpus=2)
        self.fresh = self.a.free_counts().sum(axis=2)
        self.held: dict[int, tuple[int, int]] = {}  # pfn -> (order, owner state)
        self.isolated: dict[int, int] = {}  # pfn -> order (page reporting)

    @rule(order=st.integers(0, MAX_ORDER - 1), mt=st.sampled_from(
        [MIGRATE_UNMOVABLE, MIGRATE_MOVABLE, MIGRATE_RECLAIMABLE]), cpu=st.integers(0, 1),
        balloon=st.booleans())
    def alloc(self, order: int, mt: int, cpu: int, balloon: bool) -> None:
        owner = OWNER_BALLOON if balloon else PG_ALLOC
        p = self.a.alloc_pages(order, mt, cpu=cpu, owner=owner)
        if p is None:
            return
        assert p % (1 << order) == 0
        for q, (o, _) in self.held.items():
            assert p + (1 << order) <= q or q + (1 << o) <= p, "double allocation"
        self.held[p] = (order, owner)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), cpu=st.integers(0, 1))
    def free(self, data: st.DataObject, cpu: int) -> None:
        p = data.draw(st.sampled_from(sorted(self.held)))
        o, _ = self.held.pop(p)
        self.a.free_pages(p, o, cpu=cpu)

    @rule(n=st.integers(1, 3000), mt=st.sampled_from([MIGRATE_UNMOVABLE, MIGRATE_MOVABLE]))
    def alloc_bulk(self, n: int, mt: int) -> None:
        pfns = self.a.alloc_pages_bulk(n, mt)
        assert pfns.size <= n and np.unique(pfns).size == pfns.size
        for p in pfns.tolist():
            assert p not in self.held
            self.held[p] = (0, PG_ALLOC)

    @precondition(lambda self: any(o == 0 for o, _ in self.held.values()))
    @rule(data=st.data())
    def free_bulk(self, data: st.DataObject) -> None:
        zero = sorted(p for p, (o, _) in self.held.items() if o == 0)
        k = data.draw(st.integers(1, len(zero)))
        sel = zero[:k] if data.draw(st.booleans()) else zero[-k:]
        for p in sel:
            del self.held[p]
        self.a.free_pages_bulk(np.array(sel))

    @rule()
    def drain(self) -> None:
        self.a.drain_pcp()

    @rule(order=st.integers(pageblock_order, MAX_ORDER - 1), skip=st.booleans())
    def isolate(self, order: int, skip: bool) -> None:
        p = self.a.isolate_free_block(order, skip_reported=skip)
        if p is None:
            return
        assert p % (1 << order) == 0 and p not in self.isolated
        assert (self.a.state[p:p + (1 << order)] == PG_ISOLATED).all()
        self.isolated[p] = order

    @precondition(lambda self: self.isolated)
    @rule(data=st.data(), reported=st.booleans())
    def putback(self, data: st.DataObject, reported: bool) -> None:
        p = data.draw(st.sampled_from(sorted(self.isolated)))
        o = self.isolated.pop(p)
        self.a.putback_block(p, o, reported=reported)
        # Marked only if it stayed a block of its own order (no merge).
        assert self.a.is_reported(p) == (reported and self.a.page_order(p) == o)

    @rule(data=st.data())
    def double_free_is_refused(self, data: st.DataObject) -> None:
        p = data.draw(st.integers(0, self.a.ram_pages - 1))
        if self.a.state[p] in (PG_ALLOC, PG_BALLOON):
            return
        with pytest.raises(BuddyError):
            self.a.free_pages(p, 0)

    @invariant()
    def no_page_both_free_and_allocated(self) -> None:
        expect = np.zeros(self.a.ram_pages, dtype=np.uint8)
        for p, (o, owner) in self.held.items():
            expect[p:p + (1 << o)] = owner
        alloc = (self.a.state == PG_ALLOC) | (self.a.state == PG_BALLOON)
        np.testing.assert_array_equal(np.flatnonzero(alloc), np.flatnonzero(expect))
        np.testing.assert_array_equal(self.a.state[expect > 0], expect[expect > 0])
        iso = np.zeros(self.a.ram_pages, dtype=np.bool_)
        for p, o in self.isolated.items():
            iso[p:p + (1 << o)] = True
        np.testing.assert_array_equal(iso, self.a.state == PG_ISOLATED)

    @invariant()
    def counts_match_brute_force(self) -> None:
        np.testing.assert_array_equal(self.a.free_counts(), recount(self.a))
        self.a.check()

    def teardown(self) -> None:
        for p, (o, _) in list(self.held.items()):
            self.a.free_pages(p, o)
        for p, o in list(self.isolated.items()):
            self.a.putback_block(p, o)
        self.a.drain_pcp()
        # Everything coalesces back into maximal blocks: same blocks per zone/order as at boot.
        np.testing.assert_array_equal(self.a.free_counts().sum(axis=2), self.fresh)
        assert_maximal(self.a)
        self.a.check()


TestAllocatorMachine = AllocatorMachine.TestCase


TestAllocatorMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
