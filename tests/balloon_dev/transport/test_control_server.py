"""The host-control socket (balloon_dev.transport.control_server): a JSON stream with or without
newlines (QEMU's own ``qemu.qmp`` client), the answer to an over-long request reaching a client
that is still sending, the cap on connections, the request framing, and set-target's warning."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import trio

from balloon_dev.control import HostControl
from balloon_dev.transport import control_server as cs
from tests.balloon_dev.transport.vfio_user.client import Client, perform


@pytest.fixture
def control() -> Iterator[HostControl]:
    """Host control of a device a vfio-user session serves (RAM mapped, driver ready)."""
    c = Client()
    c.version()
    c.map_ram()
    c.driver_init(msix=True)
    yield HostControl(c.dev, lambda fn: perform(c.session.host(fn)), lambda: 0.0,
                      in_guest_ram=c.mem.contains, guest_ram_pages=lambda: 4096)
    c.close()


@contextmanager
def served(control: HostControl) -> Iterator[str]:
    """``serve_control`` in a thread of its own (trio), its socket path yielded."""
    d = tempfile.mkdtemp(prefix="bh-ctl-")
    path = os.path.join(d, "ctl.sock")
    started = threading.Event()
    token: list[trio.lowlevel.TrioToken] = []
    stop = trio.Event()

    async def main() -> None:
        token.append(trio.lowlevel.current_trio_token())
        async with trio.open_nursery() as n:
            await n.start(cs.serve_control, path, control)
            started.set()
            await stop.wait()
            n.cancel_scope.cancel()

    t = threading.Thread(target=trio.run, args=(main,), daemon=True)
    t.start()
    assert started.wait(10)
    try:
        yield path
    finally:
        trio.from_thread.run_sync(stop.set, trio_token=token[0])
        t.join(10)
        os.rmdir(d)


def connect(path: str) -> tuple[socket.socket, Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    f = s.makefile("rb")
    assert "QMP" in json.loads(f.readline())
    return s, f


def test_requests_without_newlines_are_answered(control: HostControl) -> None:
    with served(control) as path:
        s, f = connect(path)
        # Two requests in one write, no newline anywhere, a brace inside a string.
        s.sendall(b'{"execute":"qmp_capabilities","id":"a}"}{"execute":"stats","id":2}')
        first, second = json.loads(f.readline()), json.loads(f.readline())
        assert first == {"return": {}, "id": "a}"}
        assert second["id"] == 2 and "num_pages" in second["return"]
        # Newline-delimited requests still work, one answer per line, bad lines included.
        s.sendall(b'{"execute": "stats"}\n{"execute":\n\n  nonsense \n')
        assert "return" in json.loads(f.readline())
        assert "bad JSON" in json.loads(f.readline())["error"]["desc"]
        assert "bad JSON" in json.loads(f.readline())["error"]["desc"]
        s.close()


def test_qemu_qmp_client_negotiates_and_runs_commands(control: HostControl) -> None:
    from qemu.qmp import QMPClient  # the QEMU project's own client (test extra)

    async def main(path: str) -> tuple[Any, Any]:
        qmp = QMPClient("balloon-hint-test")
        await asyncio.wait_for(qmp.connect(path), 10)  # greeting + qmp_capabilities
        try:
            stats = await asyncio.wait_for(qmp.execute("stats"), 10)
            target = await asyncio.wait_for(qmp.execute("set-target", {"pages": 64}), 10)
        finally:
            await qmp.disconnect()
        return stats, target

    with served(control) as path:
        stats, target = asyncio.run(main(path))
    assert isinstance(stats, dict) and "num_pages" in stats
    assert target == {}
    assert control.dev.num_pages == 64


def test_overlong_request_answer_reaches_a_client_still_sending(control: HostControl) -> None:
    """10 MB with no newline: the client writes it all, then reads; it must find the answer
    (not ECONNRESET, which a close with unread input would cause)."""
    with served(control) as path:
        s, f = connect(path)
        s.sendall(b"x" * (10 << 20))
        ans = json.loads(f.readline())
        assert "too long" in ans["error"]["desc"]
        assert f.readline() == b""  # then the server ends the connection
        s.close()
        s, f = connect(path)  # and serves the next client
        s.sendall(b'{"execute":"stats"}')
        assert "return" in json.loads(f.readline())
        s.close()


def test_connections_beyond_the_cap_are_refused_with_a_reason(control: HostControl) -> None:
    with served(control) as path:
        held = [connect(path) for _ in range(cs.MAX_CONTROL_CONNECTIONS)]
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.settimeout(10)
        extra.connect(path)
        ans = json.loads(extra.makefile("rb").readline())
        assert "too many control connections" in ans["error"]["desc"]
        extra.close()
        held.pop()[0].close()
        s, f = connect(path)  # a slot freed: served again
        s.sendall(b'{"execute":"stats"}\n')
        assert json.loads(f.readline())["return"]["control_counters"] == {"control_refused_full": 1}
        s.close()
        for h, _ in held:
            h.close()


@pytest.mark.parametrize(("buf", "want"), [
    (b'{"a": 1}{"b"', (b'{"a": 1}', 8)),
    (b'  [1, [2]] x', (b"[1, [2]]", 10)),
    (b'{"s": "}\\"]"}', (b'{"s": "}\\"]"}', 13)),
    (b'{"a":\n', (b'{"a":', 6)),
    (b"nul", None),
    (b"null\n", (b"null", 5)),
    (b'{"a": "x', None),
    (b"   ", None),
])
def test_request_framing(buf: bytes, want: tuple[bytes, int] | None) -> None:
    assert cs.next_request(buf) == want


def test_set_target_beyond_guest_ram_says_so(control: HostControl) -> None:
    ans = control.execute({"execute": "set-target", "arguments": {"pages": 4097}})
    assert "exceeds the guest's RAM (4096 pages" in ans["return"]["warning"]
    assert control.dev.num_pages == 4097  # accepted all the same
    assert control.execute({"execute": "set-target", "arguments": {"pages": 4096}}) == \
        {"return": {}}
