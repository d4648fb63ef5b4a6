"""The client side of QEMU's qtest line protocol (``-accel qtest -qtest unix:PATH``).

Theory of operation
-------------------
qtest is a request/response protocol of text lines over one stream socket (QEMU's
``system/qtest.c``): we send ``COMMAND ARG...\\n``, QEMU answers one line starting with ``OK``
(then values), ``FAIL`` or ``ERR`` (then a reason). Numbers go out in hex (QEMU parses them
with base 0); values come back as ``0x...``. Besides the replies, QEMU may write asynchronous
``IRQ raise N`` / ``IRQ lower N`` lines at any moment once an interrupt controller's pins are
intercepted (``irq_intercept_in``); they are collected in ``irq_events`` and never mistaken for
a reply.

QEMU checks almost nothing in a request: a malformed number, a missing argument or a port above
0xffff makes it abort (``g_assert``), so every argument is checked here first and a bad one
raises ``UsageError`` before anything is sent. Zero-length block accesses are answered locally
(QEMU's ``b64write``/``write`` refuse them and ``read`` asserts on them).

Commands (all guest-physical accesses go through the first CPU's address space, as a guest
CPU's would, so they reach RAM, MMIO BARs and the MSI window alike, and writes to RAM are
recorded in QEMU's dirty bitmaps, which migration uses):

============================  ===========================================================
``readb/w/l/q(addr)``         a 1/2/4/8-byte little-endian load -> int
``writeb/w/l/q(addr, v)``     a store
``inb/w/l(port)``             port I/O (0..0xffff) -> int
``outb/w/l(port, v)``
``read(addr, n)``             bytes (hex on the wire)
``write(addr, data)``         bytes (hex)
``b64read(addr, n)``          bytes (base64 on the wire: 1.33 bytes per byte, not 2)
``b64write(addr, data)``
``memset(addr, n, byte)``
``clock_step(ns=None)``       advance QEMU_CLOCK_VIRTUAL by ns, or to the next timer -> ns
``clock_set(ns)``
``irq_intercept_in(path)``    start ``IRQ`` lines for that device's input pins
============================  ===========================================================

``pipeline(lines)`` sends several commands in one write and then reads their replies: the
round trip is paid once (QEMU handles a socket's lines in order); at most ``WINDOW`` commands
are in flight, since QEMU blocks writing replies nobody reads and then stops reading. Block
transfers larger than ``CHUNK`` bytes are split, so no line grows without bound. ``ops``
counts commands sent.

Errors: a ``FAIL``/``ERR`` reply raises ``QtestCommandFailed``; a closed connection, a timeout
or a reply that does not parse raises ``QtestError`` (an ``EnvironmentFailure``: QEMU died or
misbehaved, nothing the caller can fix by retrying the same call).
"""
from __future__ import annotations

import base64
import socket
from collections.abc import Sequence

from protocol.errors import EnvironmentFailure, UsageError

U64 = 1 << 64
#: Largest block sent or read in one command (bytes); larger transfers are split. QEMU reads
#: its qtest socket 1 KiB per main-loop turn and rescans the pending line each time, so long
#: lines cost more per byte: 16-64 KiB is the fastest (about 30 MiB/s for b64write here).
CHUNK = 32 << 10
#: Commands in flight at most in a pipeline. QEMU writes each reply with a blocking write; every
#: small reply costs a socket buffer's worth of overhead (~1 KiB), so with ~200 unread replies
#: QEMU stops reading us: beyond this window we read replies before sending more.
WINDOW = 64
_SIZES = {"b": 1, "w": 2, "l": 4, "q": 8}


class QtestError(EnvironmentFailure):
    """QEMU's qtest connection failed: closed, timed out, or an unparsable reply."""


class QtestCommandFailed(QtestError):
    """QEMU answered a command with FAIL or ERR (the reply is in the message)."""


def _check_addr(addr: int, n: int = 1) -> None:
    if not isinstance(addr, int) or addr < 0 or n < 0 or addr + n > U64:
        raise UsageError(f"qtest: guest address {addr!r} (+{n}) is not inside 0..2^64")


def _check_value(value: int, size: int, what: str = "value") -> None:
    if not isinstance(value, int) or not 0 <= value < 1 << (8 * size):
        raise UsageError(f"qtest: {what} {value!r} does not fit {size} bytes")


def _check_port(port: int) -> None:
    if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise UsageError(f"qtest: I/O port {port!r} is not inside 0..0xffff")


