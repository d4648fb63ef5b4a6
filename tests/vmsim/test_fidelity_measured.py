"""The second fidelity table (simulated vs measured on this machine), host profiles, the new
scenario keys, and the host-profile fit."""
from __future__ import annotations

import dataclasses
import json

import pytest

from balloon_dev.host.profiles import PROFILES, cost_model
from protocol.errors import UsageError
from vmsim.cmd_fidelity import MEASURED, MEASURED_SOURCES, measured_row
from vmsim.host_measure import HostRun, fit
from vmsim.scenario import ScenarioError, load_builtin, loads
from vmsim.vm import run_scenario


def test_measured_row_pairs_simulation_with_the_measured_means():
    scn = load_builtin(MEASURED[0])
    assert scn.host.profile == "lab-qemu-11.1" and scn.measured
    row = measured_row(scn)
    for key in ("off", "hints"):
        sim, meas = row[key]["sim"], row[key]["measured"]
        assert row[key]["verified"]
        assert meas["transferred_bytes"] == scn.measured[f"transferred_bytes_{key}"]
        # the per-phase figure: QEMU's downtime beside the simulated stop-and-copy
        assert meas["downtime_ms"] == scn.measured[f"downtime_ms_{key}"]
        assert sim["downtime_ms"] > 0
        assert sim["normal_pages"] + sim["zero_pages"] > 0 and sim["total_ms"] > 0
    # hints save bytes in both worlds, and the cut is computed from the figures shown
    assert 0 < row["bytes_cut_sim"] < 1 and 0 < row["bytes_cut_measured"] < 1
    assert row["bytes_cut_sim"] == pytest.approx(
        1 - row["hints"]["sim"]["transferred_bytes"] / row["off"]["sim"]["transferred_bytes"])


def test_host_profile_changes_the_simulated_time():
    scn = load_builtin("lab-512m-ioa0")
    # priced page by page (CPU and wire add up) so the difference is the profiles' alone
    scn = dataclasses.replace(scn, migration=dataclasses.replace(scn.migration,
                                                                 rate_limited=False))
    lab = run_scenario(scn, "off")
    xeon = run_scenario(dataclasses.replace(
        scn, host=dataclasses.replace(scn.host, profile="xeon-2017")), "off")
    assert lab.pages_sent == xeon.pages_sent   # same pages, each priced by its profile:
    a, b = cost_model("lab-qemu-11.1"), cost_model("xeon-2017")
    normal = lab.pages_sent - lab.zero_pages
    ram_pages = scn.guest.ram_bytes // 4096
    expect = (lab.zero_pages * (a.zero_page_s - b.zero_page_s)
              + normal * (a.zero_page_s + a.copy_page_s - b.zero_page_s - b.copy_page_s)
              # the fixed costs the profiles also set: dirty logging's start, the switchover
              + ram_pages * (a.log_start_page_s - b.log_start_page_s)
              + a.switchover_s - b.switchover_s)
    assert lab.total_time_s - xeon.total_time_s == pytest.approx(expect, rel=0.05)
    assert set(PROFILES) >= {"xeon-2017", "lab-qemu-11.1"}
    assert cost_model("xeon-2017") == cost_model("xeon-2017")
    with pytest.raises(KeyError, match="unknown host profile"):
        cost_model("pdp-11")


def test_scenario_keys_are_checked(tmp_path):
    base = '[guest]\nram = "256MiB"\n'
    with pytest.raises(ScenarioError, match="host.profile"):
        loads(base + '[host]\nprofile = "pdp-11"\n', "x.toml")
    with pytest.raises(ScenarioError, match="guest.boot_free_dirty.*half"):
        loads('[guest]\nram = "256MiB"\nboot_free_dirty = "200MiB"\n', "x.toml")
    with pytest.raises(ScenarioError, match="hinting.memory_bandwidth"):
        loads(base + '[hinting]\nmemory_bandwidth = "-1GB/s"\n', "x.toml")
    scn = loads('[guest]\nram = "256MiB"\nruntime = 1\n'.replace("runtime = 1\n", "runnable = 3\n")
                + '[hinting]\nalloc_cost = "2us"\n[measured]\nruns = 2\n', "x.toml")
    assert scn.guest.runnable == 3 and scn.hinting.alloc_cost_s == 2e-6
    assert scn.measured == {"runs": 2}


