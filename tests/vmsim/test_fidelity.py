"""The fidelity command: published vs simulated reductions (one scenario, to stay fast)."""
from __future__ import annotations

import json

from vmsim.cli import main


def test_fidelity_idle_8g(tmp_path, capsys) -> None:
    js = tmp_path / "fid.json"
    assert main(["fidelity", "--only", "idle-8g", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "idle-8g" in out and "79.1%" in out  # the published reduction is shown
    (row,) = json.loads(js.read_text())
    assert row["verified"] and row["calibration_point"]
    # the calibration point itself: the built-in constant reproduces the published 2970 ms
    assert abs(row["simulated_without_ms"] - 2970) < 5
    assert 0 < row["simulated_reduction"] < 1
    assert abs(row["relative_error"]) <= 0.10
