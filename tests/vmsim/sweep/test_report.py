"""sweep-report: paired savings, percentiles per axis value, where hinting does not pay, plots."""
from __future__ import annotations

import pytest
from rich.console import Console

from vmsim.cli import main
from vmsim.sweep.report import _stats, not_paying, pair, print_report, write_plot

DESC = {"name": "syn", "description": "", "axes": [
    {"key": "hinting.mode", "values": ["off", "capture"]},
    {"key": "migration.bandwidth", "values": ["10Gbit/s", "100Gbit/s"]}],
    "seeds": [1, 2, 3], "fleet": [], "evacuation": None}


def _row(i, mode, bw, seed, sent, t, down=0.05, status="ok"):
    return {"point": i, "point_id": f"p{i}", "status": status,
            "failure": None if status == "ok" else "KilledWorker: gone",
            "hinting.mode": mode, "migration.bandwidth": bw, "sweep_seed": seed, "mode": mode,
            "bytes_sent": sent, "total_time_s": t, "downtime_s": down, "verified": True,
            "error": None, "converged": True, "pages_skipped_hint": 0 if mode == "off" else 100,
            "page_size": 4096, "guest_ram_bytes": 1 << 30}


def _rows():
    """At 10 Gbit/s capture saves 400 bytes and 0.4 s; at 100 Gbit/s it saves bytes but costs
    time (the hint round is slower than sending the pages)."""
    rows = []
    i = 0
    for bw in ("10Gbit/s", "100Gbit/s"):
        for seed in (1, 2, 3):
            off_t = 1.0 if bw == "10Gbit/s" else 0.1
            rows.append(_row(i, "off", bw, seed, 1000 + seed, off_t))
            i += 1
            cap_t = 0.6 if bw == "10Gbit/s" else 0.12
            rows.append(_row(i, "capture", bw, seed, 600 + seed, cap_t))
            i += 1
    return rows


def test_pairing_uses_the_off_twin() -> None:
    ps, paired = pair(_rows(), ["hinting.mode", "migration.bandwidth"])
    assert paired
    cap = [p for p in ps if p.row["mode"] == "capture"]
    assert all(p.bytes_saved == 400 for p in cap)
    slow = [p.time_saved_s for p in cap if p.row["migration.bandwidth"] == "10Gbit/s"]
    assert slow == pytest.approx([0.4] * 3)


def test_without_off_savings_are_pages_skipped() -> None:
    rows = [r for r in _rows() if r["mode"] == "capture"]
    desc = {**DESC, "axes": [DESC["axes"][1]]}
    ps, paired = pair(rows, [a["key"] for a in desc["axes"]])
    assert not paired and all(p.bytes_saved == 100 * 4096 and p.time_saved_s is None
                              for p in ps)


def test_not_paying_finds_the_fast_link() -> None:
    ps, _ = pair(_rows(), ["hinting.mode", "migration.bandwidth"])
    bad = not_paying(DESC, ps)
    assert [(where, mode) for where, mode, _ in bad] == [("migration.bandwidth=100Gbit/s",
                                                           "capture")]
    assert bad[0][2].time_saved[0] == pytest.approx(-0.02)


def test_runs_cancelled_by_the_time_limit_are_left_out() -> None:
    rows = _rows()
    rows[1] = {**rows[1], "converged": False, "error": "did not converge within 1 s"}
    ps, _ = pair(rows, ["hinting.mode", "migration.bandwidth"])
    assert len(ps) == 11 and all(p.row["point"] != 1 for p in ps)


def test_percentiles() -> None:
    med, p5, p95 = _stats([float(x) for x in range(101)])
    assert (med, p5, p95) == (50.0, 5.0, 95.0)
    assert _stats([]) is None


def test_report_text(tmp_path) -> None:
    rows = _rows() + [_row(99, "capture", "10Gbit/s", 4, None, None, None, status="failed")]
    con = Console(record=True, width=120)
    print_report(rows, DESC, con)
    text = con.export_text()
    assert "13 runs, 1 failed, 0 did not converge" in text
    assert "by migration.bandwidth" in text
    assert "3 of 6 hinted runs took at least as long" in text
    assert "KilledWorker: gone" in text
    # the median of saved bytes at 10 Gbit/s: 400 B = 0.39 KiB
    assert "0.39" in text


def test_plot_and_cli(tmp_path, capsys) -> None:
    png = tmp_path / "p.png"
    write_plot(_rows(), DESC, png)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["sweep-report", str(tmp_path / "nothing")]) == 2
    assert "no sweep results" in capsys.readouterr().err
