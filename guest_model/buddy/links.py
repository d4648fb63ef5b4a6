"""Free-list links, one per page, stored so that the heads of max-order blocks sit together.

Linux keeps a free block's list links in the ``lru`` field of its first ``struct page``; the model
keeps them as one integer per page in ``next`` and ``prev``. Stored by pfn, the links of a big
guest's free memory (mostly max-order blocks, whose heads are 1024 pages apart) would put one
link in every 4 KiB OS page of the arrays, so both arrays would be wholly resident: 2 MiB per GiB
of guest to hold 8 KiB of links.

So the link of a pfn aligned to a max-order block lives apart, at slot ``top + pfn // 1024``
(``top`` = the number of pages): those are dense, 4 KiB of links per 4 GiB of guest. Every other
pfn's link lives at slot ``pfn``, so the links of a fragmented block stay together (a list walk
or a scatter over neighbouring blocks touches few OS pages), and the slots of aligned pfns in
that part are never used. A link is only ever written at a free block's head, so only the OS
pages of blocks that fragmentation reaches become resident (``numpy.empty`` leaves the rest
unallocated). The values stored are still pfns or list sentinels: what a link, stale or not,
points to does not depend on the layout.

``PfnLinks`` indexes by pfn (an int or an int64 array) for numpy work; the allocator's scalar
paths compute the slot inline on the memoryview ``view`` (a method call per link would cost more
than the link).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from guest_model.buddy.defs import MAX_ORDER, BuddyError

#: pfn & ROW_MASK == 0: the pfn heads a max-order block, its link is at top + (pfn >> ROW_SHIFT).
ROW_SHIFT = MAX_ORDER - 1
ROW_MASK = (1 << ROW_SHIFT) - 1


class PfnLinks:
    """One link per pfn in the layout above."""

    def __init__(self, ram_pages: int, dtype: type[np.signedinteger[Any]]) -> None:
        self.ram_pages = ram_pages
        self.top = ram_pages
        self.store = np.empty(ram_pages + (-(-ram_pages >> ROW_SHIFT)), dtype=dtype)
        self.view = self.store.data

    def slot(self, pfn: int | np.ndarray) -> int | np.ndarray:
        """Where the link of ``pfn`` (an int or an int64 array) is stored."""
        if isinstance(pfn, np.ndarray):
            return np.where(pfn & ROW_MASK, pfn, self.top + (pfn >> ROW_SHIFT))
        return pfn if pfn & ROW_MASK else self.top + (pfn >> ROW_SHIFT)

    def __getitem__(self, pfn: int | np.ndarray) -> Any:
        return self.store[self.slot(pfn)]

    def __setitem__(self, pfn: int | np.ndarray | slice,
                    value: int | np.ndarray | PfnLinks) -> None:
        if isinstance(pfn, slice):
            # Only ``links[:] = other`` (copy every link, written or not, from equal-sized
            # links): what twin tests do to start from identical memory.
            if pfn != slice(None) or not isinstance(value, PfnLinks) \
                    or value.store.shape != self.store.shape:
                raise BuddyError("PfnLinks supports only links[:] = other_links of the same size")
            self.store[:] = value.store
            return
        assert not isinstance(value, PfnLinks)
        self.store[self.slot(pfn)] = value

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Every page's link in pfn order (a copy; for tests and debugging)."""
        out = self.store[:self.ram_pages].copy()
        heads = np.arange(0, self.ram_pages, 1 << ROW_SHIFT)
        out[heads] = self.store[self.top + (heads >> ROW_SHIFT)]
        return out if dtype is None else out.astype(dtype)
