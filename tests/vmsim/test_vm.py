"""Whole simulated VMs (buddy allocator, balloon driver, device, in-process transport, migration
engine) migrating small scenarios, verified at switchover."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from protocol.errors import UsageError
from vmsim.scenario import WorkloadSpec, load, load_builtin
from vmsim.vm import run_scenario

HERE = Path(__file__).parent / "scenarios"


@pytest.mark.parametrize("mode", ["off", "walk", "capture"])
def test_small_idle_verifies_in_every_mode(mode) -> None:
    r = run_scenario(load_builtin("small-idle"), mode)
    assert r.verified and r.mismatched_pages == 0 and r.poison_violations == 0
    if mode == "off":
        assert r.pages_skipped_hint == 0 and r.hints_received == 0
        assert r.pages_sent == r.guest_ram_bytes // r.page_size
    else:
        # the free memory (zero pages) was hinted and skipped in the bulk pass
        assert r.pages_skipped_hint > 20000 and r.hint_rounds >= 1


def test_hints_cut_pages_and_time() -> None:
    scn = load_builtin("small-idle")
    off = run_scenario(scn, "off")
    cap = run_scenario(scn, "capture")
    assert cap.pages_sent < off.pages_sent - 20000
    assert cap.total_time_s < off.total_time_s
    assert cap.guest_held_pages > 0  # captured blocks are held until DONE, excluded from checks


@pytest.mark.parametrize("mode", ["off", "walk", "capture"])
def test_churn_during_migration_verifies(mode) -> None:
    r = run_scenario(load_builtin("small-churn"), mode)
    assert r.verified, r
    assert r.rounds >= 2
    assert r.guest_counters["churn_alloc_pages"] > 0


def test_same_seed_same_result() -> None:
    scn = load_builtin("small-churn")
    a = run_scenario(scn, "walk", seed=11)
    b = run_scenario(scn, "walk", seed=11)
    assert a.as_dict() | {"wall_s": 0} == b.as_dict() | {"wall_s": 0}


@pytest.mark.spec("D-10")
def test_stale_hints_are_dropped_and_the_run_verifies() -> None:
    r = run_scenario(load_builtin("churn-walk"), "walk")
    assert r.stale_hints_dropped > 0
    assert r.verified


@pytest.mark.spec("D-11")
def test_fault_accept_stale_hints_fails_verification_under_churn() -> None:
    """protocol.md 5.7: a hint from before a sync applied after it erases a newer write."""
    r = run_scenario(load_builtin("churn-walk"), "walk", fault="accept-stale-hints")
    assert r.stale_hints_applied > 0
    assert not r.verified and r.mismatched_pages > 0
    # the same fault cannot hurt when the guest holds what it hints (capture): nothing churns
    # through hinted pages
    c = run_scenario(load_builtin("churn-walk"), "capture", fault="accept-stale-hints")
    assert c.verified


def test_walk_with_page_poisoning_is_a_poison_violation() -> None:
    """The seed's walk hints free pages it does not hold: with poisoning the destination has
    zeros where the guest expects the poison pattern. Capture holds (then frees and re-poisons)
    what it hints, so it verifies."""
    scn = load(HERE / "poison-walk.toml")
    w = run_scenario(scn, "walk")
    assert not w.verified and w.poison_violations > 0 and w.mismatched_pages == 0
    c = run_scenario(scn, "capture")
    assert c.verified and c.poison_violations == 0
    o = run_scenario(scn, "off")
    assert o.verified


def _builtins_up_to_8g() -> list[str]:
    from vmsim.scenario import builtin_names
    # A host whose dirty log loses writes fails by design: tests/vmsim/test_lossy_dirty_log.py.
    return [n for n in builtin_names() if load_builtin(n).guest.ram_bytes <= 8 << 30
            and load_builtin(n).host.dirty_log == "exact"]


@pytest.mark.parametrize("name", _builtins_up_to_8g())
def test_every_builtin_verifies_in_every_mode(name) -> None:
    """The 128 GiB built-ins take ~35 s for all modes: scripts/bench_migration.py runs them."""
    scn = load_builtin(name)
    for mode in ("off", "walk", "capture"):
        r = run_scenario(scn, mode)
        assert r.verified, (name, mode, r.mismatched_pages, r.poison_violations)


@pytest.mark.spec("D-13")
def test_done_is_published_and_the_driver_releases_its_blocks() -> None:
    """After the migration the device publishes DONE (CLEANUP, protocol.md 5.4) and the guest's
    driver frees every block it held for hinting (DR-11)."""
    from guestmem.units import PAGE_SHIFT
    from protocol.balloon import CFG_FREE_PAGE_HINT_CMD_ID, VIRTIO_BALLOON_CMD_ID_DONE
    from vmsim.vm import SimVM, VMOptions

    vm = SimVM(load_builtin("small-idle"), VMOptions(mode="capture", seed=1))
    vm.prepare()
    vm.migrate()
    assert vm.migration.verify_result is not None and vm.migration.verify_result.verified
    assert vm.held_at_switch > 0  # held at switchover, excluded from the check
    cid = int.from_bytes(vm.dev.read_config(CFG_FREE_PAGE_HINT_CMD_ID, 4), "little")
    assert cid == VIRTIO_BALLOON_CMD_ID_DONE
    assert not vm.guest.held_by_driver_mask().any()
    assert vm.guest.driver.counters["hint_blocks_returned_done"] > 0
    assert vm.migration.stats.hint_rounds >= 1 and vm.ram_pages == (256 << 20) >> PAGE_SHIFT


SCENARIO_CHURN_DEFAULTS = """\
name = "churn-defaults"
description = "an idle phase, then a churn without lifetime and a dirty rate during migration"

