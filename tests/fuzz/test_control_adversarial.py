"""Adversarial input on the host-control socket (``serve_control`` + ``HostControl``).

A seeded-random client sends lines of every kind a confused or hostile tool could send: random
bytes, non-JSON, JSON of the wrong shape (lists, numbers, strings, nested objects), commands
with arguments of the wrong type or range, deeply nested JSON (which makes Python's parser
raise ``RecursionError``, not ``ValueError``), non-UTF-8, lone surrogates, NaN/Infinity, and
lines longer than the limit. The properties:

* every non-blank line within the limit gets exactly one reply line, a JSON object with either
  ``return`` or ``error`` (and the request's ``id`` echoed when one was given);
* an over-long line gets an error reply and the connection is closed (framing is lost);
* the control server keeps accepting connections: a fresh client's ``stats`` works afterwards;
* the device's state is untouched by rejected commands (``num_pages`` only moves by a valid
  ``set-target``);
* no fd leaks once the connections are closed.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from typing import Any

import trio

from balloon_dev.control import HostControl
from balloon_dev.transport.control_server import MAX_CONTROL_LINE, serve_control
from protocol.balloon import CFG_NUM_PAGES
from tests.balloon_dev.transport.vfio_user.client import Client, perform
from tests.fdutil import open_fds


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1 << 32, (1 << 64) + 5, 4096, 2**31, 10**40])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e308])
    if kind == 4:
        return rng.choice(["", "stats", "hint-start", "\x00", "\ud800", "x" * 300])
    if kind == 5:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["execute", "arguments", "id", "pages", "k"]): _random_json(rng, depth + 1)
            for _ in range(rng.randrange(4))}


COMMANDS = ["hint-start", "hint-stop", "hint-done", "set-target", "request-stats", "stats",
            "qmp_capabilities", "nonsense", "", "STATS"]


def _line(rng: random.Random) -> tuple[bytes, int | None]:
    """One request line (no newline) and the target it validly sets (else None)."""
    k = rng.randrange(12)
    if k == 0:  # random bytes, newline-free, not blank
        return b"#" + bytes(rng.choice([b for b in range(256) if b != 10])
                            for _ in range(rng.randrange(200))), None
    if k == 1:
        return rng.choice([b"{", b"}", b"[1,", b"nul", b'{"execute":', b"\xff\xfe",
                           b'"\\ud800"', b"NaN", b"-Infinity", b"1e999999"]), None
    if k == 2:  # nesting past the recursion limit
        token = rng.choice([b"[", b'{"a":'])
        depth = rng.choice([2000, 10000, (MAX_CONTROL_LINE - 16) // len(token)])
        return token * depth, None
    if k == 3:
        return json.dumps(_random_json(rng)).encode(), None
    if k == 4:
        obj: dict[str, Any] = {"execute": rng.choice(COMMANDS)}
        if rng.random() < 0.7:
            obj["arguments"] = _random_json(rng)
        if rng.random() < 0.5:
            obj["id"] = _random_json(rng)
        return json.dumps(obj).encode(), None
    if k == 5:
        pages = rng.choice([-1, 1 << 32, 1.5, "12", True, None, [1], {"p": 1}, float("nan")])
        return json.dumps({"execute": "set-target", "arguments": {"pages": pages}}).encode(), None
    if k == 6:
        pages = rng.randrange(0, 1 << 12)
        return json.dumps({"execute": "set-target", "arguments": {"pages": pages},
                           "id": rng.randrange(100)}).encode(), pages
    if k == 7:
        return b'{"execute": "stats", "id": ' + rng.choice([b"NaN", b"1e400", b"[]", b"{}"]) \
            + b"}", None
    return json.dumps({"execute": rng.choice(COMMANDS)}).encode(), None


class LineClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def readline(self) -> bytes | None:
        while b"\n" not in self.buf:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line


async def _connect(path: str) -> LineClient:
    c = LineClient(await trio.open_unix_socket(path))
    welcome = json.loads(await c.readline() or b"null")
    assert "QMP" in welcome
    return c


def _num_pages(c: Client) -> int:
    return int.from_bytes(c.dev.read_config(CFG_NUM_PAGES, 4), "little")


def test_control_socket_survives_random_lines() -> None:
    rng = random.Random(0xC0117)
    c = Client()
    c.version()
    c.map_ram()
    c.driver_init(msix=True)
    hc = HostControl(c.dev, lambda fn: perform(c.session.host(fn)), lambda: 0.0,
                     in_guest_ram=c.mem.contains)
    baseline = open_fds()

    async def main() -> None:
        with tempfile.TemporaryDirectory() as d, trio.fail_after(60):
            path = os.path.join(d, "ctl.sock")
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_control, path, hc)
                target = _num_pages(c)
                for _conn in range(6):
                    cl = await _connect(path)
                    for _ in range(40):
                        line, sets = _line(rng)
                        await cl.stream.send_all(line + b"\n")
                        reply = await cl.readline()
                        assert reply is not None, line[:80]
                        ans = json.loads(reply)
                        assert isinstance(ans, dict) and ("return" in ans) != ("error" in ans), ans
                        if sets is not None:
                            assert "return" in ans, (line, ans)
                            target = sets
                        assert _num_pages(c) == target, line[:80]
                    # An over-long line: one error reply, then the connection is closed. (Exactly
                    # one byte too many, so the server has read all of it and closes cleanly
                    # instead of resetting the connection under its own reply.)
                    await cl.stream.send_all(b"[" * (MAX_CONTROL_LINE + 1))
                    ans = json.loads(await cl.readline() or b"null")
                    assert "error" in ans and "too long" in ans["error"]["desc"]
                    assert await cl.readline() is None
                    await cl.stream.aclose()
                cl = await _connect(path)
                await cl.stream.send_all(b'{"execute": "stats"}\n')
                stats = json.loads(await cl.readline() or b"null")
                assert stats["return"]["num_pages"] == target
                await cl.stream.aclose()
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert open_fds() <= baseline
    c.close()
