"""A vhost-user *front-end* playing QEMU's part (its generic ``vhost-user-test-device-pci``), so
our guest-side driver can drive an external virtio-balloon back-end over vhost-user.

Theory of operation
-------------------
In vhost-user the front-end owns the guest-visible virtio transport; the back-end sees only what
the front-end forwards (protocol.md section 8). ``VhostUserClient`` therefore implements
``guest_model.transport.VirtioTransport`` itself and forwards as QEMU does:

* ``connect()``: GET_FEATURES, GET/SET_PROTOCOL_FEATURES (the intersection of what the back-end
  offers and REPLY_ACK, BACKEND_REQ, CONFIG, STATUS), SET_BACKEND_REQ_FD with one end of a
  socketpair (the back-end's config-change messages arrive there), SET_OWNER. Guest RAM is a
  memfd of ``ram_bytes`` mapped here as a ``GuestMemory`` region at gpa 0.
* the status byte is kept here. FEATURES_OK sends SET_FEATURES and, with STATUS, SET_STATUS and
  reads GET_STATUS back (a back-end may refuse). DRIVER_OK starts the device (QEMU's
  ``vhost_dev_start``): SET_MEM_TABLE with the memfd, per enabled queue SET_VRING_NUM / BASE /
  ADDR (front-end virtual addresses, translated by the memory table) / KICK / CALL eventfds and
  SET_VRING_ENABLE, then SET_STATUS with DRIVER_OK. Before that the back-end has no rings, so
  kicks are only remembered and passed on at start (QEMU's front-end does not forward them
  either). Status 0 stops the device: GET_VRING_BASE per ring, SET_STATUS 0.
* config reads and writes are GET_CONFIG / SET_CONFIG; ``config_generation`` counts the
  back-end's CONFIG_CHANGE_MSG messages (vhost-user has no generation of its own).
* the queue count and size are the front-end's configuration, as QEMU's ``num_vqs`` and
  ``vq_size`` properties: by default the compacted layout of the offered features and 128.

Interrupts use the same model as ``vmsim.vfio_user_client``: "vector" 0 is the config
interrupt (a CONFIG_CHANGE_MSG on the back-end channel), vector ``1 + q`` is queue ``q``'s call
eventfd. ``poll_interrupts()`` delivers them to the handlers, never from inside another call;
``irq_counts``, ``wait_interrupt``, ``discard_interrupts`` and ``config_vector`` work as there.

Every reply is checked (request id, size, REPLY_ACK status); a failure, a lost connection or a
timeout raises ``vmsim.client_base.DeviceFault``. Synchronous sockets:
this is a test harness, not a VMM. It imports nothing from ``balloon_dev``.
"""
from __future__ import annotations

import os
import select
import socket
import struct
from typing import Any

from protocol import vhost_user as vu
from protocol.balloon import queue_layout
from protocol.errors import PeerFault
from protocol.virtio import DeviceStatus
from protocol.virtqueue import VIRTQ_MAX_SIZE
from vmsim.client_base import ClientUsageError, DeviceFault, QemuRoleClient

R = vu.VhostUserRequest
PF = vu.VhostUserProtocolFeature

#: Protocol features this front-end uses.
WANTED_PROTOCOL_FEATURES = (1 << PF.REPLY_ACK) | (1 << PF.BACKEND_REQ) | (1 << PF.CONFIG) \
    | (1 << PF.STATUS)
#: The "front-end process" address guest RAM is said to be mapped at (any value: the back-end
#: only uses it to translate ring addresses through the memory table).
RAM_UADDR = 0x7F00_0000_0000
#: QEMU's generic front-end default ring size.
DEFAULT_VQ_SIZE = 128


