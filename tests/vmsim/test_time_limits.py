"""Scenario runs that cannot end in reasonable time: refused up front (a first pre-copy round
longer than ``MAX_FIRST_ROUND_S``) or cancelled by the migration's time budget
(``migration.time_limit``), reported as an error with exit status 1, never run for ever."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from vmsim.cli import main
from vmsim.scenario import MAX_FIRST_ROUND_S, MigrationSpec, ScenarioError, loads
from vmsim.vm import run_scenario

GUEST = '[guest]\nram = "64MiB"\n'
CHURN = '\n[[workload]]\nkind = "churn"\nduring = true\nrate = "100MiB/s"\n'


def scenario(migration: str, workloads: str = CHURN) -> str:
    return GUEST + workloads + "\n[migration]\n" + migration


def test_one_bit_per_second_is_refused_naming_file_key_and_line() -> None:
    text = scenario('max_rounds = 5\nbandwidth = "1bit/s"\n')
    with pytest.raises(ScenarioError) as e:
        loads(text, "slow.toml")
    assert e.value.key == "migration.bandwidth"
    assert e.value.line == text.splitlines().index('bandwidth = "1bit/s"') + 1
    msg = str(e.value)
    assert msg.startswith(f"slow.toml:{e.value.line}: key 'migration.bandwidth'")
    assert "first pre-copy round" in msg and "3600 s" in msg


def test_first_round_bound_is_guest_ram_over_bandwidth() -> None:
    ram = 64 << 20
    fits = ram / MAX_FIRST_ROUND_S * 1.0001       # bytes per second: just fast enough
    too_slow = ram / MAX_FIRST_ROUND_S * 0.9999
    s = loads(scenario(f'bandwidth = "{fits:.4f}B/s"\n'), "ok.toml")
    assert s.migration.bandwidth_Bps == pytest.approx(fits)
    with pytest.raises(ScenarioError, match="migration.bandwidth"):
        loads(scenario(f'bandwidth = "{too_slow:.4f}B/s"\n'), "slow.toml")
    # Without a [migration] table the default link (100 Gbit/s) is fine even for 1 TiB.
    loads('[guest]\nram = "1TiB"\n', "big.toml")


@pytest.mark.parametrize(("value", "seconds"), [('"2h"', 7200.0), ('"90min"', 5400.0),
                                                ('"250ms"', 0.25), ("600", 600.0)])
def test_time_limit_key(value: str, seconds: float) -> None:
    s = loads(scenario(f"time_limit = {value}\n"), "t.toml")
    assert s.migration.time_limit_s == seconds
    assert loads(scenario(""), "t.toml").migration.time_limit_s is None  # engine default


@pytest.mark.parametrize("value", ['"25h"', '"0s"', '"-1h"', '"1 fortnight"', "true", "inf"])
def test_bad_time_limit_names_key_and_line(value: str) -> None:
    text = scenario(f'bandwidth = "1Gbit/s"\ntime_limit = {value}\n')
    with pytest.raises(ScenarioError) as e:
        loads(text, "t.toml")
    assert e.value.key == "migration.time_limit"
    assert e.value.line == len(text.splitlines())


#: Dirtying faster than a 1 Gbit/s link can send, with a 1 ms downtime limit: never converges,
#: and max_rounds is out of reach, so only the time limit ends the run.
NEVER_CONVERGES = scenario(
    'bandwidth = "1Gbit/s"\ndowntime_limit = "1ms"\nmax_rounds = 10000\ntime_limit = "300ms"\n',
    '\n[[workload]]\nkind = "fill"\nsize = "16MiB"\n'
    '\n[[workload]]\nkind = "dirty"\nduring = true\nrate = "200MiB/s"\n')


def test_run_cancelled_by_the_time_limit_is_an_error_result() -> None:
    scn = loads(NEVER_CONVERGES, "never.toml")
    r = run_scenario(scn, "capture")
    assert r.error is not None and r.error.startswith("did not converge within 0.3 s simulated")
    assert not r.verified and not r.converged
    assert 0 < r.total_time_s <= 0.3 and r.downtime_s == 0
    # Once the time limit is lifted the same scenario ends by its round limit instead.
    lifted = replace(scn, migration=replace(scn.migration, time_limit_s=None, max_rounds=5))
    r2 = run_scenario(lifted, "capture")
    assert r2.error is None and r2.verified and not r2.converged and r2.rounds == 6


def test_one_bit_per_second_past_validation_still_ends_at_once() -> None:
    # The engine's budget guards callers that build a Scenario without loads() (or a check
    # that missed a case): the bulk pass would take ~1e9 s simulated under background churn.
    scn = loads(scenario('bandwidth = "1Gbit/s"\n'), "slow.toml")
    scn = replace(scn, migration=MigrationSpec(bandwidth_Bps=1 / 8))
    # Ending at once is shown by the error and the simulated time, not by wall-clock time (a
    # speed target would belong in scripts/bench): without the budget this run never returns.
    r = run_scenario(scn, "capture")
    assert r.error is not None and "did not converge within 3600 s simulated" in r.error
    assert not r.verified and r.total_time_s <= 3600


def test_migrate_cli_exits_1_with_the_error(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "never.toml"
    path.write_text(NEVER_CONVERGES, encoding="utf-8")
    out = tmp_path / "r.json"
    status = main(["migrate", str(path), "--mode", "off", "--json", str(out)])
    err = " ".join(capsys.readouterr().err.split())
    assert status == 1
    assert "Traceback" not in err
    assert "error: mode off: did not converge within 0.3 s simulated" in err
    assert "verification failed" not in err  # not a quiet verified = false
    (res,) = json.loads(out.read_text(encoding="utf-8"))["results"]
    assert res["error"].startswith("did not converge") and res["verified"] is False


def test_migrate_cli_refuses_a_hopeless_link_with_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "slow.toml"
    path.write_text(scenario('bandwidth = "1bit/s"\n'), encoding="utf-8")
    status = main(["migrate", str(path)])
    err = " ".join(capsys.readouterr().err.replace(str(path), "FILE").split())
    assert status == 2 and "Traceback" not in err
    assert "FILE:10: key 'migration.bandwidth'" in err.replace("\n", ""), err
