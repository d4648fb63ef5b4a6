"""QEMU 7.2's lossy dirty log under TCG, in the simulator (``[host] dirty_log``): the built-in
lab-512m-ioa1-qemu72 predicts what `balloon-hint migrate-check --qemu debian` measured (docs/
qemu-lab.md): hints with init_on_alloc=1 lose kernel pages; no hints, init_on_alloc=0, an exact
log (QEMU 11.1) or a RAM size QEMU syncs page by page lose none."""
from __future__ import annotations

import dataclasses

import pytest

from guest_model.kernel_data import KDATA_GPA
from guestmem.units import PAGE_SHIFT
from vmsim.scenario import WorkloadSpec, load_builtin
from vmsim.vm import SimVM, VMOptions, run_scenario

NAME = "lab-512m-ioa1-qemu72"


def _variant(*, guest: dict | None = None, host: dict | None = None):
    scn = load_builtin(NAME)
    return dataclasses.replace(
        scn, guest=dataclasses.replace(scn.guest, **(guest or {})),
        host=dataclasses.replace(scn.host, **(host or {})))


def test_hints_with_init_on_alloc_lose_the_kernels_hot_pages() -> None:
    r = run_scenario(load_builtin(NAME), "capture")
    assert not r.verified and r.mismatched_pages > 0
    vm = SimVM(load_builtin(NAME), VMOptions(mode="capture", seed=1))
    vm.prepare()
    vm.migrate()
    res = vm.migration.verify_result
    assert res is not None and not res.verified
    # the zone's page and the (one) CPU's counters: written by every allocation of the round,
    # through TLB entries the syncs left in place
    zone = KDATA_GPA >> PAGE_SHIFT
    assert {zone, zone + 1} <= set(res.first_mismatches)
    assert vm.dirty.unlogged_writes > 0


def test_the_exact_log_of_qemu_11_loses_nothing() -> None:
    r = run_scenario(_variant(host={"dirty_log": "exact"}), "capture")
    assert r.verified and r.mismatched_pages == 0


@pytest.mark.parametrize("mode", ["off", "walk"])
def test_without_allocating_hints_nothing_is_lost(mode) -> None:
    r = run_scenario(load_builtin(NAME), mode)
    assert r.verified, (mode, r.mismatched_pages)


def test_a_short_hint_round_without_zeroing_loses_nothing() -> None:
    """init_on_alloc=0: the round is over before the send cursor reaches the kernel's data."""
    r = run_scenario(_variant(guest={"init_on_alloc": False}), "capture")
    assert r.verified, r.mismatched_pages


def test_ram_synced_page_by_page_loses_nothing() -> None:
    """512 MiB + 8 KiB: not whole 64-page words, so QEMU 7.2 syncs page by page (and resets
    the TLB), as --ram 524296K in the lab."""
    r = run_scenario(_variant(guest={"ram_bytes": (512 << 20) + (8 << 10)}), "capture")
    assert r.verified, r.mismatched_pages


def test_processes_taking_turns_flush_the_tlb_and_nothing_is_lost() -> None:
    """The lab's fork storm: every switch between two processes flushes TCG's TLB, and 7.2
    lost nothing in 5 runs. One process alone switches once and the loss stays."""
    scn = load_builtin(NAME)
    writer = WorkloadSpec("dirty", True, {"rate": 64 << 10, "working_set": 1 << 20})
    one = run_scenario(dataclasses.replace(scn, workloads=(*scn.workloads, writer)), "capture")
    assert not one.verified and one.mismatched_pages > 0
    two = run_scenario(dataclasses.replace(scn, workloads=(*scn.workloads, writer, writer)),
                       "capture")
    assert two.verified, two.mismatched_pages
