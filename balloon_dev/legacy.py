"""The legacy (virtio 0.9.5) interface of the balloon device, beside the modern one.

Theory of operation
-------------------
The same device core can present the interface a legacy driver speaks (protocol.md 1.7,
3.2-3.5, 4.6) when built with ``DeviceConfig(legacy=True)``. ``BalloonDevice`` then hands the
calls whose meaning differs to its ``LegacyInterface``; everything else (queues, hinting,
reporting, inflate/deflate) is shared. What differs:

- Features: one 32-bit word; the driver sees bits 0-31 of the offered features (never
  VERSION_1) and its write is taken at once, minus bits not offered (counted). There is no
  FEATURES_OK (``status.LEGACY_PREREQUISITES``: DRIVER_OK follows DRIVER), so nothing can be
  refused: a driver that declines MUST_TELL_HOST is served whatever
  ``refuse_without_must_tell_host`` says (D-2), only noted as DR-1 at DRIVER_OK. Without
  MUST_TELL_HOST the driver may reuse balloon pages before the deflate is used; the device asks
  nothing else of it. Feature writes after a ring is set up are ignored and counted (the rings
  were built for the earlier ones).
- ``actual`` (D-5): config reads show the bytes as written, but the device acts on the value
  (``actual``, ``ActualChanged``) only when a write covers its most significant byte (offset 7),
  so a driver writing it byte by byte, low to high, is never taken at a half-written value.
  A write that is not all 4 bytes at once is noted as DR-7. Config fields stay little-endian
  (protocol.md 3.2); config writes are accepted at any time (no FEATURES_OK step).
- Statistics (D-7): the first stats buffer after initialisation is held, as always, but its
  values are not read (no ``StatsReceived``, no DR-8 tag-set baseline); counted as
  ``stats_first_buffer_ignored``.
- Endianness: legacy rings, pfn arrays and stats entries are guest-endian. The device assumes a
  little-endian guest (x86-64, and arm64 as Linux runs it), where guest-endian is little-endian,
  so they are read exactly as on the modern interface. Big-endian legacy guests are not served.
- Rings: a transport that has only the legacy single address calls ``set_queue_legacy(q, pfn)``
  (one block at that pfn's address, the queue's fixed size, used ring on the next 4 KiB); a
  transport that knows the three addresses may keep using ``set_queue``.
- DEVICE_NEEDS_RESET does not exist there: a broken ring still stops the device (and emits
  ``NeedsReset`` for the host), but ``status`` does not show the bit and no config interrupt is
  sent.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from balloon_dev.effects import ActualChanged, Effect
from balloon_dev.status import DRIVER_OK
from guestmem.units import Pfn, pfn_to_gpa
from protocol.balloon import CFG_ACTUAL, VIRTIO_BALLOON_F_MUST_TELL_HOST
from protocol.virtqueue import avail_ring_size, desc_table_size

if TYPE_CHECKING:
    from balloon_dev.device import BalloonDevice

#: Legacy virtio-pci's ring alignment (the used ring starts on the next 4 KiB boundary).
LEGACY_VRING_ALIGN = 4096
U32_MAX = 0xFFFFFFFF
U64_MASK = (1 << 64) - 1


def legacy_ring_layout(base: int, size: int, align: int = LEGACY_VRING_ALIGN
                       ) -> tuple[int, int, int]:
    """(desc, driver, device) areas of a legacy ring of ``size`` entries at ``base``
    (protocol.md 1.7): the descriptor table, the available ring right after it, the used ring
    at the next ``align`` boundary (a real round-up, not the spec's printed macro)."""
    driver = base + desc_table_size(size)
    device = (driver + avail_ring_size(size) + align - 1) & ~(align - 1)
    return base, driver, device


@dataclass(slots=True)
class LegacyState:
    """What only the legacy interface holds; a device reset starts it afresh."""

    #: A stats buffer has arrived since initialisation (D-7: the first one's values are ignored).
    stats_first_seen: bool = False
    #: ``actual`` as the driver has written it so far, byte by byte (what config reads show);
    #: the device's ``actual`` is taken from here when the most significant byte is written.
    actual_written: int = 0


class LegacyInterface:
    """The legacy handlers of one ``BalloonDevice`` (which owns it and calls it)."""

    def __init__(self, dev: BalloonDevice) -> None:
        self._dev = dev
        self.state = LegacyState()

    def reset(self) -> None:
        self.state = LegacyState()

    def write_features(self, value: int) -> None:
        """One 32-bit word, taken as written; nothing can be refused (D-2)."""
        dev = self._dev
        st = dev.state
        if st.status & DRIVER_OK or dev.any_queue_enabled():
            # The rings were built for the features written before them (event idx, indirect).
            dev.count("features_write_after_queue_setup", "legacy driver features %#x written "
                      "after queue set-up or DRIVER_OK (kept %#x)", value, st.driver_features)
            return
        if value < 0 or value > U32_MAX:
            dev.count("features_write_out_of_range", "legacy driver features %#x: only bits "
                      "0-31 exist", value)
            value &= U32_MAX
        visible = dev.device_features
        if value & ~visible:
            # No FEATURES_OK to refuse with: keep the offered part, as QEMU does.
            dev.count("features_not_offered", "legacy driver accepted %#x, offered %#x (extra "
                      "%#x dropped)", value, visible, value & ~visible)
            value &= visible
        st.driver_features = value

    def check_features(self) -> None:
        """At DRIVER_OK, the driver's final features: note what a modern device would have
        refused, refuse nothing (D-2: the legacy interface cannot report a refusal)."""
        dev = self._dev
        f = dev.state.driver_features
        visible = dev.device_features
        bit = VIRTIO_BALLOON_F_MUST_TELL_HOST
        if visible >> bit & 1 and not f >> bit & 1:
            # D-2: served anyway (refuse_without_must_tell_host is a modern-interface choice);
            # the driver still broke a "should".
            dev.checker.must_tell_host_declined(f, legacy=True)
        if dev.layout_differs(f):
            dev.count("features_queue_layout_mismatch", "legacy driver features %#x decline an "
                      "offered queue before an accepted one: its queue numbering differs from "
                      "ours (offered %#x)", f, visible)

    def write_actual(self, offset: int, end: int, new_v: int) -> list[Effect]:
        """A config write of bytes [offset, end) touching ``actual`` (``new_v``: the field with
        it applied)."""
        dev = self._dev
        self.state.actual_written = new_v
        dev.checker.legacy_actual_write(max(offset, CFG_ACTUAL), min(end, CFG_ACTUAL + 4),
                                        whole=offset <= CFG_ACTUAL and end >= CFG_ACTUAL + 4)
        if end < CFG_ACTUAL + 4:
            # D-5: until its most significant byte is written the value is half-written; the
            # device must not act on it (e.g. report a bogus balloon size to the host).
            return []
        if new_v == dev.state.actual:
            return []
        dev.state.actual = new_v
        return [ActualChanged(new_v)]

    def first_stats_buffer(self, head: int) -> bool:
        """True if the buffer at ``head`` is the first since initialisation, whose values are
        not read (D-7): old drivers posted it uninitialised, so its tags say nothing about the
        driver either (DR-8). It is still held, as the one a request for stats gives back."""
        if self.state.stats_first_seen:
            return False
        self.state.stats_first_seen = True
        self._dev.count("stats_first_buffer_ignored", "stats head %d: first buffer since "
                        "initialisation, values ignored (legacy)", head, level=logging.INFO)
        return True

    def set_queue(self, q: int, max_size: int, pfn: int, align: int) -> list[Effect]:
        """Queue ``q`` (of fixed size ``max_size``) set up from one page frame number (see
        ``BalloonDevice.set_queue_legacy``)."""
        dev = self._dev
        if pfn == 0:
            return []
        if pfn < 0 or pfn_to_gpa(Pfn(pfn)) > U64_MASK:
            dev.count("queue_bad_pfn", "queue %d: legacy pfn %#x out of range", q, pfn)
            return []
        desc, driver, device = legacy_ring_layout(pfn_to_gpa(Pfn(pfn)), max_size, align)
        dev.set_queue(q, max_size, desc, driver, device)
        return dev.enable_queue(q)
