"""Every way a scenario file can fail to parse ends in one line naming the file, exit 2 (issue 15
item 7): nesting deeper than Python's parser stack, numbers whose value in bytes, bytes per
second or seconds overflows a float, keys holding control characters, files that are not regular
files or are far too large. ``ScenarioError`` is a ``UsageError``, so ``vmsim.cli`` handles it
like any other usage error."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from protocol.errors import UsageError
from vmsim.cli import main
from vmsim.scenario import MAX_FILE_BYTES, ScenarioError, loads

GUEST = '[guest]\nram = "64MiB"\n'


def _cli(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    status = main(["migrate", str(path)])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, whatever the width of the terminal
    assert lines[0].startswith(f"balloon-hint migrate: {path}"), err
    return lines[0]


def test_scenario_error_is_a_usage_error() -> None:
    assert issubclass(ScenarioError, UsageError)


@pytest.mark.parametrize("text", [
    "a = " + "[" * 2000 + "]" * 2000 + "\n",
    "a = " + "{ b = " * 2000 + "1" + " }" * 2000 + "\n",
    GUEST + "[[workload]]\nkind = " + "[" * 5000 + "\n",
])
def test_deep_nesting_is_one_line_exit_2(tmp_path: Path, text: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "deep.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ScenarioError, match="deep.toml"):
        loads(text, "deep.toml")
    _cli(path, capsys)


@pytest.mark.parametrize("line", [
    'ram = "1e308TiB"',                       # finite number, infinite bytes
    'ram = "1e308T"',
])
def test_sizes_that_overflow_are_refused(line: str) -> None:
    with pytest.raises(ScenarioError, match="too large"):
        loads(f"[guest]\n{line}\n", "f.toml")


@pytest.mark.parametrize(("table", "line"), [
    ("migration", 'bandwidth = "1e308Tbit/s"'),   # an infinite bandwidth
    ("migration", 'downtime_limit = "1e308h"'),
    ("hinting", 'block_cost = "1e308h"'),
])
def test_rates_and_durations_that_overflow_are_refused(table: str, line: str) -> None:
    with pytest.raises(ScenarioError, match="too large"):
        loads(f"{GUEST}[{table}]\n{line}\n", "f.toml")


def test_control_characters_and_huge_values_stay_on_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nl.toml"
    path.write_text(GUEST + '"a\\nb\\u2028c" = 1\n', encoding="utf-8")
    assert "a\\x0ab" in _cli(path, capsys)
    path.write_text(GUEST + '[hinting]\nmode = "' + "x" * 1_000_000 + '"\n', encoding="utf-8")
    line = _cli(path, capsys)
    assert len(line) < 600 and "is not one of off, walk, capture" in line


def test_non_regular_and_oversized_files(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # reading it would block for ever
    assert "not a regular file" in _cli(fifo, capsys)
    assert "not a regular file" in _cli(tmp_path, capsys)
    big = tmp_path / "big.toml"
    big.write_text(GUEST + "# " + "x" * MAX_FILE_BYTES + "\n", encoding="utf-8")
    assert "larger than" in _cli(big, capsys)
