"""A thin trio server that serves the balloon device to one vhost-user front-end at a time.

Theory of operation: the server owns the I/O, ``VhostUserSession`` owns the meaning. It listens on
a unix socket (created mode 0600 inside a folder the user chose), accepts one front-end, and runs
three kinds of task for it:

* the reader: reads a 12-byte header (with any ``SCM_RIGHTS`` fds), then the payload, hands the
  ``Message`` to the session, re-synchronises the kick watchers with the session's started
  rings, performs the effects, and only then sends the reply (so a front-end waiting for it sees
  the change done). A framing error or EOF ends the connection.
* one kick watcher per started ring: waits until the ring's kick eventfd is readable
  (``trio.lowlevel.wait_readable``), drains it and calls ``session.kick(q)``. A watcher waits on
  its own ``dup`` of the eventfd, so the session may close or replace the original at any time;
  the server cancels the watcher and closes the dup (after ``notify_closing``) when the ring stops.
* host requests: ``host_call(fn)`` (used by ``balloon_dev.control.HostControl`` through the
  control socket) runs ``fn(dev)`` synchronously in the trio thread between two messages, so the
  device is only ever touched by one task at a time (trio is single-threaded and no device call
  awaits), performs the guest-facing effects and returns the host effects.

Effects: ``NotifyQueue(q)`` writes 1 to ring q's call eventfd; ``ConfigChanged`` sends
CONFIG_CHANGE_MSG on the back-end channel (the front-end then injects the guest's config
interrupt). The back-end channel is a blocking socket with a short timeout: the message is 12
bytes and QEMU reads the channel from its main loop, so a send only waits if QEMU is stuck, and
then gives up (counted) rather than stalling the device for long. Host effects (hints,
inflations, statistics, ...) caused by the guest go to ``on_effects``; those caused by a
``host_call`` are its return value (the caller forwards them, as ``HostControl`` does).

When the front-end leaves, the session releases its fds and mappings and resets the device; the
next front-end finds a freshly reset device. A second front-end that connects while one is served
is refused (closed at once) and counted.
"""
from __future__ import annotations

import array
import logging
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from balloon_dev.effects import ConfigChanged, Effect, NotifyQueue
from balloon_dev.transport.memfd import close_quietly, received_fds
from balloon_dev.transport.unixsock import listen_private, unlink_quietly
from balloon_dev.transport.vhost_user import (
    DEFAULT_PROTOCOL_FEATURES,
    BalloonDeviceLike,
    VhostUserSession,
)
from guestmem import GuestMemory
from protocol.vhost_user import (
    HEADER_SIZE,
    VHOST_USER_MAX_FDS,
    Message,
    VhostUserFramingError,
    parse_header,
)

log = logging.getLogger(__name__)

_FD_SIZE = array.array("i").itemsize
_EVENTFD_ONE = struct.pack("=Q", 1)

class PeerClosed(Exception):
    """The front-end closed the connection (possibly in the middle of a message)."""