def test_boot_free_dirty_is_sent_without_hints_and_skipped_with_them():
    """Free pages holding data at boot: more normal pages without hints, none of them with."""
    def normal(mode, free_dirty):
        scn = loads(f'[guest]\nram = "256MiB"\nboot_free_dirty = "{free_dirty}"\n'
                    '[migration]\nbandwidth = "10Gbit/s"\n', "x.toml")
        r = run_scenario(scn, mode)
        assert r.verified
        return r.pages_sent - r.zero_pages

    extra_off = normal("off", "64MiB") - normal("off", "0MiB")
    assert extra_off == pytest.approx(64 << 8, rel=0.02)     # 16384 pages, all sent as data
    assert normal("capture", "64MiB") - normal("capture", "0MiB") < extra_off / 4


def test_fit_recovers_per_page_costs():
    z, n = 2e-6, 5e-6
    runs = [HostRun(f, 1000, int(1000 * f), 1000 - int(1000 * f),
                    total_ms=(z * (1000 - int(1000 * f)) + n * int(1000 * f)) * 1000 + 1,
                    setup_ms=1, transferred=0) for f in (0.0, 0.5, 1.0)]
    out = fit(runs)
    assert out["zero_page_s"] == pytest.approx(z) and out["copy_page_s"] == pytest.approx(n - z)


def test_measured_rows_validate_against_the_schema():
    import json
    from importlib import resources

    import jsonschema

    schema = json.loads(resources.files("vmsim").joinpath("schemas/fidelity.schema.json")
                        .read_text())
    doc = {"schema_version": 1, "kind": "fidelity", "rows": [],
           "measured_rows": [measured_row(load_builtin(MEASURED[1]), src)
                             for src in MEASURED_SOURCES]}
    jsonschema.validate(json.loads(json.dumps(doc)), schema)


def test_rate_limited_link_overlaps_cpu_and_wire():
    """With QEMU's max-bandwidth throttle the thread's CPU work hides in the waiting: each batch
    costs the larger of its CPU and wire time, so the migration takes at least the larger of
    the two totals and less than their sum (what the unthrottled model charges)."""
    scn = load_builtin("lab-512m-ioa0")
    assert scn.migration.rate_limited
    added = run_scenario(dataclasses.replace(scn, migration=dataclasses.replace(
        scn.migration, rate_limited=False)), "off")
    limited = run_scenario(scn, "off")
    assert limited.bytes_sent == added.bytes_sent
    wire = limited.bytes_sent / scn.migration.bandwidth_Bps
    c = cost_model(scn.host.profile)
    cpu = (limited.pages_sent * c.zero_page_s
           + (limited.pages_sent - limited.zero_pages) * c.copy_page_s)
    assert max(wire, cpu) <= limited.total_time_s
    assert limited.total_time_s < added.total_time_s - 0.5 * min(wire, cpu)


def test_host_keys_override_the_profile():
    base = '[guest]\nram = "256MiB"\n'
    with pytest.raises(ScenarioError, match="host.cores"):
        loads(base + '[host]\ncores = -1\n', "x.toml")
    with pytest.raises(ScenarioError, match="host.guest_memory_bandwidth"):
        loads(base + '[host]\nguest_memory_bandwidth = "0MB/s"\n', "x.toml")
    scn = loads(base + '[host]\nprofile = "lab-qemu-11.1"\ncores = 4\n'
                'guest_memory_bandwidth = "2GB/s"\nguest_first_write = "10us"\n', "x.toml")
    assert scn.host.cores == 4 and scn.host.guest_memory_bandwidth_Bps == 2e9
    assert scn.host.guest_first_write_s == pytest.approx(10e-6)
    assert loads(base, "x.toml").host.cores is None  # the profile's
    lab = cost_model("lab-qemu-11.1")
    assert lab.host_cores == 2 and lab.guest_memory_bandwidth > 0 and lab.guest_first_write_s > 0
    xeon = cost_model("xeon-2017")  # the published set-up: no contention, the guest's own
    assert xeon.host_cores == 0 and xeon.guest_memory_bandwidth == 0 == xeon.guest_first_write_s


