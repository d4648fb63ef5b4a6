"""External device, balloon queues seen from the driver: D-3, D-4, D-6, D-14, D-15
(protocol.md 3.4 - 3.7, 4.6). Page contents are watched with a canary over guest RAM: the
device may change a page only where the spec lets it."""
from __future__ import annotations

import struct

import pytest

from protocol.balloon import (
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    BalloonQueue,
)
from protocol.virtqueue import VIRTQ_DESC_F_WRITE
from vmsim.conformance.harness import (
    NEEDS_RESET,
    PAGE,
    QUIET,
    Canary,
    RawGuest,
    pfn_bytes,
    wait_for,
)

Q = BalloonQueue
W = VIRTQ_DESC_F_WRITE


def pages(*pfn: int) -> list[tuple[int, int]]:
    return [(p * PAGE, PAGE) for p in pfn]


def need(raw: RawGuest, bit: int, name: str) -> None:
    raw.negotiate()
    if not raw.offered >> bit & 1:
        pytest.skip(f"the target does not offer {name}")


@pytest.mark.spec("D-3")
def test_only_inflated_pages_may_change(raw: RawGuest):
    """while the guest inflates pages, no other page of guest RAM changes"""
    raw.start()
    canary = Canary(raw.mem)
    inflated = list(range(0x2000, 0x2000 + 64, 2))  # every other page of a range
    a, n = raw.buf(pfn_bytes(*inflated))
    raw.post(Q.INFLATE, [(a, n, 0)])
    assert raw.wait_used(Q.INFLATE) == [(0, 0)]
    wait_for(lambda: False, QUIET)
    bad = canary.changed_pages(skip=pages(*inflated))
    assert not bad, f"pages never inflated changed: {bad[:8]}"
    assert not raw.status() & NEEDS_RESET


@pytest.mark.spec("D-4")
def test_deflated_pages_stable_after_acknowledgement(raw: RawGuest):
    """with MUST_TELL_HOST: once a deflate is acknowledged, the guest's new content of those
    pages stays, while the balloon keeps working on other pages"""
    need(raw, VIRTIO_BALLOON_F_MUST_TELL_HOST, "MUST_TELL_HOST")
    raw.start()
    assert raw.features >> VIRTIO_BALLOON_F_MUST_TELL_HOST & 1
    back = list(range(0x2400, 0x2410))
    a, n = raw.buf(pfn_bytes(*back))
    raw.post(Q.INFLATE, [(a, n, 0)])
    assert raw.wait_used(Q.INFLATE)
    raw.post(Q.DEFLATE, [(a, n, 0)])
    assert raw.wait_used(Q.DEFLATE) == [(0, 0)]
    # The guest reuses the pages only now (DR-5), writing new content.
    canary = Canary(raw.mem, pages(*back), seed=7)
    other = list(range(0x2800, 0x2840))
    b, m = raw.buf(pfn_bytes(*other))
    raw.post(Q.INFLATE, [(b, m, 0)], head=1)
    assert raw.wait_used(Q.INFLATE)
    wait_for(lambda: False, QUIET)
    bad = canary.changed_pages()
    assert not bad, f"deflated pages changed after the deflate was acknowledged: {bad[:8]}"


@pytest.mark.spec("D-6")
def test_stats_with_unknown_tags_in_any_order(raw: RawGuest, host):
    """a stats buffer with an unknown tag and tags out of order is kept, returned (len 0) on a
    host request, and the device goes on; our control socket also shows the known values"""
    need(raw, VIRTIO_BALLOON_F_STATS_VQ, "STATS_VQ")
    raw.start()
    entries = [(0x7F01, 99), (5, 1 << 32), (4, 123 << 20), (0x0F0F, 1), (6, 77 << 20)]
    a, n = raw.buf(b"".join(struct.pack("<HQ", t, v) for t, v in entries))
    raw.post(Q.STATS, [(a, n, 0)])
    assert not raw.wait_used(Q.STATS, 1, QUIET), "stats buffer used before the host asked"
    host.host("request-stats")
    assert raw.wait_used(Q.STATS) == [(0, 0)], "stats buffer not returned with len 0"
    assert not raw.status() & NEEDS_RESET, "unknown stats tags broke the device"
    # The driver reposts (DR-8), in yet another order; the device keeps serving.
    b, m = raw.buf(b"".join(struct.pack("<HQ", t, v) for t, v in reversed(entries)))
    raw.post(Q.STATS, [(b, m, 0)], head=1)
    host.host("request-stats")
    assert raw.wait_used(Q.STATS) == [(1, 0)]
    report = host.host("stats")
    if "guest_stats" in report:  # balloon-hint's control socket shows what it parsed
        gs = report["guest_stats"]
        assert gs.get("MEMFREE") == 123 << 20 and gs.get("AVAIL") == 77 << 20, gs


def report_pages(raw: RawGuest, blocks: list[int]) -> None:
    head = raw.post(Q.REPORTING, [(p * PAGE, 512 * PAGE, W) for p in blocks])
    assert raw.wait_used(Q.REPORTING) == [(head, 0)]


@pytest.mark.spec("D-14")
def test_any_poison_value_is_only_a_hint(raw: RawGuest):
    """with PAGE_POISON and an arbitrary poison_val the device serves every queue and never
    writes the value into pages it was not given"""
    need(raw, VIRTIO_BALLOON_F_PAGE_POISON, "PAGE_POISON")
    raw.start(poison=0x5A17C0DE)
    canary = Canary(raw.mem)
    a, n = raw.buf(pfn_bytes(0x3000, 0x3001))
    raw.post(Q.INFLATE, [(a, n, 0)])
    raw.post(Q.DEFLATE, [(a, n, 0)])
    assert raw.wait_used(Q.INFLATE) and raw.wait_used(Q.DEFLATE)
    blocks = [0x1000]
    if Q.REPORTING in raw.rings:
        report_pages(raw, blocks)
    wait_for(lambda: False, QUIET)
    bad = canary.changed_pages(skip=pages(0x3000, 0x3001) + [(0x1000 * PAGE, 512 * PAGE)])
    assert not bad, f"pages changed: {bad[:8]}"
    assert not raw.status() & NEEDS_RESET


@pytest.mark.spec("D-15")
def test_reported_pages_hold_content_or_poison(raw: RawGuest):
    """with PAGE_POISON: reported pages read afterwards either as before or as poison_val;
    pages not reported never change"""
    need(raw, VIRTIO_BALLOON_F_REPORTING, "PAGE_REPORTING")
    if not raw.offered >> VIRTIO_BALLOON_F_PAGE_POISON & 1:
        pytest.skip("the target offers REPORTING without PAGE_POISON: any change is allowed")
    poison = 0xAAAAAAAA
    raw.start(poison=poison)
    canary = Canary(raw.mem)
    blocks = [0x1200, 0x1600]
    report_pages(raw, blocks)
    wait_for(lambda: False, QUIET)
    reported = [(p * PAGE, 512 * PAGE) for p in blocks]
    bad = canary.changed_pages(skip=reported)
    assert not bad, f"pages never reported changed: {bad[:8]}"
    pat = struct.pack("<I", poison) * (PAGE // 4)
    for g, n in reported:
        for off in range(0, n, PAGE):
            page = raw.mem.read(g + off, PAGE)
            same = page == canary.pattern(g + off, PAGE).tobytes()
            assert same or page == pat, f"reported page {(g + off) // PAGE:#x} holds neither " \
                "its content nor poison_val"
