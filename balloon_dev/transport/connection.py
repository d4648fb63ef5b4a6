"""The device servers' common half: listen, accept, serve one peer at a time, perform outcomes.

Theory of operation
-------------------
``DeviceServer.run`` binds the socket (``unixsock.listen_private``: mode 0600) and accepts
connections. Each connection gets a fresh session (``new_session``) and one reader that loops:
read one framed message (``read_message``, protocol-specific, with an ``fdstream.FdStream``),
hand it to the session, perform the ``core.Outcome`` in ``core.ORDER``. Framing lost
(``protocol.errors.FramingLost``) or the peer gone (``fdstream.PeerClosed``) ends the
connection; the session is then closed (device reset before its mappings go, every fd and
mapping released) and the next peer finds a device fresh from reset. Host requests
(``host_call``, from the control socket) run in the same trio thread between two messages.

The policies both transports follow, decided here once
------------------------------------------------------
* **Fds beyond the per-message limit** (the kernel drops them, ``MSG_CTRUNC``): the message is
  refused like any other bad message -- error reply, counter ``fds_truncated``, the fds that did
  arrive closed -- and the connection stays. Why: the bytes of the message arrived whole, so
  framing is not lost, and conventions 5 closes a connection only when framing is lost.
* **A second peer while one is served** waits up to ``busy_wait`` seconds (2 by default) for the
  first to leave, then is closed and counted (``connections_refused_busy``). Why: one device has
  one driver; but a VMM that reconnects at once (a restarted QEMU) races the teardown of its own
  previous connection, and a short wait serves it instead of failing it; longer, a peer would
  hang until its own timeout.
* **One session per connection.** Why: a session holds a peer's fds, mappings and negotiated
  state; a new object per connection starts fresh by construction, so no field can be forgotten
  by a reset. The last session's counters stay visible in ``stats`` after it ends.
* **At most ``MAX_WAITING_PEERS`` peers wait** behind the one served; one more is closed at
  once (``connections_refused_full``, a warning naming the reason). Why: every waiting peer holds
  an fd for up to ``busy_wait``; a flood of connections must not use up the process's fds.
* **accept() failing for want of resources** (EMFILE, ENFILE, ENOBUFS, ENOMEM) is survived:
  counted (``accept_errors``), one warning per streak, and the loop backs off (``ACCEPT_BACKOFF``:
  10 ms doubling to 1 s) while the connection waits in the kernel's queue. Why: a server that
  ends when its fds run out takes the device away from the VM; the condition passes when peers
  leave. ``accept_forever`` is that loop, for the control socket too.
* **Guest RAM mappings stop before the fds do**: a mapping costs an fd (Python's ``mmap`` keeps a
  dup), so ``guest_ram`` refuses one with ENOSPC once fewer than ``guest_ram.fd_reserve`` fds
  would be left, keeping fds for connections, eventfds and the control socket.
* **One listen backlog** (``LISTEN_BACKLOG``) for both device sockets.
"""
from __future__ import annotations

import errno
import logging
import os
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

import trio

from balloon_dev.effects import Effect
from balloon_dev.transport.core import Outcome, PeerError, Signal
from balloon_dev.transport.fdstream import FD_GAUGE, FdStream, PeerClosed, close_all
from balloon_dev.transport.unixsock import listen_private, unlink_quietly
from protocol.errors import FramingLost

_EVENTFD_ONE = (1).to_bytes(8, sys.byteorder)

#: Pending connections the kernel queues for each listening socket.
LISTEN_BACKLOG = 4
#: How long a second peer waits for the one being served (see the module docstring).
BUSY_WAIT_S = 2.0
#: Peers that may wait behind the one served; more are refused at once.
MAX_WAITING_PEERS = 4
#: accept() back-off after a resource error: first and longest sleep, seconds.
ACCEPT_BACKOFF = (0.01, 1.0)
#: accept() errors that mean "no resources now", not "this socket is broken".
ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


