"""The host-control socket: ``balloon_dev.control.HostControl`` served as line-delimited JSON.

Theory of operation: ``serve_control(path, control)`` listens on a unix socket (mode 0600,
``unixsock.listen_private``) beside either device server and serves any number of control
clients at once, each in its own task: a welcome line (QMP-style), then one JSON reply line per
request line. A request line longer than ``MAX_CONTROL_LINE`` is answered with an error and the
connection closed. Nothing a control client sends may end the server: bad JSON (also nested
too deep for the parser) is answered with an error, and a failing command is logged and
answered as an internal error. Commands run in the trio thread, between two device messages.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import trio

from balloon_dev.control import HostControl
from balloon_dev.transport.connection import LISTEN_BACKLOG
from balloon_dev.transport.unixsock import listen_private, unlink_quietly

log = logging.getLogger(__name__)

MAX_CONTROL_LINE = 64 * 1024


async def serve_control(path: str, control: HostControl, *,
                        task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``control`` on a unix socket (mode 0600), one JSON object per line."""
    sock = trio.socket.from_stdlib_socket(listen_private(path, LISTEN_BACKLOG))
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
