"""External device, initialisation and transport items seen from the driver: D-1, D-16, D-17,
V-10 (protocol.md 2.3, 3.3, 4.6)."""
from __future__ import annotations

import struct

import pytest

from protocol.balloon import (
    CFG_ACTUAL,
    CFG_FREE_PAGE_HINT_CMD_ID,
    CFG_NUM_PAGES,
    CFG_POISON_VAL,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    BalloonQueue,
    queue_layout,
)
from protocol.virtio import VIRTIO_F_VERSION_1, feature_mask
from protocol.virtqueue import VIRTQ_DESC_F_WRITE
from vmsim.conformance.harness import (
    ACK,
    FOK,
    NEEDS_RESET,
    QUIET,
    WAIT,
    DriverGuest,
    RawGuest,
    pfn_bytes,
    qemu_behaviour,
    wait_for,
    wait_irq,
)

Q = BalloonQueue
MTH = feature_mask(VIRTIO_BALLOON_F_MUST_TELL_HOST)


@pytest.mark.spec("D-1")
def test_features_ok_only_refused_for_missing_must_tell_host(raw: RawGuest):
    """FEATURES_OK holds for every offered subset that keeps MUST_TELL_HOST (if offered); only
    declining MUST_TELL_HOST may be refused"""
    assert raw.negotiate(), "FEATURES_OK refused for the full offered set"
    offered = raw.offered
    assert offered >> VIRTIO_F_VERSION_1 & 1, "VERSION_1 not offered (modern device MUST)"
    keep = offered & MTH | feature_mask(VIRTIO_F_VERSION_1)
    assert raw.negotiate(keep), f"FEATURES_OK refused for the minimal set {keep:#x}"
    if offered & MTH:
        ok = raw.negotiate(offered & ~MTH)
        # Either is allowed (D-1 is a "may"); a refusal must read back without FEATURES_OK.
        assert ok == bool(raw.c.get_status() & FOK)
    raw.c.reset()
    assert raw.c.get_status() == 0


@pytest.mark.spec("D-16")
def test_config_of_offered_features_readable_before_features_ok(raw: RawGuest, target):
    """config fields of offered features are readable before FEATURES_OK; no round id is
    published before the driver runs (also right after a round); poison_val reads 0 after
    reset"""
    c = raw.c
    if target.has_host:
        raw.start(poison=0xAAAAAAAA)
        if raw.offered >> VIRTIO_BALLOON_F_FREE_PAGE_HINT & 1:
            target.host("hint-start")  # a live round the reset below must end
    c.reset()
    c.set_status(ACK)
    offered = c.get_device_features()
    num_pages = struct.unpack("<I", c.read_config(CFG_NUM_PAGES, 4))[0]
    actual = struct.unpack("<I", c.read_config(CFG_ACTUAL, 4))[0]
    assert num_pages < 1 << 32 and actual < 1 << 32
    if offered >> VIRTIO_BALLOON_F_FREE_PAGE_HINT & 1:
        cid = struct.unpack("<I", c.read_config(CFG_FREE_PAGE_HINT_CMD_ID, 4))[0]
        # Nothing can be hinted before DRIVER_OK, so the device cannot want a round (D-8).
        assert cid in (0, 1), f"free_page_hint_cmd_id {cid:#x} published before the driver ran"
    if offered >> VIRTIO_BALLOON_F_PAGE_POISON & 1:
        assert c.read_config(CFG_POISON_VAL, 4) == b"\0\0\0\0", "poison_val not reset to 0"


@pytest.mark.spec("V-10", "D-16")
def test_kicks_before_driver_ok_use_nothing(raw: RawGuest, target):
    """buffers kicked before DRIVER_OK are neither used nor interrupted for; after DRIVER_OK
    they are"""
    if target.kind == "vhost-user":
        pytest.skip("vhost-user: the front-end hands the rings over only at DRIVER_OK, so the "
                    "back-end cannot see an early kick")
    raw.start(driver_ok=False)
    a, n = raw.buf(pfn_bytes(0x2000, 0x2001))
    raw.post(Q.INFLATE, [(a, n, 0)])
    raw.post(Q.DEFLATE, [(a, n, 0)])
    before = list(raw.c.irq_counts)
    used_early = wait_for(lambda: bool(raw.used_idx(Q.INFLATE) or raw.used_idx(Q.DEFLATE)),
                          QUIET, raw.c)
    raw.c.discard_interrupts()
    irqs = raw.c.irq_counts
    # virtio 1.x 2.1.2 (Device Status Field, device requirements): the device MUST NOT consume
    # buffers or send any used buffer notifications to the driver before DRIVER_OK.
    assert not used_early and irqs == before, (
        f"virtio 2.1.2 broken: before DRIVER_OK the device used buffers ({used_early}) and "
        f"sent interrupts ({before} -> {irqs})")
    raw.driver_ok()
    assert len(raw.wait_used(Q.INFLATE)) == 1, "the early buffer was never used after DRIVER_OK"
    assert len(raw.wait_used(Q.DEFLATE)) == 1