async def accept_forever(lsock: trio.socket.SocketType, nursery: trio.Nursery,
                         handle: Callable[[trio.socket.SocketType], Awaitable[None]],
                         counters: Counter[str], log: logging.Logger, what: str) -> None:
    """Accept connections on ``lsock`` and start ``handle(conn)`` for each, surviving resource
    errors with a back-off (module docstring)."""
    delay = ACCEPT_BACKOFF[0]
    while True:
        try:
            conn, _ = await lsock.accept()
        except OSError as e:
            if e.errno == errno.ECONNABORTED:
                continue  # the peer gave up before we accepted it
            if e.errno not in ACCEPT_RESOURCE_ERRORS:
                raise
            counters["accept_errors"] += 1
            if delay == ACCEPT_BACKOFF[0]:
                log.warning("%s: accept failed (%s); backing off until resources free up", what,
                            e)
            await trio.sleep(delay)
            delay = min(delay * 2, ACCEPT_BACKOFF[1])
            continue
        delay = ACCEPT_BACKOFF[0]
        FD_GAUGE.sample()
        nursery.start_soon(handle, conn)


class Session(Protocol):
    """What ``DeviceServer`` needs of a transport session."""

    counters: Counter[str]

    def handle(self, msg: Any) -> Outcome: ...
    def refuse(self, msg: Any, fault: PeerError) -> Outcome: ...
    def host(self, call: Callable[[Any], list[Effect]]) -> Outcome: ...
    def close(self) -> tuple[Effect, ...]: ...


S = TypeVar("S", bound=Session)


