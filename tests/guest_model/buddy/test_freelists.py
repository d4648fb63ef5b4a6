"""guest_model.buddy.freelists: boot layout, zones, watermarks, determinism."""
from __future__ import annotations

import numpy as np

from guest_model.buddy import (
    MAX_ORDER,
    MIGRATE_MOVABLE,
    MIGRATE_TYPES,
    PG_RESERVED,
    WMARK_MIN,
    ZONE_DMA32,
    ZONE_NORMAL,
    BuddyAllocator,
)
from tests.guest_model.buddy.checks import GiB, MiB, assert_maximal, recount


def test_boot_layout_zones_and_reserved() -> None:
    ram = 4 * GiB + 64 * MiB + 12 * 4096  # a ragged end
    a = BuddyAllocator(ram, reserved=[(1 * MiB, 4 * MiB), (0, 1)])
    assert [z.name for z in a.zones] == ["DMA", "DMA32", "Normal"]
    assert (a.zones[0].start_pfn, a.zones[0].end_pfn) == (0, 4096)
    assert (a.zones[1].start_pfn, a.zones[1].end_pfn) == (4096, 1 << 20)
    assert a.zones[2].end_pfn == ram >> 12
    reserved = 1 + (4 * MiB >> 12)  # pfn 0 (1 byte rounds out to a page) and the driver area
    assert a.nr_free_pages() == (ram >> 12) - reserved
    assert int(np.count_nonzero(a.state == PG_RESERVED)) == reserved
    assert a.zones[0].managed_pages == 4096 - reserved
    np.testing.assert_array_equal(a.free_counts(), recount(a))
    a.check()
    assert_maximal(a)
    # The ragged end is 12 pages: blocks of order 3 and 2 at the top of Normal.
    top = (ram >> 12) - 12
    assert a.page_order(top) == 3 and a.page_order(top + 8) == 2
    # All memory starts movable; the big middle is max-order blocks in address order.
    counts = a.free_counts()
    assert counts[:, :, MIGRATE_MOVABLE].sum() == counts.sum()
    lid = (ZONE_DMA32 * MAX_ORDER + MAX_ORDER - 1) * MIGRATE_TYPES + MIGRATE_MOVABLE
    blocks = a.free_blocks(lid)
    assert blocks == sorted(blocks) and len(blocks) == (4 * GiB - 16 * MiB) >> 22


def test_watermarks_look_like_linux() -> None:
    a = BuddyAllocator(8 * GiB)
    # min_free_kbytes = sqrt(16 * 8 GiB in KiB) = 11585 KiB -> 2896 pages, spread by size.
    assert sum(z.watermark[WMARK_MIN] for z in a.zones) in range(2890, 2897)
    n = a.zones[ZONE_NORMAL]
    assert n.watermark[0] < n.watermark[1] < n.watermark[2]
    assert n.pcp_batch == 63 and n.pcp_high == 378
    # DMA32 is protected from allocations that could have used Normal.
    assert a.zones[ZONE_DMA32].lowmem_reserve[ZONE_NORMAL] == n.managed_pages // 256


def test_deterministic_from_seed() -> None:
    def run(seed: int) -> list[int | None]:
        a = BuddyAllocator(64 * MiB, seed=seed, shuffle=True)
        rng = np.random.default_rng(seed)
        held: list[tuple[int, int]] = []
        out: list[int | None] = []
        for _ in range(300):
            if held and rng.random() < 0.45:
                hp, o = held.pop(int(rng.integers(len(held))))
                a.free_pages(hp, o)
            else:
                o = int(rng.integers(0, 6))
                p = a.alloc_pages(o, int(rng.integers(0, 3)))
                out.append(p)
                if p is not None:
                    held.append((p, o))
        return out

    assert run(3) == run(3)
