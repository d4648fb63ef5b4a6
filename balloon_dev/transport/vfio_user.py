"""The vfio-user server session, sans-I/O: its dispatch table (protocol.md section 7).

Theory of operation: a ``VfioUserSession`` serves one client connection. Its server
(``vfio_user_server``, on ``connection.DeviceServer``) reads one framed
``protocol.vfio_user.Message`` and calls ``handle(msg)``, which returns one ``core.Outcome``: the
reply (none for NO_REPLY commands; an error reply is the bare header with ERROR set and an errno,
protocol.md 7.1), the eventfds to signal (an MSI-X vector or INTx fired) and the device core's host
effects. The session owns every fd of a message from then on: DMA fds only until they are mapped
(``guest_ram.GuestRamMapper``, which also explains why each one is sealed first), IRQ eventfds until
they are replaced or their index is disabled; the fds of a refused message are closed at once.

The device is a ``VirtioPciFunction`` (config space region 7, BAR1 and BAR4); its MSI-X and INTx
actions are mapped to the eventfds the client installed with SET_IRQS. INTx is level-triggered
and automasked: a raised line signals the trigger eventfd once and masks; the client's UNMASK
(after the guest's EOI) re-signals if the line is still high.

A malformed or unacceptable message is a ``protocol.errors.PeerFault`` (``refused(errno, why)``):
logged at warning, counted (``peer_errors`` and ``peer_error_<ERRNO>``), answered with an error
reply; the session goes on. Only framing errors (raised by the server's header decode) end a
connection.
"""
from __future__ import annotations

import errno
import logging
import mmap
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from balloon_dev.effects import Effect
from balloon_dev.transport.core import Outcome, PeerError, Signal, count_peer_fault
from balloon_dev.transport.fdstream import close_all, close_quietly
from balloon_dev.transport.guest_ram import GuestRamMapper, RamMapping
from balloon_dev.transport.virtio_pci import IntxLevel, MsixFire, PciAction, VirtioPciFunction
from guestmem import GuestMemory
from protocol import vfio_user as vu
from protocol.errors import PeerFault

log = logging.getLogger(__name__)

#: Capabilities we answer VERSION with. max_msg_fds is what *we* accept per message (the server
#: sizes its ancillary buffer for it); QEMU refuses more than 16 and more than 65535 maps.
SERVER_MAX_MSG_FDS = 16
SERVER_MAX_DMA_MAPS = 4096


@dataclass(slots=True)
class DmaMapping:
    addr: int
    size: int
    flags: int
    ram: RamMapping | None  # None: the client gave no fd (accessible only by DMA_READ/WRITE)


@dataclass(slots=True)
class IrqIndexState:
    count: int
    fds: list[int | None] = field(default_factory=list)
    enabled: bool = False
    masked: bool = False  # INTx only


#: What a command handler returns: the reply payload and the interrupts and effects it caused.
Result = tuple[bytes, list[Effect | Signal]]


def refused(err: int, why: str) -> PeerError:
    """The session refuses a message: error reply with ``err``, counted per errno."""
    name = errno.errorcode.get(err, str(err))
    return PeerError(f"peer_error_{name}", f"{name}: {why}", errno=err)


