"""The qtest write path during a real QEMU-to-QEMU migration: writes through the shared mapping
are invisible to QEMU's dirty log, writes through qtest (and ``WriteThrough``'s rewrites) are
not (docs/interfaces.md "QEMU under qtest"). Deterministic: the source pauses before switchover
(``pause-before-switchover``), after its last pass over RAM; the writes land then, and only the
final dirty sync can carry them to the destination."""
from __future__ import annotations

from vmsim.qtest.machine import QtestMachine, WriteThrough

RAM = 64 << 20
PAGE = 4096


def test_only_qemu_visible_writes_reach_the_destination(qtest_qemu):
    with QtestMachine(qtest_qemu, ram_bytes=RAM) as src, \
            QtestMachine(qtest_qemu, ram_bytes=RAM, incoming="defer") as dst:
        mapped, qtested, through = 0x2000000, 0x2001000, 0x2002000
        for g in (mapped, qtested, through):
            src.mem.write(g, b"\x11" * PAGE)  # before the migration: sent in the first pass
        src.migrate_to(dst, capabilities={"pause-before-switchover": True})
        src.wait_migration(["pre-switchover"])
        # The source has sent RAM and stopped the VM; only the final sync is left.
        src.mem.write(mapped, b"\x22" * PAGE)  # through the mapping only: not dirty-logged
        src.write(qtested, b"\x22" * PAGE)     # through qtest: dirty-logged
        wt = WriteThrough(src)
        src.mem.dirty_log = wt  # type: ignore[assignment]
        src.mem.write(through, b"\x22" * PAGE)  # mapping, then rewritten through qtest
        assert wt.flush() == 1
        src.qmp("migrate-continue", state="pre-switchover")
        info = src.wait_migration(["completed"])
        dst.wait_migration(["completed"])
        assert info["ram"]["total"] >= src.total_bytes  # guest RAM + ROMs
        assert dst.mem.read(qtested, PAGE) == b"\x22" * PAGE
        assert dst.mem.read(through, PAGE) == b"\x22" * PAGE
        # The hazard the write path exists for: QEMU never saw this write, so it never sent it.
        assert dst.mem.read(mapped, PAGE) == b"\x11" * PAGE
        assert src.mem.read(mapped, PAGE) == b"\x22" * PAGE