class VhostUserClient(QemuRoleClient):
    """QEMU's side of a vhost-user connection to a balloon back-end (see the module docstring)."""

    def __init__(self, path: str, *, ram_bytes: int = 64 << 20, timeout: float = 5.0,
                 num_vqs: int | None = None, vq_size: int = DEFAULT_VQ_SIZE) -> None:
        super().__init__(path, ram_bytes=ram_bytes, timeout=timeout)
        if not 0 < vq_size <= VIRTQ_MAX_SIZE or vq_size & (vq_size - 1):
            raise ClientUsageError(f"vq_size={vq_size}: must be a power of two <= "
                                   f"{VIRTQ_MAX_SIZE}")
        self.vq_size = vq_size
        self._num_vqs = num_vqs
        self.channel: socket.socket | None = None
        self.offered = 0  # device features, without the vhost-user protocol bit
        self.protocol_features = 0
        self.status = 0
        self.driver_features = 0
        self.running = False
        self.generation = 0
        self._queues: dict[int, tuple[int, int, int, int]] = {}  # q -> size, desc, avail, used
        self._enabled: set[int] = set()
        self._pending_kicks: set[int] = set()
        self.kick_fds: dict[int, int] = {}
        self.call_fds: dict[int, int] = {}
        self.irq_counts = [0]  # the config "vector"; queues' are added at setup_queue
        self._chan_buf = b""

    # -- lifecycle --------------------------------------------------------------------------
    def connect(self) -> None:
        self._open_socket()
        try:
            feats = self._u64(self.request(R.GET_FEATURES), "GET_FEATURES")
            self.offered = feats & ~(1 << vu.VHOST_USER_F_PROTOCOL_FEATURES)
            if feats >> vu.VHOST_USER_F_PROTOCOL_FEATURES & 1:
                pf = self._u64(self.request(R.GET_PROTOCOL_FEATURES), "GET_PROTOCOL_FEATURES")
                self.protocol_features = pf & WANTED_PROTOCOL_FEATURES
                # No ack asked for: the back-end learns of REPLY_ACK with this very message.
                self.request(R.SET_PROTOCOL_FEATURES, vu.build_u64(self.protocol_features),
                             ack=False)
            if self._has(PF.BACKEND_REQ):
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    self.request(R.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
                finally:
                    theirs.close()
                ours.setblocking(False)
                self.channel = ours
            self.request(R.SET_OWNER)
            self._map_guest_ram()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for s in (self.sock, self.channel):
            if s is not None:
                s.close()
        self.sock = self.channel = None
        self._close_ring_fds()
        self._release_guest_ram()

    def _close_ring_fds(self) -> None:
        for fd in list(self.kick_fds.values()) + list(self.call_fds.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        self.kick_fds.clear()
        self.call_fds.clear()

    def _has(self, pf: int) -> bool:
        return bool(self.protocol_features >> pf & 1)

    # -- messages ---------------------------------------------------------------------------
    def request(self, req: int, payload: bytes = b"", fds: list[int] | None = None, *,
                ack: bool | None = None) -> bytes | None:
        """Send one request; return the reply payload when one is due (REPLY_REQUESTS, or a
        REPLY_ACK asked for: by default for every request without a reply, once REPLY_ACK is
        negotiated, so that a refusal is seen). A non-zero ack raises."""
        if self.sock is None:
            raise DeviceFault("not connected")
        name = vu.request_name(req)
        replies = req in vu.REPLY_REQUESTS
        want_ack = (not replies and self._has(PF.REPLY_ACK)) if ack is None else ack
        msg = vu.build_request(req, payload, need_reply=want_ack)
        try:
            if fds:
                socket.send_fds(self.sock, [msg], fds)
            else:
                self.sock.sendall(msg)
            if not (replies or want_ack):
                return None
            h = vu.parse_header(self._exact(vu.HEADER_SIZE, name))
            body = self._exact(h.size, name) if h.size else b""
        except TimeoutError:
            raise DeviceFault(f"{name}: no reply within {self.timeout} s") from None
        except PeerFault as e:
            raise DeviceFault(f"{name}: reply unusable: {e}") from None
        except OSError as e:
            raise DeviceFault(f"{name}: connection failed: {e}") from None
        if h.request != req or not h.flags & vu.VHOST_USER_REPLY_MASK:
            raise DeviceFault(f"{name}: reply does not match (request {h.request} "
                                       f"flags {h.flags:#x})")
        if not replies:
            code = self._u64(body, name)
            if code != 0:
                raise DeviceFault(f"{name}: back-end refused (REPLY_ACK {code})")
            return None
        return body

    def _exact(self, n: int, name: str) -> bytes:
        assert self.sock is not None
        buf = b""
        while len(buf) < n:
            d = self.sock.recv(n - len(buf))
            if not d:
                raise DeviceFault(f"{name}: the back-end closed the connection")
            buf += d
        return buf

    @staticmethod
    def _u64(body: bytes | None, name: str) -> int:
        if body is None or len(body) != 8:
            raise DeviceFault(f"{name}: expected a u64 reply, got {body!r}")
        return int(struct.unpack("=Q", body)[0])

    # -- interrupts -------------------------------------------------------------------------
    def _read_channel(self) -> int:
        """Handle the back-end's requests on the channel; returns config changes seen."""
        if self.channel is None:
            return 0
        changes = 0
        while True:
            try:
                data = self.channel.recv(4096)
            except BlockingIOError:
                break
            except OSError:
                # Reset by the back-end (it closed with our replies unread): the channel is
                # gone just as after an orderly close; what arrived before is still handled.
                data = b""
            if not data:
                self.channel.close()
                self.channel = None
                break
            self._chan_buf += data
        while len(self._chan_buf) >= vu.HEADER_SIZE:
            try:
                h = vu.parse_header(self._chan_buf[:vu.HEADER_SIZE])
            except PeerFault as e:
                raise DeviceFault(f"back-end channel framing lost: {e}") from None
            if len(self._chan_buf) < vu.HEADER_SIZE + h.size:
                break
            self._chan_buf = self._chan_buf[vu.HEADER_SIZE + h.size:]
            if h.request == vu.VhostUserBackendRequest.CONFIG_CHANGE_MSG:
                changes += 1
            if h.flags & vu.VHOST_USER_NEED_REPLY_MASK and self.channel is not None:
                ok = 0 if h.request == vu.VhostUserBackendRequest.CONFIG_CHANGE_MSG else 1
                try:
                    self.channel.sendall(vu.build_reply(h.request, vu.build_u64(ok)))
                except OSError as e:
                    raise DeviceFault(f"back-end channel: cannot reply to "
                                               f"{h.request}: {e}") from None
        return changes

    def _drain(self) -> list[int]:
        fired = []
        n = self._read_channel()
        if n:
            self.generation = (self.generation + n) & 0xFF
            self.irq_counts[0] += n
            fired.append(0)
        for q, fd in sorted(self.call_fds.items()):
            c = self._read_eventfd(fd)
            if c:
                v = 1 + q
                self.irq_counts[v] += c
                fired.append(v)
        return fired

    def wait_interrupt(self, timeout: float) -> bool:
        fds: list[Any] = list(self.call_fds.values())
        if self.channel is not None:
            fds.append(self.channel)
        if not fds:
            return False
        r, _, _ = select.select(fds, [], [], max(0.0, timeout))
        return bool(r)

    # -- VirtioTransport --------------------------------------------------------------------
    def get_device_features(self) -> int:
        return self.offered

    def set_driver_features(self, features: int) -> None:
        self.driver_features = features

    def get_status(self) -> int:
        st = self.status
        if self._has(PF.STATUS) and self.status & DeviceStatus.FEATURES_OK:
            dev = self._u64(self.request(R.GET_STATUS), "GET_STATUS")
            st |= dev & DeviceStatus.DEVICE_NEEDS_RESET
        return st

    def set_status(self, status: int) -> None:
        status &= 0xFF
        if status == 0:
            self._stop()
            self.status = 0
            return
        new = status & ~self.status
        self.status = status
        if new & DeviceStatus.FEATURES_OK:
            self.request(R.SET_FEATURES, vu.build_u64(self.driver_features))
            if self._has(PF.STATUS):
                self.request(R.SET_STATUS, vu.build_u64(
                    status & ~(DeviceStatus.DRIVER_OK | DeviceStatus.FAILED)))
                dev = self._u64(self.request(R.GET_STATUS), "GET_STATUS")
                if not dev & DeviceStatus.FEATURES_OK:
                    self.status &= ~DeviceStatus.FEATURES_OK  # refused: reads back without it
                    return
        if new & DeviceStatus.DRIVER_OK:
            self._start()

    def _start(self) -> None:
        """QEMU's vhost_dev_start."""
        assert self._memfd is not None
        self.request(R.SET_MEM_TABLE, vu.build_memory_table(
            [vu.MemoryRegion(0, self.ram_bytes, RAM_UADDR, 0)]), fds=[self._memfd])
        for q in sorted(self._enabled):
            size, desc, avail, used = self._queues[q]
            self.request(R.SET_VRING_NUM, vu.build_vring_state(q, size))
            self.request(R.SET_VRING_BASE, vu.build_vring_state(q, 0))
            self.request(R.SET_VRING_ADDR, vu.build_vring_addr(vu.VringAddr(
                q, 0, RAM_UADDR + desc, RAM_UADDR + used, RAM_UADDR + avail, 0)))
            kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.kick_fds[q], self.call_fds[q] = kick, call
            self.request(R.SET_VRING_KICK, vu.build_vring_file(q), fds=[kick])
            self.request(R.SET_VRING_CALL, vu.build_vring_file(q), fds=[call])
        for q in sorted(self._enabled):
            self.request(R.SET_VRING_ENABLE, vu.build_vring_state(q, 1))
        if self._has(PF.STATUS):
            self.request(R.SET_STATUS, vu.build_u64(self.status))
        self.running = True
        for q in sorted(self._pending_kicks):
            self.notify(q)
        self._pending_kicks.clear()

    def _stop(self) -> None:
        """QEMU's vhost_dev_stop, then the status reset."""
        if self.running:
            for q in sorted(self.kick_fds):
                self.request(R.GET_VRING_BASE, vu.build_vring_state(q, 0))
        if self._has(PF.STATUS) and self.sock is not None:
            self.request(R.SET_STATUS, vu.build_u64(0))
        self.running = False
        self._close_ring_fds()
        self._queues.clear()
        self._enabled.clear()
        self._pending_kicks.clear()
        self.queue_vectors.clear()

    def read_config(self, offset: int, size: int) -> bytes:
        body = self.request(R.GET_CONFIG, vu.build_config(offset, bytes(size)))
        try:
            c = vu.decode_payload(R.GET_CONFIG, body or b"")
        except PeerFault as e:
            raise DeviceFault(f"GET_CONFIG reply unusable: {e}") from None
        if not isinstance(c, vu.ConfigAccess) or len(c.data) != size:
            raise DeviceFault(f"GET_CONFIG [{offset:#x}, +{size}): bad reply")
        return bytes(c.data)

    def write_config(self, offset: int, data: bytes) -> None:
        self.request(R.SET_CONFIG, vu.build_config(offset, bytes(data)))

    def config_generation(self) -> int:
        self.discard_interrupts()  # a config change message moves the generation
        return self.generation

    def num_queues(self) -> int:
        return self._num_vqs if self._num_vqs is not None else len(queue_layout(self.offered))

    def queue_max_size(self, q: int) -> int:
        return self.vq_size if 0 <= q < self.num_queues() else 0

    def setup_queue(self, q: int, size: int, desc: int, avail: int, used: int) -> None:
        if not 0 <= q < self.num_queues():
            raise DeviceFault(f"queue {q} does not exist")
        self._queues[q] = (size, desc, avail, used)
        self.queue_vectors[q] = 1 + q
        while len(self.irq_counts) < 2 + q:
            self.irq_counts.append(0)

    def enable_queue(self, q: int) -> None:
        if q not in self._queues:
            raise DeviceFault(f"queue {q} enabled before it was set up")
        self._enabled.add(q)

    def notify(self, q: int) -> None:
        fd = self.kick_fds.get(q)
        if not self.running or fd is None:
            self._pending_kicks.add(q)
            return
        os.write(fd, (1).to_bytes(8, "little"))

    def reset(self) -> None:
        self.set_status(0)
        self.discard_interrupts()
