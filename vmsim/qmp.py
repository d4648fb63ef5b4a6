"""QMP, QEMU's JSON control protocol, from the client side, and the finaliser that never leaves
a QEMU behind. Shared by the QEMU lab's booted guests (``vmsim.qemu_lab.GuestVM``) and the qtest
peers (``vmsim.qtest.machine.QtestMachine``), which differ only in how they reach the socket.

This is an I/O harness for tests, benchmarks and the lab commands, not core code.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
from typing import Any

from protocol.errors import EnvironmentFailure


class QmpError(EnvironmentFailure):
    """QMP answered a command with an error (``class`` and ``desc`` in the message), or the
    conversation itself failed (``QmpConnectionLost``)."""


class QmpConnectionLost(QmpError):
    """The QMP connection failed or QEMU closed it: no answer will come."""


class QmpClient:
    """One QMP connection (already connected): greeting read, capabilities negotiated.

    ``events``: the list the asynchronous events seen while waiting for replies are appended to
    (a new one if not given)."""

    def __init__(self, sock: socket.socket, timeout: float,
                 events: list[dict[str, Any]] | None = None) -> None:
        sock.settimeout(timeout)
        self.sock = sock
        self.file = sock.makefile("rwb")
        self.events: list[dict[str, Any]] = [] if events is None else events
        greeting = self._read("greeting")
        if "QMP" not in greeting:
            raise QmpError(f"unexpected QMP greeting {greeting}")
        self.execute("qmp_capabilities")

    def _read(self, what: str) -> dict[str, Any]:
        try:
            line = self.file.readline()
        except OSError as e:
            raise QmpConnectionLost(f"QMP: connection failed during {what}: {e}") from None
        if not line:
            raise QmpConnectionLost(f"QMP: QEMU closed the connection during {what}")
        try:
            msg = json.loads(line)
        except ValueError:
            raise QmpError(f"QMP: unparsable line {line[:200]!r} during {what}") from None
        if not isinstance(msg, dict):
            raise QmpError(f"QMP: unexpected message {msg!r} during {what}")
        return msg

    def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        """Send one command; its ``return`` value (``QmpError`` for an error reply)."""
        msg: dict[str, Any] = {"execute": command}
        if args:
            msg["arguments"] = args
        try:
            self.file.write(json.dumps(msg).encode() + b"\n")
            self.file.flush()
        except OSError as e:
            raise QmpConnectionLost(f"QMP: cannot send {command}: {e}") from None
        while True:
            reply = self._read(command)
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpError(f"QMP {command}: {err.get('class')}: {err.get('desc')}")
            return reply.get("return")

    def close(self) -> None:
        for c in (self.file, self.sock):
            try:
                c.close()
            except OSError:
                pass


def kill_and_remove(proc: subprocess.Popen[bytes], tmpdir: str) -> None:
    """Finaliser of a QEMU we started: kill it if it still runs, remove its temp folder (its
    sockets, RAM file, logs). Registered with ``weakref.finalize`` so a machine dropped without
    ``close()`` leaves nothing behind."""
    if proc.poll() is None:
        proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    shutil.rmtree(tmpdir, ignore_errors=True)