class QtestConnection:
    """One qtest stream (see the module docstring). ``sock`` is connected already."""

    def __init__(self, sock: socket.socket, *, timeout: float = 10.0) -> None:
        sock.settimeout(timeout)
        self.sock = sock
        self.timeout = timeout
        self._buf = bytearray()
        self.irq_events: list[tuple[str, int]] = []  # ("raise" | "lower", irq number)
        self.ops = 0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- lines ------------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise QtestError(f"qtest: cannot send to QEMU: {e}") from None

    def _line(self, what: str) -> str:
        """The next line that is not an asynchronous IRQ line."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                raw = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                line = raw.decode("ascii", errors="replace").rstrip("\r")
                if line.startswith("IRQ "):
                    self._irq_line(line)
                    continue
                return line
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise QtestError(f"qtest: no reply to {what!r} within {self.timeout} s") from None
            except OSError as e:
                raise QtestError(f"qtest: connection to QEMU failed during {what!r}: {e}") \
                    from None
            if not data:
                raise QtestError(f"qtest: QEMU closed the connection during {what!r}")
            self._buf += data

    def _irq_line(self, line: str) -> None:
        parts = line.split()
        if len(parts) == 3 and parts[1] in ("raise", "lower") and parts[2].lstrip("-").isdigit():
            self.irq_events.append((parts[1], int(parts[2])))
        else:
            raise QtestError(f"qtest: malformed asynchronous line {line!r}")

    def _reply(self, cmd: str) -> list[str]:
        line = self._line(cmd)
        words = line.split(" ")
        if words[0] == "OK":
            return words[1:]
        if words[0] in ("FAIL", "ERR"):
            raise QtestCommandFailed(f"qtest: QEMU refused {cmd!r}: {line}")
        raise QtestError(f"qtest: unexpected reply {line!r} to {cmd!r}")

    def command(self, cmd: str) -> list[str]:
        """Send one command line (no newline); returns the words after ``OK``."""
        if "\n" in cmd:
            raise UsageError(f"qtest: a command is one line: {cmd!r}")
        self.ops += 1
        self._send(cmd.encode("ascii") + b"\n")
        return self._reply(cmd)

    def pipeline(self, cmds: Sequence[str]) -> list[list[str]]:
        """Send ``cmds`` in one write, then read every reply (in order). A failed command
        raises after all replies have been read, so the stream stays in step."""
        if not cmds:
            return []
        for c in cmds:
            if "\n" in c:
                raise UsageError(f"qtest: a command is one line: {c!r}")
        self.ops += len(cmds)
        out: list[list[str]] = []
        first_error: QtestError | None = None
        for start in range(0, len(cmds), WINDOW):
            group = cmds[start:start + WINDOW]
            self._send("".join(c + "\n" for c in group).encode("ascii"))
            for c in group:
                try:
                    out.append(self._reply(c))
                except QtestCommandFailed as e:
                    first_error = first_error or e
                    out.append([])
        if first_error is not None:
            raise first_error
        return out

    @staticmethod
    def _int(words: list[str], cmd: str) -> int:
        try:
            return int(words[0], 0)
        except (IndexError, ValueError):
            raise QtestError(f"qtest: reply {words!r} to {cmd!r} carries no number") from None

    # -- memory -----------------------------------------------------------------------------
    def _load(self, kind: str, addr: int) -> int:
        _check_addr(addr, _SIZES[kind])
        cmd = f"read{kind} {addr:#x}"
        return self._int(self.command(cmd), cmd)

    def _store(self, kind: str, addr: int, value: int) -> None:
        _check_addr(addr, _SIZES[kind])
        _check_value(value, _SIZES[kind])
        self.command(f"write{kind} {addr:#x} {value:#x}")

    def readb(self, addr: int) -> int:
        return self._load("b", addr)

    def readw(self, addr: int) -> int:
        return self._load("w", addr)

    def readl(self, addr: int) -> int:
        return self._load("l", addr)

    def readq(self, addr: int) -> int:
        return self._load("q", addr)

    def writeb(self, addr: int, value: int) -> None:
        self._store("b", addr, value)

    def writew(self, addr: int, value: int) -> None:
        self._store("w", addr, value)

    def writel(self, addr: int, value: int) -> None:
        self._store("l", addr, value)

    def writeq(self, addr: int, value: int) -> None:
        self._store("q", addr, value)

    def load(self, addr: int, size: int) -> int:
        """A naturally sized load of ``size`` (1, 2, 4 or 8) bytes."""
        kind = {1: "b", 2: "w", 4: "l", 8: "q"}.get(size)
        if kind is None:
            raise UsageError(f"qtest: access size {size} is not 1, 2, 4 or 8")
        return self._load(kind, addr)

    def store(self, addr: int, size: int, value: int) -> None:
        kind = {1: "b", 2: "w", 4: "l", 8: "q"}.get(size)
        if kind is None:
            raise UsageError(f"qtest: access size {size} is not 1, 2, 4 or 8")
        self._store(kind, addr, value)

    def read(self, addr: int, n: int) -> bytes:
        """``n`` bytes at ``addr`` (hex on the wire; ``b64read`` is cheaper for big blocks)."""
        _check_addr(addr, n)
        out = bytearray()
        for off in range(0, n, CHUNK):
            k = min(CHUNK, n - off)
            cmd = f"read {addr + off:#x} {k:#x}"
            words = self.command(cmd)
            text = words[0] if words else ""
            if not text.startswith("0x") or len(text) != 2 + 2 * k:
                raise QtestError(f"qtest: reply to {cmd!r} has {len(text)} characters")
            out += bytes.fromhex(text[2:])
        return bytes(out)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        _check_addr(addr, len(data))
        mv = memoryview(data).cast("B")
        for off in range(0, len(mv), CHUNK):
            k = min(CHUNK, len(mv) - off)
            self.command(f"write {addr + off:#x} {k:#x} 0x{mv[off:off + k].hex()}")

    def b64read(self, addr: int, n: int) -> bytes:
        _check_addr(addr, n)
        cmds = [f"b64read {addr + off:#x} {min(CHUNK, n - off):#x}" for off in range(0, n, CHUNK)]
        out = bytearray()
        for cmd, words in zip(cmds, self.pipeline(cmds), strict=True):
            k = int(cmd.split()[2], 0)
            try:
                got = base64.b64decode(words[0] if words else "", validate=True)
            except ValueError:
                raise QtestError(f"qtest: reply to {cmd!r} is not base64") from None
            if len(got) != k:
                raise QtestError(f"qtest: {cmd!r} returned {len(got)} bytes")
            out += got
        return bytes(out)

    def b64write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        _check_addr(addr, len(data))
        mv = memoryview(data).cast("B")
        cmds = []
        for off in range(0, len(mv), CHUNK):
            k = min(CHUNK, len(mv) - off)
            b64 = base64.b64encode(mv[off:off + k]).decode("ascii")
            cmds.append(f"b64write {addr + off:#x} {k:#x} {b64}")
        self.pipeline(cmds)

    def memset(self, addr: int, n: int, byte: int) -> None:
        _check_addr(addr, n)
        _check_value(byte, 1, "fill byte")
        if n:
            self.command(f"memset {addr:#x} {n:#x} {byte:#x}")

    # -- port I/O ---------------------------------------------------------------------------
    def _in(self, kind: str, port: int) -> int:
        _check_port(port)
        cmd = f"in{kind} {port:#x}"
        return self._int(self.command(cmd), cmd)

    def _out(self, kind: str, port: int, value: int) -> None:
        _check_port(port)
        _check_value(value, _SIZES[kind])
        self.command(f"out{kind} {port:#x} {value:#x}")

    def inb(self, port: int) -> int:
        return self._in("b", port)

    def inw(self, port: int) -> int:
        return self._in("w", port)

    def inl(self, port: int) -> int:
        return self._in("l", port)

    def outb(self, port: int, value: int) -> None:
        self._out("b", port, value)

    def outw(self, port: int, value: int) -> None:
        self._out("w", port, value)

    def outl(self, port: int, value: int) -> None:
        self._out("l", port, value)

    # -- clock and interrupts ---------------------------------------------------------------
    def clock_step(self, ns: int | None = None) -> int:
        """Advance the virtual clock by ``ns`` (or to the next timer deadline); returns the
        new clock value in ns."""
        if ns is not None and (not isinstance(ns, int) or ns <= 0 or ns >= 1 << 63):
            raise UsageError(f"qtest: clock step {ns!r} must be a positive int64")
        cmd = "clock_step" if ns is None else f"clock_step {ns}"
        return self._int(self.command(cmd), cmd)

    def clock_set(self, ns: int) -> int:
        if not isinstance(ns, int) or not 0 <= ns < 1 << 63:
            raise UsageError(f"qtest: clock value {ns!r} must be a non-negative int64")
        cmd = f"clock_set {ns}"
        return self._int(self.command(cmd), cmd)

    def irq_intercept_in(self, qom_path: str) -> None:
        if not qom_path or any(c.isspace() for c in qom_path):
            raise UsageError(f"qtest: QOM path {qom_path!r} must be one word")
        self.command(f"irq_intercept_in {qom_path}")

    def endianness(self) -> str:
        words = self.command("endianness")
        return words[0] if words else ""
