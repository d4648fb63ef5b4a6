"""The thin trio server around ``VfioUserSession``: one vfio-user client at a time on a unix
socket, plus the JSON host-control socket.

Theory of operation: ``VfioUserServer.run`` binds the socket the user named (created with mode
0600 by ``balloon_dev.transport.unixsock.listen_private``, as the vhost-user server's: only the
owner may connect, since a client gets to map memory and drive the device),
listens, and serves one connection at a time (a second client waits briefly, then is closed). Per
connection one reader task reads a message: the 16-byte header with ``recvmsg`` (collecting
``SCM_RIGHTS`` fds), checks framing, reads the rest of the payload, and hands header, payload
and fds to the session. The session's actions
are performed in order: replies are written to the socket, ``SignalEventfd`` becomes an 8-byte
write to the eventfd, host effects go to ``on_effects``. A framing error or EOF ends the
connection; the device is then reset and the session dropped (its mappings unmapped, its
eventfds closed) before the next client is accepted.

Host requests (from the control socket) run in the same trio loop between two messages, so they
never interleave with a message half-served: ``host_call(fn)`` runs ``fn(dev)`` through the
session (or the bare PCI function when no client is connected) and performs the interrupts.

``serve_control`` speaks ``balloon_dev.control.HostControl``'s line-delimited JSON on a second
unix socket, also mode 0600.
"""
from __future__ import annotations

import array
import json
import logging
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import trio

from balloon_dev.control import HostControl
from balloon_dev.transport.memfd import close_quietly, received_fds
from balloon_dev.transport.unixsock import listen_private, unlink_quietly
from balloon_dev.transport.vfio_user import (
    SERVER_MAX_MSG_FDS,
    Reply,
    SignalEventfd,
    VfioUserSession,
)
from balloon_dev.transport.virtio_pci import IntxLevel, MsixFire, VirtioPciFunction
from guestmem import GuestMemory
from protocol import vfio_user as vu

log = logging.getLogger(__name__)

_EVENTFD_ONE = (1).to_bytes(8, sys.byteorder)
_ANC_SIZE = socket.CMSG_SPACE(SERVER_MAX_MSG_FDS * array.array("i").itemsize)


class ConnectionLost(Exception):
    pass


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        close_quietly(fd)


