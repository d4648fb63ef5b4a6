"""Simulated page contents: one version number per guest page (struct-of-arrays, numpy).

A simulated guest of 128 GiB cannot hold its bytes, and a migration only needs to know whether
the destination ends with what the source has. So a page's content is a ``uint32`` version:
``ZERO`` (0) is a zero-filled page, ``POISON`` (1) is a page filled with the guest's poison
value, and every other write gives the page a fresh version from a global counter. Every write
goes through here so the dirty log sees it.
"""
from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from guestmem.dirty import DirtyLog

ZERO = 0
POISON = 1
_FIRST_DATA = 2


class PageVersions:
    def __init__(self, ram_pages: int, dirty_log: DirtyLog | None = None) -> None:
        self.ram_pages = ram_pages
        self.version = np.zeros(ram_pages, dtype=np.uint32)
        self.dirty_log = dirty_log
        self._next = _FIRST_DATA
        self.writes = 0  # pages written, all kinds

    def _bump(self, n: int) -> np.ndarray:
        if self._next + n >= 0xFFFFFFFF:
            self._next = _FIRST_DATA  # wrap: versions only need to differ from recent ones
        out = np.arange(self._next, self._next + n, dtype=np.uint32)
        self._next += n
        return out

    def _content(self, kind: str, n: int) -> np.ndarray | int:
        """The versions ``n`` pages get from a write of ``kind`` (data, zero or poison)."""
        if kind == "data":
            return self._bump(n)
        if kind == "zero":
            return ZERO
        if kind == "poison":
            return POISON
        raise ValueError(f"unknown write kind {kind!r}")

    def switch_mm(self, mm: Hashable | None) -> None:
        """The guest now runs in address space ``mm`` (a process; None: kernel work, which
        borrows the current one): a dirty log that models the vCPU's TLB needs to know
        (``guestmem.dirty``)."""
        if self.dirty_log is not None:
            self.dirty_log.switch_mm(mm)

    def write_range(self, first_pfn: int, count: int, kind: str = "data") -> None:
        """Write ``count`` pages from ``first_pfn``: ``kind`` is data, zero or poison."""
        if count <= 0:
            return
        self.version[first_pfn:first_pfn + count] = self._content(kind, count)
        self.writes += count
        if self.dirty_log is not None:
            self.dirty_log.mark_range(first_pfn, count)

    def write_pfns(self, pfns: np.ndarray, kind: str = "data") -> None:
        pfns = np.asarray(pfns, dtype=np.int64)
        if pfns.size == 0:
            return
        self.version[pfns] = self._content(kind, int(pfns.size))
        self.writes += int(pfns.size)
        if self.dirty_log is not None:
            self.dirty_log.mark_pfns(pfns)
