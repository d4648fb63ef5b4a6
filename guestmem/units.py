"""Typed units at the guest/host boundary and the one place that converts between them.

Guest physical addresses, page frame numbers and page counts are distinct ``NewType`` s so a
reader (and mypy) can tell a pfn from a byte address. Pages are 4 KiB, as on x86-64 and in the
balloon's PFN unit (protocol.md 3.4).
"""
from __future__ import annotations

from typing import NewType

import numpy as np

Gpa = NewType("Gpa", int)  # guest physical address, bytes
Pfn = NewType("Pfn", int)  # guest page frame number (4 KiB units)
PageCount = NewType("PageCount", int)
QueueIndex = NewType("QueueIndex", int)  # transport queue index (after compaction)
CmdId = NewType("CmdId", int)  # free_page_hint_cmd_id value

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1
U64_LIMIT = 1 << 64


def pfn_to_gpa(pfn: int) -> Gpa:
    return Gpa(pfn << PAGE_SHIFT)


def gpa_to_pfn(gpa: int) -> Pfn:
    """The pfn holding ``gpa`` (rounds down)."""
    return Pfn(gpa >> PAGE_SHIFT)


def pages_to_bytes(n: int) -> int:
    return n << PAGE_SHIFT


def bytes_to_pages(n: int) -> PageCount:
    """Whole pages in ``n`` bytes (partial pages dropped)."""
    return PageCount(n >> PAGE_SHIFT)


def whole_pages_in(gpa: int, length: int) -> tuple[Pfn, PageCount]:
    """The pages lying wholly inside ``[gpa, gpa+length)``: first pfn and count (count may be 0)."""
    first = (gpa + PAGE_MASK) >> PAGE_SHIFT
    end = (gpa + length) >> PAGE_SHIFT
    return Pfn(first), PageCount(max(0, end - first))


def whole_pages_in_arrays(gpas: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``whole_pages_in`` for arrays of ranges (uint64 or int64): first pfns and counts, int64.
    Written so that no intermediate wraps for any range ending at or below 2^64."""
    a = gpas.astype(np.uint64, copy=False)
    n = lengths.astype(np.uint64, copy=False)
    shift, mask = np.uint64(PAGE_SHIFT), np.uint64(PAGE_MASK)
    if not ((a | n) & mask).any():  # page-aligned ranges of whole pages (what Linux hints)
        return (a >> shift).astype(np.int64), (n >> shift).astype(np.int64)
    off = a & mask
    first = (a >> shift) + (off != 0)
    end = (a >> shift) + ((off + n) >> shift)
    count = np.where(end > first, end - first, np.uint64(0))
    return first.astype(np.int64), count.astype(np.int64)


def is_page_aligned(x: int) -> bool:
    return x & PAGE_MASK == 0
