"""``balloon-hint migrate`` stopped by SIGINT (Ctrl-C) or SIGTERM, and its other user-facing
edges: the modes already finished are kept (table, JSON), one line says what happened, the exit
status is 128 + the signal. The signal goes to a child process, as a user's Ctrl-C does."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from vmsim.cli import main


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_keeps_finished_modes(tmp_path, sig):
    js = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "-m", "vmsim", "-v", "migrate", "--builtin",
                             "compile-8g", "--mode", "all", "--json", str(js)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # -v logs each finished mode; signal once the first is done
            if "mode off finished" in line:
                proc.send_signal(sig)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig
    doc = json.loads(js.read_text())
    kept = [r["mode"] for r in doc["results"]]
    assert kept[0] == "off" and doc["interrupted"]["signal"] == sig.name
    # the signal lands in the next mode, or (on a slow machine) just before it starts
    during = doc["interrupted"]["during_mode"]
    assert during in (None, ["off", "walk", "capture"][len(kept)])
    assert "pages sent" in out and "off" in out
    msgs = [x for x in err.splitlines() if not x.startswith("INFO ")]
    when = f"during mode {during}" if during else "between modes"
    assert msgs == [f"balloon-hint migrate: interrupted by {sig.name} {when}; finished modes "
                    f"kept: {', '.join(kept)}"]
    assert "Traceback" not in err


def test_negative_seed_is_a_usage_error(capsys):
    assert main(["migrate", "--builtin", "small-idle", "--seed", "-5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "balloon-hint migrate: --seed -5: a seed is a whole number >= 0"


def test_json_dash_is_standard_output(capsys):
    assert main(["migrate", "--builtin", "small-idle", "--mode", "off", "--json", "-"]) == 0
    cap = capsys.readouterr()
    doc = json.loads(cap.out)  # nothing but the document on standard output
    assert [r["mode"] for r in doc["results"]] == ["off"]
    assert "pages sent" in cap.err  # the table moved to standard error


def test_fault_with_no_stale_hint_says_so(capsys):
    """small-idle has no churn: no hint arrives stale, so the fault cannot act"""
    assert main(["migrate", "--builtin", "small-idle", "--mode", "capture", "--fault",
                 "accept-stale-hints"]) == 0
    assert ("note: mode capture: 0 stale hints arrived: the fault had nothing to act on"
            in " ".join(capsys.readouterr().err.split()))


def test_plot_without_matplotlib_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    import importlib.util

    import vmsim.vm

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(vmsim.vm, "run_scenario", lambda *a, **k: pytest.fail("ran"))
    assert main(["migrate", "--builtin", "small-idle", "--plot", str(tmp_path / "p.png")]) == 1
    err = capsys.readouterr().err
    assert "pip install 'balloon-hint[plot]'" in err  # the extra's brackets survive


def test_brackets_in_names_survive(tmp_path, capsys):
    """rich markup is escaped: a description with [brackets] prints as written"""
    scn = tmp_path / "b.toml"
    scn.write_text('name = "br"\ndescription = "a [guest] with [bold]brackets[/]"\n'
                   '[guest]\nram = "64MiB"\n[hinting]\nmode = "off"\n')
    assert main(["migrate", str(scn)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "br: a [guest] with [bold]brackets[/]" in out
