"""A trio server run in a thread, for tests that talk to it from blocking code (a hand-made
vfio-user client or vhost-user front-end): the server's own trio loop runs in a daemon thread,
the test talks to its socket from the main thread, and on leaving the loop is cancelled from
outside (``trio.from_thread``) and joined. Whatever escaped the server's loop fails the test:
a server must survive every peer. ``wait_until`` polls for what the server does after a peer
left (it cleans up after EOF, in its own thread)."""
from __future__ import annotations

import gc
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio


@contextmanager
def trio_server_in_thread(run: Callable[..., Awaitable[Any]]) -> Iterator[None]:
    """Start ``run`` (a ``server.run(task_status=...)``) in its own trio loop in a thread; return
    once it reported started; on leaving cancel it, join the thread and assert nothing escaped."""
    errors: list[BaseException] = []
    ready = threading.Event()
    stop: list[tuple[trio.lowlevel.TrioToken, trio.CancelScope]] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            stop.append((trio.lowlevel.current_trio_token(), nursery.cancel_scope))
            await nursery.start(run)
            ready.set()

    def thread() -> None:
        try:
            trio.run(main)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
            ready.set()

    t = threading.Thread(target=thread, daemon=True)
    t.start()
    assert ready.wait(10)
    try:
        yield
    finally:
        if stop:
            token, scope = stop[0]
            try:
                trio.from_thread.run_sync(scope.cancel, trio_token=token)
            except trio.RunFinishedError:
                pass
        t.join(10)
    assert not errors, errors  # nothing escaped the server's loop


def wait_until(cond: Callable[[], object], timeout: float = 5.0) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` s passed; returns whether it holds."""
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        # A peer's own mmap of guest RAM holds a dup of its memfd until it is collected.
        gc.collect()
        time.sleep(0.02)
    return bool(cond())