class VfioUserSession:
    def __init__(self, pci: VirtioPciFunction, mem: GuestMemory, *,
                 max_data_xfer: int = vu.DEFAULT_MAX_DATA_XFER) -> None:
        self.pci = pci
        self.mem = mem
        self.max_data_xfer = max_data_xfer
        self.counters: Counter[str] = Counter()
        self.version_done = False
        self.client_caps: dict[str, Any] = {}
        self.dma: dict[int, DmaMapping] = {}
        self.ram = GuestRamMapper(mem, self.counters)
        self.irqs = [
            IrqIndexState(count=n) for n in (1, 0, pci.msix_vectors, 0, 0)
        ]
        for st in self.irqs:
            st.fds = [None] * st.count
        self.intx_level = False
        self.closed = False

    # -- regions -----------------------------------------------------------------------------
    def region_size(self, index: int) -> int:
        if index == vu.VFIO_PCI_CONFIG_REGION_INDEX:
            return len(self.pci.config)
        if 0 <= index <= vu.VFIO_PCI_BAR5_REGION_INDEX:
            return self.pci.bar_size(index)
        return 0

    # -- entry points ------------------------------------------------------------------------
    def handle(self, msg: vu.Message) -> Outcome:
        """Serve one message. Takes ownership of its fds."""
        header = msg.header
        self.counters["messages"] += 1
        fds = list(msg.fds)
        try:
            if header.is_reply:
                # We never send commands, so no reply is expected: a peer error, not answered.
                raise PeerError("unexpected_replies", "a reply where a command was expected")
            req = vu.decode_request(header, msg.payload)
            handler = self._handlers[type(req)]
            payload_out, actions = handler(self, header, req, fds)
        except PeerFault as e:
            close_all(fds)  # architecture: fds of a rejected message are closed
            return self._refused(msg, e)
        except Exception:  # noqa: BLE001 - a bug of ours must not take the VM's device down
            close_all(fds)
            self.counters["internal_errors"] += 1
            log.exception("internal error serving vfio-user msg_id %#x command %d",
                          header.msg_id, header.command)
            return self._error_reply(header, errno.EIO)
        outcome = self._outcome(actions)
        if header.no_reply:
            return outcome
        return Outcome(vu.encode_reply(header, payload_out), outcome.signals, outcome.effects)

    def refuse(self, msg: vu.Message, fault: PeerFault) -> Outcome:
        """Refuse ``msg`` unread (the server found it unacceptable): close its fds, answer."""
        self.counters["messages"] += 1
        close_all(msg.fds)
        return self._refused(msg, fault)

    def _refused(self, msg: vu.Message, e: PeerFault) -> Outcome:
        h = msg.header
        if not e.counter.startswith("peer_error_"):  # also counted by the errno it answers
            self.counters[f"peer_error_{errno.errorcode.get(e.errno, e.errno)}"] += 1
        count_peer_fault(self.counters, e, log,
                         f"vfio-user msg_id {h.msg_id:#x} command {h.command} (size {h.size:#x} "
                         f"flags {h.flags:#x}, {len(msg.fds)} fds)")
        return self._error_reply(h, e.errno)

    @staticmethod
    def _error_reply(header: vu.Header, err: int) -> Outcome:
        if header.no_reply or header.is_reply:
            return Outcome()
        return Outcome(reply=vu.encode_error(header, err))

    def host(self, call: Callable[[Any], list[Effect]]) -> Outcome:
        """Run a host-side core call and map its interrupts to eventfds."""
        return self._outcome(self._irq_actions(self.pci.host(call)))

    def close(self) -> tuple[Effect, ...]:
        """The client left: reset the device (before the mappings go, so nothing touches
        unmapped memory), then drop every mapping and eventfd. Returns the reset's host
        effects (nobody is left to interrupt)."""
        if self.closed:
            return ()
        self.closed = True
        try:
            effects = tuple(a for a in self.pci.reset()
                            if not isinstance(a, (MsixFire, IntxLevel)))
        finally:
            for m in list(self.dma.values()):
                self._unmap(m)
            for st in self.irqs:
                self._disable_index(st)
            self.ram.reap()
        return effects

    @staticmethod
    def _outcome(actions: list[Effect | Signal]) -> Outcome:
        signals = tuple(a for a in actions if isinstance(a, Signal))
        effects = tuple(a for a in actions if not isinstance(a, Signal))
        return Outcome(signals=signals, effects=effects)

    # -- interrupts --------------------------------------------------------------------------
    def _irq_actions(self, actions: list[PciAction]) -> list[Effect | Signal]:
        out: list[Effect | Signal] = []
        for a in actions:
            if isinstance(a, MsixFire):
                out += self._signal(vu.VFIO_PCI_MSIX_IRQ_INDEX, a.vector)
            elif isinstance(a, IntxLevel):
                self.intx_level = a.asserted
                if a.asserted:
                    out += self._intx_fire()
            else:
                out.append(a)
        return out

    def _signal(self, index: int, vector: int) -> list[Signal]:
        st = self.irqs[index]
        fd = st.fds[vector] if st.enabled and 0 <= vector < st.count else None
        if fd is None:
            self.counters[f"irq_dropped_no_eventfd_{index}"] += 1
            return []
        self.counters[f"irq_signalled_{index}"] += 1
        return [Signal(fd, f"irq index {index} vector {vector}")]

    def _intx_fire(self) -> list[Signal]:
        st = self.irqs[vu.VFIO_PCI_INTX_IRQ_INDEX]
        if st.masked or not self.intx_level:
            return []
        out = self._signal(vu.VFIO_PCI_INTX_IRQ_INDEX, 0)
        if out:
            st.masked = True  # AUTOMASKED: the client unmasks after the guest's EOI
        return out

    def _disable_index(self, st: IrqIndexState) -> None:
        for i, fd in enumerate(st.fds):
            if fd is not None:
                close_quietly(fd)
                st.fds[i] = None
        st.enabled = False
        st.masked = False

    # -- handlers ----------------------------------------------------------------------------
    def _no_fds(self, fds: list[int], what: str) -> None:
        if fds:
            raise refused(errno.EINVAL, f"{what} carries {len(fds)} unexpected fds")

    def _version(self, h: vu.Header, m: vu.Version, fds: list[int]) -> Result:
        self._no_fds(fds, "VERSION")
        if m.major != vu.VFIO_USER_MAJOR:
            raise refused(errno.ENOTSUP, f"protocol major {m.major} (we speak "
                                   f"{vu.VFIO_USER_MAJOR})")
        caps = {
            "max_msg_fds": SERVER_MAX_MSG_FDS,
            "max_data_xfer_size": self.max_data_xfer,
            "pgsizes": mmap.PAGESIZE,
            "max_dma_maps": SERVER_MAX_DMA_MAPS,
        }
        self.client_caps = m.capabilities
        self.version_done = True
        # Minor: never above what the client proposed (protocol.md 7.3).
        minor = min(m.minor, vu.VFIO_USER_MINOR)
        log.info("vfio-user client version %d.%d caps %s", m.major, m.minor, m.capabilities)
        return vu.build_version(vu.VFIO_USER_MAJOR, minor, caps), []

    def _require_version(self, what: str) -> None:
        if not self.version_done:
            raise refused(errno.EINVAL, f"{what} before VERSION negotiation")

    def _dma_map(self, h: vu.Header, m: vu.DmaMap, fds: list[int]) -> Result:
        self._require_version("DMA_MAP")
        if len(fds) > 1:
            raise refused(errno.EINVAL, f"DMA_MAP with {len(fds)} fds")
        known = vu.VFIO_DMA_MAP_FLAG_READ | vu.VFIO_DMA_MAP_FLAG_WRITE
        if m.flags & ~known:
            raise refused(errno.EINVAL, f"DMA_MAP flags {m.flags:#x}")
        if m.size == 0 or m.addr + m.size > 1 << 64 or m.addr % mmap.PAGESIZE \
                or m.size % mmap.PAGESIZE:
            raise refused(errno.EINVAL, f"DMA_MAP range [{m.addr:#x}, +{m.size:#x}) "
                                   "is empty, wraps or is not page-aligned")
        for other in self.dma.values():
            if m.addr < other.addr + other.size and other.addr < m.addr + m.size:
                raise refused(errno.EEXIST, f"DMA_MAP [{m.addr:#x}, +{m.size:#x}) "
                                       f"overlaps [{other.addr:#x}, +{other.size:#x})")
        if len(self.dma) >= SERVER_MAX_DMA_MAPS:
            raise refused(errno.ENOSPC, "too many DMA mappings")
        ram = None
        if fds:
            fd = fds.pop()
            what = f"DMA_MAP [{m.addr:#x}, +{m.size:#x})"
            try:
                ram = self.ram.map(fd, gpa=m.addr, size=m.size, offset=m.offset,
                                   writable=bool(m.flags & vu.VFIO_DMA_MAP_FLAG_WRITE),
                                   counter="bad_dma_map", what=what)
            finally:
                close_quietly(fd)  # the mapping keeps the memory; the fd is not needed any more
            self.ram.add(ram, name=f"dma@{m.addr:#x}", counter="bad_dma_map", what=what)
        self.dma[m.addr] = DmaMapping(m.addr, m.size, m.flags, ram)
        self.counters["dma_maps"] += 1
        log.info("DMA_MAP [%#x, +%#x) flags %#x offset %#x %s", m.addr, m.size, m.flags,
                 m.offset, "fd" if ram is not None else "no fd")
        return b"", []

    def _unmap(self, m: DmaMapping) -> None:
        del self.dma[m.addr]
        if m.ram is not None:
            self.ram.unmap(m.ram)

    def _dma_unmap(self, h: vu.Header, m: vu.DmaUnmap, fds: list[int]) -> Result:
        self._require_version("DMA_UNMAP")
        self._no_fds(fds, "DMA_UNMAP")
        if m.flags & vu.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP:
            raise refused(errno.ENOTSUP, "dirty page bitmaps are not supported")
        if m.flags & ~vu.VFIO_DMA_UNMAP_FLAG_ALL:
            raise refused(errno.EINVAL, f"DMA_UNMAP flags {m.flags:#x}")
        if m.flags & vu.VFIO_DMA_UNMAP_FLAG_ALL:
            victims = list(self.dma.values())
        else:
            end = m.addr + m.size
            victims = [d for d in self.dma.values() if m.addr <= d.addr and d.addr + d.size <= end]
            partial = [d for d in self.dma.values() if d.addr < end and m.addr < d.addr + d.size
                       and d not in victims]
            if partial or not victims:
                raise refused(errno.EINVAL, f"DMA_UNMAP [{m.addr:#x}, +{m.size:#x}) "
                                       "does not match whole mappings")
        for d in victims:
            self._unmap(d)
        self.counters["dma_unmaps"] += len(victims)
        log.info("DMA_UNMAP [%#x, +%#x) flags %#x: %d mapping(s)", m.addr, m.size, m.flags,
                 len(victims))
        return vu.build_dma_unmap(m.flags, m.addr, m.size), []

    def _device_get_info(self, h: vu.Header, m: vu.DeviceGetInfo, fds: list[int]) -> Result:
        self._require_version("DEVICE_GET_INFO")
        self._no_fds(fds, "DEVICE_GET_INFO")
        return vu.build_device_info(vu.DEVICE_INFO_SIZE,
                                    vu.VFIO_DEVICE_FLAGS_PCI | vu.VFIO_DEVICE_FLAGS_RESET,
                                    vu.VFIO_PCI_NUM_REGIONS, vu.VFIO_PCI_NUM_IRQS), []

    def _get_region_info(self, h: vu.Header, m: vu.GetRegionInfo, fds: list[int]) -> Result:
        self._require_version("GET_REGION_INFO")
        self._no_fds(fds, "GET_REGION_INFO")
        if m.index >= vu.VFIO_PCI_NUM_REGIONS:
            raise refused(errno.EINVAL, f"region index {m.index}")
        size = self.region_size(m.index)
        flags = vu.VFIO_REGION_INFO_FLAG_READ | vu.VFIO_REGION_INFO_FLAG_WRITE if size else 0
        return vu.build_region_info(vu.REGION_INFO_SIZE, flags, m.index, size), []

    def _get_region_io_fds(self, h: vu.Header, m: vu.GetRegionIoFds, fds: list[int]) -> Result:
        self._no_fds(fds, "GET_REGION_IO_FDS")
        raise refused(errno.ENOTSUP, "no region has I/O fds")

    def _get_irq_info(self, h: vu.Header, m: vu.GetIrqInfo, fds: list[int]) -> Result:
        self._require_version("GET_IRQ_INFO")
        self._no_fds(fds, "GET_IRQ_INFO")
        if m.index >= vu.VFIO_PCI_NUM_IRQS:
            raise refused(errno.EINVAL, f"irq index {m.index}")
        flags = vu.VFIO_IRQ_INFO_EVENTFD
        if m.index == vu.VFIO_PCI_INTX_IRQ_INDEX:
            flags |= vu.VFIO_IRQ_INFO_MASKABLE | vu.VFIO_IRQ_INFO_AUTOMASKED
        return vu.build_irq_info(vu.IRQ_INFO_SIZE, flags, m.index, self.irqs[m.index].count), []

    def _set_irqs(self, h: vu.Header, m: vu.SetIrqs, fds: list[int]) -> Result:
        self._require_version("SET_IRQS")
        if m.index >= vu.VFIO_PCI_NUM_IRQS:
            raise refused(errno.EINVAL, f"SET_IRQS irq index {m.index}")
        st = self.irqs[m.index]
        dt, act = m.data_type, m.action
        if dt not in (vu.VFIO_IRQ_SET_DATA_NONE, vu.VFIO_IRQ_SET_DATA_BOOL,
                      vu.VFIO_IRQ_SET_DATA_EVENTFD) or act not in (
                vu.VFIO_IRQ_SET_ACTION_MASK, vu.VFIO_IRQ_SET_ACTION_UNMASK,
                vu.VFIO_IRQ_SET_ACTION_TRIGGER) or m.flags & ~0x3F:
            raise refused(errno.EINVAL, f"SET_IRQS flags {m.flags:#x}")
        if m.count and (m.start >= st.count or m.count > st.count - m.start):
            raise refused(errno.EINVAL, f"SET_IRQS index {m.index} vectors "
                                   f"[{m.start}, +{m.count}) beyond {st.count}")
        if dt != vu.VFIO_IRQ_SET_DATA_EVENTFD:
            self._no_fds(fds, "SET_IRQS without DATA_EVENTFD")
        elif fds and len(fds) != m.count:
            raise refused(errno.EINVAL, f"SET_IRQS count {m.count} with {len(fds)} fds")
        out: list[Effect | Signal] = []
        if act == vu.VFIO_IRQ_SET_ACTION_TRIGGER:
            if m.count == 0:
                if dt not in (vu.VFIO_IRQ_SET_DATA_NONE, vu.VFIO_IRQ_SET_DATA_EVENTFD):
                    raise refused(errno.EINVAL, "SET_IRQS count 0 with DATA_BOOL")
                self._disable_index(st)  # count 0: tear down the whole index
                self.counters[f"irq_index_disabled_{m.index}"] += 1
            elif dt == vu.VFIO_IRQ_SET_DATA_EVENTFD:
                for i in range(m.count):
                    old = st.fds[m.start + i]
                    if old is not None:
                        close_quietly(old)
                    # No fds at all means "de-assign these vectors" (QEMU sends none for -1).
                    st.fds[m.start + i] = fds[i] if fds else None
                fds.clear()
                st.enabled = True
                if m.index == vu.VFIO_PCI_INTX_IRQ_INDEX:
                    out += self._intx_fire()  # a line already high must be seen
            else:  # loopback trigger: fire the vectors now
                for i in range(m.count):
                    if dt == vu.VFIO_IRQ_SET_DATA_BOOL and not m.data[i]:
                        continue
                    out += self._signal(m.index, m.start + i)
        else:
            if m.index != vu.VFIO_PCI_INTX_IRQ_INDEX:
                raise refused(errno.EINVAL, f"irq index {m.index} is not maskable")
            if dt != vu.VFIO_IRQ_SET_DATA_NONE:
                raise refused(errno.ENOTSUP, "mask/unmask only with DATA_NONE")
            if m.count != 1:
                raise refused(errno.EINVAL, f"INTx mask/unmask count {m.count}")
            if act == vu.VFIO_IRQ_SET_ACTION_MASK:
                st.masked = True
            else:
                st.masked = False
                out += self._intx_fire()
        self.counters["set_irqs"] += 1
        return b"", out

    def _check_access(self, what: str, region: int, offset: int, count: int) -> None:
        size = self.region_size(region)
        if region >= vu.VFIO_PCI_NUM_REGIONS or size == 0:
            raise refused(errno.EINVAL, f"{what} of region {region}, which has no size")
        if count == 0 or count > self.max_data_xfer or offset + count > size:
            raise refused(errno.EINVAL, f"{what} [{offset:#x}, +{count:#x}) of region "
                                   f"{region} (size {size:#x})")

    @staticmethod
    def _chunks(offset: int, count: int) -> list[tuple[int, int]]:
        # Registers are accessed 1/2/4/8 bytes at a time; anything else is split into naturally
        # aligned pieces, as a CPU would issue them.
        out, pos, end = [], offset, offset + count
        while pos < end:
            n = 8
            while n > 1 and (pos % n or pos + n > end):
                n //= 2
            out.append((pos, n))
            pos += n
        return out

    def _region_read(self, h: vu.Header, m: vu.RegionRead, fds: list[int]) -> Result:
        self._require_version("REGION_READ")
        self._no_fds(fds, "REGION_READ")
        self._check_access("REGION_READ", m.region, m.offset, m.count)
        acts: list[PciAction] = []
        if m.region == vu.VFIO_PCI_CONFIG_REGION_INDEX:
            data, acts = self.pci.config_read(m.offset, m.count)
        else:
            parts = []
            for off, n in self._chunks(m.offset, m.count):
                d, a = self.pci.bar_read(m.region, off, n)
                parts.append(d)
                acts += a
            data = b"".join(parts)
        self.counters["region_reads"] += 1
        return vu.build_region_access(m.offset, m.region, m.count, data), self._irq_actions(acts)

    def _region_write(self, h: vu.Header, m: vu.RegionWrite, fds: list[int]) -> Result:
        self._require_version("REGION_WRITE")
        self._no_fds(fds, "REGION_WRITE")
        self._check_access("REGION_WRITE", m.region, m.offset, m.count)
        if m.region == vu.VFIO_PCI_CONFIG_REGION_INDEX:
            acts = self.pci.config_write(m.offset, m.data)
        else:
            acts = []
            for off, n in self._chunks(m.offset, m.count):
                rel = off - m.offset
                acts += self.pci.bar_write(m.region, off, m.data[rel:rel + n])
        self.counters["region_writes"] += 1
        return vu.build_region_access(m.offset, m.region, m.count), self._irq_actions(acts)

    def _device_reset(self, h: vu.Header, m: vu.DeviceReset, fds: list[int]) -> Result:
        self._require_version("DEVICE_RESET")
        self._no_fds(fds, "DEVICE_RESET")
        self.counters["device_resets"] += 1
        return b"", self._irq_actions(self.pci.reset())

    _handlers: dict[type, Callable[..., Result]] = {
        vu.Version: _version,
        vu.DmaMap: _dma_map,
        vu.DmaUnmap: _dma_unmap,
        vu.DeviceGetInfo: _device_get_info,
        vu.GetRegionInfo: _get_region_info,
        vu.GetRegionIoFds: _get_region_io_fds,
        vu.GetIrqInfo: _get_irq_info,
        vu.SetIrqs: _set_irqs,
        vu.RegionRead: _region_read,
        vu.RegionWrite: _region_write,
        vu.DeviceReset: _device_reset,
    }
