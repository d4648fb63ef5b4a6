"""Twin allocators for equivalence tests: the code under test (``a``) and a reference (``r``)
driven by the same calls must end with equal books, link for link. The shared rules (drains,
isolation, putback, pageblock isolation) and the comparison live here; each test machine adds
the rules for the path it compares and sets ``a``, ``r``, ``isolated`` and ``notified``."""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from guest_model.buddy import (
    MAX_ORDER,
    MIGRATE_MOVABLE,
    MIGRATE_UNMOVABLE,
    BuddyAllocator,
    pageblock_order,
)


def assert_same(a: BuddyAllocator, r: BuddyAllocator) -> None:
    """Per-page arrays (stale links too), list heads/tails/counts, counters, per-cpu lists and,
    when both model page contents, the versions, write count and dirty log."""
    for name in ("next", "prev", "buddy_order", "state", "pageblock_mt", "reported"):
        np.testing.assert_array_equal(getattr(a, name), getattr(r, name), err_msg=name)
    for name in ("_first", "_last", "_count", "_nr_reported", "_zone_free", "counters"):
        assert getattr(a, name) == getattr(r, name), name
    assert [[list(q) for q in z] for c in a.pcp for z in c] == \
        [[list(q) for q in z] for c in r.pcp for z in c]
    assert (a.pages is None) == (r.pages is None)
    if a.pages is not None and r.pages is not None:
        np.testing.assert_array_equal(a.pages.version, r.pages.version, err_msg="version")
        assert a.pages.writes == r.pages.writes
        la, lr = a.pages.dirty_log, r.pages.dirty_log
        assert (la is None) == (lr is None)
        if la is not None and lr is not None:
            np.testing.assert_array_equal(la.peek(), lr.peek(), err_msg="dirty log")


class TwinRules(RuleBasedStateMachine):
    a: BuddyAllocator
    r: BuddyAllocator
    isolated: dict[int, int]
    notified: tuple[list[int], list[int]]

    def _ready(self) -> bool:
        return hasattr(self, "a")  # machines that boot in an @initialize rule

    @rule()
    def drain(self) -> None:
        if self._ready():
            self.a.drain_pcp()
            self.r.drain_pcp()

    @rule(order=st.integers(pageblock_order, MAX_ORDER - 1), skip=st.booleans())
    def isolate(self, order: int, skip: bool) -> None:
        if not self._ready():
            return
        p = self.a.isolate_free_block(order, skip_reported=skip)
        assert p == self.r.isolate_free_block(order, skip_reported=skip)
        if p is not None:
            self.isolated[p] = order

    @precondition(lambda self: bool(getattr(self, "isolated", None)))
    @rule(data=st.data(), reported=st.booleans())
    def putback(self, data: st.DataObject, reported: bool) -> None:
        p = data.draw(st.sampled_from(sorted(self.isolated)))
        o = self.isolated.pop(p)
        self.a.putback_block(p, o, reported=reported)
        self.r.putback_block(p, o, reported=reported)

    @rule(data=st.data(), mt=st.sampled_from([MIGRATE_UNMOVABLE, MIGRATE_MOVABLE]))
    def isolate_pageblock(self, data: st.DataObject, mt: int) -> None:
        if not self._ready():
            return
        pfn = data.draw(st.integers(0, self.a.ram_pages - 1))
        if data.draw(st.booleans()):
            assert self.a.set_migratetype_isolate(pfn) == self.r.set_migratetype_isolate(pfn)
        else:
            self.a.unset_migratetype_isolate(pfn, mt)
            self.r.unset_migratetype_isolate(pfn, mt)

    @invariant()
    def identical(self) -> None:
        if self._ready():
            assert_same(self.a, self.r)
            assert self.notified[0] == self.notified[1]

    def teardown(self) -> None:
        if self._ready():
            self.a.check()
