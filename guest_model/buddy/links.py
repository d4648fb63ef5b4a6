"""Free-list links, one per page, stored so that the heads of aligned blocks sit together.

Linux keeps a free block's list links in the ``lru`` field of its first ``struct page``; the model
keeps them as one integer per page in ``next`` and ``prev``. Stored by pfn, the links of a big
guest's free memory (mostly max-order blocks, whose heads are 1024 pages apart) would put one
link in every 4 KiB OS page of the arrays, so both arrays would be wholly resident: 2 MiB per GiB
of guest to hold 8 KiB of links.

So the link of ``pfn`` lives at slot ``(pfn % 1024) * rows + pfn // 1024``: the arrays are 1024
rows of ``rows = ceil(ram_pages / 1024)`` entries, one row per offset inside a max-order block.
All max-order heads fill row 0, the order-9 heads of second halves row 512, and so on; a link is
only ever written at a free block's head, so only the rows that fragmentation reaches are touched
(``numpy.empty`` leaves the rest unallocated). The values stored are still pfns or list sentinels:
what a link, stale or not, points to does not depend on the layout.

``PfnLinks`` indexes by pfn (an int or an int64 array) for numpy work; the allocator's scalar
paths compute the slot inline on the memoryview ``view`` (a method call per link would cost more
than the link).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from guest_model.buddy.defs import MAX_ORDER, BuddyError

#: A pfn's row is its offset inside its max-order block; its column is the block's number.
ROW_SHIFT = MAX_ORDER - 1
ROW_MASK = (1 << ROW_SHIFT) - 1


class PfnLinks:
    """One link per pfn in the row layout above."""

    def __init__(self, ram_pages: int, dtype: type[np.signedinteger[Any]]) -> None:
        self.ram_pages = ram_pages
        self.rows = -(-ram_pages >> ROW_SHIFT)
        self.store = np.empty(self.rows << ROW_SHIFT, dtype=dtype)
        self.view = self.store.data

    def slot(self, pfn: int | np.ndarray) -> int | np.ndarray:
        """Where the link of ``pfn`` (an int or an int64 array) is stored."""
        return (pfn & ROW_MASK) * self.rows + (pfn >> ROW_SHIFT)

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
        out = np.ascontiguousarray(self.store.reshape(1 << ROW_SHIFT, self.rows).T).ravel()
        out = out[:self.ram_pages]
        return out if dtype is None else out.astype(dtype)
