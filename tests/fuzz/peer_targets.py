"""Fuzz targets for the socket peers' messages: the vfio-user and vhost-user sessions.

Each input is a program of messages handed to a fresh session (``handle(Message)``, the entry
point the trio servers call with what they framed off the socket): a record picks the command,
flags, fds of some kind (eventfd, memfd, pipe, /dev/null) and a payload; a few records instead
scribble on guest RAM or kick a ring, so a session that set up rings over fuzzed memory runs
the device on it. A vfio-user record may also give a raw 16-byte header, which
``decode_header`` must accept or refuse with ``FramingLost`` (the server then closes).

The invariant: a view the device asks for outside guest memory (refused there) comes with a
counted fault; every message gets exactly the answer its flags call for (vfio-user: one reply
echoing the msg_id, none for NO_REPLY or a reply; vhost-user: one for a request QEMU waits on
and for NEED_REPLY once REPLY_ACK is negotiated), the session counts no internal error and logs
none, every eventfd it signals is still open, and once the session is closed the process holds
no more fds than before the input (the session owns the fds of every message it was handed).
"""
from __future__ import annotations

import errno as _errno
import gc
import os
from typing import Any

from tests.fuzz.targets import ErrorLogs, Reader, fd_count, target

PEER_RAM = 1 << 16


def _watched_memory() -> Any:
    """Guest memory recording every view asked for outside its regions (it refuses them with
    ``GuestMemoryError``): after a message that caused one, a fault must have been counted."""
    from guestmem import GuestMemory

    class Watched(GuestMemory):
        outside = 0

        def view(self, gpa: int, length: int, *, writable: bool = False) -> Any:
            if not self.contains(gpa, length):
                self.outside += 1
            return super().view(gpa, length, writable=writable)

    return Watched()


def _faults(*counters: Any) -> int:
    return sum(sum(c.values()) for c in counters)


def _fds(r: Reader) -> list[int]:
    out: list[int] = []
    for _ in range(r.u8() % 4):
        kind = r.u8() % 5
        if kind == 0:
            out.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        elif kind == 1:
            fd = os.memfd_create("fuzz", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, PEER_RAM)
            out.append(fd)
        elif kind == 2:
            rd, wr = os.pipe()
            os.close(wr)
            out.append(rd)
        elif kind == 3:
            out.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        else:
            fd = os.memfd_create("fuzz-small", os.MFD_CLOEXEC)
            os.ftruncate(fd, 4096)  # smaller than what a table will claim
            out.append(fd)
    return out


def _close_check(session: Any, before: int, ram_fd: int) -> None:
    session.close()
    os.close(ram_fd)
    if fd_count() > before:
        gc.collect()  # an mmap a view still pinned goes with its last view
    after = fd_count()
    assert after <= before, f"fd leak: {before} fds before the session, {after} after close"


def _signals_open(outcome: Any) -> None:
    for s in outcome.signals:
        try:
            os.fstat(s.fd)
        except OSError as e:
            raise AssertionError(f"signal to a closed fd {s.fd} ({s.what})") from e


# -- vfio-user --------------------------------------------------------------------------------
@target
def vfio_user(data: bytes) -> None:
    from balloon_dev.device import BalloonDevice
    from balloon_dev.transport.vfio_user import VfioUserSession
    from balloon_dev.transport.virtio_pci import VirtioPciFunction
    from protocol import vfio_user as vu

    before = fd_count()
    mem = _watched_memory()
    dev = BalloonDevice(mem)
    session = VfioUserSession(VirtioPciFunction(dev, msix_vectors=2), mem)
    ram_fd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(ram_fd, PEER_RAM)
    commands = [int(c) for c in vu.Command]
    flag_choices = [0, 0, 0, vu.VFIO_USER_F_NO_REPLY, vu.VFIO_USER_F_TYPE_REPLY,
                    vu.VFIO_USER_F_ERROR]

    def send(msg_id: int, cmd: int, payload: bytes, fds: list[int], flags: int = 0) -> Any:
        raw = vu.encode_request(msg_id, cmd, payload, flags=flags)
        return session.handle(vu.Message(vu.decode_header(raw[:vu.HEADER_SIZE]),
                                         raw[vu.HEADER_SIZE:], tuple(fds)))

    r = Reader(data)
    with ErrorLogs():
        # Most programs start as QEMU does: VERSION, then guest RAM at gpa 0.
        if r.u8() % 4:
            send(0, vu.Command.VERSION, vu.build_version(0, 0, {"max_msg_fds": 8}), [])
            flags = vu.VFIO_DMA_MAP_FLAG_READ | vu.VFIO_DMA_MAP_FLAG_WRITE
            send(1, vu.Command.DMA_MAP, vu.build_dma_map(flags, 0, 0, PEER_RAM),
                 [os.dup(ram_fd)])
        steps = 0
        while r.more() and steps < 24:
            steps += 1
            op = r.u8() % 8
            if op == 0:  # the guest writes its RAM (rings, buffers)
                os.pwrite(ram_fd, r.bytes(r.u8() % 48), r.u16() % PEER_RAM)
                continue
            msg_id = r.u16()
            outside, faults = mem.outside, _faults(session.counters, dev.counters)
            if op == 1:  # a header straight from the input: framing must hold or be refused
                raw = r.bytes(vu.HEADER_SIZE)
                try:
                    header = vu.decode_header(raw)
                except vu.FramingLost:
                    continue
                payload = r.bytes(min(header.size - vu.HEADER_SIZE, 256))
                out = session.handle(vu.Message(header, payload, tuple(_fds(r))))
            else:
                cmd = commands[r.u8() % len(commands)] if op != 2 else r.u16()
                flags = flag_choices[r.u8() % len(flag_choices)]
                payload = r.bytes(r.u16() % 300)
                fds = _fds(r)
                raw = vu.encode_request(msg_id, cmd, payload, flags=flags)
                header = vu.decode_header(raw[:vu.HEADER_SIZE])
                out = session.handle(vu.Message(header, payload, tuple(fds)))
            _signals_open(out)
            assert mem.outside == outside or _faults(session.counters, dev.counters) > faults, (
                "a view outside guest memory without a counted fault")
            silent = header.no_reply or header.is_reply
            assert (out.reply is None) == silent, (header, out.reply)
            if out.reply is not None:
                rh = vu.decode_header(out.reply[:vu.HEADER_SIZE])
                assert rh.msg_id == header.msg_id and rh.command == header.command
                assert rh.is_reply and rh.size == len(out.reply)
                assert not rh.flags & vu.VFIO_USER_F_ERROR or rh.error != _errno.EIO, (
                    "EIO: the session hit an internal error")
        assert not session.counters.get("internal_errors"), session.counters
    _close_check(session, before, ram_fd)


