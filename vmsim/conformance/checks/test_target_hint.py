"""External device, free page hinting seen from the driver: D-8 .. D-13 (protocol.md 4).

Every check needs host requests (a round is the host's idea): they are skipped, and reported
NOT COVERED, without the target's control socket. What the driver can see: the command id in
config space and its config interrupts, which buffers are used, and guest RAM (a device must
never change a page the rules keep from it). If the control socket is balloon-hint's, its
``stats`` round log is checked as well (hints under a stale id must not be counted)."""
from __future__ import annotations

import struct

import pytest

from guest_model.vring import DriverVring
from protocol.balloon import (
    CFG_FREE_PAGE_HINT_CMD_ID,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    BalloonQueue,
)
from protocol.virtqueue import VIRTQ_DESC_F_WRITE
from vmsim.conformance.harness import (
    PAGE,
    QUIET,
    Canary,
    DriverGuest,
    RawGuest,
    Target,
    wait_for,
    wait_irq,
)

Q = BalloonQueue
W = VIRTQ_DESC_F_WRITE
BLOCK = 0x400000
STOP, DONE = 0, 1


def cmd_id(c) -> int:
    return struct.unpack("<I", c.read_config(CFG_FREE_PAGE_HINT_CMD_ID, 4))[0]


def hinting(raw: RawGuest, host: Target) -> int:
    """Start the raw guest with FREE_PAGE_HINT; returns the config-vector interrupt count."""
    raw.negotiate()
    if not raw.offered >> VIRTIO_BALLOON_F_FREE_PAGE_HINT & 1:
        pytest.skip("the target does not offer FREE_PAGE_HINT")
    raw.start()
    raw.c.discard_interrupts()
    return raw.c.irq_counts[raw.c.config_vector]


def start_round(raw: RawGuest, host: Target) -> int:
    cv = raw.c.config_vector
    before = raw.c.irq_counts[cv]
    host.host("hint-start")
    assert wait_irq(raw.c, cv, before), "no config interrupt for a new command id"
    cid = cmd_id(raw.c)
    assert cid >= 2, f"hint-start published {cid:#x}, not a command id"
    return cid


def rounds(host: Target) -> dict[int, dict] | None:
    """balloon-hint's round log by command id, or None for another control socket."""
    rep = host.host("stats")
    if "rounds" not in rep:
        return None
    return {r["cmd_id"]: r for r in rep["rounds"]}


@pytest.mark.spec("D-8")
def test_stop_published_with_interrupt(raw: RawGuest, host):
    """a host stop publishes STOP (0) with a config interrupt; after a reset no round id is
    left published"""
    hinting(raw, host)
    start_round(raw, host)
    cv = raw.c.config_vector
    before = raw.c.irq_counts[cv]
    host.host("hint-stop")
    assert wait_irq(raw.c, cv, before), "no config interrupt for STOP"
    assert cmd_id(raw.c) == STOP, f"after hint-stop the id reads {cmd_id(raw.c):#x}"
    start_round(raw, host)
    raw.c.reset()  # the device cannot use hints now
    assert cmd_id(raw.c) in (STOP, DONE), "a round id survived a device reset"


@pytest.mark.spec("D-8")
def test_stop_published_at_reset(raw: RawGuest, host):
    """a device reset during a round leaves no round id published: the field reads STOP or
    DONE afterwards (the reset device cannot use hints)"""
    hinting(raw, host)
    cid = start_round(raw, host)
    raw.c.reset()
    assert cmd_id(raw.c) in (STOP, DONE), f"round id {cid:#x} survived a device reset"


@pytest.mark.spec("D-8")
def test_stop_published_at_a_dirty_bitmap_sync(raw: RawGuest, host):
    """QEMU: when its migration syncs the dirty bitmap it cannot use hints, and publishes STOP
    (then the next round's id): every sync moves config_generation twice and raises config
    interrupts"""
    if host.kind != "qemu":
        pytest.skip("bitmap syncs are QEMU's migration's; a control socket's hint-stop is "
                    "checked by test_stop_published_with_interrupt")
    hinting(raw, host)
    cid = start_round(raw, host)
    cv = raw.c.config_vector
    gen, irqs = raw.c.config_generation(), raw.c.irq_counts[cv]
    new = host.host("hint-sync")["cmd-id"]
    syncs = (new - cid) & 0xFFFFFFFF
    assert new >= 2 and 0 < syncs < 1 << 20, f"after a sync the id reads {new:#x} (was " \
        f"{cid:#x})"
    moved = (raw.c.config_generation() - gen) & 0xFF  # the generation is 8 bits wide
    assert moved == 2 * syncs & 0xFF, (
        f"{syncs} sync(s) moved config_generation by {moved}: no STOP published before "
        f"id {new:#x}")
    assert wait_irq(raw.c, cv, irqs), "no config interrupt for the sync's STOP / new id"
    host.host("hint-done")