class VfioUserServer:
    def __init__(self, path: str, pci: VirtioPciFunction, mem: GuestMemory, *,
                 on_effects: Callable[[list[Any]], None] | None = None,
                 busy_wait: float = 2.0) -> None:
        self.path = path
        self.pci = pci
        self.mem = mem
        self.on_effects = on_effects
        self.session: VfioUserSession | None = None
        self.counters: Counter[str] = Counter()
        self.connections = 0
        self.busy_wait = busy_wait
        self._one_client = trio.Lock()  # FIFO: clients are served in arrival order

    # -- host side ---------------------------------------------------------------------------
    def host_call(self, call: Callable[[Any], list[Any]]) -> list[Any]:
        """Run ``call(dev)`` now; interrupts are delivered, host effects returned."""
        if self.session is not None:
            actions = self.session.host(call)
        else:
            # No client: nothing to interrupt; the device still changes state.
            actions = [a for a in self.pci.host(call) if not isinstance(a, (MsixFire, IntxLevel))]
        return self._perform_local(actions)

    def _perform_local(self, actions: list[Any]) -> list[Any]:
        effects = []
        for a in actions:
            if isinstance(a, SignalEventfd):
                self._signal(a)
            elif not isinstance(a, Reply):
                effects.append(a)
        return effects

    def _signal(self, a: SignalEventfd) -> None:
        try:
            os.write(a.fd, _EVENTFD_ONE)
            self.counters["eventfd_writes"] += 1
        except OSError as e:
            self.counters["eventfd_write_errors"] += 1
            log.warning("eventfd %d (irq index %d vector %d) write failed: %s", a.fd,
                        a.irq_index, a.vector, e)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "server_counters": dict(self.counters),
            "connections": self.connections,
            "pci_counters": dict(self.pci.counters),
            "dma_regions": [[r.gpa, r.size] for r in self.mem.regions],
        }
        if self.session is not None:
            out["session_counters"] = dict(self.session.counters)
        return out

    # -- vfio-user socket --------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        # Bound and listening on return (mode 0600; FileExistsError for a non-socket in the
        # way): from here on the path is ours to remove.
        sock = trio.socket.from_stdlib_socket(listen_private(self.path, 4))
        try:
            log.info("vfio-user server listening on %s", self.path)
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await sock.accept()
                    nursery.start_soon(self._serve_and_close, conn)
        finally:
            sock.close()
            unlink_quietly(self.path)

    async def _serve_and_close(self, conn: Any) -> None:
        # One device, one client. A client that arrives while another is served waits up to
        # ``busy_wait`` seconds (the previous one may just be leaving: a VMM restarted at once),
        # then is turned away (it sees the socket close) rather than hanging until its timeout.
        try:
            with trio.move_on_after(self.busy_wait) as cs:
                await self._one_client.acquire()
            if cs.cancelled_caught:
                self.counters["connections_refused_busy"] += 1
                log.warning("vfio-user: a second client connected while one is served; "
                            "closing it")
                return
            try:
                self.connections += 1
                await self._serve(conn)
            finally:
                self._one_client.release()
        except Exception:  # noqa: BLE001 - one client's trouble must not end the server
            # A bug of ours (or a host ``on_effects`` that raised) would otherwise leave this
            # task, cancel the nursery and stop the server for every later client.
            self.counters["internal_errors"] += 1
            log.exception("vfio-user: connection ended by an internal error")
        finally:
            conn.close()

    async def _serve(self, conn: Any) -> None:
        session = VfioUserSession(self.pci, self.mem)
        self.session = session
        log.info("vfio-user client connected (connection %d)", self.connections)
        try:
            while True:
                fds: list[int] = []
                try:
                    raw = await self._recv_exact(conn, vu.HEADER_SIZE, fds, first=True)
                    header = vu.decode_header(raw)
                    payload = await self._recv_exact(conn, header.payload_size, fds)
                except vu.FramingError as e:
                    _close_fds(fds)
                    self.counters["framing_errors"] += 1
                    log.warning("vfio-user framing lost (%s): closing the connection", e)
                    return
                except ConnectionLost as e:
                    _close_fds(fds)
                    log.info("vfio-user client left: %s", e)
                    return
                if header.is_reply:
                    # We never send commands, so no reply is expected; drop it, stay up.
                    _close_fds(fds)
                    self.counters["unexpected_replies"] += 1
                    log.warning("unexpected reply msg_id %#x command %d", header.msg_id,
                                header.command)
                    continue
                lost: ConnectionLost | None = None
                for a in session.handle(header, payload, fds):
                    if isinstance(a, Reply):
                        if lost is None:
                            try:
                                await self._send(conn, a.data)
                            except ConnectionLost as e:
                                lost = e
                    elif isinstance(a, SignalEventfd):
                        self._signal(a)
                    elif self.on_effects is not None:
                        self.on_effects([a])  # the message's effects happened: deliver them
                if lost is not None:
                    # The client left without reading its reply (EPIPE): this connection
                    # ends, the server does not.
                    log.info("vfio-user client left: %s", lost)
                    return
        finally:
            # The device is reset before the mappings go, so nothing touches unmapped memory,
            # and the next client finds a device fresh from reset. The session is closed (its
            # mappings and eventfds released) even if the reset or the host's handler raised.
            try:
                effects = [a for a in self.pci.reset()
                           if not isinstance(a, (MsixFire, IntxLevel))]
                if self.on_effects is not None and effects:
                    self.on_effects(effects)
            finally:
                session.close()
                self.session = None

    async def _send(self, conn: Any, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                n = await conn.send(view)
                view = view[n:]
        except OSError as e:
            raise ConnectionLost(f"send failed: {e}") from None

    async def _recv_exact(self, conn: Any, n: int, fds: list[int], first: bool = False) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                data, anc, flags, _ = await conn.recvmsg(n - len(buf), _ANC_SIZE)
            except OSError as e:
                raise ConnectionLost(f"recv failed: {e}") from None
            fds.extend(received_fds(anc))
            if flags & socket.MSG_CTRUNC:
                # More fds than max_msg_fds: the kernel dropped some. The message can still be
                # served (and will be rejected for its fd count).
                self.counters["fds_truncated"] += 1
                log.warning("ancillary data truncated: more than %d fds sent",
                            SERVER_MAX_MSG_FDS)
            if not data:
                if buf or not first:
                    raise ConnectionLost(f"EOF inside a message ({len(buf)} of {n} bytes)")
                raise ConnectionLost("EOF")
            buf += data
        return bytes(buf)


# -- control socket ---------------------------------------------------------------------------
MAX_CONTROL_LINE = 64 * 1024


async def serve_control(path: str, control: HostControl, *,
                        task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``control`` on a unix socket (mode 0600), one JSON object per line."""
    sock = trio.socket.from_stdlib_socket(listen_private(path, 4))
    try:
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await sock.accept()
                nursery.start_soon(_control_conn, trio.SocketStream(conn), control)
    finally:
        sock.close()
        unlink_quietly(path)


async def _control_conn(stream: trio.SocketStream, control: HostControl) -> None:
    async with stream:
        try:
            await stream.send_all(json.dumps(control.welcome()).encode() + b"\n")
            buf = b""
            while True:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                buf += chunk
                if len(buf) > MAX_CONTROL_LINE and b"\n" not in buf:
                    await stream.send_all(json.dumps({"error": {
                        "class": "GenericError", "desc": "line too long"}}).encode() + b"\n")
                    return
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    await stream.send_all(_control_reply(control, line))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


def _control_reply(control: HostControl, line: bytes) -> bytes:
    """The reply line (newline included) to one request line; never raises.

    Deeply nested JSON makes the parser (and ``json.dumps`` of an echoed ``id``) raise
    ``RecursionError``, not ``ValueError``: it is bad input like any other, answered with an
    error, and must not end the control server (which shares the device server's nursery).
    """
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:
        reply: dict[str, Any] = {"error": {"class": "GenericError",
                                           "desc": f"bad JSON: {str(e)[:200]}"}}
    else:
        try:
            reply = control.execute(obj)
        except Exception as e:  # noqa: BLE001 - keep serving the device
            log.exception("control command %.200r failed", line)
            reply = {"error": {"class": "GenericError", "desc": f"internal error: {e}"}}
    try:
        return json.dumps(reply).encode() + b"\n"
    except (ValueError, RecursionError) as e:  # an unencodable echoed id
        return json.dumps({"error": {"class": "GenericError",
                                     "desc": f"unencodable reply: {e}"}}).encode() + b"\n"


def wall_clock() -> float:
    """The clock a served device's control log uses (monotonic seconds)."""
    return time.monotonic()