async def _recv_exact(sock: trio.socket.SocketType, n: int, fds: list[int]) -> bytes:
    """Read exactly ``n`` bytes, collecting any fds that arrive with them into ``fds``."""
    buf = bytearray()
    while len(buf) < n:
        data, anc, flags, _ = await sock.recvmsg(
            n - len(buf), socket.CMSG_SPACE(VHOST_USER_MAX_FDS * _FD_SIZE))
        fds.extend(received_fds(anc))
        if flags & socket.MSG_CTRUNC:
            # More fds than any message may carry: those past the buffer are lost to us and the
            # peer is misbehaving; what did arrive is closed by the caller.
            raise VhostUserFramingError(f"more than {VHOST_USER_MAX_FDS} fds on one message")
        if not data:
            raise PeerClosed(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


async def read_message(sock: trio.socket.SocketType) -> Message:
    """Read one framed message. Raises ``VhostUserFramingError`` or ``PeerClosed``."""
    fds: list[int] = []
    try:
        header = parse_header(await _recv_exact(sock, HEADER_SIZE, fds))
        payload = await _recv_exact(sock, header.size, fds) if header.size else b""
    except BaseException:
        for fd in fds:
            close_quietly(fd)
        raise
    return Message(header, payload, tuple(fds))


class VhostUserServer:
    """Serves ``dev`` (whose guest memory is ``mem``) at unix socket ``path``."""

    def __init__(self, dev: BalloonDeviceLike, mem: GuestMemory, path: str | os.PathLike[str], *,
                 on_effects: Callable[[list[Effect]], None] | None = None,
                 protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
                 backend_timeout: float = 2.0) -> None:
        self.dev = dev
        self.mem = mem
        self.path = Path(path)
        self.on_effects = on_effects
        self.session = VhostUserSession(dev, mem, protocol_features=protocol_features)
        self.counters: Counter[str] = Counter()
        self.connections = 0
        self.backend_timeout = backend_timeout
        self._busy = False
        self._backend_sock: socket.socket | None = None
        self._backend_fd: int | None = None
        self._watchers: dict[int, tuple[int, int, trio.CancelScope]] = {}  # q -> (fd, dup, scope)

    # -- host side --------------------------------------------------------------------------
    def host_call(self, fn: Callable[[Any], list[Effect]]) -> list[Effect]:
        """Run a host request ``fn(dev) -> effects`` (e.g. ``lambda d: d.free_page_start()``)
        now, deliver its guest-facing effects, and return its host effects."""
        return self._perform(list(fn(self.dev)))

    def stats(self) -> dict[str, Any]:
        return {
            "transport": "vhost-user",
            "server_counters": dict(self.counters),
            "connections": self.connections,
            "session_counters": dict(self.session.counters),
            "memory_regions": [[r.gpa, r.size] for r in self.mem.regions],
            "live": self.session.live,
        }

    # -- serving ----------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve front-ends one at a time until cancelled."""
        # Mode 0600, a stale socket replaced, FileExistsError for any other file in the way
        # (one helper with the vfio-user server). Backlog 1: one front-end is served at a time.
        lsock = trio.socket.from_stdlib_socket(listen_private(self.path, 1))
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self.path)
                while True:
                    conn, _ = await lsock.accept()
                    if self._busy:
                        self.counters["refused_second_frontend"] += 1
                        log.warning("vhost-user: refusing a second front-end while one is served")
                        conn.close()
                        continue
                    self._busy = True
                    nursery.start_soon(self._connection, conn)
        finally:
            lsock.close()
            unlink_quietly(self.path)

    async def _connection(self, conn: trio.socket.SocketType) -> None:
        self.connections += 1
        try:
            async with trio.open_nursery() as nursery:
                await self._read_loop(conn, nursery)
                nursery.cancel_scope.cancel()
        except Exception:  # noqa: BLE001 - one front-end's trouble must not end the server
            self.counters["internal_errors"] += 1
            log.exception("vhost-user: connection ended by an internal error")
        finally:
            self._stop_all_watchers()
            # The device is reset before the mappings go (inside session.close), so nothing
            # touches unmapped memory, and the next front-end finds a device fresh from reset.
            # No guest to interrupt any more: only the host hears about the reset's effects.
            try:
                self._deliver_host(self.session.close(), guest=False)
            except Exception:  # noqa: BLE001 - raised here it would end the whole server
                self.counters["internal_errors"] += 1
                log.exception("vhost-user: internal error while closing the connection")
            self._close_backend()
            conn.close()
            self._busy = False
            log.info("vhost-user: front-end left; device reset")

    async def _read_loop(self, conn: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            try:
                msg = await read_message(conn)
            except PeerClosed:
                return
            except VhostUserFramingError as e:
                self.counters["framing_errors"] += 1
                log.warning("vhost-user: framing lost, closing the connection: %s", e)
                return
            except OSError as e:
                self.counters["socket_errors"] += 1
                log.warning("vhost-user: socket error, closing the connection: %s", e)
                return
            self.counters["messages"] += 1
            result = self.session.handle(msg)
            # Watchers and channel follow the session before the reply goes out: a front-end
            # that waits for the reply (NEED_REPLY) may rely on the change having happened, e.g.
            # that a replaced kick fd is no longer read.
            self._sync_watchers(nursery)
            self._sync_backend()
            self._deliver_host(list(result.effects))
            if result.reply is not None:
                try:
                    await _send_all(conn, result.reply)
                except OSError as e:
                    log.warning("vhost-user: cannot send a reply: %s", e)
                    return
            if result.close:
                return

    # -- kick watchers ----------------------------------------------------------------------
    def _sync_watchers(self, nursery: trio.Nursery) -> None:
        want = self.session.kick_fds()
        for q in list(self._watchers):
            fd, _dup, _scope = self._watchers[q]
            if want.get(q) != fd:
                self._stop_watcher(q)
        for q, fd in want.items():
            if q not in self._watchers:
                try:
                    dup = os.dup(fd)
                    os.set_blocking(dup, False)
                except OSError as e:
                    log.warning("vhost-user: cannot watch kick fd of ring %d: %s", q, e)
                    continue
                scope = trio.CancelScope()
                self._watchers[q] = (fd, dup, scope)
                nursery.start_soon(self._watch_kick, q, dup, scope)

    def _stop_watcher(self, q: int) -> None:
        _fd, dup, scope = self._watchers.pop(q)
        scope.cancel()
        trio.lowlevel.notify_closing(dup)
        close_quietly(dup)

    def _stop_all_watchers(self) -> None:
        for q in list(self._watchers):
            self._stop_watcher(q)

    async def _watch_kick(self, q: int, fd: int, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                try:
                    await trio.lowlevel.wait_readable(fd)
                except (trio.ClosedResourceError, OSError):
                    return
                try:
                    drained = os.read(fd, 8)  # drain the eventfd counter
                except BlockingIOError:
                    continue
                except OSError as e:
                    log.warning("vhost-user: kick fd of ring %d failed: %s", q, e)
                    return
                if not drained:
                    # Not an eventfd: a pipe or socket at EOF is readable forever and would
                    # spin this loop (and the server's only thread). Stop watching it; a new
                    # SET_VRING_KICK starts a new watcher.
                    self.counters["kick_fd_eof"] += 1
                    log.warning("vhost-user: kick fd of ring %d is at EOF (not an eventfd); "
                                "no longer watched", q)
                    return
                self.counters["kicks"] += 1
                try:
                    effects = self.session.kick(q)
                except Exception:  # noqa: BLE001 - a bug of ours must not end the server
                    self.counters["internal_errors"] += 1
                    log.exception("vhost-user: internal error on a kick of ring %d", q)
                    continue
                self._deliver_host(effects)

    # -- effects ----------------------------------------------------------------------------
    def _deliver_host(self, effects: list[Effect], guest: bool = True) -> list[Effect]:
        host: list[Effect] = self._perform(effects) if guest else [
            e for e in effects if not isinstance(e, (NotifyQueue, ConfigChanged))]
        if host and self.on_effects is not None:
            self.on_effects(host)
        return host

    def _perform(self, effects: list[Effect]) -> list[Effect]:
        """Deliver the guest-facing effects; return the host ones, in order."""
        host: list[Effect] = []
        for eff in effects:
            if isinstance(eff, NotifyQueue):
                self._signal_call(eff.queue)
            elif isinstance(eff, ConfigChanged):
                self._send_config_change()
            else:
                host.append(eff)
        return host

    def _signal_call(self, q: int) -> None:
        fd = self.session.call_fd(q)
        if fd is None:
            self.counters["notify_without_call_fd"] += 1
            return
        try:
            os.write(fd, _EVENTFD_ONE)
            self.counters["calls"] += 1
        except BlockingIOError:
            pass  # counter saturated: the front-end has an interrupt pending anyway
        except OSError as e:
            self.counters["call_errors"] += 1
            log.warning("vhost-user: call eventfd of ring %d failed: %s", q, e)

    def _sync_backend(self) -> None:
        fd = self.session.backend_fd
        if fd == self._backend_fd:
            return
        self._close_backend()
        if fd is not None:
            # Tried once per fd: an unusable one is remembered, not retried on every message.
            self._backend_fd = fd
            dup = -1
            try:
                dup = os.dup(fd)
                s = socket.socket(fileno=dup)
            except OSError as e:
                # Not a socket (ENOTSOCK): socket() does not take ownership of the dup.
                if dup >= 0:
                    close_quietly(dup)
                self.counters["backend_fd_unusable"] += 1
                log.warning("vhost-user: back-end channel fd %d unusable: %s", fd, e)
                return
            s.settimeout(self.backend_timeout)
            self._backend_sock = s

    def _close_backend(self) -> None:
        if self._backend_sock is not None:
            self._backend_sock.close()
        self._backend_sock = None
        self._backend_fd = None

    def _send_config_change(self) -> None:
        self._sync_backend()
        msg = self.session.config_change_message()
        if msg is None or self._backend_sock is None:
            self.counters["config_change_without_channel"] += 1
            return
        try:
            self._backend_sock.sendall(msg)
            self.counters["config_change_msgs"] += 1
        except OSError as e:  # includes the timeout
            self.counters["backend_errors"] += 1
            log.warning("vhost-user: back-end channel send failed: %s", e)


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view)
        view = view[n:]

