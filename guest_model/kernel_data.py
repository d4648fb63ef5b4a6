"""The guest kernel's own data in guest RAM, written by every allocation and free.

Linux keeps the page allocator's bookkeeping in RAM like anything else: the zone (free list
heads and counters) in the kernel image's data, a per-CPU page of counters for each CPU, and
the memmap (a 64-byte ``struct page`` per page of RAM, at the top of RAM on the lab's guest).
Every allocation and every free writes the zone, the CPU's counters and the struct pages of
the pages concerned. The rest of the model keeps this bookkeeping in numpy arrays outside guest
RAM; ``KernelDataAllocator`` adds the writes (``[guest] kernel_data``), so a migration sees
the pages the guest writes most often. They matter where a host's dirty log loses writes
(``guestmem.dirty``, ``qemu-7.2-tcg``): the lab's 7.2 runs lost exactly such pages (per-CPU
counters, zone data, struct pages).

Layout: the zone page and one page per CPU at ``KDATA_GPA`` (16 MiB, where x86-64 Linux loads
its image), the memmap in the last RAM/64 bytes of RAM. Both are reserved in the allocator, so
the migration verifier checks them like any page in use.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from guest_model.buddy import MIGRATE_MOVABLE, BuddyAllocator
from guestmem.pages import PageVersions
from guestmem.units import PAGE_SHIFT, PAGE_SIZE

KDATA_GPA = 16 << 20
STRUCT_PAGE_BYTES = 64
#: Pages of memmap per page of RAM, as a shift: 4096 / 64 struct pages fit in one page.
MEMMAP_SHIFT = (PAGE_SIZE // STRUCT_PAGE_BYTES).bit_length() - 1


class KernelData:
    """Where the kernel's data lives in RAM and which pages an allocation or free writes."""

    def __init__(self, ram_pages: int, nr_cpus: int) -> None:
        self.zone_pfn = KDATA_GPA >> PAGE_SHIFT
        self.nr_cpus = nr_cpus
        self.memmap_pages = (ram_pages + (1 << MEMMAP_SHIFT) - 1) >> MEMMAP_SHIFT
        self.memmap_first = ram_pages - self.memmap_pages
        if self.memmap_first <= self.zone_pfn + nr_cpus:
            raise ValueError(f"{ram_pages} pages of RAM hold no kernel data at "
                             f"{KDATA_GPA:#x} and a memmap")

    def reserved(self) -> list[tuple[int, int]]:
        """(gpa, size) ranges the allocator must keep out of its free lists."""
        return [(KDATA_GPA, (1 + self.nr_cpus) << PAGE_SHIFT),
                (self.memmap_first << PAGE_SHIFT, self.memmap_pages << PAGE_SHIFT)]

    def write_all(self, pages: PageVersions) -> None:
        """What boot leaves: every page of the kernel data holds data."""
        pages.write_range(self.zone_pfn, 1 + self.nr_cpus, "data")
        pages.write_range(self.memmap_first, self.memmap_pages, "data")

    def touch(self, pages: PageVersions, pfns: np.ndarray, cpu: int) -> None:
        """An allocation or free of ``pfns`` on ``cpu``: the zone, the CPU's counters and the
        struct pages of ``pfns`` are written."""
        mm = np.unique(np.asarray(pfns, np.int64) >> MEMMAP_SHIFT) + self.memmap_first
        own = np.array([self.zone_pfn, self.zone_pfn + 1 + cpu], np.int64)
        pages.write_pfns(np.concatenate((own, mm)), "data")

    def touch_blocks(self, pages: PageVersions, first: np.ndarray, order: int, cpu: int) -> None:
        """As ``touch`` for blocks of ``2**order`` pages from each of ``first``."""
        f = np.asarray(first, np.int64)
        if order <= MEMMAP_SHIFT:
            # a block's struct pages fit in one or two memmap pages: its first and last
            self.touch(pages, np.concatenate((f, f + (1 << order) - 1)), cpu)
        else:
            step = np.arange(0, 1 << order, 1 << MEMMAP_SHIFT, dtype=np.int64)
            self.touch(pages, (f[:, None] + step[None, :]).ravel(), cpu)


class KernelDataAllocator(BuddyAllocator):
    """A ``BuddyAllocator`` whose every allocation and free also writes the kernel's data
    (``KernelData``). Calls the allocator makes to itself may write it twice: only which pages
    are written matters to a migration."""

    def __init__(self, ram_bytes: int, *, pages: PageVersions, nr_cpus: int = 2,
                 reserved: list[tuple[int, int]] | None = None, **kw: Any) -> None:
        self.kdata = KernelData(ram_bytes >> PAGE_SHIFT, nr_cpus)
        super().__init__(ram_bytes, pages=pages, nr_cpus=nr_cpus,
                         reserved=[*(reserved or []), *self.kdata.reserved()], **kw)
        self._kpages = pages
        self.kdata.write_all(pages)

    def alloc_pages(self, order: int, migratetype: int = MIGRATE_MOVABLE, *, cpu: int = 0,
                    **kw: Any) -> Any:
        pfn = super().alloc_pages(order, migratetype, cpu=cpu, **kw)
        if pfn is not None:
            self.kdata.touch_blocks(self._kpages, np.array([int(pfn)]), order, cpu)
        return pfn

    def free_pages(self, pfn: int, order: int, *, cpu: int = 0) -> None:
        super().free_pages(pfn, order, cpu=cpu)
        self.kdata.touch_blocks(self._kpages, np.array([int(pfn)]), order, cpu)

    def alloc_blocks_bulk(self, count: int, order: int, migratetype: int = MIGRATE_MOVABLE, *,
                          cpu: int = 0, **kw: Any) -> np.ndarray:
        out = super().alloc_blocks_bulk(count, order, migratetype, cpu=cpu, **kw)
        if out.size:
            self.kdata.touch_blocks(self._kpages, out, order, cpu)
        return out

    def alloc_pages_bulk(self, nr_pages: int, migratetype: int = MIGRATE_MOVABLE,
                         **kw: Any) -> np.ndarray:
        out = super().alloc_pages_bulk(nr_pages, migratetype, **kw)
        if out.size:
            self.kdata.touch(self._kpages, out, 0)
        return out

    def free_blocks_bulk(self, pfns: np.ndarray, order: int, *, cpu: int = 0) -> None:
        super().free_blocks_bulk(pfns, order, cpu=cpu)
        if np.asarray(pfns).size:
            self.kdata.touch_blocks(self._kpages, np.asarray(pfns), order, cpu)

    def free_pages_bulk(self, pfns: np.ndarray) -> None:
        super().free_pages_bulk(pfns)
        if np.asarray(pfns).size:
            self.kdata.touch(self._kpages, np.asarray(pfns), 0)
