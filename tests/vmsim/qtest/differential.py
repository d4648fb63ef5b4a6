"""Differential testing of our device against QEMU's own virtio-balloon (issue 9 item 3).

Theory of operation
-------------------
One driver-side action interpreter (``Driver``) runs the same action sequence against two
peers and records, after every action, what a driver can observe (``Obs``): device status
(NEEDS_RESET included), the config fields, whether ``config_generation`` moved, the ISR byte
(read, and so cleared), which MSI-X vectors fired, and per queue the used ring's new elements
(id, len). The two records are compared action by action (``compare``).

The peers (``Peer``) give the interpreter a ``VirtioTransport`` (plus ``read_isr``), guest
memory to write raw rings into (``vmsim.conformance.rings.RawRing``: malformed chains are
written descriptor by descriptor) and the host's requests:

* ``OurPeer``: ``balloon_dev.device.BalloonDevice`` behind its own virtio-pci function
  (``balloon_dev.transport.virtio_pci.VirtioPciFunction``), called in-process through
  ``PciTransport`` at the same register offsets a guest uses, so ISR, MSI-X vectors and common
  config are ours too. Its host side mirrors what QEMU's does: a hint round starts as QEMU's
  migration starts it (precopy SETUP, BEFORE/AFTER_BITMAP_SYNC; a running one is CLEANUP'd
  first), ends with CLEANUP.
* ``QemuPeer``: ``vmsim.qtest.QemuBalloon`` (QEMU's virtio-balloon-pci under qtest). One QEMU
  serves many sequences: ``begin()`` cancels its migration, resets the device, zeroes the
  driver area and clears the target; a fresh QEMU only when that fails.

QEMU is asynchronous (kicks after DRIVER_OK go through an ioeventfd to its main loop, the free
page queue to its iothread, stats to a timer), so after each action ``settle`` polls until
every buffer the driver published is used (the stats queue may hold one) or nothing changed
for ``QUIET_S``.

Command ids differ in value between the peers (QEMU's counter lives on across sequences), so
ids >= 2 are compared by order of first appearance ("id1", "id2", ...); STOP (0) and DONE (1)
as themselves.

A divergence is either explained by an ``ALLOWED`` entry (a documented QEMU deviation, with
its spec section and docs/qemu-deviations.md section) or is a failure. An allowed divergence
that changes device state (QEMU used buffers ours kept, FEATURES_OK taken vs refused) ends the
comparison of that sequence: the states legitimately differ from then on.
"""
from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from balloon_dev.device import BalloonDevice, DeviceConfig
from balloon_dev.effects import PrecopyEvent
from balloon_dev.transport.virtio_pci import CAP_MSIX, MsixFire, VirtioPciFunction
from guestmem import GuestMemory
from protocol import virtio_pci as vp
from protocol.balloon import (
    CFG_ACTUAL,
    CFG_POISON_VAL,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    BalloonQueue,
    queue_layout,
)
from protocol.virtio import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceStatus,
    feature_mask,
)
from protocol.virtqueue import used_ring_size
from vmsim.conformance.rings import INDIRECT, NEXT, WRITE, RawRing, write_table
from vmsim.qtest.balloon import BalloonDeviceOptions, QemuBalloon
from vmsim.qtest.qemu import QemuBinary

RAM_BYTES = 64 << 20
PAGE = 4096
RING_BASE = 0x100000           # rings: [1 MiB, 3 MiB)
SCRATCH = 0x300000             # buffers the driver writes: [3 MiB, 5 MiB)
SCRATCH_END = 0x500000
DRIVER_AREA = (RING_BASE, SCRATCH_END - RING_BASE)
#: pfns a sequence inflates/deflates and hint ranges: RAM above the driver area.
PFN_LO, PFN_HI = SCRATCH_END // PAGE, RAM_BYTES // PAGE
QUIET_S = 0.01                 # QEMU: no change for this long = settled
SETTLE_MAX_S = 0.5
IRQ_WAIT_S = 0.01
#: QEMU's device: everything it can offer but MUST_TELL_HOST (it has none).
QEMU_DEVICE = BalloonDeviceOptions(free_page_hint=True, free_page_reporting=True,
                                   deflate_on_oom=True, page_poison=True)
#: Our device offers what that QEMU offers, except RING_RESET (virtio 1.2 queue reset), which
#: ours does not implement; the driver never accepts it, and ``OFFER_MASK`` hides it.
OUR_FEATURES = feature_mask(
    VIRTIO_F_VERSION_1, VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT, VIRTIO_BALLOON_F_PAGE_POISON, VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC)
VIRTIO_F_RING_RESET = 40
OFFER_MASK = ~feature_mask(VIRTIO_F_RING_RESET)

ACK, DRV, FOK, DOK = (int(DeviceStatus.ACKNOWLEDGE), int(DeviceStatus.DRIVER),
                      int(DeviceStatus.FEATURES_OK), int(DeviceStatus.DRIVER_OK))
NEEDS_RESET = int(DeviceStatus.DEVICE_NEEDS_RESET)


