"""``balloon-hint migrate --host qemu``: scenarios migrated by two real QEMUs under qtest
(vmsim.qtest.host_migrate). Small guests (128 MiB, each run a few seconds): the destination
check must pass, hints must cut what QEMU sends when freed memory holds data, and a broken
driver that hints pages in use must make the check fail."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema  # type: ignore[import-untyped]
import numpy as np
import pytest

from vmsim.cli import main
from vmsim.qtest.host_migrate import (
    FOUR_GIB,
    Layout,
    byte_mismatches,
    compare_rows,
    qemu_ram_for,
    run_qemu_scenario,
    scale_scenario,
    thread_sched,
    wait_thread_asleep,
    write_pages_qtest,
)
from vmsim.scenario import load_builtin, loads
from vmsim.vm import run_scenario

FREED = """
name = "qtest-freed"
description = "128 MiB guest, 64 MiB freed but full of data, a little writing during migration"
[guest]
ram = "128MiB"
seed = 2
[[workload]]
kind = "fill"
size = "16MiB"
[[workload]]
kind = "fill_free"
size = "64MiB"
[[workload]]
kind = "dirty"
during = true
rate = "4MiB/s"
[migration]
bandwidth = "400Mbit/s"
downtime_limit = "50ms"
"""

CHURN = """
name = "qtest-churn"
description = "128 MiB guest allocating, writing and freeing while it migrates"
[guest]
ram = "128MiB"
seed = 4
init_on_alloc = true
[[workload]]
kind = "fill"
size = "16MiB"
[[workload]]
kind = "fill_free"
size = "48MiB"
[[workload]]
kind = "churn"
during = true
rate = "16MiB/s"
lifetime = "100ms"
footprint = "8MiB"
[[workload]]
kind = "dirty"
during = true
rate = "8MiB/s"
[migration]
bandwidth = "400Mbit/s"
downtime_limit = "20ms"
max_rounds = 6
"""


def _check(r, what: str) -> None:
    assert r.error is None, r.error
    assert r.source_mismatches == 0, f"{what}: the qtest write path lost guest writes"
    assert r.verified, (f"{what}: {r.mismatched_pages} pages in use differ on the destination "
                        f"(first {r.first_mismatches}), {r.poison_violations} poison violations")
    assert r.checked_pages > 0


def test_hints_cut_qemus_bytes_and_the_destination_matches(qtest_qemu):
    scn = loads(FREED)
    off = run_qemu_scenario(scn, "off", qemu=qtest_qemu)
    cap = run_qemu_scenario(scn, "capture", qemu=qtest_qemu)
    _check(off, "off")
    _check(cap, "capture")
    # 64 MiB of freed data: QEMU sends it without hints and skips it with them.
    assert off.transferred_bytes > (80 << 20)
    assert cap.transferred_bytes < off.transferred_bytes - (48 << 20), (
        off.transferred_bytes, cap.transferred_bytes)
    assert cap.hinted_pages > 0 and off.hinted_pages == 0
    # The pause saw QEMU's hint iothread asleep before the last RAM pass (no late store into
    # the used ring); without free-page-hint there is no such thread.
    assert cap.hint_thread == "asleep" and off.hint_thread == "none"
    # The guest kept writing during the migration, through qtest.
    assert cap.pages_written > 0
    # QEMU's figures sit beside the simulator's for the same scenario and seed.
    rows = {r.name: r for r in compare_rows(run_scenario(scn, "capture"), cap)}
    assert rows["transferred"].qemu == cap.transferred_bytes
    assert rows["dirty syncs"].qemu == cap.dirty_sync_count >= 2


def test_walk_under_churn_with_init_on_alloc_verifies(qtest_qemu):
    """Allocation, zeroing and freeing during the migration: every page the guest uses at
    switchover, as the guest model last wrote it, is on the destination."""
    r = run_qemu_scenario(loads(CHURN), "walk", qemu=qtest_qemu)
    _check(r, "walk under churn")
    assert r.pages_written > 500
    assert r.hint_rounds >= 1


def test_page_poison_free_pages_keep_their_poison_on_the_destination(qtest_qemu):
    """With page poisoning free pages must arrive poisoned: capture verifies; the seed's walk
    loses the poison of pages it hinted (as in the simulator), and only of those."""
    scn = loads(FREED.replace('seed = 2', 'seed = 2\npage_poison = true'))
    assert scn.guest.page_poison
    _check(run_qemu_scenario(scn, "capture", qemu=qtest_qemu), "capture, page poison")
    walk = run_qemu_scenario(scn, "walk", qemu=qtest_qemu)
    assert walk.mismatched_pages == 0 and not walk.verified
    assert walk.poison_violations == walk.poison_violations_from_hints > 0


def test_a_driver_hinting_pages_in_use_fails_the_check(qtest_qemu):
    r = run_qemu_scenario(loads(FREED), "capture", qemu=qtest_qemu, fault="hint-in-use")
    assert r.error is None
    assert r.source_mismatches == 0  # the source is right; the destination lacks pages
    assert not r.verified
    assert r.mismatched_pages > 0


def test_cli_prints_simulator_beside_qemu(qtest_qemu, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "r.json"
    scn = tmp_path / "s.toml"
    scn.write_text(FREED)
    rc = main(["migrate", str(scn), "--host", "qemu", "--mode", "capture", "--ram", "64MiB",
               "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "RAM scaled from 128.0 MiB to 64.0 MiB" in text
    assert "QEMU vs sim" in text
    doc = json.loads(out.read_text())
    jsonschema.Draft202012Validator(json.loads(
        (Path(__file__).resolve().parents[3] / "vmsim" / "schemas" / "migrate.schema.json")
        .read_text())).validate(doc)
    q = doc["qemu"]["runs"][0]
    assert q["verified"] and q["guest_ram_bytes"] == 64 << 20
    assert [c["name"] for c in q["compare"]][:3] == ["transferred", "normal pages",
                                                      "zero pages"]
    assert doc["results"][0]["guest_ram_bytes"] == 64 << 20  # the simulator ran the same


# -- no QEMU needed ------------------------------------------------------------------------------
def test_scaling_keeps_fractions_of_ram():
    scn = load_builtin("memhog-freed-8g")
    ram, why = qemu_ram_for(scn, None)
    assert ram == 2 << 30 and why is not None and "scaled from 8.0 GiB to 2.0 GiB" in why
    small, f = scale_scenario(scn, ram)
    assert f == 0.25
    sizes = {w.kind: w.params for w in small.workloads}
    assert sizes["fill_free"]["size"] == (6 << 30) // 4
    assert sizes["dirty"]["rate"] == pytest.approx(2 * (1 << 20) / 4)
    assert small.migration == scn.migration
    assert qemu_ram_for(load_builtin("small-idle"), None) == (256 << 20, None)


def test_layout_above_4g_reserves_the_pci_hole():
    lay = Layout.for_ram(4 << 30)
    # q35: 2 GiB below 4 GiB, the rest at 4 GiB; model pfns are guest-physical
    assert lay.pieces == ((0, 0, 0x80000), (FOUR_GIB >> 12, 0x80000, 0x80000))
    assert lay.model_bytes == 6 << 30
    hole = lay.hole_mask()
    assert hole[0x80000:FOUR_GIB >> 12].all() and not hole[FOUR_GIB >> 12:].any()
    assert hole[0xA0:0x100].all() and not hole[:0xA0].any()
    assert np.count_nonzero(~hole) == (4 << 30) // 4096 - 0x60


@pytest.mark.parametrize("argv, msg", [
    (["--ram", "64MiB"], "--ram applies to --host qemu"),
    (["--fault", "hint-in-use"], "needs --host qemu"),
    (["--host", "qemu", "--fault", "accept-stale-hints"], "fault of the simulated host"),
    (["--host", "kvm"], "sim, qemu or qemu:PATH"),
    (["--host", "qemu", "--ram", "8GiB"], "up to 4.0 GiB"),
])
def test_bad_host_arguments(argv, msg, capsys):
    assert main(["migrate", "--builtin", "small-idle", *argv]) == 2
    assert msg in capsys.readouterr().err


def test_a_lossy_host_scenario_is_not_run_on_qemu(capsys):
    assert main(["migrate", "--builtin", "lab-512m-ioa1-qemu72", "--host", "qemu",
                 "--mode", "capture"]) == 2
    assert "use --host sim" in capsys.readouterr().err


@pytest.mark.parametrize("states, outcome, reads", [
    ([("R", 1), ("S", 2), ("S", 2)], "asleep", 3),
    # asleep at both samples, but it ran (and slept again) in between: not yet
    ([("S", 2), ("S", 3), ("S", 3)], "asleep", 3),
    ([("S", 2), ("R", 2), ("S", 3), ("S", 3)], "asleep", 4),
    ([None], "gone", 1),
    ([("S", 2), None], "gone", 2),
])
def test_wait_thread_asleep_needs_a_quiet_interval(states, outcome, reads):
    calls = []

    def sched(tid):
        calls.append(tid)
        return states[len(calls) - 1]
    got, waited = wait_thread_asleep(7, timeout=10, quiet_s=0, sched=sched)
    assert got == outcome and len(calls) == reads and calls[0] == 7
    assert 0 <= waited < 10


def test_wait_thread_asleep_gives_up_on_a_busy_thread():
    got, waited = wait_thread_asleep(7, timeout=0.05, quiet_s=0.001, sched=lambda t: ("R", 5))
    assert got == "busy" and waited >= 0.05


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="no Linux /proc on this host")
def test_thread_sched_tells_a_sleeping_process_from_a_spinning_one():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        # started: wait until the sleeper is in its sleep
        assert wait_thread_asleep(sleeper.pid, timeout=20)[0] == "asleep"
        st = thread_sched(sleeper.pid)
        assert st is not None and st[0] == "S"
        assert wait_thread_asleep(spinner.pid, timeout=0.2)[0] == "busy"
    finally:
        for p in (sleeper, spinner):
            p.kill()
            p.wait()
    assert thread_sched(sleeper.pid) is None
    assert wait_thread_asleep(sleeper.pid)[0] == "gone"


def test_byte_mismatches_names_the_differing_bytes():
    base = 0x100000
    src = np.zeros(4 * 4096, np.uint8)
    dst = src.copy()
    dst[4096 + 5] = 1           # page 0x101, byte 5
    dst[3 * 4096 + 4095] = 9    # page 0x103, its last byte
    assert byte_mismatches(src, dst, base, [0x103, 0x101]) == [0x101005, 0x103FFF]
    assert byte_mismatches(src, dst, base, [0x101]) == [0x101005]
    assert byte_mismatches(src, dst, base, [0x100, 0x102]) == []
    dst[2 * 4096:2 * 4096 + 20] = 3
    assert byte_mismatches(src, dst, base, [0x102], limit=4) == [0x102000 + i for i in range(4)]


class _Recorder:
    """A machine whose qtest link records the commands it is given."""
    def __init__(self):
        self.cmds = []
        self.qt = self

    def pipeline(self, cmds):
        self.cmds.extend(cmds)
        return [["OK"]] * len(cmds)


def test_write_pages_qtest_zeroes_runs_with_one_memset():
    """Pages turning zero go as one memset per run of consecutive pages (at most 1024 pages,
    4 MiB, per command); pages with data keep one 16-byte header write each."""
    zero_run = np.arange(2000, 3500)
    pfns = np.concatenate(([9, 7, 5, 6, 10], zero_run)).astype(np.int64)
    versions = np.zeros(pfns.size, np.uint32)
    versions[4] = 3  # pfn 10 holds data
    m = _Recorder()
    write_pages_qtest(m, pfns, versions)  # type: ignore[arg-type]
    memsets = [c.split() for c in m.cmds if c.startswith("memset")]
    assert [(int(a, 16) >> 12, int(n, 16) >> 12, v) for _, a, n, v in memsets] == [
        (5, 3, "0x0"), (9, 1, "0x0"), (2000, 1024, "0x0"), (3024, 476, "0x0")]
    writes = [c.split() for c in m.cmds if c.startswith("write")]
    assert len(writes) == 1 and int(writes[0][1], 16) == 10 << 12 and writes[0][2] == "0x10"
    assert len(m.cmds) == 5
    assert int(writes[0][3][2:10], 16) != 0  # the header (magic first) is not zero
