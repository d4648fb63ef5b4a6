"""The balloon's configuration space as the driver reads and writes it (protocol.md 3.2).

Theory of operation
-------------------
``ConfigSpace`` belongs to one ``BalloonDevice``: it renders the little-endian window
(``num_pages``, ``actual``, ``free_page_hint_cmd_id``, ``poison_val``, as many as the offered
features give) from the device's state and applies the driver's writes field by field: the
read-only fields are counted and ignored, ``actual`` goes to the device (or, on the legacy
interface, to ``LegacyInterface.write_actual``), ``poison_val`` is writable only with PAGE_POISON
negotiated and before DRIVER_OK (after it, a change is DR-12). Writes before FEATURES_OK (modern
interface) and past the window are counted and ignored; reads past it return all ones, as QEMU.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from balloon_dev.device_config import DeviceUsageError
from balloon_dev.effects import ActualChanged, Effect
from balloon_dev.status import DRIVER_OK, FEATURES_OK
from protocol.balloon import (
    CFG_ACTUAL,
    CFG_FREE_PAGE_HINT_CMD_ID,
    CFG_NUM_PAGES,
    CFG_POISON_VAL,
    VIRTIO_BALLOON_F_PAGE_POISON,
)

if TYPE_CHECKING:
    from balloon_dev.device import BalloonDevice

_CONFIG_FIELDS = ((CFG_NUM_PAGES, "num_pages"), (CFG_ACTUAL, "actual"),
                  (CFG_FREE_PAGE_HINT_CMD_ID, "free_page_hint_cmd_id"),
                  (CFG_POISON_VAL, "poison_val"))


class ConfigSpace:
    def __init__(self, dev: BalloonDevice) -> None:
        self._dev = dev

    def render(self) -> bytes:
        """The whole config window as the driver reads it now."""
        s = self._dev.state
        # Little-endian even on the legacy interface (protocol.md 3.2). Legacy reads show
        # ``actual`` as written so far, including a half-written value (D-5).
        legacy = self._dev.legacy_interface
        actual = s.actual if legacy is None else legacy.state.actual_written
        raw = struct.pack("<IIII", s.num_pages, actual, self._dev.hint.config_value(), s.poison_val)
        return raw[:self._dev.config_size]

    def read(self, offset: int, size: int) -> bytes:
        """The driver reads ``size`` bytes at ``offset``."""
        if offset < 0 or size < 0:
            raise DeviceUsageError(f"read_config(offset={offset}, size={size}): negative")
        if offset + size > self._dev.config_size:
            # QEMU answers reads past the window with all ones.
            self._dev.count("config_read_out_of_range", "read [%#x, +%#x) past config size %#x",
                            offset, size, self._dev.config_size)
            return b"\xff" * size
        return self.render()[offset:offset + size]

    def write(self, offset: int, data: bytes) -> list[Effect]:
        """The driver writes ``data`` at ``offset``."""
        if offset < 0:
            raise DeviceUsageError(f"write_config(offset={offset}): negative")
        data = bytes(data)
        effects: list[Effect] = []
        end = offset + len(data)
        if end > self._dev.config_size:
            self._dev.count("config_write_out_of_range", "write [%#x, +%#x) past config size %#x "
                            "(ignored past the end)", offset, len(data), self._dev.config_size)
            data = data[:max(self._dev.config_size - offset, 0)]
            end = offset + len(data)
        if not data:
            return effects
        legacy = self._dev.legacy_interface
        if legacy is None and not self._dev.state.status & FEATURES_OK:
            # protocol.md 2.3 step 4: config may be read, not written, before FEATURES_OK.
            # (The legacy interface has no such step: its config is writable at any time.)
            self._dev.count("config_write_before_features_ok", "write [%#x, +%#x) = %s ignored",
                            offset, len(data), data.hex())
            return effects
        cur = bytearray(self.render())
        new = bytearray(cur)
        new[offset:end] = data
        for foff, name in _CONFIG_FIELDS:
            if foff >= self._dev.config_size or not (offset < foff + 4 and foff < end):
                continue
            old_v = int.from_bytes(cur[foff:foff + 4], "little")
            new_v = int.from_bytes(new[foff:foff + 4], "little")
            if name in ("num_pages", "free_page_hint_cmd_id"):
                self._dev.count("config_write_readonly", "driver wrote read-only %s at %#x "
                                "(%#x -> %#x ignored)", name, foff, old_v, new_v)
            elif name == "actual":
                if legacy is not None:
                    effects += legacy.write_actual(offset, end, new_v)
                elif new_v != old_v:
                    self._dev.state.actual = new_v
                    effects.append(ActualChanged(new_v))
            elif name == "poison_val":
                effects += self._poison(old_v, new_v)
        return effects

    def _poison(self, old_v: int, new_v: int) -> list[Effect]:
        if not self._dev.negotiated(VIRTIO_BALLOON_F_PAGE_POISON):
            self._dev.count("config_write_poison_not_negotiated", "poison_val write %#x ignored: "
                            "PAGE_POISON not negotiated", new_v)
            return []
        if self._dev.state.status & DRIVER_OK:
            # DR-12: poison_val is written before DRIVER_OK and never changed afterwards.
            self._dev.checker.poison_changed(old_v, new_v)
            return []
        self._dev.state.poison_val = new_v
        self._dev.state.poison_written = True
        return []