# == peers ======================================================================================
class PciTransport:
    """``VirtioTransport`` over our ``VirtioPciFunction``, called in-process, register by
    register at BAR4's offsets; MSI-X vectors as QtestVirtioPci lays them out (config 0, every
    queue 1). ``fired`` collects the vectors signalled."""

    def __init__(self, pci: VirtioPciFunction, mem: GuestMemory) -> None:
        self.pci = pci
        self.mem = mem
        self.fired: set[int] = set()
        ctrl = struct.unpack_from("<H", pci.config, CAP_MSIX + vp.PCI_MSIX_FLAGS)[0]
        self._act(pci.config_write(CAP_MSIX + vp.PCI_MSIX_FLAGS, struct.pack(
            "<H", (ctrl | vp.PCI_MSIX_FLAGS_ENABLE) & ~vp.PCI_MSIX_FLAGS_MASKALL)))

    def _act(self, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, MsixFire):
                self.fired.add(a.vector)

    def _rd(self, off: int, size: int) -> int:
        data, acts = self.pci.bar_read(vp.MODERN_BAR, off, size)
        self._act(acts)
        return int.from_bytes(data, "little")

    def _wr(self, off: int, size: int, value: int) -> None:
        self._act(self.pci.bar_write(vp.MODERN_BAR, off, value.to_bytes(size, "little")))

    def common_read(self, off: int, size: int) -> int:
        return self._rd(vp.COMMON_CFG_OFFSET + off, size)

    def common_write(self, off: int, size: int, value: int) -> None:
        self._wr(vp.COMMON_CFG_OFFSET + off, size, value)

    def read_isr(self) -> int:
        return self._rd(vp.ISR_CFG_OFFSET, 1)

    def get_device_features(self) -> int:
        out = 0
        for half in (0, 1):
            self.common_write(vp.COMMON_DFSELECT, 4, half)
            out |= self.common_read(vp.COMMON_DF, 4) << (32 * half)
        return out

    def set_driver_features(self, features: int) -> None:
        for half in (0, 1):
            self.common_write(vp.COMMON_GFSELECT, 4, half)
            self.common_write(vp.COMMON_GF, 4, (features >> (32 * half)) & 0xFFFFFFFF)

    def get_status(self) -> int:
        return self.common_read(vp.COMMON_STATUS, 1)

    def set_status(self, status: int) -> None:
        self.common_write(vp.COMMON_STATUS, 1, status & 0xFF)
        if status & FOK and not status & DOK:
            self.common_write(vp.COMMON_MSIX, 2, 0)

    def read_config(self, offset: int, size: int) -> bytes:
        return b"".join(self._rd(vp.DEVICE_CFG_OFFSET + offset + i, 4).to_bytes(4, "little")
                        for i in range(0, size, 4))[:size]

    def write_config(self, offset: int, data: bytes) -> None:
        self._act(self.pci.bar_write(vp.MODERN_BAR, vp.DEVICE_CFG_OFFSET + offset, data))

    def config_generation(self) -> int:
        return self.common_read(vp.COMMON_CFGGENERATION, 1)

    def num_queues(self) -> int:
        return self.common_read(vp.COMMON_NUMQ, 2)

    def queue_max_size(self, q: int) -> int:
        self.common_write(vp.COMMON_Q_SELECT, 2, q)
        return self.common_read(vp.COMMON_Q_SIZE, 2)

    def setup_queue(self, q: int, size: int, desc: int, avail: int, used: int) -> None:
        self.common_write(vp.COMMON_Q_SELECT, 2, q)
        self.common_write(vp.COMMON_Q_SIZE, 2, size)
        self.common_write(vp.COMMON_Q_MSIX, 2, 1)
        for lo, addr in ((vp.COMMON_Q_DESCLO, desc), (vp.COMMON_Q_AVAILLO, avail),
                         (vp.COMMON_Q_USEDLO, used)):
            self.common_write(lo, 4, addr & 0xFFFFFFFF)
            self.common_write(lo + 4, 4, addr >> 32)

    def enable_queue(self, q: int) -> None:
        self.common_write(vp.COMMON_Q_SELECT, 2, q)
        self.common_write(vp.COMMON_Q_ENABLE, 2, 1)

    def queue_enabled(self, q: int) -> bool:
        self.common_write(vp.COMMON_Q_SELECT, 2, q)
        return bool(self.common_read(vp.COMMON_Q_ENABLE, 2))

    def notify(self, q: int) -> None:
        self._wr(vp.NOTIFY_CFG_OFFSET + q * vp.NOTIFY_OFF_MULTIPLIER, 2, q)

    def set_interrupt_handlers(self, on_queue: Callable[[int], None],
                               on_config: Callable[[], None]) -> None:
        pass  # the interpreter reads ``fired`` instead

    def reset(self) -> None:
        self.set_status(0)


class Peer:
    """What the interpreter needs of a device under test (see the module docstring)."""

    name = "?"
    t: Any
    mem: GuestMemory

    def begin(self) -> None: ...
    def take_fired(self) -> set[int]: ...
    def host_set_target(self, pages: int) -> None: ...
    def host_request_stats(self) -> None: ...
    def host_hint_start(self) -> None: ...
    def host_hint_done(self) -> None: ...

    def settle(self, rings: dict[BalloonQueue, RawRing], gen_before: int,
               stats_slack: int = 1) -> None:
        pass

    def malformed_chains(self) -> int | None:
        """Chains the device used as malformed so far (ours only)."""
        return None

    def close(self) -> None:
        pass


