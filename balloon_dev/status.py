"""The device status byte as a table: which bit needs which, and how a status write is judged.

Theory of operation: the driver owns the status bits ACKNOWLEDGE, DRIVER, FEATURES_OK,
DRIVER_OK and FAILED; the device owns DEVICE_NEEDS_RESET (protocol.md 2.2). Initialisation sets
them in order (protocol.md 2.3): ACKNOWLEDGE, DRIVER, FEATURES_OK (which the device may refuse),
DRIVER_OK. ``judge_status_write(old, value, ...)`` walks the bits newly set by a write in that
order and checks each against ``PREREQUISITES``; the device then acts on the verdict:

- ``value == 0`` is a reset (handled by the device before calling this);
- bits a driver may not write (DEVICE_NEEDS_RESET, SUSPEND when not negotiated) are dropped and
  reported as ``ignored``;
- a write that clears a driver bit without resetting, or sets a bit whose prerequisite is not
  set (e.g. DRIVER_OK without FEATURES_OK on the modern interface), is a guest error: the
  verdict is ``broken`` and the device enters DEVICE_NEEDS_RESET (virtio 1.x 2.1.2: the device
  sets it when it needs a reset to recover).
- FEATURES_OK newly set asks the device to validate the features (the ``validate_features``
  callback); when it says no, the bit is not kept and the verdict's ``features_refused`` is set
  (the driver sees the bit gone on re-read, step 6 of protocol.md 2.3).

The legacy interface (virtio 0.9.5, ``legacy=True``) has only ACKNOWLEDGE, DRIVER, DRIVER_OK and
FAILED: features are taken when written, never confirmed, so DRIVER_OK follows DRIVER directly
(``LEGACY_PREREQUISITES``) and the device cannot refuse them. Any other bit a legacy driver writes
(FEATURES_OK, SUSPEND, DEVICE_NEEDS_RESET, bit 5) means nothing there: dropped and reported as
``status_not_legacy_bit``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from protocol.virtio import DeviceStatus

ACKNOWLEDGE = int(DeviceStatus.ACKNOWLEDGE)
DRIVER = int(DeviceStatus.DRIVER)
FEATURES_OK = int(DeviceStatus.FEATURES_OK)
DRIVER_OK = int(DeviceStatus.DRIVER_OK)
SUSPEND = int(DeviceStatus.SUSPEND)
NEEDS_RESET = int(DeviceStatus.DEVICE_NEEDS_RESET)
FAILED = int(DeviceStatus.FAILED)

#: Bits the driver sets during initialisation, in the order protocol.md 2.3 sets them, each with
#: the bits that must already be set (or set by the same write, earlier in this order).
PREREQUISITES: dict[int, int] = {
    ACKNOWLEDGE: 0,
    DRIVER: ACKNOWLEDGE,
    FEATURES_OK: ACKNOWLEDGE | DRIVER,
    DRIVER_OK: ACKNOWLEDGE | DRIVER | FEATURES_OK,
    FAILED: 0,  # the driver may give up at any point
    SUSPEND: ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
}
DRIVER_BITS = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | FAILED | SUSPEND
#: The legacy interface's table: no FEATURES_OK step (features are never confirmed there).
LEGACY_PREREQUISITES: dict[int, int] = {
    ACKNOWLEDGE: 0,
    DRIVER: ACKNOWLEDGE,
    DRIVER_OK: ACKNOWLEDGE | DRIVER,
    FAILED: 0,
}
LEGACY_DRIVER_BITS = ACKNOWLEDGE | DRIVER | DRIVER_OK | FAILED
UNDEFINED_BITS = 0xFF & ~(DRIVER_BITS | NEEDS_RESET)  # bit 5: no meaning in virtio 1.x


@dataclass(frozen=True, slots=True)
class StatusVerdict:
    status: int  # the value the status byte holds after the write (before NEEDS_RESET handling)
    newly_set: int  # driver bits this write set
    ignored: tuple[str, ...]  # guest errors that dropped a bit but keep the device usable
    broken: str | None  # guest error that needs a reset, or None
    features_refused: bool  # FEATURES_OK was asked for and refused


def judge_status_write(old: int, value: int, *, suspend_negotiated: bool,
                       validate_features: Callable[[], bool],
                       legacy: bool = False) -> StatusVerdict:
    """Judge a non-zero status write. ``validate_features()`` is called only when the write
    newly sets FEATURES_OK (with its prerequisites met) and says whether to accept it.
    ``legacy``: judge by the legacy interface's bits and table (module docstring)."""
    value &= 0xFF
    ignored: list[str] = []
    prerequisites = PREREQUISITES
    if legacy:
        prerequisites = LEGACY_PREREQUISITES
        if value & ~LEGACY_DRIVER_BITS:
            ignored.append("status_not_legacy_bit")
            value &= LEGACY_DRIVER_BITS
    if value & NEEDS_RESET and not old & NEEDS_RESET:
        ignored.append("status_write_needs_reset_bit")  # device-owned bit
    if value & SUSPEND and not suspend_negotiated:
        ignored.append("status_suspend_not_negotiated")
        value &= ~SUSPEND
    if value & UNDEFINED_BITS:
        ignored.append("status_undefined_bit")
        value &= ~UNDEFINED_BITS
    value &= DRIVER_BITS
    old_driver = old & DRIVER_BITS
    keep_reset = old & NEEDS_RESET
    cleared = old_driver & ~value
    if cleared:
        # Drivers only add bits; the only way back is writing 0 (virtio 1.x 2.1.1).
        return StatusVerdict(value | keep_reset, 0, tuple(ignored),
                             f"status write {value:#04x} clears bits {cleared:#04x} "
                             "without a reset",
                             False)
    newly = value & ~old_driver
    have = old_driver
    refused = False
    for bit, needs in prerequisites.items():
        if not newly & bit:
            continue
        if needs & ~have:
            return StatusVerdict(value | keep_reset, newly, tuple(ignored),
                                 f"status bit {DeviceStatus(bit).name} set without "
                                 f"{DeviceStatus(needs & ~have)!s} (write {value:#04x})", False)
        if bit == FEATURES_OK and not validate_features():
            refused = True
            value &= ~FEATURES_OK
            newly &= ~FEATURES_OK
            continue
        have |= bit
    return StatusVerdict(value | keep_reset, newly, tuple(ignored), None, refused)
