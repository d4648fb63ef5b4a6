"""The parts of the real-guest migration check that need no QEMU: resolving descriptor readings
into hints, the poller against a ring a thread writes the way Linux's driver does, the RAM diff
and the page classification."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from protocol.errors import EnvironmentFailure
from vmsim.cli import main as cli_main
from vmsim.hint_capture import PAGE, VRING_DESC_F_WRITE, Reading, RingAddrs, poll_ring, resolve
from vmsim.lab_migrate import (
    classify,
    differing_pages,
    set_apart_device_rings,
    used_rings,
    zero_pages,
)

MIB4 = 4 << 20


def reading(entry, head, addr, *, hint=True, cmd=None):
    return Reading(entry, head, addr, MIB4 if hint else 4, VRING_DESC_F_WRITE if hint else 0,
                   cmd, entry)


def test_resolve_counts_hints_rounds_and_late_readings():
    start, stop = 0x1000, 0x2000
    rs = [reading(0, 0, start, hint=False, cmd=0x80000001),
          reading(1, 0, 0x40000000), reading(2, 0, 0x40400000),
          # entry 3 was read after the driver had reused descriptor 0 for entry 4
          reading(3, 0, 0x40C00000), reading(4, 0, 0x40C00000),
          reading(5, 0, stop, hint=False, cmd=0),
          reading(6, 0, start, hint=False, cmd=0x80000002), reading(7, 1, 0x50000000)]
    res = resolve(rs)
    assert [h.addr for h in res.hints] == [0x40000000, 0x40400000, 0x40C00000, 0x50000000]
    assert [h.round for h in res.hints] == [1, 1, 1, 2]
    assert res.rounds == [0x80000001, 0x80000002]
    assert res.suspect == 1
    assert res.hinted_bytes == 4 * MIB4
    assert res.ranges() == [(0x40000000, 0x40800000), (0x40C00000, 0x41000000),
                            (0x50000000, 0x50400000)]


def test_resolve_same_head_start_after_stop_is_not_suspect():
    rs = [reading(0, 0, 0x1000, hint=False, cmd=0x80000001),
          reading(1, 0, 0x2000, hint=False, cmd=0),
          reading(2, 0, 0x1000, hint=False, cmd=0x80000002),
          reading(3, 0, 0x2000, hint=False, cmd=0)]
    res = resolve(rs)
    assert res.suspect == 0 and res.rounds == [0x80000001, 0x80000002] and not res.hints


def test_resolve_round_whose_start_was_read_late():
    rs = [reading(0, 0, 0x40000000), reading(1, 0, 0x40000000),  # START overwritten
          reading(2, 0, 0x2000, hint=False, cmd=0),
          reading(3, 0, 0x40400000)]                              # START and STOP missed
    res = resolve(rs)
    assert res.rounds == [0, 0] and res.suspect == 1
    assert [h.round for h in res.hints] == [1, 2]


class _Driver:
    """Plays Linux's driver between the poller's polls (``poll_ring`` asks ``stop.is_set()``
    after every poll when ``check_every=1``): each step publishes ``per_step`` entries, all on
    descriptor 0, reused at once as the driver does after the device consumed it."""

    def __init__(self, ring, buf, entries, per_step):
        self.ring, self.buf, self.entries, self.per_step = ring, buf, list(entries), per_step
        self.idx = 0

    def is_set(self):
        if not self.entries:
            return True
        for addr, length, flags in self.entries[:self.per_step]:
            struct.pack_into("<QIHH", self.buf, self.ring.desc, addr, length, flags, 0)
            struct.pack_into("<H", self.buf, self.ring.avail + 4 + 2 * (self.idx % self.ring.num),
                             0)
            self.idx += 1
            struct.pack_into("<H", self.buf, self.ring.avail + 2, self.idx & 0xFFFF)
        del self.entries[:self.per_step]
        return False


def _round(cmd_at, addrs):
    return ([(cmd_at, 4, 0)] + [(a, MIB4, VRING_DESC_F_WRITE) for a in addrs]
            + [(cmd_at + 4, 4, 0)])


def test_poller_reads_every_hint_of_a_slow_driver():
    ring = RingAddrs(desc=0x0, avail=0x4000, used=0x5000, num=1024)
    buf = bytearray(1 << 20)
    cmd_at = 0x8000
    struct.pack_into("<I", buf, cmd_at, 0x80000001)
    addrs = [0x100000 * (i + 1) for i in range(50)]
    drv = _Driver(ring, buf, _round(cmd_at, addrs), per_step=1)
    readings, polls, _gap = poll_ring(buf, ring, 0, drv, check_every=1)
    res = resolve(readings, polls)
    assert len(readings) == 52
    assert res.rounds == [0x80000001]
    assert [h.addr for h in res.hints] == addrs
    assert res.suspect == 0


def test_poller_late_readings_are_counted_not_invented():
    """The driver publishes two entries per poll on one descriptor: the first of each pair is
    read too late; its hint is lost and counted, and no address is invented."""
    ring = RingAddrs(desc=0x0, avail=0x4000, used=0x5000, num=8)   # wraps the ring too
    buf = bytearray(1 << 16)
    addrs = [0x400000 * (i + 1) for i in range(10)]
    drv = _Driver(ring, buf, [(a, MIB4, VRING_DESC_F_WRITE) for a in addrs], per_step=2)
    readings, _p, _g = poll_ring(buf, ring, 0, drv, check_every=1)
    res = resolve(readings)
    assert len(readings) == 10
    assert [h.addr for h in res.hints] == addrs[1::2]
    assert res.suspect == 5


@pytest.fixture
def ram_pair(tmp_path):
    pages = 64
    src = np.zeros((pages, PAGE), np.uint8)
    dst = np.zeros((pages, PAGE), np.uint8)
    src[3, 10] = 1            # differs, dst zero (never sent)
    src[4] = 7
    dst[4] = 9                # differs, dst stale
    src[40, 4095] = 1         # differs, outside any hint
    src[41, 0] = 2
    src[50] = dst[50] = 5     # equal
    sp, dp = tmp_path / "src.ram", tmp_path / "dst.ram"
    sp.write_bytes(src.tobytes())
    dp.write_bytes(dst.tobytes())
    return str(sp), str(dp)


def test_differing_pages_and_classification(ram_pair):
    src, dst = ram_pair
    pages = differing_pages(src, dst, chunk=16 * PAGE)
    assert pages.tolist() == [3, 4, 40, 41]
    c = classify(pages, [(2 * PAGE, 8 * PAGE)], zero_pages(dst, pages))
    assert (c.differing, c.hinted, c.hinted_dst_zero, c.lost) == (4, 2, 1, 2)
    assert c.lost_runs == [(40 * PAGE, 42 * PAGE)]
    none = classify(pages, [], zero_pages(dst, pages))
    assert none.lost == 4 and none.hinted == 0


def test_pages_differing_only_in_a_used_ring_are_set_apart(tmp_path):
    """The device's write of a used ring's avail_event after the final sync: not a lost guest
    write. A page differing there and elsewhere stays lost."""
    src = np.zeros(8 * PAGE, np.uint8)
    dst = src.copy()
    used = (2 * PAGE + 0x840, 2 * PAGE + 0x840 + 6 + 8 * 256)   # ends in page 3, at +0x46
    src[used[1] - 2] = 7          # page 3: avail_event only
    src[5 * PAGE + 100] = 1       # page 5: elsewhere
    src[used[1] - 1] = 1          # page 3 again: still inside the ring
    src[6 * PAGE + 10] = 1        # page 6: not in any ring
    sp, dp = tmp_path / "s", tmp_path / "d"
    sp.write_bytes(src.tobytes())
    dp.write_bytes(dst.tobytes())
    pages = differing_pages(str(sp), str(dp))
    c = classify(pages, [], zero_pages(str(dp), pages))
    assert c.lost == 3
    set_apart_device_rings(c, str(sp), str(dp), [used])
    assert c.device_ring == 1 and c.device_ring_pages == [3 * PAGE]
    assert c.lost == 2 and c.lost_runs == [(5 * PAGE, 7 * PAGE)]
    assert used_rings([{"vring-used": used[0], "vring-num": 256}]) == [used]


def test_differing_pages_refuses_files_of_different_size(tmp_path):
    (tmp_path / "a").write_bytes(bytes(2 * PAGE))
    (tmp_path / "b").write_bytes(bytes(3 * PAGE))
    with pytest.raises(EnvironmentFailure, match="differ in size"):
        differing_pages(str(tmp_path / "a"), str(tmp_path / "b"))


@pytest.mark.parametrize("argv", [["--ram", "64M"], ["--ram", "lots"], ["--runs", "0"],
                                  ["--ram", "524300K"]])
def test_bad_arguments_exit_2(argv, capsys):
    assert cli_main(["migrate-check", *argv]) == 2
    assert "migrate-check" in capsys.readouterr().err


def test_ram_not_whole_mib_is_given_to_qemu_in_kib(tmp_path):
    """512 MiB + 8 KiB: not a multiple of 64 pages, so QEMU syncs its dirty bitmap page by
    page (the path that resets the TLB's dirty state: docs/qemu-lab.md)."""
    from vmsim.qemu_lab import QemuLab
    lab = QemuLab(tmp_path, {"qemu_root": "q", "kernel": "k", "initrd": "i",
                             "kernel_release": "r", "qemu_version": "11.1.3"})
    args = lab.machine_args(ram="524296K")
    assert args[args.index("-m") + 1] == "524296K"
    assert f"size={524296 << 10}," in " ".join(args)
    args = lab.machine_args(ram="512M")
    assert args[args.index("-m") + 1] == "512"


@pytest.mark.parametrize("version, ram, warned", [
    ("7.2.22", 512 << 20, True), ("8.2.2", 1 << 30, True),
    ("7.2.22", (512 << 20) + (8 << 10), False), ("9.0.0", 512 << 20, False),
    ("11.1.3", 512 << 20, False), ("unknown", 512 << 20, False),
])
def test_old_qemu_with_whole_word_ram_is_warned_about(version, ram, warned):
    from vmsim.lab_migrate import tcg_dirty_note
    note = tcg_dirty_note(version, ram)
    assert (note is not None) == warned
    assert note is None or "03bfc2188f" in note


def _stream(tmp_path):
    """A tiny stream as QEMU writes it: header, RAM START with the block list, two
    iterations (PART) and the END section, each closed by EOS and a footer."""
    import struct as st

    from vmsim import migration_stream as ms
    sid = 2
    out = st.pack(">II", ms.QEMU_VM_FILE_MAGIC, 3)
    out += bytes([ms.SECTION_START]) + st.pack(">I", sid) + b"\x03ram" + st.pack(">II", 0, 4)
    out += st.pack(">Q", (8 * PAGE) | ms.F_MEM_SIZE) + b"\x03mem" + st.pack(">Q", 8 * PAGE)
    out += st.pack(">Q", ms.F_EOS) + bytes([ms.SECTION_FOOTER]) + st.pack(">I", sid)
    page = bytes(range(256)) * 16
    # iteration 1: page 0 (new block name), zero page 1
    out += bytes([ms.SECTION_PART]) + st.pack(">I", sid)
    out += st.pack(">Q", 0 | ms.F_PAGE) + b"\x03mem" + page
    out += st.pack(">Q", PAGE | ms.F_ZERO | ms.F_CONTINUE) + b"\x00"
    out += st.pack(">Q", ms.F_MULTIFD_FLUSH)
    out += st.pack(">Q", ms.F_EOS) + bytes([ms.SECTION_FOOTER]) + st.pack(">I", sid)
    # the stop-and-copy pass: page 0 again
    out += bytes([ms.SECTION_END]) + st.pack(">I", sid)
    out += st.pack(">Q", 0 | ms.F_PAGE | ms.F_CONTINUE) + page
    out += st.pack(">Q", ms.F_EOS) + bytes([ms.SECTION_FOOTER]) + st.pack(">I", sid)
    out += bytes([0x04]) + b"device state follows, not parsed"
    p = tmp_path / "s.stream"
    p.write_bytes(out)
    return str(p), page


def test_ram_records_lists_pages_per_iteration(tmp_path):
    from vmsim.migration_stream import ram_records
    path, page = _stream(tmp_path)
    recs = ram_records(path)
    assert [(r.iteration, r.block, r.offset, r.zero) for r in recs] == [
        (1, "mem", 0, False), (1, "mem", PAGE, True), (2, "mem", 0, False)]
    data = open(path, "rb").read()
    assert data[recs[2].pos:recs[2].pos + PAGE] == page


def test_ram_records_refuses_other_files(tmp_path):
    from vmsim.migration_stream import StreamFormatError, ram_records
    p = tmp_path / "x"
    p.write_bytes(b"not a stream at all")
    with pytest.raises(StreamFormatError, match="not a QEMU migration stream"):
        ram_records(str(p))
    path, _ = _stream(tmp_path)
    cut = tmp_path / "cut"
    cut.write_bytes(open(path, "rb").read()[:200])
    with pytest.raises(StreamFormatError, match="ends inside"):
        ram_records(str(cut))
