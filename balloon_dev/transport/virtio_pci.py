"""A virtio-pci modern function around the balloon device core, sans-I/O.

Theory of operation: ``VirtioPciFunction`` is what a PCI bus sees of the device: a 256-byte
configuration space and two memory BARs, laid out like QEMU's own virtio-pci (protocol.md 7.6):

* config space: type-0 header (vendor 0x1AF4, device 0x1045, class 0x00FF), a capability list
  at 0x40: MSI-X, then the virtio capabilities COMMON, NOTIFY, ISR, DEVICE and PCI_CFG;
* BAR1 (4 KiB): the MSI-X table at 0 and the PBA at 0x800;
* BAR4 (16 KiB, 64-bit prefetchable): common config @0x0000, ISR @0x1000, device config
  @0x2000, notify @0x3000 (queue q is kicked at 0x3000 + 4q).

Register accesses are mapped onto the device core API (``docs/interfaces.md``, "Device core"):
feature halves are assembled into 64-bit values, queue addresses are kept here until the driver
writes ``queue_enable`` and then handed to ``set_queue``/``enable_queue``, notify writes call
``notify(q)``, the device config window is ``read_config``/``write_config``.

Every call returns *actions*: ``MsixFire(vector)`` and ``IntxLevel(asserted)`` for the transport
below (vfio-user turns them into eventfd writes), and the core's host effects (``PagesHinted``,
``Inflated``, ...) unchanged, in order. The core's guest effects are consumed here: a
``NotifyQueue(q)`` sets ISR bit 0 and fires the queue's MSI-X vector (or raises INTx when MSI-X
is off); a ``ConfigChanged`` sets ISR bit 1 and fires the config vector (or INTx); the
configuration generation is the core's, which moves on every config change. ISR is
read-to-clear and clearing it drops INTx.

A notify write is exactly one ``notify(q)``: the core itself looks at the ring once more after
re-enabling notifications (``BalloonDevice._process``), so a buffer a concurrent guest publishes
mid-drain is not left without a kick, and the transport needs no second look.

Accesses the guest gets wrong (a notify for a missing queue, an MSI-X vector beyond the table, an
access outside every register) are logged at warning and counted; none raises.
"""
from __future__ import annotations

import logging
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from balloon_dev.effects import ConfigChanged, Effect, NotifyQueue
from balloon_dev.transport.core import DeviceCore
from protocol import virtio_pci as vp
from protocol.errors import UsageError
from protocol.virtio import VIRTIO_ID_BALLOON

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MsixFire:
    """Signal MSI-X vector ``vector``."""

    vector: int


@dataclass(frozen=True, slots=True)
class IntxLevel:
    """The INTx line changed level."""

    asserted: bool


#: What the function returns: the core's effects with the queue and config notifications
#: turned into ``MsixFire`` / ``IntxLevel``.
PciAction = Effect | MsixFire | IntxLevel


@dataclass(slots=True)
class _QueueRegs:
    size: int = 0
    msix_vector: int = vp.VIRTIO_MSI_NO_VECTOR
    desc: int = 0
    driver: int = 0
    device: int = 0


@dataclass(slots=True)
class VirtioPciState:
    """Transport-side registers (the core keeps features, status, queues' runtime state)."""

    device_feature_select: int = 0
    driver_feature_select: int = 0
    driver_features: int = 0
    config_msix_vector: int = vp.VIRTIO_MSI_NO_VECTOR
    queue_select: int = 0
    queues: list[_QueueRegs] = field(default_factory=list)
    isr: int = 0
    intx_asserted: bool = False


# Capability placement in config space.
CAP_MSIX = 0x40
CAP_COMMON = 0x50
CAP_NOTIFY = 0x60
CAP_ISR = 0x74
CAP_DEVICE = 0x84
CAP_PCI_CFG = 0x94
_BAR1_REG = vp.PCI_BASE_ADDRESS_0 + 4 * vp.MSIX_BAR
_BAR4_REG = vp.PCI_BASE_ADDRESS_0 + 4 * vp.MODERN_BAR
_BAR5_REG = _BAR4_REG + 4