[guest]
ram = "128MiB"
seed = 4

[[workload]]
kind = "fill"
size = "16MiB"

[[workload]]
kind = "idle"
duration = "0.25s"

[[workload]]
kind = "churn"
during = true
rate = "100MiB/s"

[[workload]]
kind = "dirty"
during = true
rate = "20MiB/s"

[migration]
bandwidth = "1Gbit/s"
downtime_limit = "50ms"

[hinting]
mode = "capture"
"""


def test_scenario_workloads_are_guest_models_and_counted_once() -> None:
    """Every scenario workload is a guest_model workload of the guest (no vmsim copy): the idle
    phase moves the clock by its duration; a churn without lifetime lives CHURN_LIFETIME_S on
    average and ticks at churn_tick of it; each workload's counters are reported once."""
    from guest_model.workloads import Churn, Dirty, Fill, Idle
    from vmsim.scenario import loads
    from vmsim.vm import CHURN_LIFETIME_S, TICK_S, SimVM, VMOptions, churn_tick

    vm = SimVM(loads(SCENARIO_CHURN_DEFAULTS), VMOptions(mode="capture", seed=4))
    t0 = vm.sched.now
    vm.prepare()
    assert vm.sched.now - t0 >= 0.25
    vm.migrate()
    assert vm.migration.verify_result is not None and vm.migration.verify_result.verified
    kinds = [type(w) for w in vm.guest.workloads]
    assert kinds == [Fill, Idle, Churn, Dirty]
    churn = vm.guest.workloads[2]
    assert isinstance(churn, Churn)
    assert churn.lifetime == CHURN_LIFETIME_S and churn.tick == churn_tick(CHURN_LIFETIME_S)
    assert churn.stats["alloc_pages"] > 0 and churn.stats["freed_pages"] > 0
    assert vm.guest.workloads[3].tick == TICK_S
    counters = vm.guest_counters()
    for w in vm.guest.workloads[2:]:
        for k, v in w.stats.items():
            if v:
                assert counters[f"{w.name}_{k}"] == v, (w.name, k)


def test_churn_tick_follows_the_lifetime() -> None:
    from vmsim.vm import CHURN_TICK_MAX_S, TICK_S, churn_tick

    assert churn_tick(0.03) == TICK_S  # small-churn: as fine as the other workloads
    assert churn_tick(0.5) == 0.01
    assert churn_tick(1.0) == churn_tick(10.0) == CHURN_TICK_MAX_S


def test_a_scenario_built_in_code_with_a_bad_workload_is_a_usage_error() -> None:
    """The scenario loader refuses these in files; a Scenario built in code reaches
    run_scenario, which must say so as a caller's mistake (the CLI's exit 2), not a
    ValueError traceback."""
    scn = load_builtin("small-idle")
    during_fill = replace(scn, workloads=(*scn.workloads,
                                          WorkloadSpec("fill", True, {"size": 1 << 20})))
    with pytest.raises(UsageError, match="workload kind 'fill' cannot run during migration"):
        run_scenario(during_fill, "capture")
    with pytest.raises(UsageError, match="hinting mode 'fast'"):
        run_scenario(scn, "fast")
