"""Device conformance, free page hinting: D-8 .. D-13 (protocol.md 4.6, rules of 4.4)."""
from __future__ import annotations

import pytest

from balloon_dev.effects import ConfigChanged, HintRoundStopped, PagesHinted, PrecopyEvent
from balloon_dev.hint import DONE, STOP
from protocol.balloon import BalloonQueue
from tests.balloon_dev.devharness import Harness, cmd

Q = BalloonQueue
BLOCK = 0x400000


def live() -> Harness:
    h = Harness()
    h.init()
    return h


def hinted(effects) -> list[PagesHinted]:
    return [e for e in effects if isinstance(e, PagesHinted)]


@pytest.mark.spec("D-8")
def test_stop_published_whenever_hints_cannot_be_used():
    """STOP is published (with a config interrupt) before every bitmap sync and on reset"""
    h = live()
    cid = h.open_hint_round()
    eff = h.dev.precopy_notify(PrecopyEvent.BEFORE_BITMAP_SYNC, True)
    assert eff == [HintRoundStopped(cid), ConfigChanged()]
    assert h.read_cmd_id() == 0
    # Hints still in flight for the stopped round are not used.
    h.post_in(Q.FREE_PAGE, [(0x800000, BLOCK)])
    assert hinted(h.kick(Q.FREE_PAGE)) == []
    h.dev.precopy_notify(PrecopyEvent.AFTER_BITMAP_SYNC, True)
    assert h.read_cmd_id() == cid + 1
    h.dev.reset()
    assert h.dev.hint.status == STOP and h.read_cmd_id() == 0


@pytest.mark.spec("D-9")
def test_ids_never_reused_before_stop():
    """a new round always gets a new id, also without the driver's STOP, across reset and
    around the 0xFFFFFFFF wrap"""
    h = live()
    seen = set()
    for _ in range(200):
        h.dev.free_page_start()  # no driver STOP in between: QEMU bumps, so do we
        cid = h.read_cmd_id()
        assert cid >= 0x80000000 and cid not in seen
        seen.add(cid)
    h.dev.reset()
    h.init()
    h.dev.free_page_start()
    assert h.read_cmd_id() not in seen
    h.dev.hint.state.cmd_id = 0xFFFFFFFE
    ids = []
    for _ in range(3):
        h.dev.free_page_start()
        ids.append(h.read_cmd_id())
    assert ids == [0xFFFFFFFF, 0x80000000, 0x80000001]


@pytest.mark.spec("D-10")
def test_pages_under_non_current_id_ignored():
    """hints after the host replaced the round, or sent with a stale start, are ignored"""
    h = live()
    old = h.open_hint_round()
    h.dev.free_page_start()  # the host moves on; the driver has not noticed yet
    new = h.read_cmd_id()
    h.post_in(Q.FREE_PAGE, [(0x800000, BLOCK)])
    h.post_out(Q.FREE_PAGE, cmd(old))  # stale start
    h.post_in(Q.FREE_PAGE, [(0xC00000, BLOCK)])
    assert hinted(h.kick(Q.FREE_PAGE)) == []
    h.post_out(Q.FREE_PAGE, cmd(new))
    h.post_in(Q.FREE_PAGE, [(0x400000, BLOCK)])
    assert hinted(h.kick(Q.FREE_PAGE)) == [PagesHinted.from_ranges(new, ((0x400000, BLOCK),))]


@pytest.mark.spec("D-11")
def test_hints_attributed_only_to_the_round_they_follow():
    """a hint is attributed to id X only if it follows X's start buffer, which the driver can
    send only after X was published; hints queued earlier are dropped"""
    h = live()
    h.post_in(Q.FREE_PAGE, [(0x800000, BLOCK)])  # queued before any id was published
    h.dev.free_page_start()
    cid = h.read_cmd_id()
    h.post_out(Q.FREE_PAGE, cmd(cid))
    h.post_in(Q.FREE_PAGE, [(0xC00000, BLOCK)])
    eff = h.kick(Q.FREE_PAGE)
    assert hinted(eff) == [PagesHinted.from_ranges(cid, ((0xC00000, BLOCK),))]


@pytest.mark.spec("D-12")
def test_no_hints_after_done():
    """after DONE no hint is passed on, whatever the driver sends"""
    h = live()
    cid = h.open_hint_round()
    eff = h.dev.free_page_done()
    assert eff == [HintRoundStopped(cid), ConfigChanged()] and h.read_cmd_id() == 1
    h.post_in(Q.FREE_PAGE, [(0x800000, BLOCK)])
    h.post_out(Q.FREE_PAGE, cmd(cid))
    h.post_in(Q.FREE_PAGE, [(0xC00000, BLOCK)])
    assert hinted(h.kick(Q.FREE_PAGE)) == []
    assert h.dev.hint.status == DONE


@pytest.mark.spec("D-13")
def test_done_published_when_migration_ends():
    """DONE is published at CLEANUP (success, failure, cancel) and after the final sync with
    the VM stopped"""
    for last in ((PrecopyEvent.AFTER_BITMAP_SYNC, False), (PrecopyEvent.CLEANUP, True)):
        h = live()
        h.dev.precopy_notify(PrecopyEvent.SETUP, True)
        h.dev.precopy_notify(PrecopyEvent.AFTER_BITMAP_SYNC, True)
        h.dev.precopy_notify(PrecopyEvent.BEFORE_BITMAP_SYNC, True)
        eff = h.dev.precopy_notify(*last)
        assert eff == [ConfigChanged()]
        assert h.read_cmd_id() == 1
