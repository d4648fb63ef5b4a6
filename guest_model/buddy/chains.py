"""Walking the first blocks of a free list with numpy, checked link by link.

A bulk allocation takes the first ``k`` blocks of a list (``BulkAlloc._unlink_prefix``): the
list order decides which pfns come back, so the walk must follow the links, and one Python step
per link was most of a churning guest's time (a 1 TiB compile-128g churn walks ~40 M links).

Most of those links were written by a bulk free shortly before: ``free_pages_bulk`` puts each
list's new blocks at its head as one run (``_splice_many_at_head``), and the allocations of the
next tick take them from there. ``ListChains`` remembers those runs per list, newest first, as
a guess of what follows the list head. The guess is only a guess: single frees and allocations,
merges and re-layouts change the lists without telling it. So a walk uses it only where the
links confirm it: a run whose first block is the block the walk stands on is compared with the
links in one numpy gather (``next`` of each block == the following block of the run); the walk
takes the confirmed part, and where a link disagrees it goes on one link at a time, until it
stands on the first block of a remembered run again. The blocks returned are therefore exactly
those the link-by-link walk returns, whatever the guess was (tests/guest_model/buddy/
test_chains.py spoils the guess in every way and compares).

Memory: a list cannot hold more blocks than its count, so runs past that many entries (the
oldest) are dropped, as are runs a walk has gone past.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from guest_model.buddy.links import ROW_MASK, ROW_SHIFT

#: Links walked one at a time between two looks at the guess (and the chunk of Python ints
#: held at once).
_STEP_CHUNK = 1 << 16
#: Runs shorter than this are not remembered: checking them costs more than walking them.
_MIN_RUN = 8
#: Walks shorter than this go one link at a time.
_MIN_CHECK = 24
#: How far into the newest run a walk looks for the block it stands on.
_RESYNC_LOOK = 64


class ListChains:
    """The guessed runs of each list (see the module docstring) and the checked walk."""

    def __init__(self, store: np.ndarray, top: int) -> None:
        self._store = store  # the ``next`` links (guest_model.buddy.links layout)
        self._top = top
        self._runs: dict[int, list[np.ndarray]] = {}  # lid -> runs, newest (head side) first
        self._held: dict[int, int] = {}  # lid -> entries remembered
        self.stats = {"checked": 0, "stepped": 0, "mismatches": 0}

    def clear(self) -> None:
        self._runs.clear()
        self._held.clear()

    def spliced(self, lid: int, heads: np.ndarray, count: int) -> None:
        """``heads`` (in list order) were just put at the head of list ``lid``, which now holds
        ``count`` blocks."""
        if heads.size < _MIN_RUN:
            return
        runs = self._runs.setdefault(lid, [])
        runs.insert(0, heads.astype(np.int64, copy=True))
        held = self._held.get(lid, 0) + int(heads.size)
        while held - int(runs[-1].size) >= count:
            held -= int(runs.pop().size)
        self._held[lid] = held

    def _slots(self, pfns: np.ndarray) -> np.ndarray:
        return np.where(pfns & ROW_MASK, pfns, self._top + (pfns >> ROW_SHIFT))

    def walk(self, lid: int, first: int, k: int, nx: Any) -> tuple[np.ndarray, int]:
        """The first ``k`` blocks of list ``lid`` starting at ``first`` (the list holds at
        least ``k``), as the links give them, and the link after the last one. ``nx`` is the
        scalar view of the same links."""
        top, mask, shift = self._top, ROW_MASK, ROW_SHIFT
        runs = self._runs.get(lid, [])
        got, p = 0, first
        if k < _MIN_CHECK:
            # A short walk costs less than one check; a later walk finds its place in the
            # run again (``_resync``).
            few: list[int] = []
            for _ in range(k):
                few.append(p)
                p = nx[p if p & mask else top + (p >> shift)]
            self.stats["stepped"] += k
            return np.array(few, dtype=np.int64), p
        out = np.empty(k, dtype=np.int64)
        while got < k:
            if runs and p == int(runs[0][0]):
                got, p = self._take_run(runs, out, got, k, nx)
                continue
            # Standing elsewhere: on a later block of a run (the blocks before it left the
            # list), or on blocks no run knows (put there since).
            if self._resync(runs, p):
                continue
            # One link at a time until the walk stands on the first block of a run.
            starts = {int(r[0]): i for i, r in enumerate(runs)}
            n = min(k - got, _STEP_CHUNK)
            steps: list[int] = []
            app = steps.append
            while n and p not in starts:
                app(p)
                p = nx[p if p & mask else top + (p >> shift)]
                n -= 1
            out[got:got + len(steps)] = steps
            got += len(steps)
            self.stats["stepped"] += len(steps)
            if p in starts:
                # The runs before that one are not (or no longer) where the list goes.
                del runs[:starts[p]]
        if lid in self._runs:
            self._held[lid] = sum(int(r.size) for r in runs)
        return out, p

    def _take_run(self, runs: list[np.ndarray], out: np.ndarray, got: int, k: int,
                  nx: Any) -> tuple[int, int]:
        """Take what the links confirm of the run the walk stands on; (blocks now taken,
        the link after the last one)."""
        run = runs[0]
        c = run[:k - got]
        m = int(c.size)
        drop = m
        if m > 1:
            bad = np.flatnonzero(self._store[self._slots(c[:-1])] != c[1:])
            if bad.size:
                m = int(bad[0]) + 1
                # The run's next block left the list or something was put in front of it:
                # skip it; the walk may meet the rest of the run again.
                drop = m + 1
                self.stats["mismatches"] += 1
        out[got:got + m] = c[:m]
        self.stats["checked"] += m
        last = int(c[m - 1])
        p = nx[last if last & ROW_MASK else self._top + (last >> ROW_SHIFT)]
        if drop >= run.size:
            runs.pop(0)
        else:
            runs[0] = run[drop:]
        return got + m, p

    @staticmethod
    def _resync(runs: list[np.ndarray], p: int) -> bool:
        """If the walk stands on one of the first blocks of the newest run, drop the blocks
        before it (they left the list) and say so."""
        if not runs:
            return False
        hit = np.flatnonzero(runs[0][:_RESYNC_LOOK] == p)
        if not hit.size:
            return False
        runs[0] = runs[0][int(hit[0]):]
        return True
