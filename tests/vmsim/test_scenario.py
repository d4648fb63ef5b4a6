"""Scenario files: units, schema checks, error messages naming file/key/line, built-ins."""
from __future__ import annotations

import pytest

from vmsim.scenario import (
    ScenarioError,
    UnitError,
    builtin_names,
    load,
    load_builtin,
    loads,
    parse_duration,
    parse_rate,
    parse_size,
)

GOOD = """\
name = "t"
description = "a test"

[guest]
ram = "1GiB"
seed = 7
page_poison = true

[[workload]]
kind = "fill"
size = "256MiB"

[[workload]]
kind = "churn"
during = true
rate = "64MiB/s"
lifetime = "20ms"

[migration]
bandwidth = "10Gbit/s"
downtime_limit = "300ms"
max_rounds = 12

[hinting]
mode = "walk"
min_order = 9
"""


@pytest.mark.parametrize("text,expected", [
    ("8GiB", 8 << 30), ("8G", 8 << 30), ("8 GiB", 8 << 30), ("8GB", 8_000_000_000),
    ("1.5MiB", 3 << 19), ("4096", 4096), ("4k", 4096), (4096, 4096), ("0", 0),
])
def test_sizes(text, expected) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("10Gbit/s", 1.25e9), ("100Gbps", 12.5e9), ("1.25GB/s", 1.25e9), ("1MiB/s", 1 << 20),
    ("800Mbit/s", 1e8), ("1TiB/s", 1 << 40), ("2TB/s", 2e12), ("8Tbps", 1e12),
])
def test_rates(text, expected) -> None:
    assert parse_rate(text) == pytest.approx(expected)


@pytest.mark.parametrize("text,expected", [
    ("300ms", 0.3), ("1.5s", 1.5), ("50us", 5e-5), ("2min", 120.0), (0.25, 0.25),
])
def test_durations(text, expected) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("bad", ["8 parsecs", "-1GiB", "GiB", "1.5", "1e400x"])
def test_bad_sizes(bad) -> None:
    with pytest.raises(UnitError):
        parse_size(bad)


def test_good_file_loads() -> None:
    s = loads(GOOD, "good.toml")
    assert s.name == "t" and s.guest.ram_bytes == 1 << 30 and s.guest.seed == 7
    assert s.guest.page_poison and not s.guest.init_on_free
    assert [w.kind for w in s.setup_workloads] == ["fill"]
    assert [w.kind for w in s.during_workloads] == ["churn"]
    assert s.during_workloads[0].params == {"rate": 64 << 20, "lifetime": 0.02}
    assert s.migration.bandwidth_Bps == pytest.approx(1.25e9)
    assert s.migration.downtime_limit_s == pytest.approx(0.3)
    assert s.migration.max_rounds == 12
    assert s.hinting.mode == "walk" and s.hinting.min_order == 9
    # the keys of a lossy host are off unless asked for
    assert s.host.dirty_log == "exact" and not s.guest.kernel_data
    assert s.migration.chunk_pages is None


def test_lossy_host_keys_load() -> None:
    s = loads(GOOD.replace('max_rounds = 12', 'max_rounds = 12\nchunk = "4MiB"')
              .replace('page_poison = true', 'page_poison = true\nkernel_data = true')
              + '[host]\ndirty_log = "qemu-7.2-tcg"\n', "lossy.toml")
    assert s.migration.chunk_pages == 1024 and s.guest.kernel_data
    assert s.host.dirty_log == "qemu-7.2-tcg"


def _err(text: str) -> ScenarioError:
    with pytest.raises(ScenarioError) as ei:
        loads(text, "bad.toml")
    return ei.value


def _edit(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


@pytest.mark.parametrize("old,new,key,line,words", [
    ('max_rounds = 12', 'max_round = 12', "migration.max_round", 22, "unknown key"),
    ('bandwidth = "10Gbit/s"', 'bandwidth = "10Gbt/s"', "migration.bandwidth", 20, "unit"),
    ('ram = "1GiB"', 'ram = "-1GiB"', "guest.ram", 5, "negative"),
    ('seed = 7', 'seed = "seven"', "guest.seed", 6, "integer"),
    ('page_poison = true', 'page_poison = 1', "guest.page_poison", 7, "true or false"),
    ('rate = "64MiB/s"', 'rate = 64', "workload[2].rate", 16, "rate"),
    ('lifetime = "20ms"', 'lifetime = "20 fortnights"', "workload[2].lifetime", 17, "unit"),
    ('mode = "walk"', 'mode = "grab"', "hinting.mode", 25, "not one of"),
    ('min_order = 9', 'min_order = 11', "hinting.min_order", 26, "range"),
    ('kind = "fill"', 'kind = "fil"', "workload[1].kind", 10, "unknown workload kind"),
    ('size = "256MiB"', 'size = "2GiB"', "workload[1].size", 11, "larger than"),
    ('max_rounds = 12', 'max_rounds = 0', "migration.max_rounds", 22, "range"),
    ('during = true', 'during = false', "workload[2].during", 14, "background"),
    ('size = "256MiB"', 'size = "256MiB"\nduring = true', "workload[1].during", 12,
     "set-up phase"),
    ('downtime_limit = "300ms"', 'downtime_limit = "0ms"', "migration.downtime_limit", 21,
     "more than zero"),
    ('max_rounds = 12', 'max_rounds = 12\nchunk = "6KiB"', "migration.chunk", 23,
     "whole 4 KiB pages"),
    ('max_rounds = 12', 'max_rounds = 12\nchunk = "2GiB"', "migration.chunk", 23, "1 GiB"),
    ('page_poison = true', 'page_poison = true\nkernel_data = "yes"', "guest.kernel_data", 8,
     "true or false"),
    ('min_order = 9', 'min_order = 9\n[host]\ndirty_log = "qemu-7.1"', "host.dirty_log", 28,
     "not one of"),
])
def test_bad_files_name_file_key_and_line(old, new, key, line, words) -> None:
    e = _err(_edit(old, new))
    assert e.file == "bad.toml" and e.key == key and e.line == line, str(e)
    assert words in str(e)
    assert str(e).startswith(f"bad.toml:{line}: key '{key}'")


def test_unknown_table_and_syntax_error() -> None:
    e = _err(GOOD + "\n[hinteng]\nmode = \"off\"\n")
    assert e.key == "hinteng" and e.line == 28
    e = _err("[guest\nram = 1\n")
    assert e.line == 1 and "not valid TOML" in str(e)


def test_missing_guest_and_ram() -> None:
    assert _err('name = "x"\n').key == "guest"
    assert _err('[guest]\nseed = 1\n').key == "guest.ram"


def test_load_names_the_path(tmp_path) -> None:
    p = tmp_path / "s.toml"
    p.write_text(_edit('max_rounds = 12', 'max_rounds = "many"'))
    with pytest.raises(ScenarioError) as ei:
        load(p)
    assert str(ei.value).startswith(f"{p}:22: key 'migration.max_rounds'")
    with pytest.raises(ScenarioError):
        load(tmp_path / "absent.toml")


def test_builtins_all_load() -> None:
    names = builtin_names()
    for required in ("idle-8g", "compile-8g", "idle-128g", "compile-128g", "memhog-freed-8g"):
        assert required in names
    for n in names:
        s = load_builtin(n)
        assert s.name == n
    with pytest.raises(ScenarioError):
        load_builtin("no-such-scenario")