def test_the_hint_poller_takes_a_cpu_from_hinted_runs_only():
    """migrate-check's real-time hint poller holds a CPU in the lab's hinted runs, not in the
    runs without hints: ``poller_cpus`` leaves the off run as it was and slows the hinted one
    (its migration thread shares the one CPU left with the vCPU and the iothread in a round)."""
    # init_on_alloc=1: the round's clearing needs the CPU (init_on_alloc=0 is wire-bound here,
    # as the lab measured: 791 ms with the poller, 822-825 without)
    none = load_builtin("lab-512m-ioa1")
    # its measured runs had no poller (migrate-check --no-capture)
    assert none.host.poller_cpus == 0
    scn = dataclasses.replace(none, host=dataclasses.replace(none.host, poller_cpus=1))
    assert run_scenario(scn, "off").total_time_s == run_scenario(none, "off").total_time_s
    with_poller, without = run_scenario(scn, "capture"), run_scenario(none, "capture")
    assert with_poller.verified and without.verified
    assert with_poller.total_time_s > without.total_time_s
    with pytest.raises(ScenarioError, match="host.poller_cpus"):
        loads('[guest]\nram = "256MiB"\n[host]\npoller_cpus = -1\n', "x.toml")
    greedy = dataclasses.replace(scn, host=dataclasses.replace(scn.host, poller_cpus=2))
    with pytest.raises(UsageError, match="poller_cpus"):
        run_scenario(greedy, "capture")


def test_first_writes_on_the_lab_host_slow_the_init_on_alloc_round():
    """With init_on_alloc the lab guest's round pays the host's first-write faults for blocks
    never written since boot; without that cost (a host that backs RAM up front) the hints
    land sooner, and the migration ends sooner."""
    scn = load_builtin("lab-512m-ioa1")
    # On one CPU (a run with the hint poller holding the other) the round is slow enough for
    # the cost to reach the total; on both CPUs this scenario's figures do not move.
    scn = dataclasses.replace(scn, host=dataclasses.replace(scn.host, poller_cpus=1))
    fast = dataclasses.replace(scn, host=dataclasses.replace(scn.host, guest_first_write_s=0.0))
    slow_r, fast_r = run_scenario(scn, "capture"), run_scenario(fast, "capture")
    assert slow_r.verified and fast_r.verified
    assert slow_r.total_time_s > fast_r.total_time_s


def test_fit_guest_memory_recovers_clearing_speed_and_first_write_cost():
    """Synthetic capture order: 20 resident blocks cleared at 2 GB/s, then 10 never-written
    ones paying 25 us per page more, all at a vCPU share of 2/3 (2 CPUs, 3 busy threads)."""
    from vmsim.host_measure import fit_guest_memory

    size, share = 4 << 20, 2 / 3
    fast = size / 2e9 / share * 1000                    # ms between two resident blocks
    slow = fast + 1024 * 25e-6 / share * 1000
    t, order = 0.0, []
    for i in range(31):
        order.append([1, t, hex(i * size), size])
        t += fast if i < 20 else slow
    out = fit_guest_memory(order, cores=2, busy_threads=3)
    assert out["guest_memory_bandwidth"] == pytest.approx(2e9)
    assert out["guest_first_write_s"] == pytest.approx(25e-6)
    with pytest.raises(ValueError, match="split"):
        fit_guest_memory([[1, i * 1.0, "0x0", size] for i in range(5)])


