"""Mutations of the built-in scenario files: every broken file is a usage error naming the file,
the key and the line, and the CLI exits 2 without a traceback.

Each built-in TOML file is mutated one line at a time: a key deleted or renamed, its value
replaced by one of the wrong type, a bad unit, a negative number, a huge or infinite value, or its
table declared twice. ``vmsim.scenario.loads`` must raise ``ScenarioError`` (nothing else) whose
message names the file and the mutated key and carries the line of the mutation (for a deleted
required key: the line of its table's header). A sample of the mutants also goes through the
real CLI (``python -m vmsim migrate FILE`` in-process through ``vmsim.cli.main``): exit status 2,
the file, key and line on stderr, no traceback.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest

from vmsim.cli import main
from vmsim.scenario import WORKLOAD_KINDS, ScenarioError, builtin_names, loads

KEY_LINE = re.compile(r"^(\s*)([A-Za-z0-9_]+)(\s*=\s*)(.*?)\s*$")
HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_]+)\s*\]\]?\s*$")
#: Keys a file must have (deleting one is an error). Workload keys depend on the kind.
REQUIRED = {("guest", "ram")}
REQUIRED_WORKLOAD = {"kind", *(k for ks in [("size",), ("rate",), ("duration",)] for k in ks)}


@dataclass(frozen=True)
class Mutant:
    what: str
    text: str
    key: str  # the key (last dotted component) or table the message must name
    line: int  # the line the message must give (0: any line)
    alt: tuple[str, int] | None = None  # another acceptable (key, line)


def builtin_text(name: str) -> str:
    return (resources.files("vmsim") / "scenarios" / f"{name}.toml").read_text(encoding="utf-8")


def _value_mutations(key: str, value: str) -> list[tuple[str, str]]:
    """(label, new value) pairs that must all be refused for ``key = value``."""
    out: list[tuple[str, str]] = [("array", "[1, 2]"), ("inline table", "{ a = 1 }"),
                                  ("date", "1979-05-27")]
    if value in ("true", "false"):
        out += [("int for bool", "1"), ("string for bool", '"yes"')]
    elif value.startswith('"'):
        inner = value.strip('"')
        m = re.fullmatch(r"([0-9.]+)\s*([A-Za-zµ/]+)", inner)
        if m:  # a quantity with a unit
            num, unit = m.groups()
            out += [("bad unit", f'"{num}parsecs"'), ("unit only", f'"{unit}"'),
                    ("negative", f'"-{num}{unit}"'), ("infinite", f'"1e400{unit}"'),
                    ("no number", '"lots"'), ("bool for quantity", "true")]
            if key == "rate":  # a workload's: work grows with it (bandwidth may be anything)
                out += [("absurd rate", f'"1e6{unit}"' if unit.lower().startswith("g")
                         else f'"1e9{unit}"')]
            if key == "ram":
                out += [("huge RAM", f'"1e30{unit}"'), ("unaligned RAM", '"1000000001B"'),
                        ("tiny RAM", '"1MiB"')]
        elif key in ("kind", "mode"):
            out += [("unknown choice", '"sideways"'), ("int for choice", "3")]
        else:  # name, description: any string is fine, only the type can be wrong
            out = [("int for string", "5"), ("bool for string", "false"), ("array", "[1]")]
    else:  # a bare number
        out += [("negative", "-1"), ("string for number", '"12"'),
                ("bool for number", "true"), ("infinite", "inf"), ("nan", "nan")]
        # published and measured figures: any finite number (measured: not negative)
        if key not in ("without_hints_ms", "with_hints_ms") and not key.endswith(("_off",
                                                                                   "_hints")):
            out += [("huge", str(10**30))]
        if key == "keep":
            out += [("above 1", "1.5")]
    return out


def mutants(name: str) -> list[Mutant]:
    text = builtin_text(name)
    lines = text.splitlines()
    out: list[Mutant] = []
    table, header_line, kind = "", 0, None
    for i, raw in enumerate(lines):
        no = i + 1
        h = HEADER.match(raw)
        if h:
            table, header_line = h.group(2), no
            if h.group(1) == "[":  # a table declared twice
                out.append(Mutant(f"duplicate [{table}]", "\n".join(lines + [raw, ""]), table,
                                  len(lines) + 1))
            continue
        m = KEY_LINE.match(raw)
        if not m or raw.lstrip().startswith("#"):
            continue
        indent, key, eq, value = m.groups()
        if table == "workload" and key == "kind":
            kind = value.strip('"')

        def with_line(new: str | None, _i: int = i) -> str:
            copy = list(lines)
            if new is None:
                del copy[_i]
            else:
                copy[_i] = new
            return "\n".join(copy) + "\n"

        # Renaming a workload's kind may also be reported as the kind missing (its header).
        out.append(Mutant(f"rename {table}.{key}", with_line(f"{indent}{key}_x{eq}{value}"),
                          f"{key}_x", no, (key, header_line) if key == "kind" else None))
        out.append(Mutant(f"duplicate key {table}.{key}", with_line(f"{raw}\n{raw}"), key,
                          no + 1))
        for label, new in _value_mutations(key, value):
            out.append(Mutant(f"{label} {table}.{key} = {new}",
                              with_line(f"{indent}{key}{eq}{new}"), key, no))
        required = (table, key) in REQUIRED or (
            table == "workload" and (key == "kind" or (
                kind in WORKLOAD_KINDS and key in REQUIRED_WORKLOAD)))
        if required:
            out.append(Mutant(f"delete {table}.{key}", with_line(None), key, header_line))
        if table == "workload" and key == "during" and value == "true":
            out.append(Mutant(f"flip {table}.{key}", with_line(f"{indent}{key}{eq}false"), key,
                              0))  # line: the workload's (kind line), checked loosely
    return out


ALL = [(n, m) for n in builtin_names() for m in mutants(n)]


def test_mutants_exist_for_every_builtin() -> None:
    names = {n for n, _ in ALL}
    assert names == set(builtin_names()) and len(ALL) > 300, len(ALL)


@pytest.mark.parametrize("name", builtin_names())
def test_every_mutant_is_a_scenario_error_naming_file_key_and_line(name: str) -> None:
    file = f"{name}-mutant.toml"
    failures = []
    for m in mutants(name):
        try:
            loads(m.text, file)
        except ScenarioError as e:
            msg = str(e)
            ok = False
            for key, line in [(m.key, m.line), *([m.alt] if m.alt else [])]:
                # "FILE:LINE: key 'KEY'" or "key 'table[i].KEY'"
                names_key = f"key '{key}'" in msg or f".{key}'" in msg
                at_line = e.line is not None and msg.startswith(f"{file}:{e.line}: ") and (
                    not line or e.line == line)
                ok = ok or (names_key and at_line)
            if not ok:
                failures.append(f"{m.what}: line {e.line} (want {m.line}): {msg}")
        except Exception as e:  # noqa: BLE001 - the property: nothing but ScenarioError
            failures.append(f"{m.what}: {type(e).__name__}: {e}")
        else:
            failures.append(f"{m.what}: accepted")
    assert not failures, "\n".join(failures)


def test_cli_exits_2_naming_file_key_and_line(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A sample of mutants through ``balloon-hint migrate FILE``: exit 2, no traceback."""
    rng = random.Random(7)
    sample = rng.sample(ALL, 25)
    for i, (_name, m) in enumerate(sample):
        path = tmp_path / f"m{i}.toml"
        path.write_text(m.text, encoding="utf-8")
        status = main(["migrate", str(path)])
        err = capsys.readouterr().err
        flat = " ".join(err.split())  # rich may wrap long messages
        assert status == 2, (m.what, err)
        assert "Traceback" not in err
        assert str(path) in err.replace("\n", "") or path.name in flat, (m.what, err)
        assert m.key in flat and re.search(r":\d+:", err.replace("\n", "")), (m.what, err)