@pytest.mark.spec("D-10")
def test_id_stays_published_while_the_round_runs(raw: RawGuest, host):
    """while a round runs (the driver sent the id, the device uses hints) the field still reads
    that id, and it changes only with config_generation: hints must carry "the current value
    in free_page_hint_cmd_id", and a driver that re-reads the field must not see STOP"""
    hinting(raw, host)
    cid = start_round(raw, host)
    gen = raw.c.config_generation()
    a, n = raw.buf(struct.pack("<I", cid))
    raw.post(Q.FREE_PAGE, [(a, n, 0)])
    raw.post(Q.FREE_PAGE, [(0x1000000, BLOCK, W)], head=1)
    assert raw.wait_used(Q.FREE_PAGE, 2) == [(0, 0), (1, 0)]
    now, gen_now = cmd_id(raw.c), raw.c.config_generation()
    # virtio 1.2+ balloon 5.5.6.7 (device normative, Free Page Hinting): the device MUST ignore
    # pages provided with a command ID that does not match the current value in
    # free_page_hint_cmd_id; a round ends when the device updates the field to STOP or DONE.
    # virtio 4.1.4.3: config_generation changes every time the configuration changes.
    assert now == cid and gen_now == gen, (
        f"virtio 5.5.6.7: during round {cid:#x} (start buffer used, hints taken) the field "
        f"reads {now:#x} with config_generation {gen} -> {gen_now}")
    host.host("hint-done")


@pytest.mark.spec("D-9")
def test_ids_not_reused_before_the_drivers_stop(raw: RawGuest, host):
    """ids published without a STOP from the driver in between are all different"""
    hinting(raw, host)
    seen = []
    for _ in range(6):
        seen.append(start_round(raw, host))
    assert len(set(seen)) == len(seen), f"ids reused: {[hex(i) for i in seen]}"
    # Now the driver answers a round (start, STOP) and the next ids are still fresh.
    cid = seen[-1]
    a, n = raw.buf(struct.pack("<I", cid))
    s, m = raw.buf(struct.pack("<I", STOP))
    raw.post(Q.FREE_PAGE, [(a, n, 0)])
    raw.post(Q.FREE_PAGE, [(s, m, 0)], head=1)
    assert len(raw.wait_used(Q.FREE_PAGE, 2)) == 2
    nxt = start_round(raw, host)
    assert nxt not in seen[:-1], f"id {nxt:#x} reused"


@pytest.mark.spec("D-10")
def test_pages_hinted_under_a_stale_id_are_ignored(raw: RawGuest, host):
    """hints sent under an id the host has replaced are used (len 0) but never applied: the
    pages keep what the guest writes, and no round counts them"""
    hinting(raw, host)
    old = start_round(raw, host)
    new = start_round(raw, host)
    canary = Canary(raw.mem)
    a, n = raw.buf(struct.pack("<I", old))
    raw.post(Q.FREE_PAGE, [(a, n, 0)], kick=False)
    for i, gpa in enumerate((0x1000000, 0x1400000)):
        raw.post(Q.FREE_PAGE, [(gpa, BLOCK, W)], head=1 + i, kick=False)
    # The guest reuses the pages at once, before the device saw the hints (DR-11 allows it).
    canary = Canary(raw.mem, seed=3)
    raw.kick(Q.FREE_PAGE)
    assert raw.wait_used(Q.FREE_PAGE, 3) == [(0, 0), (1, 0), (2, 0)]
    wait_for(lambda: False, QUIET)
    assert not canary.changed_pages(), "pages hinted under a stale id changed"
    log = rounds(host)
    if log is not None:
        assert log[old]["hints"] == 0 and log[new]["hints"] == 0, (log[old], log[new])


