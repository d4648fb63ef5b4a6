"""The layering rules of docs/architecture.md, enforced by walking every import (issue 2 item 9).

How it works: every ``.py`` file under the checked packages is parsed with ``ast`` (never
imported, so a broken module cannot hide a violation). Each ``import x.y``, ``from x import y``,
relative ``from ..x import y`` (resolved against the file's own package) and literal
``importlib.import_module("x")`` / ``__import__("x")`` call yields a top-level module name, which
is checked against the rules:

* ``guest_model`` never imports ``balloon_dev`` and ``balloon_dev`` never imports ``guest_model``
  (a guest and a device meet only through memory, config bytes and notifications);
* the packages stack (``PROJECT_IMPORTS``): ``protocol`` imports nothing of the project,
  ``guestmem`` only ``protocol``, ``balloon_dev`` and ``guest_model`` only those two; only
  ``vmsim`` assembles them, so nothing below it imports ``vmsim`` (its QEMU lab and qtest peers
  included);
* no package imports ``tests`` (``vmsim.conformance`` ships in the wheel, without the tests);
* ``vmsim/conformance/`` checks any device from the driver's side: it never imports
  ``balloon_dev`` (a check that used our device core would pass for our device only);
* the host's migration (``balloon_dev/host/``) and the device meet only through the device's
  effects and events: nothing else in ``balloon_dev`` imports ``balloon_dev.host``, and
  ``balloon_dev/host/`` imports of ``balloon_dev`` are ``balloon_dev.effects`` or its own;
* the guest's page allocator (``guest_model/buddy/``) is the bottom of the guest: of
  ``guest_model`` it imports only ``guest_model.buddy`` (the driver, rings and workloads use
  it, never the reverse);
* ``construct`` only inside ``protocol/`` (so construct errors cannot leak out of it);
* ``trio`` only in ``balloon_dev/transport/``, ``vmsim/cli.py`` and ``vmsim/cmd_*.py`` (the core
  is sans-I/O). ``scripts/`` and ``tests/`` are not checked: they may use anything;
* inside ``balloon_dev/transport/``: the common layer (``TRANSPORT_COMMON``) imports nothing of a
  particular transport, and each socket transport (``TRANSPORT_FAMILIES``: vfio-user with its
  PCI function, vhost-user) imports only the common layer, ``balloon_dev.effects``,
  ``balloon_dev.status`` and its own modules -- not the other transport, and not
  ``balloon_dev.device`` (it sees the device only through ``core.DeviceCore``). ``inprocess``
  is no socket transport and is not constrained.

Imports under ``if TYPE_CHECKING:`` count too: a type-only dependency between guest and device
is still a dependency the architecture forbids.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED_PACKAGES = ("protocol", "guestmem", "balloon_dev", "guest_model", "vmsim")


def _module_parts(path: Path, root: Path) -> list[str]:
    """Dotted module path of ``path`` relative to ``root`` (``a/b/__init__.py`` -> ``a.b``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return parts


def imported_modules(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute dotted module name) for every import in the file at ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    mod = _module_parts(path, root)
    # The package a relative import is resolved against: the module's own package.
    package = mod if path.name == "__init__.py" else mod[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            yield node.lineno, name
            # "from . import balloon_dev" / "from pkg import module": the imported names may be
            # modules themselves.
            if node.level and not node.module:
                for alias in node.names:
                    yield node.lineno, ".".join([*base, alias.name])
            elif not node.level and node.module:
                for alias in node.names:
                    yield node.lineno, f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Call):
            fn = node.func
            is_dyn = (isinstance(fn, ast.Attribute) and fn.attr == "import_module") or (
                isinstance(fn, ast.Name) and fn.id in ("__import__", "import_module"))
            if is_dyn and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


#: Of the project's packages, what each package below vmsim may import (besides itself).
PROJECT_IMPORTS = {
    "protocol": frozenset(),
    "guestmem": frozenset({"protocol"}),
    "balloon_dev": frozenset({"protocol", "guestmem"}),
    "guest_model": frozenset({"protocol", "guestmem"}),
}
PROJECT_TOPS = frozenset({*PROJECT_IMPORTS, "vmsim", "tests"})


def _stack_violation(rel: Path, top: str) -> str | None:
    """The package-stack, no-tests and conformance rules for an import of ``top`` by ``rel``."""
    owner = rel.parts[0]
    if top == "tests":
        return "packages never import tests/ (vmsim.conformance ships without it)"
    if owner in PROJECT_IMPORTS and top in PROJECT_TOPS and top != owner \
            and top not in PROJECT_IMPORTS[owner]:
        allowed = ", ".join(sorted(PROJECT_IMPORTS[owner])) or "nothing"
        return f"{owner} imports {allowed} of the project (vmsim sits on top)"
    if rel.parts[:2] == ("vmsim", "conformance") and top == "balloon_dev":
        return "vmsim/conformance checks a device from outside: it never imports balloon_dev"
    return None


def _trio_allowed(rel: Path) -> bool:
    parts = rel.parts
    if parts[:2] == ("balloon_dev", "transport"):
        return True
    if parts[0] == "vmsim" and len(parts) == 2:
        return parts[1] == "cli.py" or (parts[1].startswith("cmd_") and parts[1].endswith(".py"))
    return False


def _host_boundary(rel: Path, name: str) -> str | None:
    """The device / host-migration rule for an import of ``name`` by the file ``rel``."""
    parts = rel.parts
    mod = name.split(".")
    if parts[0] != "balloon_dev" or mod[0] != "balloon_dev" or len(mod) < 2:
        return None
    in_host = len(parts) > 2 and parts[1] == "host"
    if not in_host and mod[1] == "host":
        return "the device must not import the host's migration (balloon_dev.host)"
    if in_host and mod[1] not in ("host", "effects"):
        return "balloon_dev/host/ imports of balloon_dev are balloon_dev.effects only"
    return None


def _allocator_boundary(rel: Path, name: str) -> str | None:
    """The guest allocator rule for an import of ``name`` by the file ``rel``."""
    parts = rel.parts
    mod = name.split(".")
    if parts[:2] != ("guest_model", "buddy") or mod[0] != "guest_model" or len(mod) < 2:
        return None
    if mod[1] != "buddy":
        return "guest_model/buddy/ imports of guest_model are guest_model.buddy only"
    return None


#: The socket transports' common layer (balloon_dev/transport/connection.py says what each does).
TRANSPORT_COMMON = frozenset({"core", "connection", "fdstream", "guest_ram", "unixsock"})
#: Each socket transport's own modules.
TRANSPORT_FAMILIES = (frozenset({"vfio_user", "vfio_user_server", "virtio_pci"}),
                      frozenset({"vhost_user", "vhost_user_server", "vhost_user_status"}))
#: Leaf modules of balloon_dev any transport module may import: the effects it performs and the
#: status-byte names (the vhost-user status machine reads the same bits the device judges).
TRANSPORT_LEAVES = frozenset({"balloon_dev.effects", "balloon_dev.status"})
#: What else a transport module may import of balloon_dev, besides the common layer.
TRANSPORT_EXTRA = {"control_server": frozenset({"balloon_dev.control"})}


def _transport_violation(rel: Path, name: str) -> str | None:
    """Why an import by a module of balloon_dev/transport/ breaks the transport boundary."""
    if rel.parts[:2] != ("balloon_dev", "transport") or len(rel.parts) != 3:
        return None
    mod = rel.stem
    if mod in ("__init__", "inprocess") or not (name == "balloon_dev"
                                                or name.startswith("balloon_dev.")):
        return None
    parts = name.split(".")
    if ".".join(parts[:2]) in TRANSPORT_LEAVES or (parts[:2] == ["balloon_dev", "transport"]
                                                   and (len(parts) == 2
                                                        or parts[2] in TRANSPORT_COMMON)):
        return None
    if ".".join(parts[:2]) in TRANSPORT_EXTRA.get(mod, ()):
        return None
    family = next((f for f in TRANSPORT_FAMILIES if mod in f), frozenset())
    if parts[:2] == ["balloon_dev", "transport"] and parts[2] in family:
        return None
    if mod in TRANSPORT_COMMON:
        return "the common transport layer imports no particular transport nor the device"
    return ("a transport imports only the common layer, balloon_dev.effects/status and its own "
            "modules (the device only through core.DeviceCore)")


def layering_violations(root: Path) -> list[str]:
    """Every rule broken by a file under ``root``'s checked packages, as readable lines."""
    out: list[str] = []
    for pkg in CHECKED_PACKAGES:
        base = root / pkg
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(root)
            owner = rel.parts[0]
            seen: set[tuple[int, str]] = set()  # one report per line and rule
            for line, name in imported_modules(path, root):
                top = name.split(".")[0]
                why = None
                if owner == "guest_model" and top == "balloon_dev":
                    why = "guest_model must not import balloon_dev"
                elif owner == "balloon_dev" and top == "guest_model":
                    why = "balloon_dev must not import guest_model"
                elif (boundary := _stack_violation(rel, top) or _host_boundary(rel, name)
                      or _allocator_boundary(rel, name)):
                    why = boundary
                elif top == "construct" and owner != "protocol":
                    why = "construct is imported only inside protocol/"
                elif top == "trio" and not _trio_allowed(rel):
                    why = "trio only in balloon_dev/transport/, vmsim/cli.py, vmsim/cmd_*.py"
                else:
                    why = _transport_violation(rel, name)
                if why is not None and (line, why) not in seen:
                    seen.add((line, why))
                    out.append(f"{rel.as_posix()}:{line}: imports {name} ({why})")
    return out


def test_repository_respects_layering() -> None:
    assert layering_violations(ROOT) == []


def test_checked_packages_exist() -> None:
    # Guards against the walk silently checking nothing after a rename.
    for pkg in CHECKED_PACKAGES:
        assert (ROOT / pkg / "__init__.py").is_file(), pkg


def _plant(tmp_path: Path, rel: str, source: str) -> None:
    for pkg in CHECKED_PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    p = tmp_path / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.parent != tmp_path and not (p.parent / "__init__.py").exists():
        (p.parent / "__init__.py").touch()
    p.write_text(source, encoding="utf-8")


@pytest.mark.parametrize(("rel", "source", "needle"), [
    ("guest_model/bad.py", "import balloon_dev.device\n", "guest_model must not import"),
    ("guest_model/bad.py", "from balloon_dev.effects import NotifyQueue\n",
     "guest_model must not import"),
    ("guest_model/sub/bad.py", "from ...balloon_dev import device\n",
     "guest_model must not import"),
    ("balloon_dev/bad.py", "from guest_model import driver\n", "balloon_dev must not import"),
    ("balloon_dev/bad.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
     "    import guest_model.buddy\n", "balloon_dev must not import"),
    ("balloon_dev/bad.py", "import importlib\nm = importlib.import_module('guest_model.walk')\n",
     "balloon_dev must not import"),
    ("guestmem/bad.py", "from construct import Int32ul\n", "construct is imported only"),
    ("balloon_dev/bad.py", "import construct\n", "construct is imported only"),
    ("balloon_dev/device.py", "import trio\n", "trio only in"),
    ("guest_model/bad.py", "def f():\n    import trio.lowlevel\n", "trio only in"),
    ("vmsim/runner.py", "import trio\n", "trio only in"),
    ("balloon_dev/device.py", "from balloon_dev.host.precopy import PrecopyMigration\n",
     "the device must not import the host"),
    ("balloon_dev/transport/bad.py", "from balloon_dev.host import precopy\n",
     "the device must not import the host"),
    ("balloon_dev/host/precopy.py", "from balloon_dev.device import BalloonDevice\n",
     "balloon_dev.effects only"),
    ("balloon_dev/host/sub/bad.py", "from ...virtqueue import Chain\n", "balloon_dev.effects only"),
    ("guest_model/buddy/bad.py", "from guest_model.driver import PageAllocator\n",
     "guest_model.buddy only"),
    ("guest_model/buddy/bad.py", "from .. import walk\n", "guest_model.buddy only"),
    ("balloon_dev/transport/vfio_user.py",
     "from balloon_dev.transport.vhost_user import MAX_MEM_SLOTS\n", "a transport imports only"),
    ("balloon_dev/transport/vhost_user_server.py",
     "from balloon_dev.transport import vfio_user_server\n", "a transport imports only"),
    ("balloon_dev/transport/vhost_user.py", "from balloon_dev.device import BalloonDevice\n",
     "a transport imports only"),
    ("balloon_dev/transport/guest_ram.py", "from balloon_dev.transport.vfio_user import x\n",
     "the common transport layer imports no"),
    ("balloon_dev/transport/connection.py", "import balloon_dev.device\n",
     "the common transport layer imports no"),
    ("balloon_dev/transport/connection.py", "from balloon_dev.device_config import DeviceConfig\n",
     "the common transport layer imports no"),
    ("balloon_dev/bad.py", "from vmsim.qtest.machine import QtestMachine\n",
     "balloon_dev imports guestmem, protocol of the project"),
    ("guest_model/bad.py", "def f():\n    import vmsim.qtest\n",
     "guest_model imports guestmem, protocol of the project"),
    ("protocol/bad.py", "from guestmem.units import PAGE_SIZE\n", "protocol imports nothing"),
    ("guestmem/bad.py", "from balloon_dev import effects\n", "guestmem imports protocol of"),
    ("vmsim/conformance/harness.py", "from tests.fdutil import eventfd\n",
     "packages never import tests/"),
    ("vmsim/conformance/checks/test_bad.py", "import tests.conformance_target.faulty_server\n",
     "packages never import tests/"),
    ("vmsim/conformance/checks/conftest.py", "from balloon_dev.device import BalloonDevice\n",
     "vmsim/conformance checks a device from outside"),
])
def test_planted_violation_is_caught(tmp_path: Path, rel: str, source: str, needle: str) -> None:
    _plant(tmp_path, rel, source)
    found = layering_violations(tmp_path)
    assert len(found) == 1 and needle in found[0] and rel in found[0], found


@pytest.mark.parametrize(("rel", "source"), [
    ("protocol/layouts.py", "from construct import Struct\n"),
    ("balloon_dev/transport/vfio_user.py", "import trio\n"),
    ("balloon_dev/host/precopy.py", "from balloon_dev.effects import PrecopyEvent\n"),
    ("vmsim/vm.py", "from balloon_dev.host.precopy import PrecopyMigration\n"),
    ("vmsim/cmd_serve.py", "import trio\n"),
    ("vmsim/cli.py", "import trio\n"),
    ("guest_model/driver.py", "from guestmem import GuestMemory\nfrom . import vring\n"),
    ("guest_model/buddy/bulk_free.py",
     "from guest_model.buddy.defs import MAX_ORDER\nfrom . import defs\n"),
    ("balloon_dev/device.py", "from protocol.balloon import config_size\n"),
    ("balloon_dev/transport/vfio_user.py", "from balloon_dev.transport.core import Outcome\n"
     "from balloon_dev.transport.virtio_pci import VirtioPciFunction\n"),
    ("balloon_dev/transport/vhost_user_server.py",
     "from balloon_dev.transport.vhost_user import VhostUserSession\n"
     "from balloon_dev.transport.connection import DeviceServer\n"),
    ("balloon_dev/transport/control_server.py", "from balloon_dev.control import HostControl\n"),
    ("balloon_dev/transport/inprocess.py", "from balloon_dev.device import BalloonDevice\n"),
    ("balloon_dev/transport/vhost_user.py", "from balloon_dev.status import DRIVER_OK\n"),
    ("guestmem/memory.py", "from protocol.errors import GuestFault\n"),
    ("vmsim/conformance/harness.py", "from vmsim.qtest import QtestMachine\n"
     "from guest_model.guest import SimGuest\n"),
    ("vmsim/qtest/balloon.py", "from balloon_dev.device import BalloonDevice\n"),
])
def test_allowed_imports_pass(tmp_path: Path, rel: str, source: str) -> None:
    _plant(tmp_path, rel, source)
    assert layering_violations(tmp_path) == []