# Every set-up with each source of measured means: lab (the real guest, [measured]) and qtest
# (the simulated guest migrated by two QEMUs under qtest, [measured_qtest]).
ROWS = [(n, src) for n in MEASURED for src in MEASURED_SOURCES]


@pytest.mark.parametrize(("name", "source"), ROWS)
def test_bytes_cut_within_ten_percent_of_the_measured(name, source):
    """Simulated vs measured here (the recorded means): the hint cut of the bytes sent within
    10% relative (issue 11's target)."""
    row = measured_row(load_builtin(name), source)
    assert row["source"] == source
    assert row["hints"]["verified"] and row["off"]["verified"]
    assert abs(row["bytes_cut_error"]) <= 0.10, f"{name}/{source}: {row['bytes_cut_error']:+.1%}"


# The time cut, from runs without the hint poller (migrate-check --no-capture) on both sides,
# priced with the lab profile measured at the same load (docs/cost-model.md, "Simulated vs
# measured here").
@pytest.mark.parametrize(("name", "source"), ROWS)
def test_time_cut_within_ten_percent_of_the_measured(name, source):
    row = measured_row(load_builtin(name), source)
    assert abs(row["time_cut_error"]) <= 0.10, f"{name}/{source}: {row['time_cut_error']:+.1%}"


def test_qtest_rows_pair_simulation_with_the_qtest_means():
    """The qtest source reads [measured_qtest], not [measured]; the simulated side is the same
    model run as the lab row's."""
    scn = load_builtin(MEASURED[0])
    assert scn.measured_qtest and scn.measured_qtest != scn.measured
    lab, qtest = measured_row(scn, "lab"), measured_row(scn, "qtest")
    for key in ("off", "hints"):
        assert qtest[key]["sim"] == lab[key]["sim"]
        for k, v in qtest[key]["measured"].items():
            assert v == scn.measured_qtest[f"{k}_{key}"]
    assert qtest["runs"] == int(scn.measured_qtest["runs"])
    assert qtest["bytes_cut_measured"] == pytest.approx(
        1 - scn.measured_qtest["transferred_bytes_hints"]
        / scn.measured_qtest["transferred_bytes_off"])
    with pytest.raises(ScenarioError, match="measured_qtest.zero_pages_off"):
        loads('[guest]\nram = "256MiB"\n[measured_qtest]\nzero_pages_off = -1\n', "x.toml")
    with pytest.raises(ScenarioError, match="measured_qtest.runs"):
        loads('[guest]\nram = "256MiB"\n[measured_qtest]\nruns = 1.5\n', "x.toml")


def test_fit_guest_memory_command(tmp_path, capsys):
    """`fidelity --fit-guest-memory RUNS.json` fits from the first hinted init_on_alloc=1 run
    with a capture order; anything else is a usage error (exit 2)."""
    from vmsim.cli import main

    size = 4 << 20
    order, t = [], 0.0
    for i in range(12):
        order.append([1, t, hex(i * size), size])
        t += 1.5 if i < 6 else 45.0
    good = [{"hints": False, "init_on_alloc": 1},
            {"hints": True, "init_on_alloc": 1, "capture": {"order": order}}]
    p = tmp_path / "runs.json"
    p.write_text(json.dumps(good))
    assert main(["fidelity", "--fit-guest-memory", str(p)]) == 0
    out = capsys.readouterr().out
    assert "guest_memory_bandwidth = 4.194e+09" in out and "guest_first_write_s" in out
    # A run whose real-time poller held one of the 2 CPUs: the round's threads had the other.
    good[1]["capture"]["realtime_poller"] = True
    p.write_text(json.dumps(good))
    assert main(["fidelity", "--fit-guest-memory", str(p)]) == 0
    out = capsys.readouterr().out
    assert "guest_memory_bandwidth = 8.389e+09" in out and "real-time hint poller" in out
    p.write_text(json.dumps(good[:1]))
    assert main(["fidelity", "--fit-guest-memory", str(p)]) == 2
    assert main(["fidelity", "--fit-guest-memory", str(tmp_path / "missing.json")]) == 2
