"""``balloon-hint migrate --host qemu``: scenarios migrated by two real QEMUs under qtest
(vmsim.qtest.host_migrate). Small guests (128 MiB, each run a few seconds): the destination
check must pass, hints must cut what QEMU sends when freed memory holds data, and a broken
driver that hints pages in use must make the check fail."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from vmsim.cli import main
from vmsim.qtest.host_migrate import (
    FOUR_GIB,
    Layout,
    compare_rows,
    qemu_ram_for,
    run_qemu_scenario,
    scale_scenario,
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
    assert ram == 2 << 30 and "scaled from 8.0 GiB to 2.0 GiB" in why
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
