"""A small vhost-user front-end for tests: a real socketpair, a memfd as guest RAM, eventfds.

The front-end side plays QEMU: it maps the same memfd the back-end will map, lays the guest's
rings out in it with ``guest_model.vring`` (the driver side, written apart from the device), and
sends vhost-user requests with their fds over ``SCM_RIGHTS``. ``BackendPump`` runs the sans-I/O
session synchronously on the other end of the socketpair, reading exactly as the server does.
"""
from __future__ import annotations

import array
import mmap
import os
import select
import socket
import struct
from dataclasses import dataclass

from balloon_dev.device import BalloonDevice, DeviceConfig
from balloon_dev.effects import Effect
from balloon_dev.transport.core import Outcome
from balloon_dev.transport.vhost_user import VhostUserSession
from guest_model.vring import DriverArea, DriverVring
from guestmem import GuestMemory
from protocol import vhost_user as vu
from protocol.virtio import DeviceStatus
from tests.fdutil import eventfd, eventfd_count

R = vu.VhostUserRequest
PF = vu.VhostUserProtocolFeature

RAM_GPA = 0x0
RAM_SIZE = 4 << 20
#: Where the "front-end process" pretends to have mapped guest RAM (any value; translation test).
RAM_UADDR = 0x7F12_3450_0000
#: The driver area inside RAM where rings and driver buffers live.
AREA_GPA = 0x100000
AREA_SIZE = 1 << 20

POISON = 0xAAAAAAAA
STATUS_ALL = int(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
                 | DeviceStatus.DRIVER_OK)


