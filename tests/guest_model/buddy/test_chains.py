"""ListChains: the checked walk returns what the link-by-link walk returns, whatever its guess.

A free list is kept twice: as links in a ``PfnLinks`` store (what the allocator has) and as a
plain Python list (the truth). Runs are spliced at the head and told to ``ListChains``; then
the list is changed behind its back (single blocks put at the head, blocks taken from the head
or the middle, whole runs dropped) and prefixes are taken with ``walk``, which must give the
true prefix and the link after it every time. The stats show the guess was used, spoiled and
recovered from (so the test covers the checked path, the stepping path and the resync).
"""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from guest_model.buddy.chains import ListChains
from guest_model.buddy.defs import list_sentinel
from guest_model.buddy.links import PfnLinks

LID = 3
RAM = 1 << 14


class ModelList:
    """One doubly linked free list in a PfnLinks store, with the truth beside it."""

    def __init__(self) -> None:
        self.nx = PfnLinks(RAM, np.int32)
        self.nx.store[:] = -7  # garbage in unwritten links, as numpy.empty may leave
        self.chains = ListChains(self.nx.store, self.nx.top)
        self.items: list[int] = []
        self.free = set(range(RAM))

    def _relink(self) -> None:
        # Link the truth (only the blocks on the list; taken blocks keep stale links).
        if not self.items:
            return
        for a, b in zip(self.items, self.items[1:] + [list_sentinel(LID)], strict=True):
            self.nx[a] = b

    def splice(self, run: list[int], tell: bool) -> None:
        self.items[:0] = run
        self._relink()
        if tell:
            self.chains.spliced(LID, np.array(run, dtype=np.int64), len(self.items))

    def take(self, k: int) -> None:
        if not self.items:
            return
        k = min(k, len(self.items))
        first = self.items[0]
        got, p = self.chains.walk(LID, first, k, self.nx.view)
        want = self.items[:k]
        after = self.items[k] if k < len(self.items) else list_sentinel(LID)
        assert got.tolist() == want
        assert p == after
        del self.items[:k]
        self.free.update(want)

    def pick(self, rng: np.random.Generator, n: int) -> list[int]:
        pool = sorted(self.free)
        got = rng.choice(pool, size=min(n, len(pool)), replace=False).tolist()
        self.free.difference_update(got)
        return got


OPS = st.lists(st.tuples(st.sampled_from(["run", "run_quiet", "head", "take", "del_mid",
                                          "del_head"]),
                         st.integers(1, 300)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=OPS, seed=st.integers(0, 2**32 - 1))
def test_walk_equals_the_link_by_link_walk(ops: list[tuple[str, int]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = ModelList()
    for op, n in ops:
        if op in ("run", "run_quiet"):
            m.splice(m.pick(rng, n), tell=op == "run")
        elif op == "head":  # single frees at the head, not told
            m.splice(m.pick(rng, min(n, 3)), tell=False)
        elif op == "take":
            m.take(n)
        elif op == "del_mid" and m.items:  # merges and re-layouts take blocks anywhere
            for _ in range(min(n // 30 + 1, len(m.items))):
                i = int(rng.integers(len(m.items)))
                m.free.add(m.items.pop(i))
            m._relink()
        elif op == "del_head" and m.items:  # single allocations from the head
            for _ in range(min(n // 30 + 1, len(m.items))):
                m.free.add(m.items.pop(0))
            m._relink()
    m.take(len(m.items))


def test_guess_is_used_spoiled_and_recovered() -> None:
    """One fixed history that goes through every path: checked runs, a mismatch inside a run
    (a block deleted), blocks put in front of a run (stepping, then the run met again), and
    the head of the newest run taken (the walk finds its place further in)."""
    rng = np.random.default_rng(1)
    m = ModelList()
    m.splice(m.pick(rng, 200), tell=True)
    m.splice(m.pick(rng, 100), tell=True)
    m.take(50)                       # inside the newest run: checked
    m.free.add(m.items.pop(10))      # a block in the middle leaves
    m._relink()
    m.splice(m.pick(rng, 2), tell=False)  # two single frees at the head
    m.take(120)                      # steps over 2, checks, mismatch, resyncs, checks on
    for _ in range(5):               # single allocations from the head of the newest run
        m.free.add(m.items.pop(0))
    m._relink()
    m.take(len(m.items))
    s = m.chains.stats
    assert s["checked"] > 200 and s["stepped"] >= 2 and s["mismatches"] >= 1, s


def test_runs_past_the_list_count_are_forgotten() -> None:
    rng = np.random.default_rng(2)
    m = ModelList()
    for _ in range(20):
        m.splice(m.pick(rng, 50), tell=True)
        m.take(50)  # the list never holds more than one run
    assert m.chains._held[LID] <= 2 * 50
