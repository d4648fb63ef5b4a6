"""A virtio-pci modern transport over qtest: our guest driver's ``VirtioTransport`` for a virtio
device inside a ``QtestMachine`` (QEMU's own virtio-balloon-pci, for instance).

Theory of operation
-------------------
``QtestVirtioPci(machine, function)`` does what a guest's virtio-pci core does at probe:
assigns the function's BARs (``vmsim.qtest.pci``), walks its capabilities for the four virtio
structures (COMMON, NOTIFY, ISR, DEVICE; the first capability of each type counts, virtio 1.x
4.1.4.1) and the MSI-X capability, and routes MSI-X. From then on every register access is one
qtest load or store at ``BAR address + capability offset + register`` (little-endian, naturally
sized), and a kick is a 16-bit store of the queue index at the queue's notify address
(``notify_off * notify_off_multiplier``). Multi-register steps (a queue's set-up, the feature
halves) are sent as one qtest pipeline, so they cost one round trip.

*Interrupts: MSI-X routed to guest memory, polled.* Each MSI-X table entry gets as its message
address a 4-byte mailbox in the machine's reserved RAM (``QtestMachine.reserved_gpa``: RAM no
guest model owns) and as data a non-zero word. When QEMU signals a vector it stores that word
into the mailbox, as a DMA write, like libqos's virtio-pci does on qtest. Reading the mailboxes
needs no qtest round trip: they are in the shared RAM file, so ``_drain()`` just looks at them,
clears the ones that are set and reports those vectors; the driver's handlers run after the
clear (``poll_interrupts()``), so an interrupt that arrives between the look and the clear is
not lost: its used-ring or config change is already visible to the handler, which re-reads
rings and config. ``wait_interrupt(timeout)`` polls the mailboxes (every 0.2 ms) until one is set.
Vectors: config changes on vector 0; queue ``q`` on vector ``1 + q`` when the table has a vector
per queue (start QEMU's device with ``vectors=N``), else every queue shares vector 1 (QEMU's
default of 2 vectors), as Linux lays them out. ``irq_counts[v]`` counts deliveries per vector.

The interrupt helpers (``poll_interrupts``, ``discard_interrupts``, ``set_interrupt_handlers``)
are ``vmsim.client_base.QemuRoleClient``'s, so test harnesses use this transport as they use
the vfio-user and vhost-user clients. Device faults (a missing capability, a vector not taken,
status not clearing on reset) raise ``VirtioPciError``.
"""
from __future__ import annotations

import struct
import time
from collections.abc import Callable

import numpy as np

from protocol import virtio_pci as vp
from protocol.errors import EnvironmentFailure
from vmsim.client_base import QemuRoleClient
from vmsim.qtest.machine import QtestMachine
from vmsim.qtest.pci import BarAllocator, PciFunction
from vmsim.virtio_pci_client import VirtioPciClient

#: The word QEMU writes into a mailbox when a vector fires (any non-zero value would do).
MSI_DATA = 0x1
_POLL_S = 0.0002


class VirtioPciError(EnvironmentFailure):
    """The device's virtio-pci interface is not usable (the message says what)."""