class VirtioPciFunction:
    def __init__(self, dev: DeviceCore, *, msix_vectors: int = 2) -> None:
        if not 1 <= msix_vectors <= 64:
            raise UsageError(f"msix_vectors={msix_vectors}: must be 1..64")
        self.dev = dev
        self.msix_vectors = msix_vectors
        self.counters: Counter[str] = Counter()
        self.config = bytearray(vp.PCI_CONFIG_SPACE_SIZE)
        self._wmask = bytearray(vp.PCI_CONFIG_SPACE_SIZE)
        self.msix_table = bytearray(vp.PCI_MSIX_ENTRY_SIZE * msix_vectors)
        self.state = VirtioPciState()
        self._build_config()
        self._reset_transport()

    # -- layout ------------------------------------------------------------------------------
    def _build_config(self) -> None:
        c = self.config
        struct.pack_into("<HH", c, vp.PCI_VENDOR_ID, vp.VIRTIO_PCI_VENDOR_ID,
                         vp.VIRTIO_PCI_DEVICE_ID_BASE + VIRTIO_ID_BALLOON)
        struct.pack_into("<H", c, vp.PCI_STATUS, vp.PCI_STATUS_CAP_LIST)
        c[vp.PCI_REVISION_ID] = 1  # modern devices have revision >= 1
        c[vp.PCI_CLASS_PROG] = 0
        struct.pack_into("<H", c, vp.PCI_CLASS_DEVICE, vp.PCI_CLASS_OTHERS)
        struct.pack_into("<HH", c, vp.PCI_SUBSYSTEM_VENDOR_ID, vp.VIRTIO_PCI_VENDOR_ID,
                         vp.VIRTIO_PCI_SUBSYSTEM_ID)
        c[vp.PCI_CAPABILITY_LIST] = CAP_MSIX
        c[vp.PCI_INTERRUPT_PIN] = 1  # INTA#
        struct.pack_into("<I", c, _BAR1_REG, 0)
        struct.pack_into("<I", c, _BAR4_REG,
                         vp.PCI_BASE_ADDRESS_MEM_TYPE_64 | vp.PCI_BASE_ADDRESS_MEM_PREFETCH)
        # MSI-X: table size field is N-1; table and PBA in BAR1.
        struct.pack_into("<BBHII", c, CAP_MSIX, vp.PCI_CAP_ID_MSIX, CAP_COMMON,
                         self.msix_vectors - 1, vp.MSIX_TABLE_OFFSET | vp.MSIX_BAR,
                         vp.MSIX_PBA_OFFSET | vp.MSIX_BAR)
        caps = (
            (CAP_COMMON, CAP_NOTIFY, vp.VIRTIO_PCI_CAP_LEN, vp.VIRTIO_PCI_CAP_COMMON_CFG,
             vp.COMMON_CFG_OFFSET, vp.COMMON_CFG_SIZE),
            (CAP_NOTIFY, CAP_ISR, vp.VIRTIO_PCI_NOTIFY_CAP_LEN, vp.VIRTIO_PCI_CAP_NOTIFY_CFG,
             vp.NOTIFY_CFG_OFFSET, vp.REGION_PAGE),
            (CAP_ISR, CAP_DEVICE, vp.VIRTIO_PCI_CAP_LEN, vp.VIRTIO_PCI_CAP_ISR_CFG,
             vp.ISR_CFG_OFFSET, vp.REGION_PAGE),
            (CAP_DEVICE, CAP_PCI_CFG, vp.VIRTIO_PCI_CAP_LEN, vp.VIRTIO_PCI_CAP_DEVICE_CFG,
             vp.DEVICE_CFG_OFFSET, vp.REGION_PAGE),
            (CAP_PCI_CFG, 0, vp.VIRTIO_PCI_CFG_CAP_LEN, vp.VIRTIO_PCI_CAP_PCI_CFG, 0, 0),
        )
        for pos, nxt, length, cfg_type, offset, size in caps:
            bar = 0 if cfg_type == vp.VIRTIO_PCI_CAP_PCI_CFG else vp.MODERN_BAR
            struct.pack_into("<BBBBBBHII", c, pos, vp.PCI_CAP_ID_VNDR, nxt, length, cfg_type,
                             bar, 0, 0, offset, size)
        struct.pack_into("<I", c, CAP_NOTIFY + vp.VIRTIO_PCI_CAP_EXTRA, vp.NOTIFY_OFF_MULTIPLIER)
        # Writable bits; everything else is read-only (BARs handled in _config_write).
        w = self._wmask
        struct.pack_into("<H", w, vp.PCI_COMMAND,
                         vp.PCI_COMMAND_IO | vp.PCI_COMMAND_MEMORY | vp.PCI_COMMAND_MASTER
                         | vp.PCI_COMMAND_INTX_DISABLE)
        w[vp.PCI_INTERRUPT_LINE] = 0xFF
        struct.pack_into("<H", w, CAP_MSIX + vp.PCI_MSIX_FLAGS,
                         vp.PCI_MSIX_FLAGS_ENABLE | vp.PCI_MSIX_FLAGS_MASKALL)
        w[CAP_PCI_CFG + vp.VIRTIO_PCI_CAP_BAR] = 0xFF
        for i in range(4):
            w[CAP_PCI_CFG + vp.VIRTIO_PCI_CAP_OFFSET + i] = 0xFF
            w[CAP_PCI_CFG + vp.VIRTIO_PCI_CAP_LENGTH + i] = 0xFF

    @staticmethod
    def bar_size(bar: int) -> int:
        return {vp.MSIX_BAR: vp.MSIX_BAR_SIZE, vp.MODERN_BAR: vp.MODERN_BAR_SIZE}.get(bar, 0)

    def _reset_transport(self) -> None:
        s = self.state
        s.device_feature_select = s.driver_feature_select = s.driver_features = 0
        s.config_msix_vector = vp.VIRTIO_MSI_NO_VECTOR
        s.queue_select = 0
        s.queues = [_QueueRegs(size=self.dev.queue_max_size(q))
                    for q in range(self.dev.num_queues)]
        s.isr = 0

    # -- interrupts --------------------------------------------------------------------------
    @property
    def msix_enabled(self) -> bool:
        ctrl = struct.unpack_from("<H", self.config, CAP_MSIX + vp.PCI_MSIX_FLAGS)[0]
        return bool(ctrl & vp.PCI_MSIX_FLAGS_ENABLE)

    def _intx_should_assert(self) -> bool:
        cmd = struct.unpack_from("<H", self.config, vp.PCI_COMMAND)[0]
        return (self.state.isr != 0 and not self.msix_enabled
                and not cmd & vp.PCI_COMMAND_INTX_DISABLE)

    def _update_intx(self, out: list[PciAction]) -> None:
        level = self._intx_should_assert()
        # PCI status bit 3 mirrors the function's interrupt state.
        st = struct.unpack_from("<H", self.config, vp.PCI_STATUS)[0]
        st = (st | vp.PCI_STATUS_INTERRUPT) if self.state.isr else (st & ~vp.PCI_STATUS_INTERRUPT)
        struct.pack_into("<H", self.config, vp.PCI_STATUS, st)
        if level != self.state.intx_asserted:
            self.state.intx_asserted = level
            out.append(IntxLevel(level))

    def _fire(self, vector: int, what: str, out: list[PciAction]) -> None:
        if vector == vp.VIRTIO_MSI_NO_VECTOR:
            # virtio 1.x 4.1.4.3: no vector mapped means no interrupt for this event.
            self.counters[f"irq_suppressed_no_vector_{what}"] += 1
            return
        out.append(MsixFire(vector))

    def translate(self, effects: list[Effect]) -> list[PciAction]:
        """Turn the core's effects into actions: guest effects become interrupts."""
        out: list[PciAction] = []
        for e in effects:
            if isinstance(e, NotifyQueue):
                self.state.isr |= vp.VIRTIO_PCI_ISR_QUEUE
                if self.msix_enabled:
                    q = e.queue
                    vec = (self.state.queues[q].msix_vector if 0 <= q < len(self.state.queues)
                           else vp.VIRTIO_MSI_NO_VECTOR)
                    self._fire(vec, "queue", out)
                self.counters["queue_interrupts"] += 1
            elif isinstance(e, ConfigChanged):
                # The core already moved config_generation (it does so for every change).
                self.state.isr |= vp.VIRTIO_PCI_ISR_CONFIG
                if self.msix_enabled:
                    self._fire(self.state.config_msix_vector, "config", out)
                self.counters["config_interrupts"] += 1
            else:
                out.append(e)
        self._update_intx(out)
        return out

    def host(self, call: Callable[[DeviceCore], list[Effect]]) -> list[PciAction]:
        """Run a host-facing core call (``lambda dev: dev.free_page_start()``) and translate."""
        return self.translate(call(self.dev))

    def reset(self) -> list[PciAction]:
        """Function-level reset (vfio DEVICE_RESET, a new client): device and registers."""
        effects = self.dev.reset()
        self._reset_transport()
        struct.pack_into("<H", self.config, CAP_MSIX + vp.PCI_MSIX_FLAGS, self.msix_vectors - 1)
        struct.pack_into("<H", self.config, vp.PCI_COMMAND, 0)
        self.msix_table[:] = bytes(len(self.msix_table))
        return self.translate(effects)

    # -- config space ------------------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> tuple[bytes, list[PciAction]]:
        if offset < 0 or size < 0 or offset + size > len(self.config):
            self.counters["bad_config_access"] += 1
            log.warning("config read [%#x, +%#x) outside config space", offset, size)
            return bytes(size), []
        out: list[PciAction] = []
        data = bytearray(self.config[offset:offset + size])
        # PCI_CFG window: reading pci_cfg_data reads the BAR location the driver selected.
        lo = CAP_PCI_CFG + vp.VIRTIO_PCI_CAP_EXTRA
        if offset < lo + 4 and offset + size > lo:
            win, acts = self._pci_cfg_access(None)
            out += acts
            for i in range(size):
                j = offset + i - lo
                if 0 <= j < 4:
                    data[i] = win[j]
        return bytes(data), out

    def config_write(self, offset: int, data: bytes) -> list[PciAction]:
        n = len(data)
        if offset < 0 or offset + n > len(self.config):
            self.counters["bad_config_access"] += 1
            log.warning("config write [%#x, +%#x) outside config space", offset, n)
            return []
        out: list[PciAction] = []
        for i, b in enumerate(data):
            a = offset + i
            m = self._wmask[a]
            self.config[a] = (self.config[a] & ~m) | (b & m)
        self._config_write_bars(offset, data)
        lo = CAP_PCI_CFG + vp.VIRTIO_PCI_CAP_EXTRA
        if offset < lo + 4 and offset + n > lo:
            payload = bytes(data[max(0, lo - offset):lo + 4 - offset])
            _, acts = self._pci_cfg_access(payload)
            out += acts
        self._update_intx(out)
        return out

    def _config_write_bars(self, offset: int, data: bytes) -> None:
        # BARs: the written address with the size bits forced to zero, type bits kept, so that
        # the usual "write all ones, read back the size" probe works.
        end = offset + len(data)
        for reg, size, typ, hi in (
            (_BAR1_REG, vp.MSIX_BAR_SIZE, 0, False),
            (_BAR4_REG, vp.MODERN_BAR_SIZE,
             vp.PCI_BASE_ADDRESS_MEM_TYPE_64 | vp.PCI_BASE_ADDRESS_MEM_PREFETCH, False),
            (_BAR5_REG, 0, 0, True),
        ):
            if offset < reg + 4 and end > reg:
                cur = bytearray(self.config[reg:reg + 4])
                for i, b in enumerate(data):
                    a = offset + i
                    if reg <= a < reg + 4:
                        cur[a - reg] = b
                val = struct.unpack("<I", cur)[0]
                val = val if hi else (val & ~(size - 1) & 0xFFFFFFF0) | typ
                struct.pack_into("<I", self.config, reg, val)

    def _pci_cfg_access(self, write: bytes | None) -> tuple[bytes, list[PciAction]]:
        """virtio 1.x 4.1.4.9: forward the pci_cfg_data access to the selected BAR location."""
        c = self.config
        bar = c[CAP_PCI_CFG + vp.VIRTIO_PCI_CAP_BAR]
        off = struct.unpack_from("<I", c, CAP_PCI_CFG + vp.VIRTIO_PCI_CAP_OFFSET)[0]
        length = struct.unpack_from("<I", c, CAP_PCI_CFG + vp.VIRTIO_PCI_CAP_LENGTH)[0]
        if length not in (1, 2, 4) or off % length:
            # The spec leaves other lengths undefined; the access does nothing. Only a write
            # counts as a guest error: a VMM reading the whole config space reads the window too.
            if write is not None:
                self.counters["bad_pci_cfg_access"] += 1
            return bytes(4), []
        if write is None:
            data, acts = self.bar_read(bar, off, length)
            return data.ljust(4, b"\0"), acts
        return bytes(4), self.bar_write(bar, off, write[:length].ljust(length, b"\0"))

    # -- BARs --------------------------------------------------------------------------------
    def bar_read(self, bar: int, offset: int, size: int) -> tuple[bytes, list[PciAction]]:
        if size <= 0 or size > 8 or offset < 0 or offset + size > self.bar_size(bar):
            self.counters["bad_bar_access"] += 1
            log.warning("read of BAR%d [%#x, +%d) outside the BAR", bar, offset, size)
            return bytes(max(size, 0)), []
        if bar == vp.MSIX_BAR:
            return self._msix_read(offset, size), []
        page, off = offset & ~(vp.REGION_PAGE - 1), offset & (vp.REGION_PAGE - 1)
        if page == vp.COMMON_CFG_OFFSET:
            if off + size > vp.COMMON_CFG_SIZE:
                return self._unmapped(bar, offset, size), []
            return bytes(self._common_image()[off:off + size]), []
        if page == vp.ISR_CFG_OFFSET:
            if off != 0:
                return self._unmapped(bar, offset, size), []
            # Read-to-clear; clearing deasserts INTx (virtio 1.x 4.1.4.5).
            val = self.state.isr
            self.state.isr = 0
            out: list[PciAction] = []
            self._update_intx(out)
            return bytes([val]) + bytes(size - 1), out
        if page == vp.DEVICE_CFG_OFFSET:
            cs = self.dev.config_size
            if off + size > cs:
                return self._unmapped(bar, offset, size), []
            return bytes(self.dev.read_config(off, size)), []
        # Notify region is write-only.
        return bytes(size), []

    def bar_write(self, bar: int, offset: int, data: bytes) -> list[PciAction]:
        size = len(data)
        if size <= 0 or size > 8 or offset < 0 or offset + size > self.bar_size(bar):
            self.counters["bad_bar_access"] += 1
            log.warning("write of BAR%d [%#x, +%d) outside the BAR", bar, offset, size)
            return []
        if bar == vp.MSIX_BAR:
            self._msix_write(offset, data)
            return []
        page, off = offset & ~(vp.REGION_PAGE - 1), offset & (vp.REGION_PAGE - 1)
        if page == vp.COMMON_CFG_OFFSET:
            if off + size > vp.COMMON_CFG_SIZE:
                self._unmapped(bar, offset, size)
                return []
            return self._common_write(off, data)
        if page == vp.DEVICE_CFG_OFFSET:
            if off + size > self.dev.config_size:
                self._unmapped(bar, offset, size)
                return []
            return self.translate(self.dev.write_config(off, bytes(data)))
        if page == vp.NOTIFY_CFG_OFFSET:
            q, rem = divmod(off, vp.NOTIFY_OFF_MULTIPLIER)
            if rem or q >= self.dev.num_queues:
                self.counters["bad_notify"] += 1
                log.warning("notify write at %#x names no queue (%d queues)", off,
                            self.dev.num_queues)
                return []
            self.counters["notifies"] += 1
            return self.translate(self.dev.notify(q))
        if page == vp.ISR_CFG_OFFSET:
            self.counters["isr_write_ignored"] += 1
            return []
        self._unmapped(bar, offset, size)
        return []

    def _unmapped(self, bar: int, offset: int, size: int) -> bytes:
        self.counters["unmapped_bar_access"] += 1
        log.warning("access to BAR%d [%#x, +%d) hits no register", bar, offset, size)
        return bytes(size)

    def _msix_read(self, offset: int, size: int) -> bytes:
        tbl = len(self.msix_table)
        if offset + size <= tbl:
            return bytes(self.msix_table[offset:offset + size])
        # PBA: QEMU keeps pending state in its own emulated table; nothing pends here.
        return bytes(size)

    def _msix_write(self, offset: int, data: bytes) -> None:
        if offset + len(data) <= len(self.msix_table):
            self.msix_table[offset:offset + len(data)] = data
        else:
            self.counters["msix_pba_write_ignored"] += 1

    # -- common configuration ----------------------------------------------------------------
    def _selected(self) -> _QueueRegs | None:
        q = self.state.queue_select
        return self.state.queues[q] if 0 <= q < len(self.state.queues) else None

    def _common_image(self) -> bytearray:
        s, d = self.state, self.dev
        img = bytearray(vp.COMMON_CFG_SIZE)
        feat = d.device_features >> (32 * s.device_feature_select) \
            if s.device_feature_select < 2 else 0
        drv = s.driver_features >> (32 * s.driver_feature_select) \
            if s.driver_feature_select < 2 else 0
        struct.pack_into("<IIII", img, 0, s.device_feature_select, feat & 0xFFFFFFFF,
                         s.driver_feature_select, drv & 0xFFFFFFFF)
        gen = d.config_generation & 0xFF
        struct.pack_into("<HHBBH", img, vp.COMMON_MSIX, s.config_msix_vector, d.num_queues,
                         d.status & 0xFF, gen, s.queue_select)
        q = self._selected()
        if q is not None:
            qi = s.queue_select
            struct.pack_into("<HHHHQQQ", img, vp.COMMON_Q_SIZE, q.size, q.msix_vector,
                             1 if d.queue_enabled(qi) else 0, qi, q.desc, q.driver, q.device)
        return img

    def _common_write(self, off: int, data: bytes) -> list[PciAction]:
        img = self._common_image()
        new = bytearray(img)
        new[off:off + len(data)] = data
        out: list[PciAction] = []
        end = off + len(data)
        for foff, fsize, name in vp.COMMON_FIELDS:
            if foff < end and foff + fsize > off:
                value = int.from_bytes(new[foff:foff + fsize], "little")
                out += self._common_field_write(name, value)
        return out

    def _valid_vector(self, v: int) -> int:
        if v == vp.VIRTIO_MSI_NO_VECTOR or v < self.msix_vectors:
            return v
        # A vector the table does not have reads back as NO_VECTOR (protocol.md 7.6).
        self.counters["msix_vector_rejected"] += 1
        log.warning("MSI-X vector %d rejected (table has %d)", v, self.msix_vectors)
        return vp.VIRTIO_MSI_NO_VECTOR

    def _common_field_write(self, name: str, value: int) -> list[PciAction]:
        s, d = self.state, self.dev
        q = self._selected()
        if name == "device_feature_select":
            s.device_feature_select = value
        elif name == "driver_feature_select":
            s.driver_feature_select = value
        elif name == "driver_feature":
            if s.driver_feature_select < 2:
                shift = 32 * s.driver_feature_select
                s.driver_features = (s.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
                d.write_driver_features(s.driver_features)
            else:
                self.counters["driver_feature_select_out_of_range"] += 1
        elif name == "config_msix_vector":
            s.config_msix_vector = self._valid_vector(value)
        elif name == "device_status":
            effects = d.write_status(value)
            if value == 0:
                self._reset_transport()
            return self.translate(effects)
        elif name == "queue_select":
            s.queue_select = value
        elif q is None:
            if name not in ("device_feature", "num_queues", "config_generation",
                            "queue_notify_off"):
                self.counters["queue_select_out_of_range"] += 1
        elif name == "queue_msix_vector":
            q.msix_vector = self._valid_vector(value)
        elif name == "queue_enable":
            return self._enable(value)
        elif name in ("queue_size", "queue_desc_lo", "queue_desc_hi", "queue_driver_lo",
                      "queue_driver_hi", "queue_device_lo", "queue_device_hi"):
            if d.queue_enabled(s.queue_select):
                # virtio 1.x 4.1.4.3.2: the driver must not change an enabled queue's setup.
                self.counters["enabled_queue_write_ignored"] += 1
                return []
            if name == "queue_size":
                q.size = value
            else:
                attr, half = name[len("queue_"):].rsplit("_", 1)
                cur = getattr(q, attr)
                cur = (cur & ~0xFFFFFFFF) | value if half == "lo" else \
                    (cur & 0xFFFFFFFF) | (value << 32)
                setattr(q, attr, cur)
        # device_feature, num_queues, config_generation, queue_notify_off are read-only;
        # queue_reset / admin queues / notif data do not exist without their features.
        return []

    def _enable(self, value: int) -> list[PciAction]:
        s, d = self.state, self.dev
        qi = s.queue_select
        q = s.queues[qi]
        if value != 1:
            # virtio 1.x 4.1.4.3.2: writing 0 to queue_enable is not allowed (RING_RESET only).
            self.counters["queue_disable_ignored"] += 1
            return []
        if d.queue_enabled(qi):
            return []
        try:
            d.set_queue(qi, q.size, q.desc, q.driver, q.device)
        except (ValueError, KeyError, IndexError) as e:
            self.counters["queue_setup_rejected"] += 1
            log.warning("queue %d setup rejected (size %d desc %#x driver %#x device %#x): %s",
                        qi, q.size, q.desc, q.driver, q.device, e)
            return []
        return self.translate(d.enable_queue(qi))
