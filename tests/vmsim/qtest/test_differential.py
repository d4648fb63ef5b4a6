"""Differential testing: hypothesis-generated driver action sequences run on our device
(in-process) and on QEMU's virtio-balloon (qtest), compared step by step on what a driver can
observe (tests/vmsim/qtest/differential.py). A divergence fails the test unless an ``ALLOWED``
entry (a documented QEMU deviation, citing the spec and docs/qemu-deviations.md) explains it.

``BALLOON_HINT_DIFF_EXAMPLES=N`` runs N sequences instead of the default (200). One QEMU
serves every sequence (reset in between); skipped only when no QEMU can run qtest.
``BALLOON_HINT_DIFF_REPORT=path`` writes the run's counts as JSON.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.balloon import (
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
)
from protocol.virtio import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1
from tests.vmsim.qtest.differential import (
    ACK,
    DOK,
    DRV,
    FOK,
    PFN_HI,
    PFN_LO,
    OurPeer,
    QemuPeer,
    run_pair,
)

EXAMPLES = int(os.environ.get("BALLOON_HINT_DIFF_EXAMPLES", "200"))
REPORT = os.environ.get("BALLOON_HINT_DIFF_REPORT")

_bit = {"VERSION_1": VIRTIO_F_VERSION_1, "STATS_VQ": VIRTIO_BALLOON_F_STATS_VQ,
        "FREE_PAGE_HINT": VIRTIO_BALLOON_F_FREE_PAGE_HINT,
        "PAGE_POISON": VIRTIO_BALLOON_F_PAGE_POISON, "REPORTING": VIRTIO_BALLOON_F_REPORTING,
        "DEFLATE_ON_OOM": VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
        "EVENT_IDX": VIRTIO_F_RING_EVENT_IDX, "INDIRECT": VIRTIO_F_RING_INDIRECT_DESC}


def chance(draw: Any, x: float) -> bool:
    """True with probability about ``x`` (hypothesis' floats and integers lean to their
    bounds, which would make rare cases common); shrinks to False."""
    n = round(100 * x)
    return bool(draw(st.sampled_from([False] * (100 - n) + [True] * n)))


@st.composite
def features(draw: Any) -> int:
    """Mostly what a driver takes (VERSION_1, queues without gaps), sometimes anything."""
    def p(x: float) -> bool:
        return chance(draw, x)
    if p(0.06):
        names = draw(st.sets(st.sampled_from(sorted(_bit))))
    else:
        names = {"VERSION_1"}
        if p(0.9):
            names.add("STATS_VQ")
            if p(0.85):
                names.add("FREE_PAGE_HINT")
                if p(0.3):
                    names.add("REPORTING")
        names |= {n for n in ("PAGE_POISON", "DEFLATE_ON_OOM", "EVENT_IDX", "INDIRECT")
                  if p(0.5)}
    return sum(1 << _bit[n] for n in names)


pfn = st.integers(PFN_LO, PFN_HI - 1) | st.integers(PFN_HI, PFN_HI + 64)
pfn_batch = st.tuples(st.lists(pfn, min_size=1, max_size=24), st.integers(0, 8))
body_action = st.one_of(
    st.builds(lambda b: ("inflate", *b), pfn_batch),
    st.builds(lambda b: ("deflate", *b), pfn_batch),
    st.builds(lambda e, n: ("stats", e, n),
              st.lists(st.tuples(st.integers(0, 16), st.integers(0, 2**64 - 1)), max_size=12),
              st.sampled_from([1] * 9 + [2])),
    st.builds(lambda n: ("host_target", n), st.integers(0, 2048)),
    st.just(("host_stats",)),
    st.just(("host_hint_start",)),
    st.just(("host_hint_start",)),
    st.just(("host_hint_done",)),
    st.builds(lambda w, s: ("cmd", w, s),
              st.sampled_from(["current", "current", "current", "stale", "stop", "done",
                               "bogus"]),
              st.sampled_from([4, 4, 4, 4, 4, 2, 8])),
    st.builds(lambda r: ("hints", r),
              st.lists(st.tuples(st.integers(PFN_LO, PFN_HI - 17), st.integers(1, 16)),
                       min_size=1, max_size=6)),
    st.builds(lambda r: ("report", r),
              st.lists(st.tuples(st.integers(PFN_LO, PFN_HI - 513), st.sampled_from([1, 512])),
                       min_size=1, max_size=4)),
    st.builds(lambda w, h: ("race", w, h), st.sampled_from(["current", "stop", "stale"]),
              st.sampled_from(["done", "start"])),
    st.builds(lambda q, k: ("malformed", q, k),
              st.sampled_from(["INFLATE", "DEFLATE", "STATS", "FREE_PAGE", "REPORTING"]),
              st.sampled_from(["head_oob", "next_oob", "loop", "addr_oob", "zero_len",
                               "wrong_dir", "indirect_bad", "ahead"])),
    st.builds(lambda v: ("write_actual", v), st.integers(0, 4096)),
    st.builds(lambda p: ("irq_policy", p), st.sampled_from(["each", "flags", "far"])),
    st.just(("reset",)),
    st.builds(lambda v: ("status", v),
              st.sampled_from([ACK, ACK | DRV, ACK | DRV | FOK | DOK, 0x80, ACK | DRV | DOK])),
)


@st.composite
def sequences(draw: Any) -> list[tuple[Any, ...]]:
    shrink = draw(st.sampled_from([0, 0, 0, 1, 3]))
    odd = chance(draw, 0.05)
    skip = draw(st.integers(0, 31)) if chance(draw, 0.15) else 0
    seq: list[tuple[Any, ...]] = [("negotiate", draw(features())),
                                  ("setup_queues", shrink, skip, odd)]
    if draw(st.booleans()):
        seq.append(("poison", draw(st.sampled_from([0, 0xAAAAAAAA, 0x12345678]))))
    early = draw(st.lists(body_action, max_size=2)) if chance(draw, 0.1) else []
    seq += early
    seq.append(("driver_ok",))
    for a in draw(st.lists(body_action, min_size=2, max_size=14)):
        seq.append(a)
        if a == ("reset",) and draw(st.booleans()):
            seq += [("negotiate", draw(features())), ("setup_queues", 0), ("driver_ok",)]
    # A second life after a reset: the comparison resumes there if a deviation paused it.
    seq += [("negotiate", draw(features())), ("setup_queues", 0), ("driver_ok",)]
    seq += draw(st.lists(body_action, min_size=1, max_size=5))
    return seq


COUNTS: collections.Counter[str] = collections.Counter()
EXAMPLES_SEEN: list[str] = []
UNEXPLAINED: list[str] = []


@pytest.fixture(scope="module")
def peers(qtest_qemu):
    q = QemuPeer(qtest_qemu)
    yield OurPeer(), q
    q.close()
    COUNTS["qemu_restarts"] = q.restarts
    if REPORT:
        with open(REPORT, "w") as f:
            json.dump({"counts": dict(COUNTS), "unexplained": UNEXPLAINED,
                       "examples": EXAMPLES_SEEN[:50]}, f, indent=1)


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(seq=sequences())
def test_our_device_and_qemus_agree(peers, seq):
    ours, qemu = peers
    compared: list[int] = []
    divs = run_pair(ours, qemu, seq, compared)
    COUNTS["sequences"] += 1
    COUNTS["steps"] += len(seq)
    COUNTS["steps_compared"] += compared[0]
    COUNTS["sequences_compared_without_pause"] += compared[0] == len(seq)
    for d in divs:
        COUNTS[f"divergence:{d.allowed or 'NOT ALLOWED'}"] += 1
        if len(EXAMPLES_SEEN) < 200:
            EXAMPLES_SEEN.append(str(d))
    bad = [d for d in divs if d.allowed is None]
    if bad:
        UNEXPLAINED.append("\n".join(str(d) for d in bad) + "\nsequence: " + repr(seq))
    assert not bad, "\n".join(str(d) for d in divs) + "\nsequence: " + repr(seq)


def test_every_allowed_deviation_is_documented():
    """Each allow-list entry names a spec section and a section of docs/qemu-deviations.md
    that exists (no QEMU needed)."""
    from pathlib import Path

    from tests.vmsim.qtest.differential import ALLOWED, DEVIATIONS_DOC
    text = (Path(__file__).resolve().parents[3] / DEVIATIONS_DOC).read_text()
    headings = {line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")}
    for a in ALLOWED:
        assert a.spec and ("virtio" in a.spec or "protocol.md" in a.spec), a
        assert any(h.startswith(a.doc) for h in headings), (a.key, a.doc)
    assert len({a.key for a in ALLOWED}) == len(ALLOWED)


class _OffByOneTarget(OurPeer):
    """Our device with a planted bug: the host's target lands one page off."""

    def host_set_target(self, pages: int) -> None:
        super().host_set_target(pages + 1)


INIT = [("negotiate", (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BALLOON_F_STATS_VQ)
         | (1 << VIRTIO_BALLOON_F_FREE_PAGE_HINT)), ("setup_queues", 0), ("driver_ok",)]


def test_the_comparison_can_fail(peers):
    """A planted bug in our device is an unexplained divergence; the real device has none on
    the same sequence."""
    _, qemu = peers
    seq = [*INIT, ("host_target", 100), ("inflate", [PFN_LO, PFN_LO + 1], 0)]
    assert not [d for d in run_pair(OurPeer(), qemu, seq) if d.allowed is None]
    bad = [d for d in run_pair(_OffByOneTarget(), qemu, seq) if d.allowed is None]
    assert [(d.step, d.field) for d in bad] == [(3, "num_pages")], bad
