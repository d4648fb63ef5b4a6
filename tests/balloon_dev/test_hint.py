"""The hint session's transition table and command ids (balloon_dev/hint.py)."""
from __future__ import annotations

import pytest

from balloon_dev.hint import (
    DONE,
    REQUESTED,
    START,
    STOP,
    TRANSITIONS,
    Act,
    FreePageHintStatus,
    HintEvent,
    HintSession,
    next_cmd_id,
)


def test_table_is_complete():
    assert set(TRANSITIONS) == {(s, e) for s in FreePageHintStatus for e in HintEvent}


def test_qemu_state_values():
    # protocol.md 5.2: the migrated `status` field uses these numbers.
    assert [int(s) for s in (STOP, REQUESTED, START, DONE)] == [0, 1, 2, 3]


def test_first_ids_and_wrap():
    assert next_cmd_id(0x80000000) == 0x80000001
    assert next_cmd_id(0xFFFFFFFE) == 0xFFFFFFFF
    assert next_cmd_id(0xFFFFFFFF) == 0x80000000
    s = HintSession()
    s.fire(HintEvent.HOST_START)
    assert s.cmd_id == 0x80000001 and s.status == REQUESTED
    s.fire(HintEvent.HOST_START)
    assert s.cmd_id == 0x80000002


def test_round_trip_through_states():
    s = HintSession()
    assert s.config_value() == 0
    s.fire(HintEvent.HOST_START)
    cid = s.cmd_id
    assert s.config_value() == cid
    assert s.classify_cmd(cid) is HintEvent.CMD_CURRENT
    assert s.classify_cmd(0) is HintEvent.CMD_OTHER
    _, new, act = s.fire(HintEvent.CMD_CURRENT)
    assert new == START and act == Act.NONE
    assert s.config_value() == cid  # spec-faithful read while START
    _, new, act = s.fire(HintEvent.HINT)
    assert new == START and act & Act.APPLY_HINT
    _, new, act = s.fire(HintEvent.CMD_OTHER)  # the driver's STOP
    assert new == STOP and act & Act.END_ROUND
    _, new, act = s.fire(HintEvent.HINT)
    assert act == Act.NONE  # outside START: used and dropped
    _, new, act = s.fire(HintEvent.HOST_DONE)
    assert new == DONE and act & Act.PUBLISH and s.config_value() == 1


def test_qemu_cmd_id_read_gives_zero_while_start():
    s = HintSession(qemu_cmd_id_read=True)
    s.fire(HintEvent.HOST_START)
    assert s.config_value() == s.cmd_id
    s.fire(HintEvent.CMD_CURRENT)
    assert s.config_value() == 0


@pytest.mark.parametrize("state", list(FreePageHintStatus))
def test_hints_apply_only_in_start(state):
    new, act = TRANSITIONS[(state, HintEvent.HINT)]
    assert new == state
    assert bool(act & Act.APPLY_HINT) == (state == START)
    assert (act == Act.NONE) == (state != START)


@pytest.mark.parametrize("state", list(FreePageHintStatus))
def test_reset_goes_to_stop_without_interrupt(state):
    new, act = TRANSITIONS[(state, HintEvent.RESET)]
    assert new == STOP and not act & Act.PUBLISH
    assert bool(act & Act.END_ROUND) == (state in (REQUESTED, START))


def test_reset_keeps_counter():
    s = HintSession()
    s.fire(HintEvent.HOST_START)
    cid = s.cmd_id
    s.fire(HintEvent.RESET)
    s.fire(HintEvent.HOST_START)
    assert s.cmd_id == cid + 1
