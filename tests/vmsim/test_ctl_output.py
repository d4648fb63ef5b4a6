"""``balloon-hint ctl`` output for people (features in hex, round ages) and ``--raw``."""
from __future__ import annotations

import json
import os
import sys
import tempfile

from vmsim.cli import main
from vmsim.cmd_ctl import COMMAND_HELP, for_people
from vmsim.conformance.harness import start_server, stop_server


def test_rounds_get_ages_and_features_hex():
    ans = {"return": {"device_features": 0x10000000A, "driver_features": 0, "clock": 105.5,
                      "rounds": [{"cmd_id": 2, "requested_at": 100.0, "hints": 4}],
                      "status": 15}}
    out = for_people(ans)["return"]
    assert out["device_features"] == "0x10000000a" and out["driver_features"] == "0x0"
    assert out["rounds"] == [{"requested_s_ago": 5.5, "cmd_id": 2, "hints": 4}]
    assert "clock" not in out and out["status"] == 15
    assert for_people({"error": {"class": "GenericError"}}) == {"error": {"class": "GenericError"}}


def test_ctl_stats_against_serve(capsys):
    with tempfile.TemporaryDirectory(prefix="bh-ctl-") as d:
        sock, ctl = os.path.join(d, "s"), os.path.join(d, "s.ctl")
        proc = start_server([sys.executable, "-m", "vmsim", "serve", "--vfio-user", sock], sock,
                            ctl)
        try:
            assert main(["ctl", ctl, "stats"]) == 0
            shown = json.loads(capsys.readouterr().out)["return"]
            assert main(["ctl", ctl, "stats", "--raw"]) == 0
            raw = json.loads(capsys.readouterr().out)["return"]
        finally:
            stop_server(proc)
    assert shown["device_features"] == f"{raw['device_features']:#x}"
    assert isinstance(raw["clock"], float) and "clock" not in shown


def test_ctl_help_lists_every_command(capsys):
    try:
        main(["ctl", "--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for c in COMMAND_HELP:
        assert f"  {c} " in out
    assert "(default: 10.0)" in out
