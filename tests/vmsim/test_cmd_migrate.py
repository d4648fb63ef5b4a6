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
    data = json.loads(js.read_text())
    assert [d["mode"] for d in data] == ["off", "walk", "capture"]
    for d in data:
        assert JSON_KEYS <= d.keys()
        assert d["verified"] is True and d["page_size"] == 4096
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_migrate_fault_exits_1(capsys) -> None:
    rc = main(["migrate", "--builtin", "churn-walk", "--fault", "accept-stale-hints"])
    assert rc == 1
    assert "verification failed" in capsys.readouterr().err


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
