"""A vfio-user *client* playing QEMU's part, so our guest-side driver can drive any external
virtio-balloon device that speaks vfio-user (ours, or someone else's back-end).

Theory of operation
-------------------
``VfioUserClient(path)`` connects to the device's unix socket and does what QEMU's
vfio-user-pci does before a guest runs (protocol.md section 7):

1. ``VERSION`` (0.0, advertising ``max_msg_fds``), reading the server's limits;
2. guest RAM: a memfd of ``ram_bytes`` mapped here *and* handed to the device with ``DMA_MAP``
   (read/write, at gpa 0), so both sides see the same bytes. Here it backs a ``GuestMemory``
   region the guest model (rings, driver buffers) writes into;
3. ``DEVICE_GET_INFO``, ``GET_REGION_INFO`` for the config space and the BARs, ``GET_IRQ_INFO``
   for MSI-X;
4. a walk of the PCI capability list in config space (region 7) for the virtio capabilities
   (COMMON, NOTIFY, ISR, DEVICE; vendor capability 0x09) and the MSI-X capability; wherever the
   device placed its structures, they are found through the capabilities, as a guest would;
5. PCI command MEMORY|MASTER, MSI-X enabled, and one eventfd per MSI-X vector installed with
   ``SET_IRQS`` (DATA_EVENTFD | ACTION_TRIGGER).

From then on the client implements ``guest_model.transport.VirtioTransport``: every register
access is a ``REGION_READ`` / ``REGION_WRITE`` of the BAR the capability names (little-endian,
naturally sized), a kick is a write of the queue index to the queue's notify address
(``notify_off * notify_off_multiplier``). Vectors: config on vector 0, every queue on vector 1
(Linux's shared-vector layout; one vector is shared by all if the table has only one); a vector
that reads back as NO_VECTOR is an error of the device.

Interrupts are never delivered from inside a transport call (the driver's handlers must not be
re-entered, docs/interfaces.md): ``poll_interrupts()`` reads every eventfd without blocking and
then calls ``on_config()`` for the config vector and ``on_queue(q)`` for every queue on a
fired vector (a shared vector cannot say which queue, so all of them are told; drivers tolerate
spurious interrupts). ``wait_interrupt(timeout)`` blocks in ``select`` until one fires.
``irq_counts[vector]`` counts every signal seen, for checks such as "no interrupt before
DRIVER_OK".

Everything the device sends is checked: an error reply, a reply with the wrong id or command,
a short payload or a closed connection raise ``DeviceFault`` naming the request. The
client is synchronous (a test harness, not a VMM): one request in flight, a socket timeout
bounds every wait. It imports nothing from ``balloon_dev``: it is an independent peer of the
device it checks.
"""
from __future__ import annotations

import array
import errno
import os
import select
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from protocol import vfio_user as vu
from protocol import virtio_pci as vp
from protocol.errors import FramingLost, PeerFault
from vmsim.client_base import DeviceFault, QemuRoleClient
from vmsim.virtio_pci_client import VirtioPciClient

_EVENTFD_ONE = (1).to_bytes(8, "little")


@dataclass(slots=True)
class VirtioCap:
    """Where one virtio structure lives: BAR index, offset in it, length."""

    cfg_type: int
    bar: int
    offset: int
    length: int
    pos: int  # position of the capability in config space


@dataclass(slots=True)
class PciLayout:
    """What the capability walk found."""

    vendor_id: int = 0
    device_id: int = 0
    caps: dict[int, VirtioCap] = field(default_factory=dict)  # first capability per cfg_type
    notify_off_multiplier: int = 0
    msix_pos: int | None = None
    msix_table_size: int = 0


