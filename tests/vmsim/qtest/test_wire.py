"""The qtest line client against a scripted peer (no QEMU): replies, asynchronous IRQ lines,
refusals, argument checks before anything is sent, pipelines staying in step."""
from __future__ import annotations

import base64
import socket
import threading

import pytest

from protocol.errors import UsageError
from vmsim.qtest.wire import CHUNK, QtestCommandFailed, QtestConnection, QtestError


class FakeQemu:
    """Answers each received line with ``answer(line)`` (a string of whole lines)."""

    def __init__(self, answer) -> None:
        self.ours, theirs = socket.socketpair()
        self.sock = theirs
        self.answer = answer
        self.lines: list[str] = []
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        buf = b""
        while True:
            data = self.sock.recv(1 << 20)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self.lines.append(line.decode())
                out = self.answer(line.decode())
                if out is None:
                    self.sock.close()
                    return
                self.sock.sendall(out.encode())

    def client(self) -> QtestConnection:
        return QtestConnection(self.ours, timeout=2.0)


def test_values_and_async_irq_lines():
    def answer(line: str) -> str:
        if line.startswith("readl"):
            return "IRQ raise 11\nOK 0x00000000deadbeef\n"
        if line.startswith("inb"):
            return "OK 0x0012\nIRQ lower 11\n"
        return "OK\n"
    fake = FakeQemu(answer)
    qt = fake.client()
    assert qt.readl(0x1000) == 0xDEADBEEF
    assert qt.inb(0x71) == 0x12
    qt.writel(0x1000, 5)
    assert qt.irq_events[0] == ("raise", 11)
    # The IRQ line after inb's reply is read with the next reply, never taken for one.
    assert qt.command("endianness") == []
    assert qt.irq_events == [("raise", 11), ("lower", 11)]
    assert fake.lines == ["readl 0x1000", "inb 0x71", "writel 0x1000 0x5", "endianness"]
    assert qt.ops == 4


def test_fail_and_err_raise_and_pipeline_stays_in_step():
    def answer(line: str) -> str:
        return "FAIL Unknown command 'bogus'\n" if line.startswith("bogus") else "OK 0x1\n"
    fake = FakeQemu(answer)
    qt = fake.client()
    with pytest.raises(QtestCommandFailed, match="bogus"):
        qt.pipeline(["readb 0x0", "bogus", "readb 0x1"])
    assert qt.readb(2) == 1  # the third reply was consumed by the pipeline, not left behind


def test_bad_arguments_never_reach_qemu():
    fake = FakeQemu(lambda line: "OK\n")
    qt = fake.client()
    for call in (lambda: qt.outb(0x10000, 1), lambda: qt.writeb(0, 0x100),
                 lambda: qt.readq(-1), lambda: qt.writel(2**64 - 2, 0),
                 lambda: qt.memset(0, 4, 256), lambda: qt.clock_step(0),
                 lambda: qt.command("a\nb"), lambda: qt.irq_intercept_in("a b")):
        with pytest.raises(UsageError):
            call()
    qt.b64write(0x1000, b"")  # zero-length blocks are answered here (QEMU refuses them)
    assert qt.b64read(0x1000, 0) == b""
    qt.memset(0x1000, 0, 0)
    assert fake.lines == []


def test_blocks_are_chunked_and_decoded():
    store = bytearray(3 * CHUNK + 7)

    def answer(line: str) -> str:
        w = line.split()
        addr, n = int(w[1], 0), int(w[2], 0)
        if w[0] == "b64write":
            store[addr:addr + n] = base64.b64decode(w[3])
            return "OK\n"
        if w[0] == "b64read":
            return "OK " + base64.b64encode(store[addr:addr + n]).decode() + "\n"
        if w[0] == "read":
            return "OK 0x" + store[addr:addr + n].hex() + "\n"
        return "OK\n"
    fake = FakeQemu(answer)
    qt = fake.client()
    data = bytes(range(256)) * (len(store) // 256) + bytes(len(store) % 256)
    qt.b64write(0, data)
    assert sum(1 for x in fake.lines if x.startswith("b64write")) == 4
    assert qt.b64read(0, len(data)) == data
    assert qt.read(5, 300) == data[5:305]


def test_lost_connection_and_garbage_are_errors():
    fake = FakeQemu(lambda line: None)  # closes at the first command
    with pytest.raises(QtestError, match="closed"):
        fake.client().readb(0)
    fake = FakeQemu(lambda line: "hello\n")
    with pytest.raises(QtestError, match="unexpected reply"):
        fake.client().readb(0)
    fake = FakeQemu(lambda line: "OK nothex\n")
    with pytest.raises(QtestError, match="no number"):
        fake.client().readb(0)


def test_long_pipelines_are_windowed():
    """More commands than the window: replies are read between groups, all in order."""
    from vmsim.qtest.wire import WINDOW

    sent_before_reply: list[int] = []

    def answer(line: str) -> str:
        sent_before_reply.append(int(line.split()[1], 0))
        return f"OK {int(line.split()[1], 0):#x}\n"
    fake = FakeQemu(answer)
    qt = fake.client()
    n = 3 * WINDOW + 5
    got = qt.pipeline([f"readb {i:#x}" for i in range(n)])
    assert [int(w[0], 0) for w in got] == list(range(n))
    assert qt.ops == n
