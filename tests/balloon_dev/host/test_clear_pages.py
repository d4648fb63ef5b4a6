"""``clear_pages`` (the migration's hint clear) against a plain loop over the ranges.

The fast paths (merged runs cleared as slices, scattered aligned blocks as rows of a view) must
clear exactly the pages of the union of the ranges and count each page that was set once, for
ranges in any order, repeated, overlapping, adjacent or scattered."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balloon_dev.host import precopy
from balloon_dev.host.precopy import clear_pages

PAGES = 1 << 12


def reference(bits: np.ndarray, first: np.ndarray, count: np.ndarray) -> int:
    covered = np.zeros(bits.size, np.bool_)
    for a, c in zip(first.tolist(), count.tolist(), strict=True):
        covered[a:a + c] = True
    k = int(np.count_nonzero(bits & covered))
    bits[covered] = False
    return k


def check(seed: int, first: list[int], count: list[int]) -> None:
    rng = np.random.default_rng(seed)
    bits = rng.random(PAGES) < 0.7
    want_bits = bits.copy()
    f, c = np.array(first, np.int64), np.array(count, np.int64)
    want = reference(want_bits, f, c)
    got = clear_pages(bits, f.copy(), c.copy())
    assert got == want
    assert np.array_equal(bits, want_bits)


# Aligned blocks of one order (what Linux hints), as runs of adjacent blocks in any order.
@st.composite
def aligned_blocks(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    size = draw(st.sampled_from([1, 2, 16, 64, 256]))
    nblocks = PAGES // size
    rows: list[int] = []
    for _ in range(draw(st.integers(1, 12))):
        start = draw(st.integers(0, nblocks - 1))
        rows += range(start, min(nblocks, start + draw(st.integers(1, 40))))
    rows = draw(st.permutations(rows)) if draw(st.booleans()) else rows
    return [r * size for r in rows], [size] * len(rows)


# Anything inside the bitmap: unaligned, mixed sizes, overlapping, empty ranges.
@st.composite
def any_ranges(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    pairs = draw(st.lists(st.tuples(st.integers(0, PAGES - 1), st.integers(0, 300)),
                          min_size=1, max_size=60))
    return [a for a, _ in pairs], [min(c, PAGES - a) for a, c in pairs]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), aligned_blocks() | any_ranges())
def test_clear_pages_matches_a_loop_over_the_ranges(seed: int,
                                                    ranges: tuple[list[int], list[int]]) -> None:
    check(seed, *ranges)


def test_scattered_aligned_blocks_take_the_row_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every other block: more runs than the slice path takes, so the rows of a view clear it
    (and a repeated block still counts once)."""
    monkeypatch.setattr(precopy, "_clear_slices", None)  # the slice path would fail
    first = [r * 16 for r in [*range(0, 200, 2), 4, 4]]
    check(7, first, [16] * len(first))
    check(8, first[::-1], [16] * len(first))


def test_adjacent_blocks_are_cleared_as_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = precopy._clear_slices
    monkeypatch.setattr(precopy, "_clear_slices",
                        lambda *a: calls.append(len(a[1])) or real(*a))
    first = [r * 64 for r in [*range(10, 40), *range(50, 20, -1)]]
    check(9, first, [64] * len(first))
    second = [r * 64 for r in [*range(0, 20), *range(30, 50)]]
    check(10, second[::-1], [64] * len(second))
    assert calls == [1, 2]  # blocks 10..49 overlap into one run; 0..19 and 30..49 are two


def test_no_ranges_clear_nothing() -> None:
    bits = np.ones(8, np.bool_)
    assert clear_pages(bits, np.zeros(0, np.int64), np.zeros(0, np.int64)) == 0
    assert bits.all()
