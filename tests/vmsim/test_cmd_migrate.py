"""The migrate / scenarios commands: table, JSON keys, plot, exit codes, error messages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmsim.cli import main

HERE = Path(__file__).parent / "scenarios"

JSON_KEYS = {"scenario", "mode", "guest_ram_bytes", "page_size", "rounds", "pages_sent",
             "zero_pages", "pages_skipped_hint", "bytes_sent", "total_time_s", "downtime_s",
             "hint_rounds", "hints_received", "hinted_pages", "stale_hints_dropped", "verified",
             "mismatched_pages", "poison_violations", "wall_s"}


def test_migrate_all_modes_json_and_plot(tmp_path, capsys) -> None:
    js = tmp_path / "out.json"
    png = tmp_path / "out.png"
    rc = main(["migrate", "--builtin", "small-idle", "--mode", "all", "--json", str(js),
               "--plot", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    for label in ("pages sent", "pages skipped by hints", "stale hints dropped", "verified",
                  "off", "walk", "capture"):
        assert label in out
    doc = json.loads(js.read_text())
    assert doc["schema_version"] == 1 and doc["kind"] == "migrate"
    assert doc["scenario"] == "small-idle" and doc["interrupted"] is None
    data = doc["results"]
    assert [d["mode"] for d in data] == ["off", "walk", "capture"]
    for d in data:
        assert JSON_KEYS <= d.keys()
        assert d["verified"] is True and d["page_size"] == 4096
        n = len(d["pages_per_round"])
        assert n == d["rounds"] and len(d["bytes_per_round"]) == len(d["skipped_per_round"]) \
            == len(d["round_end_us"]) == n
        assert sum(d["bytes_per_round"]) == d["bytes_sent"]
        assert sum(d["skipped_per_round"]) == d["pages_skipped_hint"]
        assert abs(d["round_end_us"][-1] / 1e6 - d["total_time_s"]) < 1e-5
        assert d["round_end_us"] == sorted(d["round_end_us"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_migrate_fault_exits_1(capsys) -> None:
    rc = main(["migrate", "--builtin", "churn-walk", "--fault", "accept-stale-hints"])
    assert rc == 1
    assert "verification failed" in capsys.readouterr().err


def test_a_lossy_host_scenario_fails_and_says_why(capsys) -> None:
    rc = main(["migrate", "--builtin", "lab-512m-ioa1-qemu72", "--mode", "capture"])
    assert rc == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "verification failed" in err and "qemu-7.2-tcg, loses writes by design" in err


def test_migrate_bad_file_exits_2_naming_file_key_line(tmp_path, capsys) -> None:
    p = tmp_path / "bad.toml"
    p.write_text('[guest]\nram = "1GiB"\n\n[migration]\nbandwidth = "10 furlongs"\n')
    rc = main(["migrate", str(p)])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{p}:5" in err.replace("\n", "") and "migration.bandwidth" in err


def test_migrate_unknown_builtin_exits_2(capsys) -> None:
    assert main(["migrate", "--builtin", "nope"]) == 2


def test_scenarios_lists_builtins(capsys) -> None:
    assert main(["scenarios"]) == 0
    out = capsys.readouterr().out
    for name in ("idle-8g", "compile-128g", "memhog-freed-8g"):
        assert name in out
    assert main(["scenarios", "--show", "idle-8g"]) == 0
    assert "[migration]" in capsys.readouterr().out


def test_scenarios_list_fits_80_columns_when_piped(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["scenarios"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    assert all(ln == ln.rstrip() for ln in lines)  # no padding to the console width
    # Each scenario: its fields on one line starting with its name, then its workloads and
    # the whole description (wrapped, indented) below it.
    i = next(i for i, ln in enumerate(lines) if ln.startswith("memhog-freed-8g "))
    assert lines[i].split()[1:] == ["8.0", "GiB", "capture", "100", "Gbit/s", "400", "ms"]
    assert lines[i + 1].strip() == "workloads: fill, fill_free, dirty*"
    assert "6 GiB free but full of old data" in " ".join(ln.strip() for ln in lines[i + 2:i + 4])


@pytest.mark.parametrize("args", [["--mode", "sideways"], ["--fault", "gremlins"]])
def test_bad_arguments_exit_2(args) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["migrate", *args])
    assert ei.value.code == 2


@pytest.mark.parametrize("opt", ["--json", "--plot"])
@pytest.mark.parametrize("where", ["missing folder", "a folder"])
def test_unwritable_output_is_refused_before_the_run(tmp_path, capsys, opt: str,
                                                     where: str) -> None:
    out = tmp_path / "no" / "such" / "x" if where == "missing folder" else tmp_path
    assert main(["migrate", "--builtin", "small-idle", opt, str(out)]) == 2
    cap = capsys.readouterr()
    err = " ".join(cap.err.split())  # rich wraps long lines at the console width
    assert f"{opt} {out}:" in err and "Traceback" not in err
    assert "pages sent" not in cap.out  # refused before anything ran


def test_fidelity_unwritable_json_is_refused_before_the_run(tmp_path, capsys) -> None:
    out = tmp_path / "missing" / "x.json"
    assert main(["fidelity", "--json", str(out)]) == 2
    assert f"--json {out}: folder" in " ".join(capsys.readouterr().out.split())


def test_plot_panels(tmp_path) -> None:
    """the plot (looked at by eye too): per mode bytes and pages skipped per round on whole
    round numbers, a time line with the downtime, and totals against the published figures"""
    import matplotlib.pyplot as plt

    from vmsim import report
    from vmsim.scenario import load_builtin
    from vmsim.vm import run_scenario

    scn = load_builtin("small-idle")
    results = [run_scenario(scn, m) for m in ("off", "walk", "capture")]
    fig = report.plot_figure(results, {"without_hints_ms": 50.0, "with_hints_ms": 20.0})
    try:
        ax_bytes, ax_time, ax_skip, ax_total = fig.axes
        assert [a.get_title() for a in fig.axes] == [
            "bytes sent per round", "rounds over time (hatched: stop-and-copy = downtime)",
            "pages skipped by hints per round", "total time vs published"]
        for ax in (ax_bytes, ax_skip):
            assert len(ax.get_lines()) == 3
            assert all(float(t).is_integer() for t in ax.get_xticks())
        # one bar per round per mode on the time line, hatched last
        assert len(ax_time.collections) == sum(r.rounds for r in results)
        assert [t.get_text() for t in ax_time.get_yticklabels()] == ["off", "walk", "capture"]
        assert len(ax_total.collections) == 2  # the two published totals
        texts = " ".join(t.get_text() for t in ax_total.texts)
        assert "published, no hints: 0.05 s" in texts and "with hints: 0.02 s" in texts
        # coinciding modes are told apart by marker
        assert len({ln.get_marker() for ln in ax_bytes.get_lines()}) == 3
    finally:
        plt.close(fig)
