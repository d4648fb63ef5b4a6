"""The status-byte table (balloon_dev/status.py): prerequisites, cleared bits, ignored bits."""
from __future__ import annotations

import pytest

from balloon_dev.status import (
    ACKNOWLEDGE,
    DRIVER,
    DRIVER_OK,
    FAILED,
    FEATURES_OK,
    NEEDS_RESET,
    SUSPEND,
    judge_status_write,
)

A, D, F, OK = ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK


def judge(old: int, value: int, accept: bool = True, suspend: bool = False):
    asked = []

    def validate() -> bool:
        asked.append(True)
        return accept

    return judge_status_write(old, value, suspend_negotiated=suspend,
                              validate_features=validate), asked


@pytest.mark.parametrize("old,value", [
    (0, A), (A, A | D), (0, A | D), (A | D, A | D | F), (A | D | F, A | D | F | OK),
    (0, A | D | F | OK),  # one write may set every step, in order
    (A | D | F | OK, A | D | F | OK | FAILED), (0, FAILED), (A, A | FAILED),
])
def test_valid_sequences(old, value):
    v, _ = judge(old, value)
    assert v.broken is None and v.status == value and not v.ignored


@pytest.mark.parametrize("old,value,why", [
    (0, D, "DRIVER set without"),
    (A, A | F, "FEATURES_OK set without"),
    (A | D, A | D | OK, "DRIVER_OK set without"),
    (A | D | F, A | D, "clears bits"),
    (A | D | F | OK, A | D | F, "clears bits"),
])
def test_broken_sequences(old, value, why):
    v, _ = judge(old, value)
    assert v.broken is not None and why in v.broken


def test_features_ok_validation_asked_once_and_refusal_drops_the_bit():
    v, asked = judge(A | D, A | D | F, accept=False)
    assert asked == [True] and v.features_refused and v.broken is None
    assert v.status == A | D
    v, asked = judge(A | D | F, A | D | F)  # already set: not asked again
    assert asked == []
    # Refused FEATURES_OK in the same write as DRIVER_OK: DRIVER_OK lacks its prerequisite.
    v, _ = judge(A | D, A | D | F | OK, accept=False)
    assert v.broken is not None and "DRIVER_OK" in v.broken


def test_device_owned_and_unknown_bits_ignored():
    v, _ = judge(A, A | NEEDS_RESET)
    assert v.ignored == ("status_write_needs_reset_bit",) and v.status == A
    v, _ = judge(A, A | 0x20)
    assert v.ignored == ("status_undefined_bit",) and v.status == A
    v, _ = judge(A | D | F | OK, A | D | F | OK | SUSPEND)
    assert v.ignored == ("status_suspend_not_negotiated",) and v.status == A | D | F | OK
    v, _ = judge(A | D | F | OK, A | D | F | OK | SUSPEND, suspend=True)
    assert v.status & SUSPEND and not v.ignored


def test_needs_reset_kept_by_later_writes():
    v, _ = judge(A | D | F | OK | NEEDS_RESET, A | D | F | OK | FAILED)
    assert v.status & NEEDS_RESET and v.status & FAILED and v.broken is None
