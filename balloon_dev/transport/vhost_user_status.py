"""How a vhost-user session drives the balloon device's status from the front-end's view.

Theory of operation
-------------------
QEMU's generic vhost-user front-end keeps the guest-visible status byte itself and hands the
rings over only when the guest sets DRIVER_OK; the device core (a virtio device with its own
status byte) must still see the virtio order ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queues,
DRIVER_OK. ``FrontendStatus`` (inherited by ``vhost_user.VhostUserSession``, whose handlers call
it) moves the device along that order:

* FEATURES_OK: with the STATUS protocol feature, SET_STATUS with FEATURES_OK (QEMU 11.1 sends it
  right after SET_FEATURES); without it, SET_FEATURES itself. Driver-writable config fields the
  guest wrote before (kept in ``_pending_config``) are applied right after.
* DRIVER_OK ("going live"): SET_STATUS with DRIVER_OK if the front-end sends it (QEMU 11.1's
  generic front-end does not: its status messages are gated on a queue range it never sets),
  else the moment every device ring is runnable (address, kick fd, enabled), else, for a
  front-end that sets up fewer rings, the first kick once all rings it set up are runnable.
  Going live sets up every device queue whose ring has an address, enables it, writes
  DRIVER_OK, then notifies every runnable ring once (kicks may have come before; spurious
  notifications are allowed, protocol.md 1.4).
* Stop: SET_STATUS 0 or RESET_DEVICE resets the device. GET_VRING_BASE having stopped every ring
  (QEMU's vhost_dev_stop, sent both when the guest resets the device and when the VM is paused)
  keeps it: the restart *resumes* it when the same rings come back at the bases we reported
  (VM stop/cont: the balloon keeps its pages and held buffers, nothing is replayed), and resets
  it otherwise (a guest reset brings fresh rings at base 0).
* Resume index: GET_VRING_BASE reports the ring's used index read from guest memory, not the
  device's last_avail_idx, so that after a reset the buffers the device held unused (the stats
  buffer) are popped again; every other balloon buffer is used as soon as it is popped.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from balloon_dev.effects import Effect
from balloon_dev.status import ACKNOWLEDGE as ACK
from balloon_dev.status import DRIVER, DRIVER_OK, FAILED, FEATURES_OK, NEEDS_RESET
from balloon_dev.transport.core import DeviceCore
from guestmem import GuestMemory, GuestMemoryError
from protocol.vhost_user import VHOST_USER_F_PROTOCOL_FEATURES, VringAddr

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Vring:
    """The front-end's view of one ring, as the vhost-user messages set it."""

    num: int = 0
    addr: VringAddr | None = None
    # Guest-physical addresses translated from ``addr`` when it arrived.
    desc_gpa: int = 0
    avail_gpa: int = 0
    used_gpa: int = 0
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    started: bool = False  # a kick fd (or NOFD) arrived and no GET_VRING_BASE stopped it since
    enabled: bool = False  # SET_VRING_ENABLE state