class OurPeer(Peer):
    name = "ours"
    _ram: bytearray | None = None

    def begin(self) -> None:
        # A fresh device on the same RAM (allocating 64 MiB costs 0.2 s); our device writes
        # only the used rings, inside the driver area, which is cleared.
        if self._ram is None:
            self._ram = bytearray(RAM_BYTES)
        self._ram[RING_BASE:SCRATCH_END] = bytes(SCRATCH_END - RING_BASE)
        self.mem = GuestMemory()
        self.mem.add_region(0, self._ram, "ram")
        self.dev = BalloonDevice(self.mem, DeviceConfig(offered_features=OUR_FEATURES,
                                                        ram_pages=RAM_BYTES // PAGE))
        self.pci = VirtioPciFunction(self.dev, msix_vectors=2)
        self.t = PciTransport(self.pci, self.mem)
        self._migrating = False

    def take_fired(self) -> set[int]:
        f, self.t.fired = self.t.fired, set()
        return f

    def malformed_chains(self) -> int | None:
        return self.dev.counters.get("malformed_chain", 0)

    def _host(self, call: Callable[[BalloonDevice], list[Any]]) -> None:
        self.t._act(self.pci.host(call))

    def host_set_target(self, pages: int) -> None:
        self._host(lambda d: d.set_target(pages))

    def host_request_stats(self) -> None:
        self._host(lambda d: d.request_stats())

    def host_hint_start(self) -> None:
        # What QEMU's migration start does to the device (QemuBalloon.hint_start).
        if self._migrating:
            self.host_hint_done()
        self._migrating = True
        for ev in (PrecopyEvent.SETUP, PrecopyEvent.BEFORE_BITMAP_SYNC,
                   PrecopyEvent.AFTER_BITMAP_SYNC):
            self._host(lambda d, ev=ev: d.precopy_notify(ev, True))

    def host_hint_done(self) -> None:
        if self._migrating:
            self._migrating = False
            self._host(lambda d: d.precopy_notify(PrecopyEvent.CLEANUP, True))


class QemuPeer(Peer):
    name = "qemu"

    def __init__(self, qemu: QemuBinary) -> None:
        self.qemu = qemu
        self.q: QemuBalloon | None = None
        self.restarts = 0

    def _start(self) -> None:
        if self.q is not None:
            self.q.close()
            self.restarts += 1
        # 8 MiB of ballast keeps a hint round's migration in its first pass for ~6 s, longer
        # than any sequence's round (QemuBalloon's docstring).
        self.q = QemuBalloon(self.qemu, ram_bytes=RAM_BYTES, device=QEMU_DEVICE,
                             ballast_bytes=8 << 20)
        self.t = self.q.transport
        self.mem = self.q.mem

    def begin(self) -> None:
        for attempt in range(2):
            if self.q is None or attempt:
                self._start()
            assert self.q is not None
            try:
                self._end_migration()
                self.t.reset()
                # QEMU keeps ``actual`` across a reset: clear what the last sequence left.
                self.t.set_status(ACK | DRV)
                self.t.set_driver_features(feature_mask(VIRTIO_F_VERSION_1))
                self.t.set_status(ACK | DRV | FOK)
                self.t.write_config(CFG_ACTUAL, bytes(4))
                self.t.reset()
                self.q.set_target(0)
                self.mem.fill(RING_BASE, SCRATCH_END - RING_BASE, 0)
                self.t.discard_interrupts()
                self.t.read_isr()
                return
            except Exception:  # noqa: BLE001 - a broken QEMU is replaced once
                if attempt:
                    raise

    def take_fired(self) -> set[int]:
        return set(self.t._drain())

    def host_set_target(self, pages: int) -> None:
        assert self.q is not None
        self.q.set_target(pages)

    def host_request_stats(self) -> None:
        assert self.q is not None
        self.q.request_stats()

    def _status(self) -> str:
        assert self.q is not None
        return self.q.migration_status()

    def _wait(self, cond: Callable[[], bool], timeout: float = 3.0) -> bool:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def _end_migration(self) -> None:
        assert self.q is not None
        if self._status() in ("setup", "active", "pre-switchover", "device"):
            try:
                self.q.machine.qmp("migrate_cancel")
            except Exception:  # noqa: BLE001 - it ended on its own meanwhile
                pass
            self._wait(lambda: self._status() in ("cancelled", "failed", "completed", "none"))
            # QEMU's CLEANUP notifier (DONE) runs in the migration's cleanup, around the
            # status change: give it a main-loop turn.
            self.t.get_status()

    def host_hint_start(self) -> None:
        # QemuBalloon.hint_start, without waiting for an id that a driver which did not
        # negotiate FREE_PAGE_HINT never gets: wait for the migration's set-up (its first
        # bitmap sync, which publishes the id) instead.
        assert self.q is not None
        q = self.q
        self._end_migration()
        if q._ballast_bytes and not q._ballast_filled:
            ballast = q.machine.reserved_view()[len(q.machine.reserved_view())
                                                - q._ballast_bytes:]
            np.frombuffer(ballast, dtype=np.uint8)[:] = 0xA5
            q._ballast_filled = True
        q.machine.qmp("migrate-set-parameters", **{"max-bandwidth": 4096,
                                                   "downtime-limit": 300})
        q.machine.qmp("migrate", uri=q._sink_uri())
        self._wait(lambda: self._status() not in ("setup", "none"))
        self.t.get_status()

    def host_hint_done(self) -> None:
        self._end_migration()

    def settle(self, rings: dict[BalloonQueue, RawRing], gen_before: int,
               stats_slack: int = 1) -> None:
        """Until every published buffer is used (stats: ``stats_slack`` may stay: the one held,
        and those of a driver that published more than one at a time), the device
        needs a reset, or nothing changed for QUIET_S; then a little longer for the
        interrupts that follow a used element or a config change (QEMU moves the generation,
        then signals, possibly from another thread)."""
        deadline = time.monotonic() + SETTLE_MAX_S
        before = {q: r.used_idx() for q, r in rings.items()}
        last: tuple[Any, ...] | None = None
        quiet_since = time.monotonic()
        while True:
            st = self.t.get_status()
            pend = {q: (r.avail_idx - r.used_idx()) & 0xFFFF for q, r in rings.items()}
            done = all(n == 0 or (q == BalloonQueue.STATS and n <= stats_slack)
                       for q, n in pend.items())
            snap = (st, tuple(sorted(pend.items())))
            now = time.monotonic()
            if done:
                # An interrupt follows its used element (the free page queue's from QEMU's
                # iothread, after it drops its lock): the driver asked for one on every used
                # element (used_event), so wait a little for it when something was used.
                moved = any(r.used_idx() != before[q] for q, r in rings.items())
                if moved:
                    self._wait(lambda: bool(self.t._mailbox[1:].any()), IRQ_WAIT_S)
                if st & DOK and self.t.config_generation() != gen_before:
                    self._wait(lambda: bool(self.t._mailbox[0]), IRQ_WAIT_S)
                self.t.get_status()
                return
            # QEMU uses every buffer it is given unless its device broke (NEEDS_RESET), so
            # short of that only the time bound ends the wait: the machine is shared, and
            # a quiet period would mistake a slow iothread for an unused buffer.
            if snap != last:
                last, quiet_since = snap, now
            elif (st & NEEDS_RESET and now - quiet_since >= QUIET_S) or now > deadline:
                return
            time.sleep(0.0005)

    def close(self) -> None:
        if self.q is not None:
            self.q.close()
            self.q = None


# == observations ===============================================================================
@dataclass
class Obs:
    status: int
    config: tuple[int, int, str, int]       # num_pages, actual, cmd id (canonical), poison_val
    generation_moved: bool
    isr: int
    vectors: frozenset[int]
    used: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: not compared: ours' count of chains it used as malformed during the step (None: QEMU)
    malformed: int | None = None

    def fields(self) -> dict[str, Any]:
        d = {"status": self.status, "num_pages": self.config[0], "actual": self.config[1],
             "cmd_id": self.config[2], "poison_val": self.config[3],
             "generation_moved": self.generation_moved, "isr": self.isr,
             "vectors": sorted(self.vectors)}
        for q, u in sorted(self.used.items()):
            d[f"used.{q}"] = u
        d.update(self.extra)
        return d


# == the interpreter =============================================================================
class Driver:
    """Applies actions to one peer and records an ``Obs`` after each (module docstring)."""

    def __init__(self, peer: Peer) -> None:
        self.p = peer
        self.t = peer.t
        self.mem = peer.mem
        self.rings: dict[BalloonQueue, RawRing] = {}
        self.index: dict[BalloonQueue, int] = {}
        self.seen: dict[BalloonQueue, int] = {}
        self.next_desc: dict[BalloonQueue, int] = {}
        self.features = 0
        self.scratch = SCRATCH
        self.ids: dict[int, str] = {}
        self.last_id = 0          # the last command id >= 2 read from config
        self.policy = "each"      # a_irq_policy
        self.actual_written = False  # since the last reset, with FEATURES_OK
        self.stats_overfilled = False  # more than one stats buffer was made available
        self.stats_extra = 0          # buffers beyond one per stats action, since set-up
        self.gen = self.t.config_generation()
        self.trace: list[Obs] = []
        self.malformed = peer.malformed_chains()

    # -- helpers -------------------------------------------------------------------------------
    def buf(self, data: bytes | int) -> int:
        n = data if isinstance(data, int) else len(data)
        if self.scratch + n > SCRATCH_END:
            self.scratch = SCRATCH  # wrap: earlier buffers were used long ago
        g = self.scratch
        self.scratch = (g + max(n, 1) + 63) & ~63
        if isinstance(data, int):
            self.mem.fill(g, n, 0)
        else:
            self.mem.write(g, data)
        return g

    def canon_id(self, v: int) -> str:
        if v in (0, 1):
            return ("STOP", "DONE")[v]
        if v not in self.ids:
            self.ids[v] = f"id{len(self.ids) + 1}"
        return self.ids[v]

    def read_cmd_id(self) -> int:
        return int.from_bytes(self.t.read_config(8, 4), "little")

    def observe(self, **extra: Any) -> Obs:
        self.p.settle(self.rings, self.gen, 1 + self.stats_extra)
        cfg = self.t.read_config(0, 16)
        num_pages, actual, cmd, poison = struct.unpack("<IIII", cfg)
        if cmd >= 2:
            self.last_id = cmd
        gen = self.t.config_generation()
        used: dict[str, list[tuple[int, int]]] = {}
        for q, r in self.rings.items():
            idx = r.used_idx()
            n = (idx - self.seen[q]) & 0xFFFF
            if n:
                used[q.name.lower()] = r.used_elems(self.seen[q], min(n, r.size + 1))
                self.seen[q] = idx
        o = Obs(status=self.t.get_status(),
                config=(num_pages, actual, self.canon_id(cmd), poison),
                generation_moved=gen != self.gen, isr=self.t.read_isr(),
                vectors=frozenset(self.p.take_fired()), used=used, extra=extra)
        m = self.p.malformed_chains()
        if m is not None and self.malformed is not None:
            o.malformed = m - self.malformed
        self.malformed = m
        self.gen = gen
        self.trace.append(o)
        return o

    def post(self, q: BalloonQueue, parts: list[tuple[int, int, int]], *,
             kick: bool = True) -> None:
        """A chain of (addr, len, flags) at the ring's next free descriptors, published."""
        r = self.rings.get(q)
        if r is None:
            return
        i = self.next_desc[q]
        h = r.chain(parts, start=i)
        self.next_desc[q] = (i + len(parts)) % r.size
        r.set_avail_flags(1 if self.policy == "flags" else 0)
        r.set_used_event(r.used_idx() + (100 if self.policy == "far" else 0))
        r.publish(h)
        if kick:
            self.t.notify(self.index[q])

    # -- actions (each: apply, then observe) ---------------------------------------------------
    def do(self, action: tuple[Any, ...]) -> Obs:
        extra = getattr(self, "a_" + action[0])(*action[1:])
        return self.observe(**(extra or {}))

    def a_reset(self) -> None:
        self.actual_written = False
        self.stats_overfilled = False
        self.stats_extra = 0
        self.t.reset()
        self.rings.clear()
        self.index.clear()
        self.features = 0

    def a_negotiate(self, accept: int) -> None:
        """Reset, ACKNOWLEDGE, DRIVER, the accepted features, FEATURES_OK."""
        self.a_reset()
        self.t.set_status(ACK)
        self.t.set_status(ACK | DRV)
        offered = self.t.get_device_features() & OFFER_MASK
        self.trace_offer = offered
        self.features = accept & offered
        self.t.set_driver_features(self.features)
        self.t.set_status(ACK | DRV | FOK)

    def a_setup_queues(self, shrink: int, skip: int = 0, odd: bool = False) -> dict[str, Any]:
        """Every queue the driver's layout (protocol.md 3.3, negotiated features) has, at the
        largest size >> shrink (minus one, not a power of two, with ``odd``), enabled, except
        the logical queues in bit mask ``skip``. Observes each queue's queue_enable."""
        self.index = queue_layout(self.features)
        base = RING_BASE
        for q, idx in sorted(self.index.items(), key=lambda kv: kv[1]):
            mx = self.t.queue_max_size(idx)
            if mx == 0 or skip >> int(q) & 1:
                continue
            size = max(mx >> shrink, 1)
            if odd and size > 2:
                size -= 1
            r = RawRing.layout(self.mem, base, size)
            self.mem.fill(r.desc, r.device + used_ring_size(size) - r.desc, 0)
            self.t.setup_queue(idx, size, r.desc, r.driver, r.device)
            self.t.enable_queue(idx)
            self.rings[q] = r
            self.seen[q] = 0
            self.next_desc[q] = 0
            base = (r.device + used_ring_size(size) + 4095) & ~4095
        return {"enabled": [self.t.queue_enabled(i) for i in sorted(self.index.values())]}

    def a_irq_policy(self, policy: str) -> None:
        """How the driver asks for used-buffer interrupts on the next posts: "each" (avail
        flags 0, used_event = the used idx: every used element), "flags" (NO_INTERRUPT set),
        "far" (used_event 100 ahead)."""
        self.policy = policy

    def a_poison(self, value: int) -> None:
        self.t.write_config(CFG_POISON_VAL, value.to_bytes(4, "little"))

    def a_driver_ok(self) -> None:
        self.t.set_status(ACK | DRV | FOK | DOK)

    def a_status(self, value: int) -> None:
        self.t.set_status(value)

    def a_write_actual(self, value: int) -> None:
        self.actual_written = bool(self.t.get_status() & FOK)  # else ignored by ours
        self.t.write_config(CFG_ACTUAL, value.to_bytes(4, "little"))

    def _pfns(self, q: BalloonQueue, pfns: list[int], split: int) -> None:
        data = struct.pack(f"<{len(pfns)}I", *pfns)
        if split and len(data) > 4 * split:
            parts = [(self.buf(data[:4 * split]), 4 * split, 0),
                     (self.buf(data[4 * split:]), len(data) - 4 * split, 0)]
        else:
            parts = [(self.buf(data), len(data), 0)]
        self.post(q, parts)

    def a_inflate(self, pfns: list[int], split: int) -> None:
        self._pfns(BalloonQueue.INFLATE, pfns, split)

    def a_deflate(self, pfns: list[int], split: int) -> None:
        self._pfns(BalloonQueue.DEFLATE, pfns, split)

    def a_stats(self, entries: list[tuple[int, int]], buffers: int = 1) -> None:
        """``buffers`` stats buffers of ``entries``, published and then kicked once (a
        driver keeps one; more than one breaks its rule, virtio 1.x 5.5.6.3)."""
        data = b"".join(struct.pack("<HQ", t, v) for t, v in entries)
        self.stats_overfilled |= buffers > 1
        self.stats_extra += buffers - 1
        for k in range(buffers):
            self.post(BalloonQueue.STATS, [(self.buf(data), len(data), 0)],
                      kick=k == buffers - 1)

    def a_host_target(self, pages: int) -> None:
        self.p.host_set_target(pages)

    def a_host_stats(self) -> None:
        self.p.host_request_stats()

    def a_host_hint_start(self) -> None:
        self.p.host_hint_start()

    def a_host_hint_done(self) -> None:
        self.p.host_hint_done()

    def a_cmd(self, which: str, size: int) -> None:
        """An out buffer on the free page queue: the current id (as last read), a stale one
        (the previous id), STOP, DONE or an id never published; ``size`` bytes (4 normal)."""
        cur = self.read_cmd_id()
        if cur >= 2:
            self.last_id = cur
        value = {"current": self.last_id, "stale": max(self.last_id - 1, 2),
                 "stop": 0, "done": 1, "bogus": 0x7FFFFFFF}[which]
        data = (value.to_bytes(4, "little") + b"\x5a" * 8)[:size]
        self.post(BalloonQueue.FREE_PAGE, [(self.buf(data), size, 0)])

    def a_hints(self, ranges: list[tuple[int, int]]) -> None:
        """One writable chain of hint ranges (pfn, pages)."""
        self.post(BalloonQueue.FREE_PAGE, [(p * PAGE, n * PAGE, WRITE) for p, n in ranges])

    def a_report(self, ranges: list[tuple[int, int]]) -> None:
        """One writable chain of free page reports (pfn, pages) on the reporting queue."""
        self.post(BalloonQueue.REPORTING, [(p * PAGE, n * PAGE, WRITE) for p, n in ranges])

    def a_race(self, which: str, host: str) -> None:
        """A command buffer and a host request with no look in between: QEMU's iothread
        takes the buffer while its migration code publishes DONE or a new id (STOP/DONE
        races); the order is QEMU's to pick, what the driver then sees must not differ."""
        self.a_cmd(which, 4)
        (self.p.host_hint_done if host == "done" else self.p.host_hint_start)()

    def a_malformed(self, q_name: str, kind: str) -> None:
        q = BalloonQueue[q_name]
        r = self.rings.get(q)
        if r is None:
            return
        i = self.next_desc[q]
        ok = self.buf(8)
        if kind == "head_oob":
            r.publish(r.size + 3)
        elif kind == "next_oob":
            r.set_desc(i, ok, 4, NEXT, r.size + 1)
            r.publish(i)
        elif kind == "loop":
            r.set_desc(i, ok, 4, NEXT, i)
            r.publish(i)
        elif kind == "addr_oob":
            r.set_desc(i, 1 << 40, 4, 0)
            r.publish(i)
        elif kind == "zero_len":
            r.set_desc(i, ok, 0, 0)
            r.publish(i)
        elif kind == "wrong_dir":
            # writable on inflate/deflate/stats, readable-only hint on free page: both legal
            # shapes for some queue, wrong here
            r.set_desc(i, ok, 8, WRITE)
            r.publish(i)
        elif kind == "indirect_bad":
            tbl = self.buf(32)
            n = write_table(self.mem, tbl, [(ok, 4, NEXT, 5), (ok, 4, 0, 0)])
            r.set_desc(i, tbl, n, INDIRECT)
            r.publish(i)
        elif kind == "ahead":
            # avail.idx more than N ahead of used (V-1)
            r.set_avail_idx(r.avail_idx + r.size + 1)
        else:
            raise ValueError(kind)
        self.next_desc[q] = (i + 1) % r.size
        self.t.notify(self.index[q])


# == comparison and the allow-list =============================================================
@dataclass(frozen=True)
class Allowed:
    """A documented QEMU deviation (or a QEMU choice where the spec leaves one):
    ``matches(action, ours, qemu, field, our_driver)`` says whether it explains the
    divergence of ``field``; ``stops`` whether the states differ from then on."""

    key: str
    spec: str   # the spec section (or protocol.md rule) at stake
    doc: str    # the section of docs/qemu-deviations.md that describes it
    matches: Callable[[tuple[Any, ...], Obs, Obs, str, Driver], bool]
    stops: bool


def _isr_msix(a: tuple[Any, ...], o: Obs, q: Obs, f: str, d: Driver) -> bool:
    # QEMU sets ISR 0x3 for a config change (virtio_notify_config: isr |= 3) and 0x1 for a
    # queue even with MSI-X on; ours sets the one bit each event names. With MSI-X enabled
    # virtio 1.x 4.1.4.5.2 leaves ISR unused, so both are allowed; the bits must still agree
    # on *which* events happened.
    return f == "isr" and (o.isr & 2) == (q.isr & 2) and bool(o.isr & 1) <= bool(q.isr & 1)


def _cmd_id_zero_in_start(a: tuple[Any, ...], o: Obs, q: Obs, f: str, d: Driver) -> bool:
    # D-10: QEMU reads 0 (STOP) during START while ours reads the id. And so when the driver
    # ends the round (any out buffer during START), ours' field goes from the id to STOP, a
    # change with a new config_generation; QEMU's read STOP already: no change.
    if f == "cmd_id":
        return q.config[2] == "STOP" and o.config[2].startswith("id")
    return (f == "generation_moved" and a[0] in ("cmd", "race") and o.generation_moved
            and not q.generation_moved and o.config == q.config)


KICKING = ("inflate", "deflate", "stats", "cmd", "hints", "malformed", "report", "race")


def _before_driver_ok(a: tuple[Any, ...], o: Obs, q: Obs, f: str, d: Driver) -> bool:
    # V-10/D-16: QEMU acts on buffers kicked before DRIVER_OK (uses them, signals, or finds
    # them broken); ours defers the kick to DRIVER_OK, and then uses them.
    # (A stats buffer QEMU took early shows only when the host asks for stats.)
    return (a[0] in KICKING and not o.status & DOK) or (
        a[0] in ("driver_ok", "host_stats") and f.startswith(("used.", "vectors", "isr")))


def _layout_refused(a: tuple[Any, ...], o: Obs, q: Obs, f: str, d: Driver) -> bool:
    # D-17: a feature set whose queue numbering (by negotiated features) differs from the
    # offered numbering: ours refuses FEATURES_OK, QEMU takes it.
    if a[0] != "negotiate" or f != "status":
        return False
    fe = d.features
    layout_differs = queue_layout(fe) != {k: v for k, v in queue_layout(
        OUR_FEATURES).items() if k in queue_layout(fe)}
    return layout_differs and bool(q.status & FOK) and not o.status & FOK


def _chain_error(a: tuple[Any, ...], o: Obs, q: Obs, f: str, d: Driver) -> bool:
    # A malformed chain (protocol.md 1.6 V-2..V-8: zero-length, loops, next/head beyond N,
    # bad indirect tables, buffers outside RAM) that ours used with len 0 and went on. QEMU
    # either sets NEEDS_RESET (virtio_error()) or, for a buffer outside RAM, maps it anyway
    # (a bounce buffer over unassigned memory) and treats it as data. The rules are on the
    # driver (virtio 1.x 2.7.5.2, 2.7.13.1); the device's reaction is not specified.
    return bool(o.malformed)


def _cmd_length(a: tuple[Any, ...], o: Obs, q: Obs, f: str, d: Driver) -> bool:
    # A command out buffer of other than 4 bytes (virtio 1.x 5.5.6.5.1 driver rule,
    # protocol.md 4.4 rule 2): QEMU sets NEEDS_RESET below 4 bytes ("received an incorrect
    # cmd id", element not used) and reads the first 4 bytes of a longer one; ours uses it
    # and changes nothing.
    return a[0] == "cmd" and a[2] != 4


def _target_same(a: tuple[Any, ...], o: Obs, q: Obs, f: str, d: Driver) -> bool:
    # A host target equal to the current num_pages: QEMU notifies a config change anyway
    # (virtio_balloon_to_target always calls virtio_notify_config); ours does not, since
    # nothing changed (virtio 1.x 4.1.4.3: generation moves on a change). Drivers tolerate
    # spurious config notifications.
    return (a[0] == "host_target" and f in ("generation_moved", "isr", "vectors")
            and not o.generation_moved and q.generation_moved and o.config[0] == q.config[0])


def _queue_size_pow2(a: tuple[Any, ...], o: Obs, q: Obs, f: str, d: Driver) -> bool:
    # virtio 1.x 2.7 (split virtqueues): the queue size is always a power of 2 (a driver
    # rule): ours refuses to enable such a queue, QEMU takes it.
    return a[0] == "setup_queues" and len(a) > 3 and a[3] and f == "enabled"


def _suppressed_irq(a: tuple[Any, ...], o: Obs, q: Obs, f: str, d: Driver) -> bool:
    # The driver suppressed used-buffer notifications (NO_INTERRUPT, or used_event far
    # ahead): virtio 1.x 2.7.7.2 says the device SHOULD NOT notify; QEMU sends the first one
    # after a queue's set-up anyway (its signalled_used_valid starts false), ours does not.
    return (f == "vectors" and d.policy in ("far", "flags") and q.vectors > o.vectors
            and a[0] in KICKING)


def _stats_one(a: tuple[Any, ...], o: Obs, q: Obs, f: str, d: Driver) -> bool:
    # The driver made more than one stats buffer available (virtio 1.x 5.5.6.3: at most one,
    # a driver rule): QEMU pops one per kick (returning the one it held), leaving the rest in
    # the ring; ours takes them all and returns all but the newest at once.
    return d.stats_overfilled and f in ("used.stats", "vectors", "isr")


def _gen_not_live(a: tuple[Any, ...], o: Obs, q: Obs, f: str, d: Driver) -> bool:
    # A config change before DRIVER_OK (a host target, a reset's zeroing): ours moves
    # config_generation for every change (virtio 1.x 4.1.4.3), QEMU's virtio_notify_config()
    # returns before DRIVER_OK, generation unchanged; no interrupt from either.
    return f == "generation_moved" and o.generation_moved and not o.status & DOK


def _config_write_early(a: tuple[Any, ...], o: Obs, q: Obs, f: str, d: Driver) -> bool:
    # virtio 1.x 3.1.1 step 4: the driver MUST NOT write device config before FEATURES_OK;
    # ours ignores such a write, QEMU stores it.
    return a[0] in ("write_actual", "poison") and not o.status & FOK


def _actual_reset(a: tuple[Any, ...], o: Obs, q: Obs, f: str, d: Driver) -> bool:
    # After a reset ours shows ``actual`` 0 (power-on state), QEMU the driver's last value
    # (virtio_balloon_device_reset clears only poison_val and the held stats element), until
    # the driver writes it again. The spec says nothing of device config after a reset.
    return f == "actual" and o.config[1] == 0 and not d.actual_written


def _status_order(a: tuple[Any, ...], o: Obs, q: Obs, f: str, d: Driver) -> bool:
    # virtio 1.x 2.1.1 / 3.1.1: the driver MUST NOT clear a status bit and sets them in
    # order; when it does not, ours sets NEEDS_RESET (2.1.2: SHOULD, on an error state),
    # QEMU stores the value written.
    return (a[0] in ("status", "driver_ok") and bool(o.status & NEEDS_RESET)
            and not q.status & NEEDS_RESET)


def _iothread_msi(a: tuple[Any, ...], o: Obs, q: Obs, f: str, d: Driver) -> bool:
    # QEMU serves the free page queue in its iothread; the MSI-X messages sent from there
    # (used buffers, and the config change of a virtio_error() there) never reached the
    # mailbox under qtest (QEMU 11.1; ISR is set). Linux gives that queue no callback
    # (VIRTIO_MSI_NO_VECTOR), so no driver waits for them. Ours signals them.
    touched = a[0] in ("cmd", "hints", "race") or (a[0] == "malformed" and a[1] == "FREE_PAGE")
    return touched and f == "vectors" and q.vectors < o.vectors


def _broken_quiet(a: tuple[Any, ...], o: Obs, q: Obs, f: str, d: Driver) -> bool:
    # After NEEDS_RESET QEMU's device is "broken" and sends no more notifications
    # (virtio_notify_vector returns); ours still signals config changes and used buffers the
    # host returns. The spec asks only for the notification of NEEDS_RESET itself (2.1.2).
    return (bool(o.status & NEEDS_RESET) and bool(q.status & NEEDS_RESET)
            and f in ("vectors", "isr") and (q.vectors <= o.vectors))


def _no_version_1(a: tuple[Any, ...], o: Obs, q: Obs, f: str, d: Driver) -> bool:
    # virtio 1.x 6.1: a device MAY fail to operate if VERSION_1 is not accepted: ours refuses
    # FEATURES_OK, QEMU takes it (its FEATURES_OK check runs only with VERSION_1).
    return (a[0] == "negotiate" and f == "status" and not d.features >> VIRTIO_F_VERSION_1 & 1
            and bool(q.status & FOK) and not o.status & FOK)


def _ahead(a: tuple[Any, ...], o: Obs, q: Obs, f: str, d: Driver) -> bool:
    # V-1: avail.idx more than N ahead: QEMU uses N+1 entries, ours needs a reset.
    return a[0] == "malformed" and a[2] == "ahead"


#: docs/qemu-deviations.md, whose section headings ``Allowed.doc`` names.
DEVIATIONS_DOC = "docs/qemu-deviations.md"

ALLOWED: tuple[Allowed, ...] = (
    Allowed('ISR-MSIX', 'virtio 1.x 4.1.4.5 (ISR unused with MSI-X)',
            'ISR with MSI-X', _isr_msix, stops=False),
    Allowed('D-10', 'virtio 1.x 5.5.6.7, 4.1.4.3',
            '`free_page_hint_cmd_id` reads 0 during a round (D-10)', _cmd_id_zero_in_start,
            stops=False),
    Allowed('V-10/D-16', 'virtio 1.x 2.1.2',
            'Buffers used before DRIVER_OK (V-10, D-16)', _before_driver_ok, stops=True),
    Allowed('D-17', 'virtio 1.x 5.5.2 (a queue exists with its feature)',
            'Queue numbering (D-17, protocol.md 3.3)', _layout_refused, stops=True),
    Allowed('V-1', 'virtio 1.x 2.7.13.3 (driver rule)',
            'avail.idx more than N ahead (V-1)', _ahead, stops=True),
    Allowed('QUEUE-SIZE-POW2', 'virtio 1.x 2.7 (split queue size is a power of 2: driver rule)',
            'Queue sizes that are not a power of 2', _queue_size_pow2, stops=True),
    Allowed('SUPPRESSED-IRQ', 'virtio 1.x 2.7.7.2 (SHOULD NOT notify when suppressed)',
            'Notifications the driver suppressed', _suppressed_irq, stops=False),
    Allowed('STATS-ONE', 'virtio 1.x 5.5.6.3 (one stats buffer at a time: driver rule)',
            'More than one stats buffer', _stats_one, stops=True),
    Allowed('CHAIN-ERROR', 'virtio 1.x 2.7.5.2, 2.7.13.1 (driver rules); protocol.md 1.6',
            'Malformed chains', _chain_error, stops=True),
    Allowed('STATUS-ORDER', 'virtio 1.x 2.1.1, 3.1.1 (driver rules), 2.1.2',
            'Status written out of order', _status_order, stops=True),
    Allowed('IOTHREAD-MSI', 'virtio 1.x 2.7.7.2 (used buffer notification)',
            'No MSI-X from the free page queue', _iothread_msi, stops=False),
    Allowed('BROKEN-QUIET', 'virtio 1.x 2.1.2 (NEEDS_RESET)',
            'A broken device is quiet', _broken_quiet, stops=False),
    Allowed('CMD-LENGTH', 'virtio 1.x 5.5.6.5.1 (driver rule); protocol.md 4.4 rule 2',
            'Command buffers of other than 4 bytes', _cmd_length, stops=True),
    Allowed('TARGET-SAME', 'virtio 1.x 4.1.4.3',
            'A target request always notifies', _target_same, stops=False),
    Allowed('GEN-NOT-LIVE', 'virtio 1.x 4.1.4.3',
            'config_generation before DRIVER_OK', _gen_not_live, stops=False),
    Allowed('CONFIG-WRITE-EARLY', 'virtio 1.x 3.1.1 step 4 (driver rule)',
            'Config written before FEATURES_OK', _config_write_early, stops=True),
    Allowed('ACTUAL-RESET', 'virtio 1.x 2.4 (reset)',
            'actual kept across a reset', _actual_reset, stops=False),
    Allowed('NO-VERSION-1', 'virtio 1.x 6.1 (device MAY fail without VERSION_1)',
            'FEATURES_OK without VERSION_1', _no_version_1, stops=True),
)


@dataclass
class Divergence:
    step: int
    action: tuple[Any, ...]
    field: str
    ours: Any
    qemu: Any
    allowed: str | None

    def __str__(self) -> str:
        tag = f"allowed {self.allowed}" if self.allowed else "NOT ALLOWED"
        return (f"step {self.step} {self.action!r}: {self.field}: ours {self.ours!r} "
                f"qemu {self.qemu!r} [{tag}]")


def compare(step: int, action: tuple[Any, ...], o: Obs, q: Obs,
            d: Driver) -> tuple[list[Divergence], bool]:
    """Divergences of one step and whether comparison must stop (an allowed deviation that
    changes state)."""
    out: list[Divergence] = []
    stop = False
    fo, fq = o.fields(), q.fields()
    for k in sorted(set(fo) | set(fq)):
        if fo.get(k) == fq.get(k):
            continue
        hit = next((a for a in ALLOWED if a.matches(action, o, q, k, d)), None)
        out.append(Divergence(step, action, k, fo.get(k), fq.get(k),
                              hit.key if hit else None))
        stop |= bool(hit and hit.stops)
    return out, stop


#: Actions after which both devices are back in a state they share (reset), so that a
#: comparison stopped by a state-changing allowed divergence resumes there.
RESYNC = ("reset", "negotiate")


def run_pair(ours: Peer, qemu: Peer, actions: list[tuple[Any, ...]],
             compared: list[int] | None = None) -> list[Divergence]:
    """Run ``actions`` on both peers and compare every step; after an allowed divergence that
    changes state, comparison pauses until the next device reset (``RESYNC``); an unexplained
    divergence ends the run. ``compared`` (if given) gets the number of steps compared."""
    ours.begin()
    qemu.begin()
    do, dq = Driver(ours), Driver(qemu)
    out: list[Divergence] = []
    n = 0
    paused = False
    try:
        for step, a in enumerate(actions):
            if paused and a[0] in RESYNC:
                # ids published while paused may differ: number them afresh from here
                do.ids.clear()
                dq.ids.clear()
            o, q = do.do(a), dq.do(a)
            if paused and a[0] not in RESYNC:
                continue
            paused = False
            n += 1
            divs, stop = compare(step, a, o, q, do)
            out += divs
            if any(x.allowed is None for x in divs):
                break
            paused = stop
    finally:
        qemu.host_hint_done()
        if compared is not None:
            compared.append(n)
    return out