# -- vhost-user -------------------------------------------------------------------------------
@target
def vhost_user(data: bytes) -> None:
    from balloon_dev.device import BalloonDevice
    from balloon_dev.transport.vhost_user import VhostUserSession
    from protocol import vhost_user as vu

    before = fd_count()
    mem = _watched_memory()
    dev = BalloonDevice(mem)
    session = VhostUserSession(dev, mem)
    ram_fd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(ram_fd, PEER_RAM)
    R = vu.VhostUserRequest
    requests = [int(x) for x in R]
    uaddr = 0x7F00_0000_0000
    flag_choices = [vu.VHOST_USER_VERSION, vu.VHOST_USER_VERSION,
                    vu.VHOST_USER_VERSION | vu.VHOST_USER_NEED_REPLY_MASK,
                    vu.VHOST_USER_VERSION | vu.VHOST_USER_REPLY_MASK, 0]

    def send(req: int, payload: bytes, fds: tuple[int, ...] = (),
             flags: int = vu.VHOST_USER_VERSION) -> Any:
        return session.handle(vu.Message(vu.Header(req, flags, len(payload)), payload, fds))

    r = Reader(data)
    with ErrorLogs():
        if r.u8() % 4:  # QEMU's start: REPLY_ACK, guest RAM, features
            send(R.SET_PROTOCOL_FEATURES,
                 vu.build_u64(1 << vu.VhostUserProtocolFeature.REPLY_ACK))
            table = vu.build_memory_table([vu.MemoryRegion(0, PEER_RAM, uaddr, 0)])
            send(R.SET_MEM_TABLE, table, (os.dup(ram_fd),))
            send(R.SET_FEATURES, vu.build_u64(session.dev.device_features))
        steps = 0
        while r.more() and steps < 24:
            steps += 1
            op = r.u8() % 8
            if op == 0:
                os.pwrite(ram_fd, r.bytes(r.u8() % 48), r.u16() % PEER_RAM)
                continue
            if op == 1:
                for q in range(4):
                    outside, faults = mem.outside, _faults(session.counters, dev.counters)
                    _signals_open(session.kick(q))
                    assert mem.outside == outside or _faults(
                        session.counters, dev.counters) > faults, (
                        "a kick read outside guest memory without a counted fault")
                continue
            if op == 2:  # a ring handed over inside RAM, as QEMU does before starting it
                q, num = r.u8() % 5, (2, 8, 64, 256)[r.u8() % 4]
                d, a, u = (uaddr + 16 * (r.u16() % (PEER_RAM // 16)) for _ in range(3))
                send(R.SET_VRING_NUM, vu.build_vring_state(q, num))
                send(R.SET_VRING_ADDR, vu.build_vring_addr(vu.VringAddr(q, 0, d, u, a, 0)))
                send(R.SET_VRING_KICK, vu.build_vring_file(q),
                     (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),))
                send(R.SET_VRING_CALL, vu.build_vring_file(q),
                     (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),))
                send(R.SET_VRING_ENABLE, vu.build_vring_state(q, 1))
                continue
            req = requests[r.u8() % len(requests)] if op != 3 else r.u8()
            flags = flag_choices[r.u8() % len(flag_choices)]
            payload = r.bytes(r.u16() % 200)
            outside, faults = mem.outside, _faults(session.counters, dev.counters)
            out = send(req, payload, tuple(_fds(r)), flags)
            _signals_open(out)
            assert mem.outside == outside or _faults(session.counters, dev.counters) > faults, (
                "a view outside guest memory without a counted fault")
            # A request QEMU waits on is answered even when refused (an empty reply fails it
            # without leaving QEMU blocked), a reply flag or not.
            due = req in vu.REPLY_REQUESTS or bool(
                flags & vu.VHOST_USER_NEED_REPLY_MASK and session.has_protocol_feature(
                    vu.VhostUserProtocolFeature.REPLY_ACK))
            assert (out.reply is not None) == due, (req, flags, out.reply)
            if out.reply is not None:
                h = vu.parse_header(out.reply[:vu.HEADER_SIZE])
                assert h.request == req, (req, h)
        assert not session.counters.get("internal_errors"), session.counters
    _close_check(session, before, ram_fd)