class FrontendStatus:
    """The status machine of one vhost-user session (module docstring). The attributes are the
    session's; this class only holds the logic that reads and moves them."""

    dev: DeviceCore
    mem: GuestMemory
    counters: Counter[str]
    rings: list[Vring]
    features_acked: int | None  # last SET_FEATURES value (bit 30 included)
    live: bool  # the device has been given DRIVER_OK by this session
    stopped: bool  # every ring was stopped while live; the device kept its state
    _handed: dict[int, tuple[int, int, int, int]]  # q -> (num, desc, avail, used) handed over
    _reported_base: dict[int, int]  # GET_VRING_BASE answers since going live
    _pending_config: dict[int, bytes]  # driver-writable config written before FEATURES_OK

    @property
    def guest_features(self) -> int:
        """Features the guest accepted (SET_FEATURES minus the vhost-only bits)."""
        if self.features_acked is None:
            return 0
        return self.features_acked & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES)

    def _ring_enabled(self, ring: Vring) -> bool:
        # vhost-user.rst: without VHOST_USER_F_PROTOCOL_FEATURES rings are enabled when started;
        # with it they start disabled until SET_VRING_ENABLE 1.
        acked = self.features_acked
        if acked is None or not acked >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            return True
        return ring.enabled

    def _runnable(self, ring: Vring) -> bool:
        return ring.addr is not None and ring.started and self._ring_enabled(ring)

    def _set_up_rings_runnable(self) -> bool:
        """Every ring the front-end gave an address to can run."""
        return all(self._runnable(r) for r in self.rings if r.addr is not None)

    def _notify_runnable(self) -> list[Effect]:
        """One notification per runnable ring: buffers may have been queued while the device
        was not live (spurious notifications are allowed, protocol.md 1.4)."""
        effects: list[Effect] = []
        for q, ring in enumerate(self.rings):
            if self._runnable(ring):
                effects += self.dev.notify(q)
        return effects

    def _maybe_go_live(self) -> list[Effect]:
        """Go live once every device ring can run (see the module docstring)."""
        if self.live or self.features_acked is None:
            return []
        if all(self._runnable(r) for r in self.rings):
            return self._go_live()
        return []

    def _note_stopped(self) -> None:
        """All rings stopped by GET_VRING_BASE: the front-end stopped the device (vhost_dev_stop).

        QEMU's generic front-end stops the rings both when the guest resets the device and when
        the VM is paused (``stop``/``cont``), and sends no SET_STATUS 0 (its status messages are
        gated on a queue range the generic device never sets). The two cases look alike until
        the restart, so the device is kept as it is here and ``_go_live`` decides: resume it
        when the rings come back unchanged at the bases we reported, else reset it.
        """
        if not self.live or any(r.started for r in self.rings):
            return
        self.counters["device_stops"] += 1
        self.live = False
        self.stopped = True

    def _device_reset(self) -> list[Effect]:
        self.live = False
        self.stopped = False
        self._handed = {}
        self._reported_base = {}
        return self.dev.reset()

    def _can_resume(self) -> bool:
        """The restart hands back exactly the rings we stopped, at the bases we reported, and at
        least one base moved (all-zero bases are also what a guest reset looks like; resetting
        the device then loses nothing a fresh start at index 0 would not redo)."""
        if not self.stopped or not self._handed:
            return False
        for q, ring in enumerate(self.rings):
            setup = self._handed.get(q)
            now = None if ring.addr is None else (ring.num, ring.desc_gpa, ring.avail_gpa,
                                                  ring.used_gpa)
            if setup != now:
                return False
            if setup is not None and ring.base != self._reported_base.get(q):
                return False
        return any(self._reported_base.get(q) for q in self._handed)

    # -- device status ------------------------------------------------------------------------
    def _drive_status(self, want: int) -> list[Effect]:
        """Move the device toward the front-end's status ``want`` in virtio order."""
        effects: list[Effect] = []
        if want == 0:
            return self._device_reset()
        if self.dev.status & (FAILED | NEEDS_RESET):
            return effects
        if want & (FEATURES_OK | DRIVER_OK) and not self.dev.status & FEATURES_OK:
            effects += self._features_ok()
        if want & DRIVER_OK and not self.live:
            if not self.stopped or self._set_up_rings_runnable():
                effects += self._go_live()
            # else: restarting after a stop; the last ring handed back goes live.
        elif want & (ACK | DRIVER):
            cur = self.dev.status
            add = want & (ACK | DRIVER) & ~cur
            if add:
                effects += self.dev.write_status(cur | add)
        return effects

    def _features_ok(self) -> list[Effect]:
        if self.features_acked is None:
            self.counters["status_before_features"] += 1
            log.warning("vhost-user: FEATURES_OK requested before SET_FEATURES; not applied")
            return []
        effects: list[Effect] = []
        cur = self.dev.status
        if cur & (ACK | DRIVER) != ACK | DRIVER:
            # QEMU's add_status(FEATURES_OK) sends 8 alone: the guest has of course acknowledged
            # the device already, so supply the earlier bits first.
            effects += self.dev.write_status(cur | ACK | DRIVER)
        self.dev.write_driver_features(self.guest_features)
        effects += self.dev.write_status(self.dev.status | FEATURES_OK)
        if not self.dev.status & FEATURES_OK:
            self.counters["features_refused"] += 1
            log.warning("vhost-user: device refused features %#x", self.guest_features)
            return effects
        for off, data in sorted(self._pending_config.items()):
            effects += self._write_config_field(off, data)
        self._pending_config.clear()
        return effects

    def _go_live(self) -> list[Effect]:
        effects: list[Effect] = []
        if self.stopped:
            resume = self._can_resume()
            self.stopped = False
            if resume:
                # VM stop/cont: the device kept its state and its queue indices; carry on.
                self.counters["device_resumes"] += 1
                self.live = True
                return effects + self._notify_runnable()
            # A guest reset (or anything else): start from a fresh device.
            effects += self._device_reset()
        if not self.dev.status & FEATURES_OK:
            effects += self._features_ok()
            if not self.dev.status & FEATURES_OK:
                return effects
        self._handed = {}
        for q, ring in enumerate(self.rings):
            if ring.addr is None or ring.num == 0:
                continue
            self.dev.set_queue(q, ring.num, ring.desc_gpa, ring.avail_gpa, ring.used_gpa)
            effects += self.dev.enable_queue(q)
            self._handed[q] = (ring.num, ring.desc_gpa, ring.avail_gpa, ring.used_gpa)
            if ring.base:
                # A fresh device queue starts at index 0; a non-zero base here means rings
                # restarted mid-stream that we could not resume as they were.
                self._set_queue_base(q, ring.base)
        effects += self.dev.write_status(self.dev.status | ACK | DRIVER | FEATURES_OK | DRIVER_OK)
        if not self.dev.status & DRIVER_OK:
            self.counters["driver_ok_refused"] += 1
            log.warning("vhost-user: device refused DRIVER_OK (status %#x)", self.dev.status)
            return effects
        self.live = True
        return effects + self._notify_runnable()

    def _set_queue_base(self, q: int, base: int) -> None:
        # The device core's queues always start at index 0 (it has no way to set them), so a
        # ring handed back mid-stream that could not be resumed restarts at 0.
        self.counters["vring_base_unsupported"] += 1
        log.warning("vhost-user: ring %d cannot resume at %d: the device core's queues "
                    "start at 0", q, base)

    def _resume_index(self, q: int) -> int:
        """Where ring ``q`` resumes after a stop: the used index the device published.

        Not the device's last_avail_idx: the stop is followed by SET_STATUS 0 (a device reset),
        which forgets buffers the device popped and still holds (the statistics buffer). Those
        must be popped again on restart, so the ring resumes after the last *used* buffer; every
        balloon buffer but the held stats buffer is used as soon as it is popped.
        """
        ring = self.rings[q]
        if ring.addr is None:
            return ring.base
        try:
            return self.mem.read_u16(ring.used_gpa + 2)
        except GuestMemoryError:
            self.counters["vring_base_unreadable"] += 1
            return ring.base

    # -- config -------------------------------------------------------------------------------
    def _write_config_field(self, off: int, data: bytes) -> list[Effect]:
        if off + len(data) > self.dev.config_size:
            return []
        if self.dev.read_config(off, len(data)) == data:
            return []
        return self.dev.write_config(off, data)
