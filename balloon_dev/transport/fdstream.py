"""A unix stream socket that carries fds: exact reads with their ``SCM_RIGHTS`` fds, full sends.

Theory of operation: both device servers read a message as a fixed-size header and then its
payload, and fds may arrive with any of those bytes. ``FdStream.recv_exact(n, fds)`` reads
exactly ``n`` bytes with ``recvmsg``, appending every fd that arrives to ``fds`` (the caller owns
them from then on, also when the read fails). More fds than ``max_fds`` make the kernel drop the
rest (``MSG_CTRUNC``): the stream records that in ``truncated`` and the server applies the one
policy of ``balloon_dev.transport.connection`` (the message is refused, the connection stays).
The end of the stream, or a socket error, is ``PeerClosed``; ``send_all`` raises it too when the
peer has gone.

``close_quietly(fd)`` is the one fd-closing helper of the transports: an fd the peer (or an
earlier error path) already made invalid is no error. ``received_fds(ancillary)`` takes the fds
out of what ``recvmsg`` returned.

File descriptors are the resource a peer can exhaust (every connection, every fd it sends and
every guest-RAM mapping costs one: Python's ``mmap`` keeps a dup of the file's fd).
``FD_GAUGE`` counts the process's open fds (``/proc/self/fd``) against its soft RLIMIT_NOFILE:
``headroom()`` is what a transport checks before it takes another fd for a peer, and
``snapshot()`` (open, the peak of every sample taken, limit) goes into ``stats``.
"""
from __future__ import annotations

import array
import errno as _errno
import os
import resource
import socket

import trio

from protocol.errors import PeerFault

_FD_SIZE = array.array("i").itemsize


class PeerClosed(PeerFault):
    """The peer closed the stream (``mid_message``: inside a message) or the socket failed.

    A peer fault only when ``mid_message``; a peer leaving between messages is the normal end
    of a connection, and the servers count neither as a peer error."""

    def __init__(self, message: str, *, mid_message: bool = False) -> None:
        super().__init__(message, errno=_errno.ECONNRESET, counter="peer_closed")
        self.mid_message = mid_message


def close_quietly(fd: int) -> None:
    """Close ``fd``, ignoring an error (EBADF: already closed; nothing to do about EIO here)."""
    try:
        os.close(fd)
    except OSError:
        pass


def close_all(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        close_quietly(fd)


def received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds of the SCM_RIGHTS control messages in ``recvmsg``'s ancillary data (a partial
    trailing int, as a truncated buffer can leave, is ignored)."""
    fds: list[int] = []
    for level, typ, cdata in ancillary:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(cdata[:len(cdata) - len(cdata) % got.itemsize])
            fds.extend(got)
    return fds


class FdStream:
    """One connected unix stream socket (trio); ``max_fds`` per message are received."""

    def __init__(self, sock: trio.socket.SocketType, max_fds: int) -> None:
        self.sock = sock
        self.max_fds = max_fds
        self._anc_size = socket.CMSG_SPACE(max_fds * _FD_SIZE)
        self.truncated = False  # fds were dropped since the last ``start_message``

    def start_message(self) -> None:
        self.truncated = False

    async def recv_exact(self, n: int, fds: list[int], *, first: bool = False) -> bytes:
        """Exactly ``n`` bytes; fds that arrive go to ``fds``. ``first``: the start of a
        message, where the end of the stream is a clean close."""
        buf = bytearray()
        while len(buf) < n:
            try:
                data, anc, flags, _ = await self.sock.recvmsg(n - len(buf), self._anc_size)
            except OSError as e:
                raise PeerClosed(f"recv failed: {e}", mid_message=bool(buf) or not first) \
                    from None
            fds.extend(received_fds(anc))
            if flags & socket.MSG_CTRUNC:
                self.truncated = True
            if not data:
                if buf or not first:
                    raise PeerClosed(f"EOF inside a message ({len(buf)} of {n} bytes)",
                                     mid_message=True)
                raise PeerClosed("EOF")
            buf += data
        return bytes(buf)

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                n = await self.sock.send(view)
                view = view[n:]
        except OSError as e:
            raise PeerClosed(f"send failed: {e}") from None


class FdGauge:
    """Open fds of this process, their sampled peak, and the soft RLIMIT_NOFILE."""

    def __init__(self) -> None:
        self.peak = 0

    @staticmethod
    def limit() -> int:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return soft if soft != resource.RLIM_INFINITY else 1 << 20

    def sample(self) -> int:
        """Open fds now (the listing's own fd not counted); updates ``peak``."""
        try:
            n = len(os.listdir("/proc/self/fd")) - 1
        except OSError:  # no /proc, or no fd left to list it with
            return self.peak
        self.peak = max(self.peak, n)
        return n

    def headroom(self) -> int:
        """How many more fds the process may open."""
        return self.limit() - self.sample()

    def snapshot(self) -> dict[str, int]:
        return {"open": self.sample(), "peak": self.peak, "limit": self.limit()}


#: The process's one gauge (fds are per process, whichever server takes them).
FD_GAUGE = FdGauge()
