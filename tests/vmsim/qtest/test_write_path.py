"""The qtest write path during a real QEMU-to-QEMU migration: writes through the shared mapping
are invisible to QEMU's dirty log, writes through qtest (and ``WriteThrough``'s rewrites) are
not (docs/interfaces.md "QEMU under qtest"). Deterministic: the source pauses before switchover
(``pause-before-switchover``), after its last pass over RAM; the writes land then, and only the
final dirty sync can carry them to the destination."""
from __future__ import annotations

import os
import time

from vmsim.qtest.machine import QtestMachine, WriteThrough

RAM = 64 << 20
PAGE = 4096


def wait_status(m: QtestMachine, want: set[str], timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        st = m.qmp("query-migrate").get("status", "none")
        if st in want:
            return str(st)
        assert st not in ("failed", "cancelled"), m.qmp("query-migrate")
        assert time.monotonic() < deadline, f"migration stuck in {st}"
        time.sleep(0.01)


def test_only_qemu_visible_writes_reach_the_destination(qtest_qemu):
    with QtestMachine(qtest_qemu, ram_bytes=RAM) as src, \
            QtestMachine(qtest_qemu, ram_bytes=RAM, incoming="defer") as dst:
        sock = os.path.join(dst.tmpdir, "mig.sock")
        dst.qmp("migrate-incoming", uri=f"unix:{sock}")
        mapped, qtested, through = 0x2000000, 0x2001000, 0x2002000
        for g in (mapped, qtested, through):
            src.mem.write(g, b"\x11" * PAGE)  # before the migration: sent in the first pass
        src.qmp("migrate-set-capabilities", capabilities=[
            {"capability": "pause-before-switchover", "state": True}])
        src.qmp("migrate", uri=f"unix:{sock}")
        wait_status(src, {"pre-switchover"})
        # The source has sent RAM and stopped the VM; only the final sync is left.
        src.mem.write(mapped, b"\x22" * PAGE)  # through the mapping only: not dirty-logged
        src.write(qtested, b"\x22" * PAGE)     # through qtest: dirty-logged
        wt = WriteThrough(src)
        src.mem.dirty_log = wt  # type: ignore[assignment]
        src.mem.write(through, b"\x22" * PAGE)  # mapping, then rewritten through qtest
        assert wt.flush() == 1
        src.qmp("migrate-continue", state="pre-switchover")
        wait_status(src, {"completed"})
        wait_status(dst, {"completed"})
        assert dst.mem.read(qtested, PAGE) == b"\x22" * PAGE
        assert dst.mem.read(through, PAGE) == b"\x22" * PAGE
        # The hazard the write path exists for: QEMU never saw this write, so it never sent it.
        assert dst.mem.read(mapped, PAGE) == b"\x11" * PAGE
        assert src.mem.read(mapped, PAGE) == b"\x22" * PAGE
