"""The host-control socket: ``balloon_dev.control.HostControl`` served as a stream of JSON.

Theory of operation: ``serve_control(path, control)`` listens on a unix socket (mode 0600,
``unixsock.listen_private``) beside either device server and serves up to
``MAX_CONTROL_CONNECTIONS`` control clients at once, each in its own task: a welcome line
(QMP-style), then one reply line per request. Commands run in the trio thread, between two
device messages.

Requests are a stream of JSON texts, as QMP's are: a request ends where a top-level JSON object
or array closes (``qemu.qmp`` sends its requests with no newline after them) or at a newline,
whichever comes first (so one request per line works too, and a line that is not complete JSON
is answered with an error instead of waiting for more). ``next_request`` finds that end by
scanning brackets outside strings; ``json.loads`` then parses the request.

Nothing a control client sends may end the server: bad JSON (also nested too deep for the
parser) is answered with an error, and a failing command is logged and answered as an
internal error. A request longer than ``MAX_CONTROL_LINE`` is answered with an error and the
connection ends; so does a connection beyond the cap (the error says why). Before such a close
the server shuts down its sending side and reads away what the client still sends (for up to
``DRAIN_S``): closing a unix socket with unread input resets the connection, and the client
would see ECONNRESET instead of the answer. accept() errors for want of fds are survived
(``connection.accept_forever``).
"""
from __future__ import annotations

import json
import logging
import socket
import time
from collections import Counter
from typing import Any

import trio

from balloon_dev.control import HostControl
from balloon_dev.transport.connection import accept_forever
from balloon_dev.transport.unixsock import listen_private, unlink_quietly

log = logging.getLogger(__name__)

#: Longest request accepted, bytes.
MAX_CONTROL_LINE = 64 * 1024
#: Control clients served at once; one more is answered with an error and closed.
MAX_CONTROL_CONNECTIONS = 16
#: Pending control connections the kernel queues (``ctl`` retries while it is full).
CONTROL_BACKLOG = 64
#: How long a refused connection's input is read away before the close.
DRAIN_S = 5.0

_WS = b" \t\r\n"


def _error_line(desc: str) -> bytes:
    return json.dumps({"error": {"class": "GenericError", "desc": desc}}).encode() + b"\n"


def next_request(buf: bytes) -> tuple[bytes, int] | None:
    """The first request in ``buf`` and where the rest starts, or None if it is not complete
    yet. A request is a top-level JSON object or array up to its closing bracket, or anything
    else up to a newline (module docstring). Leading whitespace is skipped."""
    i = 0
    while i < len(buf) and buf[i] in _WS:
        i += 1
    if i == len(buf):
        return None
    if buf[i] not in b"{[":
        nl = buf.find(b"\n", i)
        return None if nl < 0 else (buf[i:nl], nl + 1)
    depth, in_str, esc = 0, False, False
    for j in range(i, len(buf)):
        ch = buf[j]
        if in_str:
            if esc:
                esc = False
            elif ch == 0x5C:  # backslash
                esc = True
            elif ch == 0x22:  # quote
                in_str = False
            elif ch == 0x0A:  # a newline cannot be inside a JSON string: the line ends here
                return buf[i:j], j + 1
        elif ch == 0x22:
            in_str = True
        elif ch in b"{[":
            depth += 1
        elif ch in b"}]":
            depth -= 1
            if depth == 0:
                return buf[i:j + 1], j + 1
        elif ch == 0x0A:
            return buf[i:j], j + 1
    return None


class ControlServer:
    """The control socket's state: how many clients are served, counters for ``stats``."""

    def __init__(self, control: HostControl) -> None:
        self.control = control
        self.active = 0
        self.counters: Counter[str] = Counter()
        control.socket_counters = self.counters  # ``stats`` shows them as control_counters

    async def run(self, path: str, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.from_stdlib_socket(listen_private(path, CONTROL_BACKLOG))
        try:
            task_status.started()
            async with trio.open_nursery() as nursery:
                await accept_forever(sock, nursery, self._connection, self.counters, log,
                                     "control socket")
        finally:
            sock.close()
            unlink_quietly(path)

    async def _connection(self, conn: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(conn)
        async with stream:
            try:
                if self.active >= MAX_CONTROL_CONNECTIONS:
                    self.counters["control_refused_full"] += 1
                    log.warning("control socket: refusing a client: %d are connected",
                                self.active)
                    await _refuse(stream, f"too many control connections ({self.active} "
                                  "open); try again later")
                    return
                self.active += 1
                try:
                    await self._serve(stream)
                finally:
                    self.active -= 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _serve(self, stream: trio.SocketStream) -> None:
        await stream.send_all(json.dumps(self.control.welcome()).encode() + b"\n")
        buf = b""
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buf += chunk
            while (found := next_request(buf)) is not None:
                request, end = found
                buf = buf[end:]
                if request.strip():
                    await stream.send_all(_control_reply(self.control, request))
            if len(buf) > MAX_CONTROL_LINE:
                self.counters["control_too_long"] += 1
                await _refuse(stream, f"request too long (line too long: more than "
                              f"{MAX_CONTROL_LINE} bytes)")
                return


async def _refuse(stream: trio.SocketStream, desc: str) -> None:
    """Answer with an error, then end the connection without resetting it (module docstring)."""
    await stream.send_all(_error_line(desc))
    try:
        stream.socket.shutdown(socket.SHUT_WR)
    except OSError:
        return
    with trio.move_on_after(DRAIN_S):
        while await stream.receive_some(65536):
            pass


async def serve_control(path: str, control: HostControl, *,
                        task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``control`` on a unix socket (mode 0600): see the module docstring."""
    await ControlServer(control).run(path, task_status=task_status)


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