@pytest.mark.spec("D-16")
def test_no_config_interrupt_before_driver_ok(raw: RawGuest, host):
    """a host config change before DRIVER_OK raises no interrupt; after DRIVER_OK it does and
    config_generation moves"""
    raw.start(driver_ok=False)
    raw.c.discard_interrupts()
    before = list(raw.c.irq_counts)
    host.host("set-target", pages=16)
    assert not raw.c.wait_interrupt(QUIET), "interrupt before DRIVER_OK"
    raw.c.discard_interrupts()
    assert raw.c.irq_counts == before
    raw.driver_ok()
    gen = raw.c.config_generation()
    host.host("set-target", pages=32)
    assert wait_for(lambda: raw.c.config_generation() != gen, WAIT), "generation did not move"
    cv = raw.c.config_vector
    assert wait_irq(raw.c, cv, before[cv]), "no config interrupt after DRIVER_OK"
    assert struct.unpack("<I", raw.c.read_config(CFG_NUM_PAGES, 4))[0] == 32


@pytest.mark.spec("D-17")
def test_queue_indices_follow_offered_features(raw: RawGuest, target):
    """num_queues and queue sizes follow the compacted layout of the offered features; the
    free page queue has >= 2 entries"""
    if target.kind == "vhost-user":
        pytest.skip("vhost-user: the front-end sets the queue count and sizes (QEMU's num_vqs, "
                    "vq_size); the back-end does not publish them")
    raw.negotiate()
    c = raw.c
    layout = queue_layout(raw.offered)
    assert c.num_queues() == len(layout), f"num_queues {c.num_queues()} for layout {layout}"
    for q, idx in layout.items():
        size = c.queue_max_size(idx)
        assert size and size & (size - 1) == 0, f"queue {idx} ({q.name}) size {size}"
        if q is Q.FREE_PAGE:
            assert size >= 2
    assert c.queue_max_size(len(layout)) == 0, "a queue beyond the layout has a size"


@pytest.mark.spec("D-17")
def test_queue_indices_do_not_follow_negotiation(raw: RawGuest, target):
    """declining STATS_VQ leaves num_queues and every queue's size where the offered features
    put them (protocol.md 3.3: offered features decide; a driver that counts negotiated
    features, as Linux does, would then post to the wrong queue)"""
    if target.kind == "vhost-user":
        pytest.skip("vhost-user: the front-end sets the queue count and sizes (QEMU's num_vqs, "
                    "vq_size); the back-end does not publish them")
    raw.negotiate()
    later = feature_mask(VIRTIO_BALLOON_F_FREE_PAGE_HINT, VIRTIO_BALLOON_F_REPORTING)
    if not raw.offered >> VIRTIO_BALLOON_F_STATS_VQ & 1 or not raw.offered & later:
        pytest.skip("needs STATS_VQ and FREE_PAGE_HINT or REPORTING offered")
    c = raw.c

    def sizes() -> list[int]:
        return [c.queue_max_size(i) for i in range(c.num_queues() + 1)]
    offered_sizes = sizes()
    if not raw.negotiate(drop=feature_mask(VIRTIO_BALLOON_F_STATS_VQ)):
        # Refusing such a subset is the other way to keep a driver that counts negotiated
        # features from posting to the wrong queue (our device does: protocol.md open
        # question 1); the spec lets a device refuse a subset it cannot serve.
        return
    assert sizes() == offered_sizes, "queue numbering moved with the negotiated features"
    if target.kind == "qemu":
        qemu_behaviour(target, "accepts a driver that declines STATS_VQ and keeps the stats "
                       "queue at 2 (queues numbered by offered features): a driver counting "
                       "negotiated features, as Linux and ours, would post hints to it")


@pytest.mark.spec("D-17")
def test_used_len_is_zero_on_balloon_queues(raw: RawGuest):
    """every used element of inflate, deflate, free page and reporting buffers has len 0"""
    raw.start()
    a, n = raw.buf(pfn_bytes(0x2100, 0x2101, 0x2102))
    raw.post(Q.INFLATE, [(a, n, 0)])
    assert raw.wait_used(Q.INFLATE) == [(0, 0)]
    raw.post(Q.DEFLATE, [(a, n, 0)])
    assert raw.wait_used(Q.DEFLATE) == [(0, 0)]
    if Q.FREE_PAGE in raw.rings:
        # No round is running: hints are just used (protocol.md 4.4 rule 4), with len 0.
        raw.post(Q.FREE_PAGE, [(0x2000000, 0x400000, VIRTQ_DESC_F_WRITE)])
        assert raw.wait_used(Q.FREE_PAGE) == [(0, 0)]
    if Q.REPORTING in raw.rings:
        raw.post(Q.REPORTING, [(0x2400000, 0x200000, VIRTQ_DESC_F_WRITE),
                               (0x2600000, 0x200000, VIRTQ_DESC_F_WRITE)])
        assert raw.wait_used(Q.REPORTING) == [(0, 0)]
    assert not raw.status() & NEEDS_RESET


@pytest.mark.spec("D-17")
def test_real_driver_probes_and_stats_come_back_with_len_zero(guest: DriverGuest, host):
    """our Linux-like driver probes the device; a host stats request returns the stats buffer
    used with len 0 and the driver reposts it"""
    d = guest.driver
    assert d.ready and d.failed is None
    if Q.STATS not in d.vqs:
        pytest.skip("the target does not offer STATS_VQ")
    vq = d.vqs[Q.STATS]
    host.host("request-stats")
    assert guest.pump(lambda: d.counters["stats_buffers"] >= 1), "stats buffer never used"
    assert vq.counters["used_len_too_big"] == 0 and vq.counters["bad_used_id"] == 0
    used = vq.mem.read(vq.used_gpa + 4, 8)
    assert struct.unpack("<II", used)[1] == 0, "stats buffer used with len != 0"
