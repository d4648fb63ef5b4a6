"""vmsim/cli.py: lazy imports (``--help`` loads no command, a command loads only its module),
``--version``, and command modules that fail to import are reported, never hidden."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap

import pytest

from vmsim import cli


def modules_after(argv: list[str]) -> set[str]:
    """Top-level and vmsim modules loaded by building the parser for ``argv`` in a fresh
    interpreter."""
    code = textwrap.dedent(f"""
        import json, sys
        from vmsim.cli import build_parser
        build_parser({argv!r})
        print(json.dumps(sorted(sys.modules)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    return set(json.loads(out.stdout))


HEAVY = {"numpy", "trio", "rich", "construct", "matplotlib", "pytest", "importlib.metadata"}


def test_help_imports_no_command_and_nothing_heavy():
    mods = modules_after([])
    assert sorted(m for m in mods if m.startswith("vmsim.cmd_")) == []
    assert sorted(HEAVY & mods) == []
    assert not any(m.split(".")[0] in ("balloon_dev", "guest_model", "guestmem") for m in mods)


def test_migrate_imports_its_module_only():
    mods = modules_after(["-v", "migrate"])
    assert sorted(m for m in mods if m.startswith("vmsim.cmd_")) == ["vmsim.cmd_migrate"]
    for unused in ("trio", "matplotlib", "pytest", "vmsim.qemu_lab", "vmsim.lab_migrate",
                   "balloon_dev.transport.vfio_user_server", "balloon_dev.transport.vhost_user",
                   "vmsim.vfio_user_client"):
        assert unused not in mods, unused


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_command_help_imports_only_its_parser(name):
    """`balloon-hint NAME --help` builds NAME's parser: its module and nothing heavy (the
    simulator, the device, the transports, numpy, rich, trio load when the command runs)."""
    mods = modules_after([name])
    assert sorted(m for m in mods if m.startswith("vmsim.cmd_")) == [cli.COMMANDS[name][0]]
    assert sorted(HEAVY & mods) == []
    assert sorted(m for m in mods if m.split(".")[0] in ("balloon_dev", "guest_model",
                                                          "guestmem")) == []
    assert "vmsim.vm" not in mods and "vmsim.scenario" not in mods
    # the QEMU lab's modules (subprocesses, the migration harness) load only to run
    assert sorted(m for m in mods if m in ("vmsim.qemu_lab", "vmsim.lab_migrate",
                                           "vmsim.hint_capture", "vmsim.migration_stream")) == []


def test_migrate_choices_are_the_engines():
    from vmsim import cmd_migrate, scenario, vm
    from vmsim.qtest import host_migrate

    assert cmd_migrate.HINT_MODES == scenario.HINT_MODES
    assert cmd_migrate.FAULTS == vm.FAULTS
    assert cmd_migrate.QEMU_FAULTS == host_migrate.QEMU_FAULTS


def test_table_help_is_the_modules_help():
    for name, (modname, help_text) in cli.COMMANDS.items():
        assert importlib.import_module(modname).HELP == help_text, name


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("balloon-hint ") and out.split()[1][0].isdigit()


@pytest.fixture
def broken_commands(tmp_path, monkeypatch):
    (tmp_path / "bh_cmd_needs_dep.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "bh_cmd_buggy.py").write_text("import vmsim.no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "needs-dep", ("bh_cmd_needs_dep", "needs a dependency"))
    monkeypatch.setitem(cli.COMMANDS, "buggy", ("bh_cmd_buggy", "imports a module of ours "
                                                "that does not exist"))


def test_command_that_cannot_import_is_listed_and_reported(broken_commands, capsys):
    """not hidden: --help lists it; running it names the missing package (exit 1)"""
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "needs-dep" in capsys.readouterr().out
    assert cli.main(["needs-dep"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'no_such_dependency_xyz'" in err


def test_command_with_a_broken_import_of_ours_raises(broken_commands):
    """a missing module of balloon-hint itself is a bug: it raises with its traceback"""
    with pytest.raises(ModuleNotFoundError, match="no_such_module_xyz"):
        cli.main(["buggy"])