class QtestVirtioPci(VirtioPciClient, QemuRoleClient):
    """``guest_model.transport.VirtioTransport`` over qtest (module docstring)."""

    fault = VirtioPciError

    def __init__(self, machine: QtestMachine, function: PciFunction, *,
                 allocator: BarAllocator | None = None) -> None:
        super().__init__(machine.qtest_path, ram_bytes=machine.ram_bytes,
                         timeout=machine.timeout)
        self.m = machine
        self.qt = machine.qt
        self.mem = machine.mem  # the machine's shared RAM, not a memfd of our own
        self.fn = function
        self.bars = function.assign_bars(allocator or BarAllocator())
        self.caps: dict[int, tuple[int, int, int]] = {}  # cfg_type -> (address, length, pos)
        self.notify_off_multiplier = 0
        self.msix_pos: int | None = None
        self.msix_table_size = 0
        self._walk_capabilities()
        self._setup_msix()
        self._notify_off: dict[int, int] = {}
        #: Called (once) by ``close()``: whoever owns the machine may stop it then.
        self.on_close: Callable[[], None] | None = None

    # -- QemuRoleClient lifecycle (the machine owns the connection and the RAM) ---------------
    def connect(self) -> None:
        pass

    def close(self) -> None:
        hook, self.on_close = self.on_close, None
        if hook is not None:
            hook()

    # -- discovery ------------------------------------------------------------------------------
    def _walk_capabilities(self) -> None:
        for cap in self.fn.capabilities():
            if cap.cap_id == vp.PCI_CAP_ID_VNDR and len(cap.raw) >= vp.VIRTIO_PCI_CAP_LEN:
                _, _, cap_len, cfg_type, bar, _, _, off, length = struct.unpack_from(
                    "<BBBBBBHII", cap.raw)
                if cfg_type in self.caps or bar not in self.bars:
                    continue
                b = self.bars[bar]
                if off + length > b.size:
                    raise VirtioPciError(f"virtio capability type {cfg_type} points past "
                                         f"BAR{bar} ({off:#x}+{length:#x} > {b.size:#x})")
                self.caps[cfg_type] = (b.addr + off, length, cap.pos)
                if cfg_type == vp.VIRTIO_PCI_CAP_NOTIFY_CFG:
                    if cap_len < vp.VIRTIO_PCI_NOTIFY_CAP_LEN:
                        raise VirtioPciError(f"notify capability of {cap_len} bytes")
                    self.notify_off_multiplier = struct.unpack_from(
                        "<I", cap.raw, vp.VIRTIO_PCI_CAP_EXTRA)[0]
            elif cap.cap_id == vp.PCI_CAP_ID_MSIX and self.msix_pos is None:
                self.msix_pos = cap.pos
                ctrl, table = struct.unpack_from("<HI", cap.raw, vp.PCI_MSIX_FLAGS)
                self.msix_table_size = (ctrl & vp.PCI_MSIX_FLAGS_QSIZE) + 1
                bir, toff = table & 7, table & ~7
                if bir not in self.bars:
                    raise VirtioPciError(f"MSI-X table in BAR{bir}, which is not a memory BAR")
                self._msix_table = self.bars[bir].addr + toff
        for t in (vp.VIRTIO_PCI_CAP_COMMON_CFG, vp.VIRTIO_PCI_CAP_NOTIFY_CFG,
                  vp.VIRTIO_PCI_CAP_ISR_CFG, vp.VIRTIO_PCI_CAP_DEVICE_CFG):
            if t not in self.caps:
                raise VirtioPciError(f"{self.fn!r} has no virtio capability of type {t} "
                                     "(not a modern virtio-pci device?)")
        if self.msix_pos is None:
            raise VirtioPciError(f"{self.fn!r} has no MSI-X capability")

    def _setup_msix(self) -> None:
        n = self.msix_table_size
        if n * 4 > len(self.m.reserved_view()):
            raise VirtioPciError(f"{n} MSI-X vectors do not fit the reserved RAM")
        self._mailbox = np.frombuffer(self.m.reserved_view(), dtype="<u4", count=n)
        self._mailbox[:] = 0
        base = self.m.reserved_gpa
        cmds = []
        for v in range(n):
            e = self._msix_table + v * vp.PCI_MSIX_ENTRY_SIZE
            addr = base + 4 * v
            cmds += [f"writel {e:#x} {addr & 0xFFFFFFFF:#x}", f"writel {e + 4:#x} {addr >> 32:#x}",
                     f"writel {e + 8:#x} {MSI_DATA:#x}", f"writel {e + 12:#x} 0x0"]  # unmasked
        self.qt.pipeline(cmds)
        assert self.msix_pos is not None
        ctrl_at = self.msix_pos + vp.PCI_MSIX_FLAGS
        ctrl = self.fn.read(ctrl_at, 2)
        self.fn.write(ctrl_at, 2, (ctrl | vp.PCI_MSIX_FLAGS_ENABLE) & ~vp.PCI_MSIX_FLAGS_MASKALL)
        cmd = self.fn.read(vp.PCI_COMMAND, 2)
        self.fn.write(vp.PCI_COMMAND, 2, cmd | vp.PCI_COMMAND_INTX_DISABLE)
        self.irq_counts = [0] * n
        self.config_vector = 0

    def _queue_vector(self, q: int) -> int:
        n = self.msix_table_size
        if n > self.num_queues():
            return 1 + q  # a vector per queue
        return 1 if n >= 2 else 0

    # -- registers ------------------------------------------------------------------------------
    def _addr(self, cfg_type: int, off: int, size: int) -> int:
        base, length, _ = self.caps[cfg_type]
        if off < 0 or off + size > length:
            raise VirtioPciError(f"access [{off:#x}, +{size}) beyond the {length:#x}-byte "
                                 f"structure of type {cfg_type}")
        return base + off

    def common_read(self, off: int, size: int) -> int:
        return self.qt.load(self._addr(vp.VIRTIO_PCI_CAP_COMMON_CFG, off, size), size)

    def common_write(self, off: int, size: int, value: int) -> None:
        self.qt.store(self._addr(vp.VIRTIO_PCI_CAP_COMMON_CFG, off, size), size, value)

    def _common_cmds(self, writes: list[tuple[int, int, int]]) -> list[str]:
        verb = {1: "writeb", 2: "writew", 4: "writel"}
        return [f"{verb[s]} {self._addr(vp.VIRTIO_PCI_CAP_COMMON_CFG, o, s):#x} {v:#x}"
                for o, s, v in writes]

    def read_isr(self) -> int:
        """Read (and so clear) the ISR byte."""
        return self.qt.readb(self._addr(vp.VIRTIO_PCI_CAP_ISR_CFG, 0, 1))

    # -- interrupts -----------------------------------------------------------------------------
    def _drain(self) -> list[int]:
        set_ = np.nonzero(self._mailbox)[0]
        if not len(set_):
            return []
        self._mailbox[set_] = 0  # cleared before the handlers run (module docstring)
        fired = [int(v) for v in set_]
        for v in fired:
            self.irq_counts[v] += 1
        return fired

    def wait_interrupt(self, timeout: float) -> bool:
        """Poll until some vector's mailbox is set (not consumed), at most ``timeout`` s."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            if self._mailbox.any():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)

    # -- VirtioTransport ------------------------------------------------------------------------
    def set_driver_features(self, features: int) -> None:
        self.qt.pipeline(self._common_cmds([
            (vp.COMMON_GFSELECT, 4, 0), (vp.COMMON_GF, 4, features & 0xFFFFFFFF),
            (vp.COMMON_GFSELECT, 4, 1), (vp.COMMON_GF, 4, (features >> 32) & 0xFFFFFFFF)]))

    def _device_access(self, offset: int, size: int) -> list[tuple[int, int]]:
        """(address, width) of the naturally aligned accesses covering a config range."""
        base = self._addr(vp.VIRTIO_PCI_CAP_DEVICE_CFG, offset, size)
        out, off = [], 0
        while off < size:
            a = base + off
            w = next(w for w in (4, 2, 1) if a % w == 0 and off + w <= size)
            out.append((a, w))
            off += w
        return out

    def read_config(self, offset: int, size: int) -> bytes:
        return b"".join(self.qt.load(a, w).to_bytes(w, "little")
                        for a, w in self._device_access(offset, size))

    def write_config(self, offset: int, data: bytes) -> None:
        pos = 0
        for a, w in self._device_access(offset, len(data)):
            self.qt.store(a, w, int.from_bytes(data[pos:pos + w], "little"))
            pos += w

    def setup_queue(self, q: int, size: int, desc: int, avail: int, used: int) -> None:
        vec = self._queue_vector(q)
        writes = [(vp.COMMON_Q_SELECT, 2, q), (vp.COMMON_Q_SIZE, 2, size),
                  (vp.COMMON_Q_MSIX, 2, vec)]
        for lo, addr in ((vp.COMMON_Q_DESCLO, desc), (vp.COMMON_Q_AVAILLO, avail),
                         (vp.COMMON_Q_USEDLO, used)):
            writes += [(lo, 4, addr & 0xFFFFFFFF), (lo + 4, 4, addr >> 32)]
        cmds = self._common_cmds(writes)
        cmds += [f"readw {self._addr(vp.VIRTIO_PCI_CAP_COMMON_CFG, vp.COMMON_Q_MSIX, 2):#x}",
                 f"readw {self._addr(vp.VIRTIO_PCI_CAP_COMMON_CFG, vp.COMMON_Q_NOFF, 2):#x}"]
        r = self.qt.pipeline(cmds)
        if int(r[-2][0], 0) != vec:
            raise VirtioPciError(f"queue {q}: MSI-X vector {vec} not taken")
        self.queue_vectors[q] = vec
        self._notify_off[q] = int(r[-1][0], 0)

    def enable_queue(self, q: int) -> None:
        self.qt.pipeline(self._common_cmds([(vp.COMMON_Q_SELECT, 2, q),
                                            (vp.COMMON_Q_ENABLE, 2, 1)]))

    def notify(self, q: int) -> None:
        off = self._notify_off.get(q)
        if off is None:
            off = self.queue_notify_off(q)
        self.qt.writew(self._addr(vp.VIRTIO_PCI_CAP_NOTIFY_CFG,
                                  off * self.notify_off_multiplier, 2), q)

    def reset(self) -> None:
        """virtio reset: status 0 read back (``reset_status``), queues and interrupts forgotten."""
        self.reset_status()
        self.queue_vectors.clear()
        self._notify_off.clear()
        self.discard_interrupts()