def recv_message_sync(sock: socket.socket) -> vu.Message:
    """Read one framed message (blocking), as the server's ``read_message`` does."""
    fds: list[int] = []

    def exact(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            data, anc, _flags, _ = sock.recvmsg(n - len(buf), socket.CMSG_SPACE(8 * 4))
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(cdata[:len(cdata) - len(cdata) % 4])
                    fds.extend(a)
            if not data:
                raise EOFError
            buf += data
        return bytes(buf)

    h = vu.parse_header(exact(vu.HEADER_SIZE))
    payload = exact(h.size) if h.size else b""
    return vu.Message(h, payload, tuple(fds))


def perform(outcome: Outcome) -> list[Effect]:
    """What the server does with an outcome's interrupts (call eventfds written); the host
    effects are returned."""
    for sig in outcome.signals:
        os.write(sig.fd, struct.pack("=Q", 1))
    return list(outcome.effects)


class BackendPump:
    """Runs a ``VhostUserSession`` on the back-end end of the socketpair, one message per call."""

    def __init__(self, sock: socket.socket, session: VhostUserSession) -> None:
        self.sock = sock
        self.session = session
        self.effects: list[Effect] = []
        self.last: Outcome | None = None

    def pump(self) -> Outcome:
        msg = recv_message_sync(self.sock)
        res = self.session.handle(msg)
        self.effects += perform(res)
        if res.reply is not None:
            self.sock.sendall(res.reply)
        self.last = res
        return res


@dataclass
class Reply:
    request: int
    flags: int
    payload: bytes

    @property
    def u64(self) -> int:
        assert len(self.payload) == 8, self.payload
        return struct.unpack("=Q", self.payload)[0]


class Frontend:
    """The QEMU side. ``fe.mem`` is the guest's view of RAM (same memfd as the back-end's)."""

    def __init__(self, dev_cfg: DeviceConfig | None = None, *,
                 protocol_features: int | None = None, connect: str | None = None) -> None:
        """With ``connect``, talk to a server at that unix socket path (no session here);
        otherwise own a socketpair and run a session on its other end."""
        self.memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, RAM_SIZE)
        self.mm = mmap.mmap(self.memfd, RAM_SIZE)
        self.mem = GuestMemory()
        self.mem.add_region(RAM_GPA, self.mm, name="ram")
        self.area = DriverArea(self.mem, AREA_GPA, AREA_SIZE)
        self.kick: dict[int, int] = {}
        self.call: dict[int, int] = {}
        self.vrings: dict[int, DriverVring] = {}
        self.channel: socket.socket | None = None
        self.backend: BackendPump | None = None
        if connect is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(connect)
            self.backend_sock = None
            return
        self.sock, self.backend_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The back-end: its own GuestMemory (empty until SET_MEM_TABLE) and the real device.
        self.be_mem = GuestMemory()
        self.dev = BalloonDevice(self.be_mem, dev_cfg)
        kw = {} if protocol_features is None else {"protocol_features": protocol_features}
        self.session = VhostUserSession(self.dev, self.be_mem, **kw)
        self.backend = BackendPump(self.backend_sock, self.session)

    def close(self) -> None:
        if self.backend is not None:
            self.session.close()
        for fd in list(self.kick.values()) + list(self.call.values()):
            os.close(fd)
        self.kick.clear()
        self.call.clear()
        self.sock.close()
        if self.backend_sock is not None:
            self.backend_sock.close()
        if self.channel is not None:
            self.channel.close()
        os.close(self.memfd)

    # -- raw messaging ---------------------------------------------------------------------
    def send_raw(self, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def send(self, req: int, payload: bytes = b"", fds: tuple[int, ...] | list[int] = (), *,
             need_reply: bool = False) -> None:
        self.send_raw(vu.build_request(req, payload, need_reply=need_reply), fds)

    def reply_pending(self) -> bool:
        return bool(select.select([self.sock], [], [], 0)[0])

    def recv_reply(self) -> Reply:
        h = vu.parse_header(self._exact(vu.HEADER_SIZE))
        return Reply(h.request, h.flags, self._exact(h.size) if h.size else b"")

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            d = self.sock.recv(n - len(buf))
            assert d, "back-end closed"
            buf += d
        return buf

    def request(self, req: int, payload: bytes = b"", fds: tuple[int, ...] | list[int] = (), *,
                need_reply: bool = False) -> Reply | None:
        """Send, let the back-end handle it, and return its reply (None if it sent none)."""
        self.send(req, payload, fds, need_reply=need_reply)
        if self.backend is None:
            # A real server: read a reply exactly when one is due.
            due = req in vu.REPLY_REQUESTS or need_reply
            return self.recv_reply() if due else None
        self.backend.pump()
        return self.recv_reply() if self.reply_pending() else None

    # -- QEMU-like sequences ---------------------------------------------------------------
    def init(self) -> None:
        """vhost_dev_init: features, protocol features, back-end channel, owner."""
        feats = self.request(R.GET_FEATURES)
        assert feats is not None
        self.offered = feats.u64
        pf = self.request(R.GET_PROTOCOL_FEATURES)
        assert pf is not None
        self.request(R.SET_PROTOCOL_FEATURES, vu.build_u64(pf.u64))
        self.channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        r = self.request(R.SET_BACKEND_REQ_FD, fds=[theirs.fileno()], need_reply=True)
        theirs.close()
        assert r is not None and r.u64 == 0
        self.request(R.SET_OWNER)

    def setup_ring(self, q: int, num: int, *, event_idx: bool = True) -> DriverVring:
        desc = self.area.alloc(16 * num, 16)
        avail = self.area.alloc(6 + 2 * num, 2)
        used = self.area.alloc(6 + 8 * num, 4)
        vr = DriverVring(self.mem, num, desc, avail, used, event_idx=event_idx, area=self.area,
                         name=f"q{q}")
        self.vrings[q] = vr
        return vr

    def uaddr(self, gpa: int) -> int:
        return RAM_UADDR + (gpa - RAM_GPA)

    def mem_table(self) -> bytes:
        return vu.build_memory_table([vu.MemoryRegion(RAM_GPA, RAM_SIZE, RAM_UADDR, 0)])

    def start(self, features: int | None = None, queues: tuple[int, ...] = (0, 1, 2, 3),
              num: int = 128, enable: tuple[int, ...] | None = None,
              driver_ok: bool = True, bases: list[int] | None = None) -> None:
        """vhost_dev_start as QEMU 11.1's generic front-end does it (STATUS negotiated): it
        sends FEATURES_OK but never DRIVER_OK; ``driver_ok`` adds the final SET_STATUS a
        front-end that gates nothing would send. ``bases`` given: the guest's rings are kept and
        restarted at those bases (QEMU after a VM stop/cont); else fresh rings at base 0."""
        f = self.offered if features is None else features
        if bases is None:
            # Linux writes poison_val (0xAAAAAAAA when it poisons freed pages) before DRIVER_OK;
            # QEMU forwards the whole config window it caches (protocol.md 3.6).
            self.request(R.SET_CONFIG, vu.build_config(0, struct.pack("<4I", 0, 0, 0, POISON)))
        self.request(R.SET_FEATURES, vu.build_u64(f))
        st = self.request(R.GET_STATUS)
        assert st is not None
        self.request(R.SET_STATUS, vu.build_u64(st.u64 | int(DeviceStatus.FEATURES_OK)))
        self.request(R.SET_MEM_TABLE, self.mem_table(), fds=[self.memfd])
        for i, q in enumerate(queues):
            vr = self.setup_ring(q, num) if bases is None else self.vrings[q]
            self.request(R.SET_VRING_NUM, vu.build_vring_state(q, vr.size))
            base = 0 if bases is None else bases[i]
            self.request(R.SET_VRING_BASE, vu.build_vring_state(q, base))
            self.request(R.SET_VRING_ADDR, vu.build_vring_addr(vu.VringAddr(
                q, 0, self.uaddr(vr.desc_gpa), self.uaddr(vr.used_gpa), self.uaddr(vr.avail_gpa),
                0)))
            self.kick[q] = eventfd()
            self.call[q] = eventfd()
            self.request(R.SET_VRING_KICK, vu.build_vring_file(q), fds=[self.kick[q]])
            self.request(R.SET_VRING_CALL, vu.build_vring_file(q), fds=[self.call[q]])
        for q in queues if enable is None else enable:
            r = self.request(R.SET_VRING_ENABLE, vu.build_vring_state(q, 1), need_reply=True)
            assert r is not None and r.u64 == 0
        if driver_ok:
            st = self.request(R.GET_STATUS)
            assert st is not None
            self.request(R.SET_STATUS, vu.build_u64(st.u64 | STATUS_ALL))

    def stop(self, queues: tuple[int, ...] = (0, 1, 2, 3)) -> list[int]:
        """vhost_dev_stop: GET_VRING_BASE on every ring (QEMU 11.1 sends no SET_STATUS 0)."""
        bases = []
        for q in queues:
            r = self.request(R.GET_VRING_BASE, vu.build_vring_state(q, 0))
            assert r is not None
            st = vu.decode_payload(R.GET_VRING_BASE, r.payload)
            assert isinstance(st, vu.VringState)
            bases.append(st.num)
            os.close(self.kick.pop(q))
            os.close(self.call.pop(q))
        return bases

    def get_config(self, offset: int = 0, size: int = 16) -> bytes:
        r = self.request(R.GET_CONFIG, vu.build_config(offset, bytes(size)))
        assert r is not None
        c = vu.decode_payload(R.GET_CONFIG, r.payload)
        assert isinstance(c, vu.ConfigAccess)
        return c.data

    def add_u32(self, vr: DriverVring, value: int) -> None:
        """Post a 4-byte driver buffer holding ``value`` on ``vr`` (a pfn on the inflate or
        deflate queue, a cmd id on the free page queue)."""
        buf = self.area.alloc(4)
        self.mem.write_u32(buf, value)
        vr.add_buf(out=[(buf, 4)])

    def kick_ring(self, q: int) -> list[Effect]:
        """The guest kicks ring q; the back-end (as its server would) drains and handles it."""
        os.write(self.kick[q], struct.pack("=Q", 1))
        if self.backend is None:
            return []  # the server's watcher reads the eventfd
        assert eventfd_count(self.kick[q]) == 1  # what the server's watcher does
        return perform(self.session.kick(q))
