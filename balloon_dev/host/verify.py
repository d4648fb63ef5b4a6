"""The migration verifier: does the destination hold what the source holds at switchover?

Theory of operation
-------------------
``verify_pages`` compares per-page versions (and, for byte-backed pages such as the driver
area, the bytes) of the source and the destination over the pages the guest has in use, leaving
out the pages its balloon driver holds for hinting (their content is garbage by contract,
protocol.md 4.5); with page poisoning on, every free page must read as the poison value on the
destination. It works in pieces of ``VERIFY_PIECE`` pages, so its masks are never RAM-sized.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from balloon_dev.host import MigrationError
from guestmem.pages import POISON
from guestmem.units import PAGE_SIZE

#: Pages one numpy pass covers (its temporaries are a few bytes per page).
VERIFY_PIECE = 1 << 22


@dataclass(slots=True)
class VerifyResult:
    verified: bool
    mismatched_pages: int
    poison_violations: int
    checked_pages: int
    first_mismatches: list[int] = field(default_factory=list)   # a few pfns, for diagnosis
    first_poison: list[int] = field(default_factory=list)



def verify_pages(
    src_version: np.ndarray,
    dest_version: np.ndarray,
    in_use: np.ndarray,
    held: np.ndarray | None = None,
    *,
    page_poison: bool = False,
    poison_version: int = POISON,
    byte_regions: Sequence[tuple[int, int, memoryview, np.ndarray]] = (),
) -> VerifyResult:
    """The migration verifier.

    * ``in_use``: pages the guest has allocated at switchover (bool per page); ``held``: pages the
      balloon driver holds for hinting (their content is garbage by contract, protocol.md 4.5).
    * A page in use and not held is *mismatched* if the destination's version differs from the
      source's (for byte-backed pages: if their bytes differ).
    * With page poisoning, a page neither in use nor held is a *poison violation* if the
      destination does not hold the poison value: the guest checks the pattern when it next
      allocates the page and would report corruption.
    """
    n = src_version.size
    if in_use.shape != (n,) or dest_version.shape != (n,):
        raise MigrationError("verifier arrays do not cover the same RAM")
    if held is not None and held.shape != (n,):
        raise MigrationError("verifier arrays do not cover the same RAM")
    regions = [(first, first + npages,
                np.frombuffer(mv, np.uint8).reshape(npages, PAGE_SIZE),
                dest.reshape(npages, PAGE_SIZE)) for first, npages, mv, dest in byte_regions]
    mism_n = poison_n = checked = 0
    mism_first: list[int] = []
    poison_first: list[int] = []
    # In pieces: the masks below are a few bytes per page, so never RAM-sized.
    for lo in range(0, n, VERIFY_PIECE):
        hi = min(n, lo + VERIFY_PIECE)
        check = in_use[lo:hi].copy()
        if held is not None:
            check &= ~held[lo:hi]
        checked += int(np.count_nonzero(check))
        byte_mask = np.zeros(hi - lo, dtype=np.bool_)
        bad = [np.zeros(0, np.int64)]
        for first, end, src_pages, dest_pages in regions:
            a, b = max(lo, first), min(hi, end)
            if a >= b:
                continue
            byte_mask[a - lo:b - lo] = True
            differs = (src_pages[a - first:b - first] != dest_pages[a - first:b - first]).any(
                axis=1)
            bad.append(np.flatnonzero(differs & check[a - lo:b - lo]) + a)
        mism = check & ~byte_mask & (src_version[lo:hi] != dest_version[lo:hi])
        pfns = np.union1d(np.flatnonzero(mism) + lo, np.concatenate(bad))
        mism_n += int(pfns.size)
        mism_first.extend(pfns[:8].tolist())
        if page_poison:
            free = ~in_use[lo:hi] & ~byte_mask
            if held is not None:
                free &= ~held[lo:hi]
            ppfns = np.flatnonzero(free & (dest_version[lo:hi] != poison_version))
            poison_n += int(ppfns.size)
            poison_first.extend((ppfns[:8] + lo).tolist())
    return VerifyResult(
        verified=mism_n == 0 and poison_n == 0,
        mismatched_pages=mism_n,
        poison_violations=poison_n,
        checked_pages=checked,
        first_mismatches=sorted(mism_first)[:8],
        first_poison=sorted(poison_first)[:8],
    )