def test_unreadable_and_binary_files_exit_2(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    for name, data in (("missing.toml", None), ("latin1.toml", b"name = \"\xe9\"\n"),
                       ("nul.toml", b"\0\0\0"), ("empty.toml", b"")):
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        status = main(["migrate", str(path)])
        err = capsys.readouterr().err
        assert status == 2 and "Traceback" not in err and name in err, (name, err)


@pytest.mark.parametrize(("text", "key", "line"), [
    ('guest = { ram = "-1GiB" }\n', "guest.ram", 1),
    ('name = "x"\nguest.ram = "12parsec"\n', "guest.ram", 2),
    ('[guest]\nram = "64MiB"\n\n[[workload]]\nkind = "fill"\nsize = { a = 1 }\n',
     "workload[1].size", 6),
    ('name = "x"\nworkload = [ { kind = "fill", size = "9TiB" } ]\n[guest]\nram = "64MiB"\n',
     "workload[1].size", 2),
    ('[guest]\nram = "64MiB"\nvcpus.x = 1\n', "guest.vcpus", 3),
])
def test_inline_tables_and_dotted_keys_get_a_line_too(text: str, key: str, line: int) -> None:
    """Valid TOML the built-ins do not use (inline tables, dotted keys): the error still carries
    the line that assigns the bad value."""
    with pytest.raises(ScenarioError) as ei:
        loads(text, "f.toml")
    assert ei.value.line == line and ei.value.key == key, str(ei.value)
