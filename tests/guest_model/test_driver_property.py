"""Property: whatever the host asks, in whatever order, interleaved with guest allocations and
memory pressure, the driver keeps the allocator consistent and its own books right.

Invariants checked after every random sequence: the buddy allocator's full consistency check
passes (no double free, no lost page); every page the driver believes it holds is PG_BALLOON and
every PG_BALLOON page is one it holds; ``num_pages`` matches the balloon list; the device saw no
driver rule broken (its DR-n checker); no ring broke. Then DONE and a zero target must give
every page back.
"""
from __future__ import annotations

import logging

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balloon_dev.device import DEFAULT_OFFERED_FEATURES
from guest_model.buddy import PG_BALLOON, PG_ISOLATED
from protocol.balloon import (
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_REPORTING,
)
from protocol.virtio import feature_mask
from tests.guest_model.driver_rig import Rig

OPS = st.one_of(
    st.just(("start",)), st.just(("stop",)), st.just(("done",)), st.just(("stats",)),
    st.tuples(st.just("target"), st.integers(0, 6000)),
    st.tuples(st.just("shrink"), st.integers(1, 5000)),
    st.tuples(st.just("alloc"), st.integers(0, 10)),
    st.tuples(st.just("free"), st.integers(0, 50)),
    st.tuples(st.just("run"), st.sampled_from([1e-5, 1e-4, 1e-3, 0.05, 2.5])),
)


def books(r: Rig) -> None:
    """The driver's idea of what it holds and isolates is exactly the allocator's."""
    mine = np.zeros(r.alloc.ram_pages, dtype=bool)
    for p, n in r.drv.held_pfn_ranges():
        assert not mine[p:p + n].any(), "a page is held twice"
        mine[p:p + n] = True
    assert (mine == (r.alloc.state == PG_BALLOON)).all()
    iso = np.zeros(r.alloc.ram_pages, dtype=bool)
    for p, n in r.drv.isolated_pfn_ranges():
        iso[p:p + n] = True
    assert (iso == (r.alloc.state == PG_ISOLATED)).all()
    assert r.drv.s.num_pages == len(r.drv.s.balloon_pfns)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, max_size=30), st.sampled_from(["capture", "walk", "off"]), st.booleans(),
       st.booleans(), st.booleans())
def test_random_host_and_guest_activity_keeps_books(ops: list[tuple], strategy: str,
                                                     must_tell: bool, reporting: bool,
                                                     deflate_on_oom: bool) -> None:
    logging.disable(logging.WARNING)
    try:
        offered = DEFAULT_OFFERED_FEATURES
        if must_tell:
            offered |= feature_mask(VIRTIO_BALLOON_F_MUST_TELL_HOST)
        if reporting:
            offered |= feature_mask(VIRTIO_BALLOON_F_REPORTING)
        if deflate_on_oom:
            offered |= feature_mask(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
        # Reporting needs a zone with a chain's worth (64 MiB) above its low watermark.
        ram = 160 << 20 if reporting else 32 << 20
        r = Rig(offered=offered, strategy=strategy, ram=ram, hint_batch=2).probe()
        guest_blocks: list[tuple[int, int]] = []
        for op in ops:
            kind = op[0]
            if kind == "start":
                r.host(r.dev.free_page_start)
            elif kind == "stop":
                r.host(r.dev.free_page_stop)
            elif kind == "done":
                r.host(r.dev.free_page_done)
            elif kind == "stats":
                r.host(r.dev.request_stats)
            elif kind == "target":
                r.host(r.dev.set_target, op[1])
            elif kind == "shrink":
                r.drv.shrink(op[1])
            elif kind == "alloc":
                p = r.alloc.alloc_pages(op[1])
                if p is None:
                    r.drv.shrink(1 << op[1])  # memory pressure reaches the shrinker
                else:
                    guest_blocks.append((p, op[1]))
            elif kind == "free" and guest_blocks:
                p, o = guest_blocks.pop(op[1] % len(guest_blocks))
                r.alloc.free_pages(p, o)
            else:
                r.run(op[1] if kind == "run" else 0.0)
            books(r)
        r.run(0.5)
        r.alloc.check()
        books(r)
        assert r.dev.dr_violations == {}
        assert r.drv.counters["vring_broken"] == 0
        assert r.drv.counters["control_buffer_failed"] == 0
        # Wind down: DONE and an empty balloon give every page back.
        r.host(r.dev.free_page_done)
        r.host(r.dev.set_target, 0)
        r.run(1.0)
        assert r.dev.actual == 0 and r.drv.s.num_pages == 0
        assert not (r.alloc.state == PG_BALLOON).any()
        assert not (r.alloc.state == PG_ISOLATED).any()
        r.alloc.check()
    finally:
        logging.disable(logging.NOTSET)
