"""The kernel's bookkeeping in RAM (guest_model.kernel_data): every allocation and free writes
the zone's page, the CPU's counters and the struct pages of the pages concerned."""
from __future__ import annotations

import numpy as np

from guest_model.buddy import PG_RESERVED
from guest_model.kernel_data import KDATA_GPA, KernelDataAllocator
from guestmem import DirtyLog, PageVersions
from guestmem.units import PAGE_SHIFT

RAM = 64 << 20
PAGES = RAM >> PAGE_SHIFT
ZONE = KDATA_GPA >> PAGE_SHIFT


def _alloc() -> tuple[KernelDataAllocator, PageVersions, DirtyLog]:
    log = DirtyLog(PAGES)
    pages = PageVersions(PAGES, log)
    a = KernelDataAllocator(RAM, pages=pages, nr_cpus=2, init_on_alloc=False)
    log.start()
    return a, pages, log


def test_layout_is_reserved_and_holds_data() -> None:
    a, pages, _ = _alloc()
    kd = a.kdata
    assert kd.memmap_pages == PAGES // 64 and kd.memmap_first == PAGES - PAGES // 64
    st = a.state
    assert (st[ZONE:ZONE + 3] == PG_RESERVED).all()
    assert (st[kd.memmap_first:] == PG_RESERVED).all()
    assert (pages.version[ZONE:ZONE + 3] != 0).all()
    assert (pages.version[kd.memmap_first:] != 0).all()


def test_an_allocation_and_a_free_write_zone_cpu_and_struct_pages() -> None:
    a, _, log = _alloc()
    pfn = a.alloc_pages(10, cpu=1)
    assert pfn is not None
    written = np.flatnonzero(log.sync())
    first = a.kdata.memmap_first + (pfn >> 6)
    assert set(written) == {ZONE, ZONE + 2, *range(first, first + 16)}
    a.free_pages(pfn, 10, cpu=1)
    assert set(np.flatnonzero(log.sync())) == set(written)


def test_bulk_calls_write_the_struct_pages_of_their_pages() -> None:
    a, _, log = _alloc()
    pfns = a.alloc_pages_bulk(300)
    want = set((np.unique(pfns >> 6) + a.kdata.memmap_first).tolist()) | {ZONE, ZONE + 1}
    assert set(np.flatnonzero(log.sync())) == want
    a.free_pages_bulk(pfns)
    assert set(np.flatnonzero(log.sync())) == want