class VfioUserClient(VirtioPciClient, QemuRoleClient):
    """QEMU's side of a vfio-user connection to a virtio-pci balloon (see the module docstring).

    ``ram_bytes`` of guest RAM at gpa 0 (a multiple of the page size). ``connect()`` runs the
    whole set-up; use the object as a context manager to close it.
    """

    def __init__(self, path: str, *, ram_bytes: int = 64 << 20, timeout: float = 5.0) -> None:
        super().__init__(path, ram_bytes=ram_bytes, timeout=timeout)
        self._msg_id = 0
        self.server_caps: dict[str, Any] = {}
        self.max_msg_fds = vu.DEFAULT_MAX_MSG_FDS
        self.region_sizes: dict[int, int] = {}
        self.pci = PciLayout()
        self.eventfds: list[int] = []
        self.config_vector = vp.VIRTIO_MSI_NO_VECTOR
        self._queue_vector_default = 1  # set from the MSI-X table size at connect()
        self._notify_off: dict[int, int] = {}
        self._queue_size: dict[int, int] = {}

    # -- lifecycle --------------------------------------------------------------------------
    def connect(self) -> None:
        self._open_socket()
        try:
            self._version()
            self._map_ram()
            self._device_info()
            self._walk_capabilities()
            self._setup_msix()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for fd in self.eventfds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.eventfds = []
        self._release_guest_ram()

    # -- messages ---------------------------------------------------------------------------
    def request(self, command: int, payload: bytes = b"", fds: list[int] | None = None,
                *, what: str | None = None) -> bytes:
        """Send one command, wait for its reply, return the reply payload.

        Raises ``DeviceFault`` on an error reply (with its errno), a reply that does not
        match the request, or a lost connection."""
        if self.sock is None:
            raise DeviceFault("not connected")
        name = what or vu.Command(command).name
        self._msg_id = (self._msg_id + 1) & 0xFFFF
        msg = vu.encode_request(self._msg_id, command, payload)
        try:
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                sent = self.sock.sendmsg([msg], anc)
                if sent < len(msg):
                    self.sock.sendall(msg[sent:])
            else:
                self.sock.sendall(msg)
            raw = self._recv_exact(vu.HEADER_SIZE, name)
            try:
                h = vu.decode_header(raw)
            except FramingLost as e:
                raise DeviceFault(f"{name}: reply header unusable: {e}") from None
            body = self._recv_exact(h.payload_size, name)
        except TimeoutError:
            raise DeviceFault(f"{name}: no reply within {self.timeout} s") from None
        except OSError as e:
            raise DeviceFault(f"{name}: connection failed: {e}") from None
        if not h.is_reply or h.msg_id != self._msg_id or h.command != command:
            raise DeviceFault(
                f"{name}: reply does not match (id {h.msg_id:#x} command {h.command} flags "
                f"{h.flags:#x}, sent id {self._msg_id:#x})")
        if h.flags & vu.VFIO_USER_F_ERROR:
            raise DeviceFault(
                f"{name}: device answered error {errno.errorcode.get(h.error, h.error)}",
                h.error)
        return body

    @staticmethod
    def _reply(layout: str, body: bytes, size: int) -> dict[str, Any]:
        """The fixed-size head of a reply payload, decoded; a short or undecodable one is the
        device's error (``DeviceFault``), not a protocol-module exception."""
        try:
            return vu.parse_reply_payload(layout, body[:size])
        except PeerFault as e:
            raise DeviceFault(f"{layout} reply of {len(body)} bytes unusable: "
                                      f"{e}") from None

    def _recv_exact(self, n: int, name: str) -> bytes:
        assert self.sock is not None
        buf = bytearray()
        while len(buf) < n:
            # The device never sends fds to a client in the commands we use; any it sends are
            # closed at once so they do not leak.
            data, anc, _, _ = self.sock.recvmsg(n - len(buf), socket.CMSG_SPACE(16 * 4))
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(cdata[:len(cdata) - len(cdata) % got.itemsize])
                    for fd in got:
                        os.close(fd)
            if not data:
                raise DeviceFault(f"{name}: the device closed the connection")
            buf += data
        return bytes(buf)

    def _version(self) -> None:
        body = self.request(vu.Command.VERSION, vu.build_version(
            vu.VFIO_USER_MAJOR, vu.VFIO_USER_MINOR, {"max_msg_fds": vu.MAX_MAX_MSG_FDS}))
        try:
            p = vu.decode_request(vu.Header(0, vu.Command.VERSION, vu.HEADER_SIZE + len(body),
                                            vu.VFIO_USER_F_TYPE_COMMAND), body)
        except PeerFault as e:
            raise DeviceFault(f"VERSION reply does not parse: {e}") from None
        assert isinstance(p, vu.Version)
        if p.major != vu.VFIO_USER_MAJOR or p.minor > vu.VFIO_USER_MINOR:
            raise DeviceFault(f"VERSION: device speaks {p.major}.{p.minor}")
        self.server_caps = p.capabilities
        fds = p.capabilities.get("max_msg_fds", vu.DEFAULT_MAX_MSG_FDS)
        self.max_msg_fds = fds if isinstance(fds, int) and fds > 0 else vu.DEFAULT_MAX_MSG_FDS

    def _map_ram(self) -> None:
        fd = self._map_guest_ram()
        self.request(vu.Command.DMA_MAP, vu.build_dma_map(
            vu.VFIO_DMA_MAP_FLAG_READ | vu.VFIO_DMA_MAP_FLAG_WRITE, 0, 0, self.ram_bytes), [fd])

    def _device_info(self) -> None:
        body = self.request(vu.Command.DEVICE_GET_INFO,
                            vu.build_device_info(vu.DEVICE_INFO_SIZE, 0, 0, 0))
        info = self._reply("device_info", body, vu.DEVICE_INFO_SIZE)
        if not info["flags"] & vu.VFIO_DEVICE_FLAGS_PCI:
            raise DeviceFault(f"DEVICE_GET_INFO: not a PCI device (flags "
                                      f"{info['flags']:#x})")
        for idx in range(min(info["num_regions"], vu.VFIO_PCI_NUM_REGIONS)):
            body = self.request(vu.Command.DEVICE_GET_REGION_INFO,
                                vu.build_region_info(vu.REGION_INFO_SIZE, 0, idx, 0))
            r = self._reply("region_info", body, vu.REGION_INFO_SIZE)
            self.region_sizes[idx] = r["size"]
        if self.region_sizes.get(vu.VFIO_PCI_CONFIG_REGION_INDEX, 0) < vp.PCI_CONFIG_SPACE_SIZE:
            raise DeviceFault("the device has no 256-byte PCI config region")

    # -- regions ----------------------------------------------------------------------------
    def region_read(self, region: int, offset: int, count: int) -> bytes:
        body = self.request(vu.Command.REGION_READ,
                            vu.build_region_access(offset, region, count))
        if len(body) != vu.REGION_ACCESS_SIZE + count:
            raise DeviceFault(f"REGION_READ region {region} [{offset:#x}, +{count}): "
                                      f"reply of {len(body)} bytes")
        return body[vu.REGION_ACCESS_SIZE:]

    def region_write(self, region: int, offset: int, data: bytes) -> None:
        self.request(vu.Command.REGION_WRITE,
                     vu.build_region_access(offset, region, len(data), data))

    def config_read(self, offset: int, count: int) -> bytes:
        return self.region_read(vu.VFIO_PCI_CONFIG_REGION_INDEX, offset, count)

    def config_write(self, offset: int, data: bytes) -> None:
        self.region_write(vu.VFIO_PCI_CONFIG_REGION_INDEX, offset, data)

    def _cap(self, cfg_type: int) -> VirtioCap:
        cap = self.pci.caps.get(cfg_type)
        if cap is None:
            raise DeviceFault(f"the device has no virtio capability of type {cfg_type}")
        return cap

    def _struct_read(self, cfg_type: int, off: int, size: int) -> int:
        cap = self._cap(cfg_type)
        return int.from_bytes(self.region_read(cap.bar, cap.offset + off, size), "little")

    def _struct_write(self, cfg_type: int, off: int, size: int, value: int) -> None:
        cap = self._cap(cfg_type)
        self.region_write(cap.bar, cap.offset + off, value.to_bytes(size, "little"))

    def common_read(self, off: int, size: int) -> int:
        return self._struct_read(vp.VIRTIO_PCI_CAP_COMMON_CFG, off, size)

    def common_write(self, off: int, size: int, value: int) -> None:
        self._struct_write(vp.VIRTIO_PCI_CAP_COMMON_CFG, off, size, value)

    def read_isr(self) -> int:
        """Read (and so clear) the ISR byte."""
        return self._struct_read(vp.VIRTIO_PCI_CAP_ISR_CFG, 0, 1)

    def _walk_capabilities(self) -> None:
        cfg = self.config_read(0, vp.PCI_CONFIG_SPACE_SIZE)
        lay = self.pci
        lay.vendor_id, lay.device_id = struct.unpack_from("<HH", cfg, vp.PCI_VENDOR_ID)
        status = struct.unpack_from("<H", cfg, vp.PCI_STATUS)[0]
        if not status & vp.PCI_STATUS_CAP_LIST:
            raise DeviceFault("PCI status says there is no capability list")
        pos = cfg[vp.PCI_CAPABILITY_LIST] & ~3
        seen: set[int] = set()
        # Bounded: at most 48 capabilities fit in 192 bytes; a loop is the device's error.
        while pos and len(seen) < 48:
            if pos in seen or pos < 0x40 or pos + 2 > len(cfg):
                raise DeviceFault(f"PCI capability list broken at {pos:#x}")
            seen.add(pos)
            cap_id, nxt = cfg[pos], cfg[pos + 1]
            if cap_id == vp.PCI_CAP_ID_VNDR and pos + vp.VIRTIO_PCI_CAP_LEN <= len(cfg):
                _, _, cap_len, cfg_type, bar, _, _, off, length = struct.unpack_from(
                    "<BBBBBBHII", cfg, pos)
                # The first capability of each type is the one to use (virtio 1.x 4.1.4).
                if cfg_type not in lay.caps and bar <= 5:
                    lay.caps[cfg_type] = VirtioCap(cfg_type, bar, off, length, pos)
                    if cfg_type == vp.VIRTIO_PCI_CAP_NOTIFY_CFG:
                        if cap_len < vp.VIRTIO_PCI_NOTIFY_CAP_LEN \
                                or pos + vp.VIRTIO_PCI_NOTIFY_CAP_LEN > len(cfg):
                            raise DeviceFault(f"notify capability of {cap_len} bytes "
                                                      f"at {pos:#x}")
                        lay.notify_off_multiplier = struct.unpack_from(
                            "<I", cfg, pos + vp.VIRTIO_PCI_CAP_EXTRA)[0]
            elif cap_id == vp.PCI_CAP_ID_MSIX and lay.msix_pos is None:
                lay.msix_pos = pos
                ctrl = struct.unpack_from("<H", cfg, pos + vp.PCI_MSIX_FLAGS)[0]
                lay.msix_table_size = (ctrl & vp.PCI_MSIX_FLAGS_QSIZE) + 1
            pos = nxt & ~3
        for t in (vp.VIRTIO_PCI_CAP_COMMON_CFG, vp.VIRTIO_PCI_CAP_NOTIFY_CFG,
                  vp.VIRTIO_PCI_CAP_ISR_CFG, vp.VIRTIO_PCI_CAP_DEVICE_CFG):
            cap = self._cap(t)
            if self.region_sizes.get(cap.bar, 0) < cap.offset + cap.length:
                raise DeviceFault(f"virtio capability type {t} points past BAR{cap.bar}")
        if lay.msix_pos is None:
            raise DeviceFault("the device has no MSI-X capability (INTx-only devices "
                                      "are not supported by this client)")

    def _setup_msix(self) -> None:
        cmd = struct.unpack("<H", self.config_read(vp.PCI_COMMAND, 2))[0]
        # Memory decoding and bus mastering on; INTx off, since interrupts come by MSI-X.
        cmd |= vp.PCI_COMMAND_MEMORY | vp.PCI_COMMAND_MASTER | vp.PCI_COMMAND_INTX_DISABLE
        self.config_write(vp.PCI_COMMAND, struct.pack("<H", cmd))
        assert self.pci.msix_pos is not None
        ctrl_at = self.pci.msix_pos + vp.PCI_MSIX_FLAGS
        ctrl = struct.unpack("<H", self.config_read(ctrl_at, 2))[0]
        self.config_write(ctrl_at, struct.pack("<H", (ctrl | vp.PCI_MSIX_FLAGS_ENABLE)
                                               & ~vp.PCI_MSIX_FLAGS_MASKALL))
        body = self.request(vu.Command.DEVICE_GET_IRQ_INFO, vu.build_irq_info(
            vu.IRQ_INFO_SIZE, 0, vu.VFIO_PCI_MSIX_IRQ_INDEX, 0))
        info = self._reply("irq_info", body, vu.IRQ_INFO_SIZE)
        count = min(info["count"], self.pci.msix_table_size)
        if count < 1 or not info["flags"] & vu.VFIO_IRQ_INFO_EVENTFD:
            raise DeviceFault(f"MSI-X irq index: count {info['count']} flags "
                                      f"{info['flags']:#x}")
        self.eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        self.irq_counts = [0] * count
        step = max(1, self.max_msg_fds)
        for start in range(0, count, step):
            fds = self.eventfds[start:start + step]
            self.request(vu.Command.DEVICE_SET_IRQS, vu.build_irq_set(
                vu.VFIO_IRQ_SET_DATA_EVENTFD | vu.VFIO_IRQ_SET_ACTION_TRIGGER,
                vu.VFIO_PCI_MSIX_IRQ_INDEX, start, len(fds)), fds)
        self.config_vector = 0
        self._queue_vector_default = 1 if count >= 2 else 0

    # -- interrupts -------------------------------------------------------------------------
    def _drain(self) -> list[int]:
        fired = []
        for v, fd in enumerate(self.eventfds):
            n = self._read_eventfd(fd)
            if n:
                self.irq_counts[v] += n
                fired.append(v)
        return fired

    def wait_interrupt(self, timeout: float) -> bool:
        """Block until some vector is signalled (not consumed), at most ``timeout`` seconds."""
        if not self.eventfds:
            return False
        r, _, _ = select.select(self.eventfds, [], [], max(0.0, timeout))
        return bool(r)

    # -- VirtioTransport (the common-config part: VirtioPciClient) ---------------------------
    def set_driver_features(self, features: int) -> None:
        for half in (0, 1):
            self.common_write(vp.COMMON_GFSELECT, 4, half)
            self.common_write(vp.COMMON_GF, 4, (features >> (32 * half)) & 0xFFFFFFFF)

    def read_config(self, offset: int, size: int) -> bytes:
        cap = self._cap(vp.VIRTIO_PCI_CAP_DEVICE_CFG)
        if offset < 0 or offset + size > cap.length:
            raise DeviceFault(f"device config [{offset:#x}, +{size}) beyond the "
                                      f"{cap.length}-byte window")
        return self.region_read(cap.bar, cap.offset + offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        cap = self._cap(vp.VIRTIO_PCI_CAP_DEVICE_CFG)
        if offset < 0 or offset + len(data) > cap.length:
            raise DeviceFault(f"device config [{offset:#x}, +{len(data)}) beyond the "
                                      f"{cap.length}-byte window")
        self.region_write(cap.bar, cap.offset + offset, bytes(data))

    def setup_queue(self, q: int, size: int, desc: int, avail: int, used: int) -> None:
        self.common_write(vp.COMMON_Q_SELECT, 2, q)
        self.common_write(vp.COMMON_Q_SIZE, 2, size)
        vec = self._queue_vector_default
        self.common_write(vp.COMMON_Q_MSIX, 2, vec)
        if self.common_read(vp.COMMON_Q_MSIX, 2) != vec:
            raise DeviceFault(f"queue {q}: MSI-X vector {vec} not taken")
        self.queue_vectors[q] = vec
        for lo, addr in ((vp.COMMON_Q_DESCLO, desc), (vp.COMMON_Q_AVAILLO, avail),
                         (vp.COMMON_Q_USEDLO, used)):
            self.common_write(lo, 4, addr & 0xFFFFFFFF)
            self.common_write(lo + 4, 4, addr >> 32)
        self._notify_off[q] = self.common_read(vp.COMMON_Q_NOFF, 2)
        self._queue_size[q] = size

    def enable_queue(self, q: int) -> None:
        self.common_write(vp.COMMON_Q_SELECT, 2, q)
        self.common_write(vp.COMMON_Q_ENABLE, 2, 1)

    def notify(self, q: int) -> None:
        off = self._notify_off.get(q)
        if off is None:
            off = self.queue_notify_off(q)
        cap = self._cap(vp.VIRTIO_PCI_CAP_NOTIFY_CFG)
        at = off * self.pci.notify_off_multiplier
        if at + 2 > cap.length:
            raise DeviceFault(f"queue {q}: notify offset {at:#x} beyond the notify "
                                      f"window of {cap.length:#x} bytes")
        self.region_write(cap.bar, cap.offset + at, struct.pack("<H", q))

    def reset(self) -> None:
        """virtio reset: status 0 read back (``reset_status``), queues and interrupts forgotten."""
        self.reset_status()
        self.queue_vectors.clear()
        self._notify_off.clear()
        self._queue_size.clear()
        self.discard_interrupts()

    def signal_test(self, vector: int) -> None:
        """Write an eventfd ourselves (tests of the polling path)."""
        os.write(self.eventfds[vector], _EVENTFD_ONE)
