"""Sweep files: points, ranges, fleets, seeds, and errors naming file, line and key."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vmsim.cli import main
from vmsim.scenario import loads
from vmsim.sweep.spec import (
    SweepError,
    load_sweep,
    loads_sweep,
    task_memory_estimate,
)

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "examples").glob("sweep-*.toml"))


def sweep(body: str, file: str = "s.toml"):
    return loads_sweep(textwrap.dedent(body), file)


def test_axes_product_seeds_and_order() -> None:
    s = sweep("""
        seeds = 2
        [base]
        builtin = "small-idle"
        [axes]
        "hinting.mode" = ["off", "capture"]
        "migration.bandwidth" = ["10Gbit/s", "25Gbit/s", "40Gbit/s"]
    """)
    assert len(s.points) == 2 * 3 * 2
    # last axis fastest, seeds innermost; each point is a scenario the loader accepts
    p = s.points[3]
    assert p.axis_values == ("off", "25Gbit/s") and p.sweep_seed == 2 and p.run_seed == 2
    scn = loads(p.scenario_text)
    assert scn.hinting.mode == "off" and scn.guest.seed == 2
    assert scn.migration.bandwidth_Bps == pytest.approx(25e9 / 8)
    # the rest is the built-in's
    assert scn.guest.ram_bytes == 256 << 20 and scn.migration.max_rounds == 10
    assert len({p.point_id for p in s.points}) == len(s.points)


def test_ranges_arithmetic_geometric_units_and_ints() -> None:
    s = sweep("""
        [base]
        builtin = "small-idle"
        [axes]
        "guest.ram" = { from = "256MiB", to = "1GiB", factor = 2 }
        "migration.bandwidth" = { from = "10Gbit/s", to = "30Gbit/s", step = "10Gbit/s" }
        "hinting.min_order" = { from = 0, to = 10, step = 4 }
        "migration.downtime_limit" = { from = "100ms", to = "0.3s", step = "100ms" }
    """)
    vals = {a.key: a.values for a in s.axes}
    assert vals["guest.ram"] == ("256MiB", "512MiB", "1024MiB")
    assert vals["migration.bandwidth"] == ("10Gbit/s", "20Gbit/s", "30Gbit/s")
    assert vals["hinting.min_order"] == (0, 4, 8)
    assert vals["migration.downtime_limit"] == ("100ms", "200ms", "300ms")
    rams = {loads(p.scenario_text).guest.ram_bytes for p in s.points}
    assert rams == {256 << 20, 512 << 20, 1 << 30}


def test_workload_key_and_percent_sizes() -> None:
    s = sweep("""
        [base]
        builtin = "small-churn"
        [axes]
        "workload[3].rate" = ["100MiB/s", "800MiB/s"]
    """)
    rates = [loads(p.scenario_text).workloads[2].params["rate"] for p in s.points]
    assert rates == [100 << 20, 800 << 20]


def test_inline_base_and_file_base(tmp_path) -> None:
    s = sweep("""
        [base.guest]
        ram = "128MiB"
        [[base.workload]]
        kind = "fill"
        size = "16MiB"
        [axes]
        "hinting.mode" = ["walk"]
    """)
    assert s.base == "inline"
    assert loads(s.points[0].scenario_text).workloads[0].params["size"] == 16 << 20
    (tmp_path / "scn.toml").write_text('[guest]\nram = "128MiB"\n')
    f = tmp_path / "sw.toml"
    f.write_text('[base]\nfile = "scn.toml"\n')
    assert len(load_sweep(f).points) == 1


@pytest.mark.parametrize("body, line, key, what", [
    # a bad axis value: the axis's line, the scenario loader's reason, the axis named
    ('[base]\nbuiltin = "small-idle"\n[axes]\n"migration.bandwidth" = ["10Gbit/s", "fast"]\n',
     4, "migration.bandwidth", "axes.migration.bandwidth"),
    ('[base]\nbuiltin = "small-idle"\n[axes]\n"guest.rom" = ["1GiB"]\n', 4, "guest.rom",
     "unknown key"),
    ('[base]\nbuiltin = "small-idle"\n[axes]\n"workload[5].rate" = ["1MiB/s"]\n', 4,
     "axes.workload[5].rate", "1 workload"),
    ('[base]\nbuiltin = "small-idle"\n\n[axes]\n"hinting.mode" = ["off", "fast"]\n', 5,
     "axes.hinting.mode", "not one of"),
    ('[base]\nbuiltin = "small-idle"\n[axes]\n"guest.ram" = {from = "1GiB", to = "2GiB"}\n',
     4, "axes.guest.ram", "step"),
    ('[base]\nbuiltin = "small-idle"\n[axes]\n"hinting.min_order" = [1, 1]\n', 4,
     "axes.hinting.min_order", "twice"),
    ('[base]\nbuiltin = "nope"\n', 2, "base.builtin", "no built-in"),
    ('[base]\nbuiltin = "small-idle"\nseeds = 0\n', None, None, "missing"),
    ('seeds = 0\n[base]\nbuiltin = "small-idle"\n', 1, "seeds", "out of range"),
    ('[base.guest]\nram = "1GiB"\n\n[base.migration]\nbandwidth = "1 furlong/s"\n', 5,
     "base.migration.bandwidth", "unknown rate unit"),
    ('colour = 1\n[base]\nbuiltin = "small-idle"\n', 1, "colour", "unknown key"),
    ('[base]\nbuiltin = "small-idle"\n[fleet]\nvms = 0\n', 4, "fleet.vms", "number of VMs"),
    ('[base]\nbuiltin = "small-idle"\n[evacuation]\nlink = "10Gbit/s"\n', 3, "evacuation",
     "needs a [fleet]"),
    # a combination the loader refuses: 1 GiB of fill in a 256 MiB guest
    ('[base]\nbuiltin = "small-idle"\n[axes]\n"workload[1].size" = ["1GiB"]\n', 4,
     "workload[1].size", "larger than the guest"),
])
def test_errors_name_file_line_and_key(body, line, key, what) -> None:
    if what == "missing":  # seeds inside [base] is an inline-plus-builtin base
        with pytest.raises(SweepError, match="exactly one"):
            loads_sweep(body, "bad.toml")
        return
    with pytest.raises(SweepError) as ei:
        loads_sweep(body, "bad.toml")
    e = ei.value
    assert e.file == "bad.toml" and e.line == line, str(e)
    if key:
        assert key in str(e)
    assert what in str(e)


def test_cli_bad_sweep_exits_2_naming_file_line_key(tmp_path, capsys) -> None:
    f = tmp_path / "bad.toml"
    f.write_text('[base]\nbuiltin = "small-idle"\n\n[axes]\n"migration.bandwidth" = ["x"]\n')
    assert main(["sweep", str(f), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{f}:5" in err.replace("\n", "") and "migration.bandwidth" in err
    assert not (tmp_path / "out").exists()  # refused before anything was set up


def test_fleet_sampled_reproducibly_with_weights() -> None:
    body = """
        [base]
        builtin = "small-idle"
        [fleet]
        vms = 400
        seed = 11
        ram = [{ value = "256MiB", weight = 3 }, { value = "512MiB", weight = 1 }]
        [[fleet.profile]]
        name = "a"
        workload = [{ kind = "fill", size = "25%" }]
        [[fleet.profile]]
        name = "b"
        weight = 3
        workload = [{ kind = "fill", size = "50%" }]
        set = { "hinting.min_order" = 4 }
    """
    s1, s2 = sweep(body), sweep(body)
    assert [(v.ram, v.profile) for v in s1.fleet] == [(v.ram, v.profile) for v in s2.fleet]
    assert [p.scenario_text for p in s1.points] == [p.scenario_text for p in s2.points]
    small = sum(v.ram == "256MiB" for v in s1.fleet)
    b = sum(v.profile == "b" for v in s1.fleet)
    assert 240 < small < 360 and 240 < b < 360  # weights 3:1 -> 300 of 400 expected
    other = sweep(body.replace("seed = 11", "seed = 12"))
    assert [v.ram for v in other.fleet] != [v.ram for v in s1.fleet]
    for p in s1.points[:20]:
        scn = loads(p.scenario_text)
        vm = s1.fleet[p.vm]
        frac = 0.25 if vm.profile == "a" else 0.5
        assert scn.workloads[0].params["size"] == int(scn.guest.ram_bytes * frac)
        assert scn.hinting.min_order == (4 if vm.profile == "b" else 10)
    # two VMs alike in RAM and profile still run with different seeds
    assert len({p.run_seed for p in s1.points}) == len(s1.points)


def test_evacuation_adds_modes_and_concurrency_bandwidth() -> None:
    s = sweep("""
        [base]
        builtin = "small-idle"
        [fleet]
        vms = 3
        [evacuation]
        link = "40Gbit/s"
        concurrency = [1, 4]
    """)
    assert [a.key for a in s.axes] == ["hinting.mode", "evacuation.concurrency"]
    assert len(s.points) == 3 * 3 * 2
    bw = {(p.axis_values[1], round(loads(p.scenario_text).migration.bandwidth_Bps))
          for p in s.points}
    assert bw == {(1, round(40e9 / 8)), (4, round(10e9 / 8))}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path) -> None:
    s = load_sweep(path)
    assert s.points


def test_examples_cover_every_kind() -> None:
    kinds = set()
    for p in EXAMPLES:
        s = load_sweep(p)
        kinds.add("evacuation" if s.evacuation else "fleet" if s.fleet else s.base.split(":")[0]
                  if s.base.startswith("builtin") else "inline" if s.base == "inline" else "file")
    assert kinds == {"builtin", "file", "inline", "fleet", "evacuation"}


def test_memory_estimate_covers_a_measured_run() -> None:
    """The per-task bound checked against worker memory must not be below what a run takes:
    a 2 GiB guest run in a fresh interpreter, its peak RSS above the interpreter's own (Linux's
    /proc/self/status)."""
    code = textwrap.dedent("""
        import vmsim.scenario
        import vmsim.vm
        scn = vmsim.scenario.loads('''
        [guest]
        ram = "2GiB"
        [[workload]]
        kind = "fill"
        size = "1GiB"
        [[workload]]
        kind = "fill_free"
        size = "512MiB"
        [[workload]]
        kind = "churn"
        during = true
        rate = "400MiB/s"
        footprint = "128MiB"
        [migration]
        bandwidth = "25Gbit/s"
        ''')
        def status(key):
            # /proc, not getrusage: ru_maxrss survives exec (it would report pytest's peak)
            with open("/proc/self/status") as f:
                line = next(ln for ln in f if ln.startswith(key + ":"))
            return int(line.split()[1]) * 1024
        before = status("VmRSS")
        vmsim.vm.run_scenario(scn, "capture")
        print(status("VmHWM") - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    used = int(out.stdout.split()[-1])
    assert 0 < used <= task_memory_estimate(2 << 30), (used, task_memory_estimate(2 << 30))


def test_help_does_not_import_dask_or_pyarrow() -> None:
    code = ("import sys\nfrom vmsim.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('dask', 'distributed', 'pyarrow')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_without_the_sweep_extra_the_command_says_so(tmp_path) -> None:
    """In a Python where dask, distributed and pyarrow cannot be found, the command names the
    extra to install (exit 1) instead of failing with a traceback."""
    code = textwrap.dedent(f"""
        import importlib.machinery, sys
        real = importlib.machinery.PathFinder.find_spec
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] in ("dask", "distributed", "pyarrow"):
                return None
            return real(name, path, target)
        importlib.machinery.PathFinder.find_spec = find_spec
        from vmsim.cli import main
        sys.exit(main(["sweep", {str(EXAMPLES[0])!r}, "--out", {str(tmp_path / "o")!r}]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1, out.stderr
    assert "pip install 'balloon-hint[sweep]'" in out.stderr
