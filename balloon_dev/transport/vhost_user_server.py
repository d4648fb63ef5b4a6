"""The vhost-user server: ``VhostUserSession`` on a unix socket, one front-end at a time.

Theory of operation: ``connection.DeviceServer`` does the serving (listen mode 0600, accept, the
one-peer policy, the message loop, performing outcomes; read its docstring for the policies).
This module adds what is vhost-user's own:

* a message is a 12-byte header (``protocol.vhost_user.parse_header``) and its payload, with up
  to ``VHOST_USER_MAX_FDS`` fds;
* one kick watcher per started ring: waits until the ring's kick eventfd is readable
  (``trio.lowlevel.wait_readable``), drains it and performs ``session.kick(q)``. A watcher waits
  on its own ``dup`` of the eventfd, so the session may close or replace the original at any
  time; the watchers follow the session after every message (``after_message``), before its
  reply goes out;
* the back-end channel (SET_BACKEND_REQ_FD) carries CONFIG_CHANGE_MSG (the front-end then
  injects the guest's config interrupt). It is a blocking socket with a short timeout: the
  message is 12 bytes and QEMU reads the channel from its main loop, so a send only waits if
  QEMU is stuck, and then gives up (counted) rather than stalling the device for long.

A host request while no front-end is connected runs on the device directly; there is nobody to
interrupt.
"""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from balloon_dev.effects import ConfigChanged, Effect, NotifyQueue
from balloon_dev.transport.connection import BUSY_WAIT_S, DeviceServer
from balloon_dev.transport.core import DeviceCore, Outcome
from balloon_dev.transport.fdstream import FdStream, close_quietly
from balloon_dev.transport.vhost_user import DEFAULT_PROTOCOL_FEATURES, VhostUserSession
from guestmem import GuestMemory
from protocol.vhost_user import HEADER_SIZE, VHOST_USER_MAX_FDS, Message, parse_header

log = logging.getLogger(__name__)


class VhostUserServer(DeviceServer[VhostUserSession]):
    """Serves ``dev`` (whose guest memory is ``mem``) at unix socket ``path``."""

    name = "vhost-user"
    max_fds = VHOST_USER_MAX_FDS

    def __init__(self, dev: DeviceCore, mem: GuestMemory, path: str | os.PathLike[str], *,
                 on_effects: Callable[[list[Effect]], None] | None = None,
                 protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
                 backend_timeout: float = 2.0, busy_wait: float = BUSY_WAIT_S) -> None:
        super().__init__(path, on_effects=on_effects, busy_wait=busy_wait)
        self.path: Path = Path(path)
        self.dev = dev
        self.mem = mem
        self.protocol_features = protocol_features
        self.backend_timeout = backend_timeout
        self._backend_sock: socket.socket | None = None
        self._backend_fd: int | None = None
        self._watchers: dict[int, tuple[int, int, trio.CancelScope]] = {}  # q -> (fd, dup, scope)

    def new_session(self) -> VhostUserSession:
        return VhostUserSession(self.dev, self.mem, protocol_features=self.protocol_features)

    async def read_message(self, stream: FdStream, fds: list[int]) -> Message:
        header = parse_header(await stream.recv_exact(HEADER_SIZE, fds, first=True))
        payload = await stream.recv_exact(header.size, fds) if header.size else b""
        return Message(header, payload, tuple(fds))

    def idle_host(self, call: Callable[[Any], list[Effect]]) -> Outcome:
        # No front-end: nothing to interrupt; the device still changes state.
        return Outcome(effects=tuple(e for e in call(self.dev)
                                     if not isinstance(e, (NotifyQueue, ConfigChanged))))

    def stats(self) -> dict[str, Any]:
        return {
            "transport": "vhost-user",
            "server_counters": dict(self.counters),
            "connections": self.connections,
            "session_counters": self.session_counters(),
            "fds": self.fd_stats(),
            "memory_regions": [[r.gpa, r.size] for r in self.mem.regions],
            "live": self.session is not None and self.session.live,
        }

    def after_message(self, session: VhostUserSession, nursery: trio.Nursery) -> None:
        self._sync_watchers(session, nursery)
        self._sync_backend(session)

    def connection_closed(self) -> None:
        self._stop_all_watchers()
        self._close_backend()

    # -- kick watchers ----------------------------------------------------------------------
    def _sync_watchers(self, session: VhostUserSession, nursery: trio.Nursery) -> None:
        want = session.kick_fds()
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
                nursery.start_soon(self._watch_kick, session, q, dup, scope)

    def _stop_watcher(self, q: int) -> None:
        _fd, dup, scope = self._watchers.pop(q)
        scope.cancel()
        trio.lowlevel.notify_closing(dup)
        close_quietly(dup)

    def _stop_all_watchers(self) -> None:
        for q in list(self._watchers):
            self._stop_watcher(q)

    async def _watch_kick(self, session: VhostUserSession, q: int, fd: int,
                          scope: trio.CancelScope) -> None:
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
                    outcome = session.kick(q)
                    if outcome.effects and self.on_effects is not None:
                        self.on_effects(list(outcome.effects))
                    self._interrupt(outcome)
                except Exception:  # noqa: BLE001 - a bug of ours must not end the server
                    self.counters["internal_errors"] += 1
                    log.exception("vhost-user: internal error on a kick of ring %d", q)

    # -- back-end channel -------------------------------------------------------------------
    def _sync_backend(self, session: VhostUserSession) -> None:
        fd = session.backend_fd
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

    def send_backend(self, msg: bytes) -> None:
        if self.session is not None:
            self._sync_backend(self.session)
        if self._backend_sock is None:
            self.counters["config_change_without_channel"] += 1
            return
        try:
            self._backend_sock.sendall(msg)
            self.counters["config_change_msgs"] += 1
        except OSError as e:  # includes the timeout
            self.counters["backend_errors"] += 1
            log.warning("vhost-user: back-end channel send failed: %s", e)
