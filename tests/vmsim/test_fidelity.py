"""The fidelity command: published vs simulated reductions (one scenario, to stay fast)."""
from __future__ import annotations

import json

import pytest

from vmsim.cli import main


def test_fidelity_idle_8g(tmp_path, capsys) -> None:
    js = tmp_path / "fid.json"
    assert main(["fidelity", "--only", "idle-8g", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "idle-8g" in out and "79.1%" in out  # the published reduction is shown
    doc = json.loads(js.read_text())
    assert doc["schema_version"] == 1 and doc["kind"] == "fidelity"
    (row,) = doc["rows"]
    assert row["verified"] and row["calibration_point"]
    # the calibration point itself: the built-in constant reproduces the published 2970 ms
    assert abs(row["simulated_without_ms"] - 2970) < 5
    assert 0 < row["simulated_reduction"] < 1
    assert abs(row["relative_error"]) <= 0.10


def test_fidelity_only_takes_a_scenario_file_with_published_figures(tmp_path, capsys) -> None:
    """a user's own measurements: --only FILE with a [published] table"""
    scn = tmp_path / "mine.toml"
    scn.write_text('name = "mine"\n[guest]\nram = "256MiB"\n[[workload]]\nkind = "fill"\n'
                   'size = "64MiB"\n[migration]\nbandwidth = "10Gbit/s"\n'
                   '[published]\nwithout_hints_ms = 300\nwith_hints_ms = 100\n')
    js = tmp_path / "fid.json"
    main(["fidelity", "--only", str(scn), "--json", str(js)])
    (row,) = json.loads(js.read_text())["rows"]
    assert row["scenario"] == "mine" and row["published_reduction"] == 1 - 100 / 300
    assert row["calibration_point"] is False and row["verified"]
    assert "mine" in capsys.readouterr().out


def test_fidelity_only_refuses_what_has_no_published_figures(tmp_path, capsys) -> None:
    scn = tmp_path / "bare.toml"
    scn.write_text('[guest]\nram = "256MiB"\n[published]\nwith_hints_ms = 100\n')
    assert main(["fidelity", "--only", str(scn)]) == 2
    assert "needs without_hints_ms" in capsys.readouterr().err
    assert main(["fidelity", "--only", "small-idle"]) == 2
    assert "not one of the published built-ins" in capsys.readouterr().err


# The target of issue 11: every simulated cut within 10% relative of the published one, the
# calibration constant untouched. compile-8g was +10.01% until bulk frees kept the order of the
# frees (the churn frees by expiry): +8.5% since (docs/cost-model.md).
@pytest.mark.parametrize("name", ["idle-128g", "compile-128g", "compile-8g"])
def test_published_cut_within_ten_percent(tmp_path, name) -> None:
    js = tmp_path / "fid.json"
    assert main(["fidelity", "--only", name, "--json", str(js)]) == 0
    (row,) = json.loads(js.read_text())["rows"]
    assert row["verified"] and not row["calibration_point"]
    assert abs(row["relative_error"]) <= 0.10, f"{name}: {row['relative_error']:+.2%}"