class DeviceServer(Generic[S]):
    """Base of ``VfioUserServer`` and ``VhostUserServer``; subclasses say how a message is
    read and how a session is made."""

    name = "device"
    #: The most fds one message may carry (the ancillary buffer is sized for it).
    max_fds = 0

    def __init__(self, path: str | os.PathLike[str], *,
                 on_effects: Callable[[list[Effect]], None] | None = None,
                 busy_wait: float = BUSY_WAIT_S) -> None:
        self.path = path
        self.on_effects = on_effects
        self.busy_wait = busy_wait
        self.session: S | None = None
        self.last_session_counters: dict[str, int] = {}
        self.counters: Counter[str] = Counter()
        self.connections = 0
        self._one_peer = trio.Lock()  # FIFO: peers are served in arrival order
        self._waiting = 0
        self.log = logging.getLogger(type(self).__module__)

    # -- to be provided by the transport -------------------------------------------------------
    def new_session(self) -> S:
        raise NotImplementedError

    async def read_message(self, stream: FdStream, fds: list[int]) -> Any:
        """One framed message; fds go to ``fds``. Raises ``FramingLost`` or ``PeerClosed``."""
        raise NotImplementedError

    def idle_host(self, call: Callable[[Any], list[Effect]]) -> Outcome:
        """A host request while no peer is connected (nobody to interrupt)."""
        raise NotImplementedError

    def after_message(self, session: S, nursery: trio.Nursery) -> None:
        """Follow session state the server mirrors (vhost-user: kick watchers, channel)."""

    def send_backend(self, msg: bytes) -> None:
        """Send a back-end channel message (vhost-user only)."""
        self.counters["backend_without_channel"] += 1

    def connection_closed(self) -> None:
        """The connection ended and its session is closed (release mirrored state)."""

    # -- host side --------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._one_peer.locked()

    def host_call(self, call: Callable[[Any], list[Effect]]) -> list[Effect]:
        """Run ``call(dev)`` now: the peer's interrupts are delivered, host effects returned."""
        outcome = self.session.host(call) if self.session is not None else self.idle_host(call)
        self._interrupt(outcome)
        return list(outcome.effects)

    def fd_stats(self) -> dict[str, int]:
        """Open fds, their peak and the limit (``stats``: ``fds``)."""
        return FD_GAUGE.snapshot()

    def session_counters(self) -> dict[str, int]:
        return dict(self.session.counters) if self.session is not None \
            else dict(self.last_session_counters)

    # -- serving ------------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve peers one at a time until cancelled."""
        # Bound and listening on return (mode 0600; FileExistsError for a non-socket in the
        # way): from here on the path is ours to remove.
        lsock = trio.socket.from_stdlib_socket(listen_private(self.path, LISTEN_BACKLOG))
        try:
            self.log.info("%s server listening on %s", self.name, self.path)
            async with trio.open_nursery() as nursery:
                task_status.started(self.path)
                await accept_forever(lsock, nursery, self._admit, self.counters, self.log,
                                     self.name)
        finally:
            lsock.close()
            unlink_quietly(self.path)

    async def _admit(self, conn: trio.socket.SocketType) -> None:
        log = self.log
        try:
            if self._one_peer.locked() and self._waiting >= MAX_WAITING_PEERS:
                self.counters["connections_refused_full"] += 1
                log.warning("%s: refusing a connection: one peer is served and %d wait already",
                            self.name, self._waiting)
                return
            self._waiting += 1
            try:
                with trio.move_on_after(self.busy_wait) as cs:
                    await self._one_peer.acquire()
            finally:
                self._waiting -= 1
            if cs.cancelled_caught:
                self.counters["connections_refused_busy"] += 1
                log.warning("%s: a second peer connected while one is served; closing it",
                            self.name)
                return
            try:
                self.connections += 1
                await self._serve(conn)
            finally:
                self._one_peer.release()
        except Exception:  # noqa: BLE001 - one peer's trouble must not end the server
            # A bug of ours (or a host ``on_effects`` that raised) would otherwise leave this
            # task, cancel the nursery and stop the server for every later peer.
            self.counters["internal_errors"] += 1
            log.exception("%s: connection ended by an internal error", self.name)
        finally:
            conn.close()

    async def _serve(self, conn: trio.socket.SocketType) -> None:
        log = self.log
        session = self.new_session()
        self.session = session
        stream = FdStream(conn, self.max_fds)
        log.info("%s: peer connected (connection %d)", self.name, self.connections)
        try:
            async with trio.open_nursery() as nursery:
                await self._message_loop(stream, session, nursery)
                nursery.cancel_scope.cancel()
        finally:
            # The device is reset before the mappings go (inside session.close), so nothing
            # touches unmapped memory. No peer to interrupt any more: only the host hears.
            try:
                effects = session.close()
                if effects and self.on_effects is not None:
                    self.on_effects(list(effects))
            finally:
                self.last_session_counters = dict(session.counters)
                self.session = None
                self.connection_closed()
                log.info("%s: peer left; device reset", self.name)

    async def _message_loop(self, stream: FdStream, session: S, nursery: trio.Nursery) -> None:
        log = self.log
        while True:
            fds: list[int] = []
            stream.start_message()
            try:
                msg = await self.read_message(stream, fds)
            except FramingLost as e:
                close_all(fds)
                self.counters["framing_errors"] += 1
                log.warning("%s: framing lost (%s): closing the connection", self.name, e)
                return
            except PeerClosed as e:
                close_all(fds)
                log.info("%s: peer left: %s", self.name, e)
                return
            self.counters["messages"] += 1
            if stream.truncated:
                self.counters["fds_truncated"] += 1
                outcome = session.refuse(msg, PeerError(
                    "fds_truncated", f"more than {self.max_fds} fds on one message; the kernel "
                    "dropped the rest"))
            else:
                outcome = session.handle(msg)
            # Mirrored state follows the session before the reply goes out: a peer that waits
            # for the reply may rely on the change (e.g. a replaced kick fd no longer read).
            self.after_message(session, nursery)
            try:
                await self.perform(outcome, stream)
            except PeerClosed as e:
                # The peer left without reading its reply (EPIPE): this connection ends.
                log.info("%s: peer left: %s", self.name, e)
                return
            if outcome.close:
                return

    # -- outcomes -----------------------------------------------------------------------------
    async def perform(self, outcome: Outcome, stream: FdStream) -> None:
        """Carry out ``outcome`` in ``core.ORDER``."""
        if outcome.effects and self.on_effects is not None:
            self.on_effects(list(outcome.effects))
        self._interrupt(outcome)
        if outcome.reply is not None:
            await stream.send_all(outcome.reply)

    def _interrupt(self, outcome: Outcome) -> None:
        for s in outcome.signals:
            self.signal(s)
        for m in outcome.backend:
            self.send_backend(m)

    def signal(self, s: Signal) -> None:
        try:
            os.write(s.fd, _EVENTFD_ONE)
            self.counters["eventfd_writes"] += 1
        except BlockingIOError:
            pass  # counter saturated: the peer has an interrupt pending anyway
        except OSError as e:
            self.counters["eventfd_write_errors"] += 1
            self.log.warning("%s: eventfd %d (%s) write failed: %s", self.name, s.fd, s.what, e)
