"""A dirty log the host can switch on, as KVM's dirty-page tracking: one bit per guest page.

Writers mark pages; the host's ``sync()`` takes the pages written since the previous sync and
clears them, so "written since the last sync" is a separate record from anything the host keeps
(protocol.md 5.7: hints may never erase it).
"""
from __future__ import annotations

import numpy as np

from guestmem.units import PAGE_SHIFT


class DirtyLog:
    def __init__(self, ram_pages: int) -> None:
        self.ram_pages = ram_pages
        self.enabled = False
        self._bits = np.zeros(ram_pages, dtype=np.bool_)

    def start(self) -> None:
        self.enabled = True
        self._bits[:] = False

    def stop(self) -> None:
        self.enabled = False

    def mark_bytes(self, gpa: int, length: int) -> None:
        if self.enabled and length > 0:
            first = gpa >> PAGE_SHIFT
            last = (gpa + length - 1) >> PAGE_SHIFT
            self._bits[max(first, 0):min(last + 1, self.ram_pages)] = True

    def mark_range(self, first_pfn: int, count: int) -> None:
        if self.enabled and count > 0:
            self._bits[first_pfn:first_pfn + count] = True

    def mark_pfns(self, pfns: np.ndarray) -> None:
        if self.enabled:
            self._bits[pfns] = True

    def peek(self) -> np.ndarray:
        """The current bits, read-only (for tests and verifiers)."""
        v = self._bits.view()
        v.flags.writeable = False
        return v

    def merge_into(self, target: np.ndarray) -> int:
        """``target |= pages written since the previous sync``, then clear the log, as
        ``sync`` does but with no copy of the log; returns how many pages were written."""
        n = int(np.count_nonzero(self._bits))
        if n:
            np.logical_or(target, self._bits, out=target)
            self._bits[:] = False
        return n

    def sync(self) -> np.ndarray:
        """Pages written since the previous sync (a copy); the log is cleared."""
        out = self._bits.copy()
        self._bits[:] = False
        return out