@pytest.mark.spec("D-11")
def test_hinted_pages_rewritten_by_the_guest_keep_their_content(guest: DriverGuest, host):
    """a real round: the driver hints blocks; the guest writes some of them again before DONE
    (reuse); those pages keep the new content, and pages never hinted never change"""
    d = guest.driver
    if Q.FREE_PAGE not in d.vqs:
        pytest.skip("the target does not offer FREE_PAGE_HINT")
    canary = Canary(guest.c.mem)
    cid = host.host("hint-start")["cmd-id"]
    assert guest.pump(lambda: d.counters["stop_sent"] >= 1), f"round {cid:#x} never ended"
    assert d.counters["hints_sent"] > 0 and d.s.held_blocks
    hinted = [(p * PAGE, BLOCK) for p in d.s.held_blocks]
    vq = d.vqs[Q.FREE_PAGE]
    assert isinstance(vq, DriverVring)  # the checks never negotiate packed rings
    # free_page_vq is polled, not reaped here: look at the used index itself.
    assert guest.pump(lambda: vq.mem.read_u16(vq.used_gpa + 2) == vq.avail_idx), \
        "hints never used"
    reused = hinted[: max(1, len(hinted) // 2)]
    for g, n in reused:
        canary.rewrite(g, n)  # reused before DONE: the guest initialises it (DR-11)
    guest.settle()
    assert not canary.changed_pages(skip=hinted), "pages never hinted changed"
    assert not canary.changed_pages(skip=hinted[len(reused):]), \
        "hinted pages rewritten by the guest lost their content"
    log = rounds(host)
    if log is not None:
        assert log[cid]["hints"] == d.counters["hints_sent"], log[cid]
    host.host("hint-done")


@pytest.mark.spec("D-11")
def test_pages_written_after_the_id_was_published_keep_their_content(raw: RawGuest, host):
    """in the current round, a hinted block the guest writes before the device used the hint,
    and one it writes right after, both keep the guest's content"""
    hinting(raw, host)
    cid = start_round(raw, host)
    a, n = raw.buf(struct.pack("<I", cid))
    raw.post(Q.FREE_PAGE, [(a, n, 0)])
    assert raw.wait_used(Q.FREE_PAGE) == [(0, 0)]
    early, late = 0x1000000, 0x1400000
    raw.post(Q.FREE_PAGE, [(early, BLOCK, W)], head=1, kick=False)
    raw.post(Q.FREE_PAGE, [(late, BLOCK, W)], head=2, kick=False)
    canary = Canary(raw.mem, seed=5)  # every page written after the id was published
    raw.kick(Q.FREE_PAGE)
    assert raw.wait_used(Q.FREE_PAGE, 2) == [(1, 0), (2, 0)]
    canary.rewrite(late, BLOCK)
    wait_for(lambda: False, QUIET)
    bad = canary.changed_pages()
    assert not bad, f"pages written after id {cid:#x} was published changed: {bad[:8]}"
    host.host("hint-done")


@pytest.mark.spec("D-12")
def test_nothing_changes_after_done(raw: RawGuest, host):
    """after DONE no hinted page changes, whatever the driver still sends under the old id"""
    hinting(raw, host)
    cid = start_round(raw, host)
    a, n = raw.buf(struct.pack("<I", cid))
    raw.post(Q.FREE_PAGE, [(a, n, 0)])
    raw.post(Q.FREE_PAGE, [(0x1800000, BLOCK, W)], head=1)
    assert len(raw.wait_used(Q.FREE_PAGE, 2)) == 2
    cv = raw.c.config_vector
    before = raw.c.irq_counts[cv]
    host.host("hint-done")
    assert wait_irq(raw.c, cv, before) and cmd_id(raw.c) == DONE
    canary = Canary(raw.mem)  # the guest now owns every page again and writes them
    raw.post(Q.FREE_PAGE, [(0x1C00000, BLOCK, W)], head=2)
    raw.post(Q.FREE_PAGE, [(a, n, 0)], head=3)
    raw.post(Q.FREE_PAGE, [(0x2000000, BLOCK, W)], head=4)
    assert len(raw.wait_used(Q.FREE_PAGE, 3)) == 3
    wait_for(lambda: False, QUIET)
    assert not canary.changed_pages(), "pages changed after DONE"
    log = rounds(host)
    if log is not None:
        assert log[cid]["hints"] == 1, log[cid]


@pytest.mark.spec("D-13")
def test_done_published_and_driver_releases_blocks(guest: DriverGuest, host):
    """the host's done publishes DONE (1) with a config interrupt; the driver then frees every
    block it held"""
    d = guest.driver
    if Q.FREE_PAGE not in d.vqs:
        pytest.skip("the target does not offer FREE_PAGE_HINT")
    host.host("hint-start")
    assert guest.pump(lambda: d.counters["stop_sent"] >= 1)
    held = len(d.s.held_blocks)
    assert held > 0
    host.host("hint-done")
    assert guest.pump(lambda: not d.s.held_blocks), "driver still holds blocks: DONE not seen"
    assert cmd_id(guest.c) == DONE
    assert d.counters["hint_blocks_returned_done"] == held
