"""Which QEMU the qtest peer runs, and whether it can: ``QemuBinary`` and ``find_qemu``.

Theory of operation
-------------------
Two sources. The lab's QEMU (``vmsim.qemu_lab``: QEMU 11.1 in a debootstrap'd trixie tree,
started with the lab's public launcher ``QemuLab.popen``: the tree's own loader, its module
folder, the cache's in-use lock held for the life of the process; there the qtest accelerator is
the loadable module ``accel-qtest.so``), used when no path is given; or any
``qemu-system-x86_64`` the user names (a host's own QEMU, for instance), run as is.
``QemuBinary.popen(args, **popen_kwargs)`` starts either.

``QemuBinary.check()`` finds out, once per binary and process, whether it can be a qtest peer,
and raises ``QtestUnavailable`` naming the missing piece otherwise: the binary itself, QEMU >= 8,
the ``qtest`` accelerator, ``virtio-balloon-pci`` and its ``free-page-hint`` property. The
accelerator check cannot rely on ``-accel help`` alone: a modular build lists only the built-in
accelerators there (the lab's 11.1 lists tcg, kvm, ... but not its qtest module), so when qtest
is not listed a QEMU is started with ``-M none -accel qtest`` and told to quit over QMP (about
50 ms); "invalid accelerator" then means it is really absent.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.errors import EnvironmentFailure

#: Oldest QEMU accepted (the issue's floor; qtest's commands and virtio-balloon's
#: free-page-hint are older, QMP's migrate-incoming and the iothread property too).
MIN_VERSION = (8, 0)
_VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")


class QtestUnavailable(EnvironmentFailure):
    """This QEMU cannot be a qtest peer; the message names the missing feature."""


@dataclass
class QemuBinary:
    """How to start one QEMU (``popen``), and a name for messages. ``argv`` is the command
    prefix (for logs); ``lab`` is the ``vmsim.qemu_lab.QemuLab`` whose launcher starts it, or
    None for a binary run as is with ``env``."""

    argv: list[str]
    env: dict[str, str]
    name: str
    lab: Any = None
    _checked: str | None = field(default=None, repr=False)  # version string once checked

    @classmethod
    def from_lab(cls) -> QemuBinary:
        """The lab's QEMU; ``QtestUnavailable`` (naming the set-up command) when absent."""
        from vmsim.qemu_lab import LabMissing, QemuLab  # noqa: PLC0415

        try:
            lab = QemuLab.find()
        except LabMissing as e:
            raise QtestUnavailable(f"no QEMU given and the lab is missing: {e}") from None
        return cls(lab.qemu_command([]), lab.env(), f"lab QEMU {lab.qemu_version}", lab)

    @classmethod
    def at(cls, path: str) -> QemuBinary:
        """A QEMU binary named by the user (run as is, with the current environment)."""
        p = Path(path)
        if not p.is_file() or not os.access(p, os.X_OK):
            raise QtestUnavailable(f"QEMU binary {path}: not an executable file")
        return cls([str(p)], dict(os.environ), str(p))

    def popen(self, args: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start this QEMU with ``args``; keyword arguments go to ``subprocess.Popen``."""
        if self.lab is not None:
            return self.lab.popen(args, **popen_kwargs)
        return subprocess.Popen([*self.argv, *args], env=self.env, **popen_kwargs)

    def _run(self, args: list[str], timeout: float = 10) -> subprocess.CompletedProcess[str]:
        try:
            with self.popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) as proc:
                try:
                    out, err = proc.communicate(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
                    raise QtestUnavailable(f"{self.name}: {args} did not finish in "
                                           f"{timeout} s") from None
        except OSError as e:
            raise QtestUnavailable(f"{self.name}: cannot run {args}: {e}") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def version(self) -> tuple[int, int, int]:
        out = self._run(["-version"])
        m = _VERSION_RE.search(out.stdout)
        if out.returncode != 0 or not m:
            raise QtestUnavailable(f"{self.name}: -version did not answer "
                                   f"({(out.stdout + out.stderr).strip()[-300:]!r})")
        return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)

    def check(self) -> str:
        """Raise ``QtestUnavailable`` unless this QEMU can be the qtest peer; returns its
        version as text. The answer is cached on the object."""
        if self._checked is not None:
            return self._checked
        ver = self.version()
        text = ".".join(map(str, ver))
        if ver[:2] < MIN_VERSION:
            raise QtestUnavailable(f"{self.name} is QEMU {text}; the qtest peer needs >= "
                                   f"{MIN_VERSION[0]}.{MIN_VERSION[1]}")
        if not self._lists_qtest():
            self._probe_qtest()
        props = self._run(["-device", "virtio-balloon-pci,help"])
        if props.returncode != 0:
            raise QtestUnavailable(f"{self.name}: no virtio-balloon-pci device "
                                   f"({props.stderr.strip()[-200:]})")
        if "free-page-hint" not in props.stdout:
            raise QtestUnavailable(f"{self.name}: virtio-balloon-pci has no free-page-hint "
                                   "property")
        self._checked = text
        return text

    def _lists_qtest(self) -> bool:
        out = self._run(["-accel", "help"])
        return any(line.strip() == "qtest" for line in out.stdout.splitlines())

    def _probe_qtest(self) -> None:
        """Start ``-M none -accel qtest`` and quit it over QMP (see the module docstring)."""
        with tempfile.TemporaryDirectory(prefix="bh-qtest-probe-") as tmp:
            qmp_path = os.path.join(tmp, "qmp.sock")
            lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            lsock.bind(qmp_path)
            lsock.listen(1)
            lsock.settimeout(0.05)
            proc = self.popen(
                ["-M", "none", "-accel", "qtest", "-qtest", "null", "-qtest-log", "none",
                 "-display", "none", "-nodefaults", "-qmp", f"unix:{qmp_path}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                text=True)
            try:
                deadline = time.monotonic() + 10
                conn = None
                while conn is None:
                    if proc.poll() is not None:
                        err = (proc.stderr.read() if proc.stderr else "").strip()
                        raise QtestUnavailable(
                            f"{self.name}: the qtest accelerator is not available (QEMU exits: "
                            f"{err[-300:]!r}); a modular build needs its accel-qtest module, "
                            "found through QEMU_MODULE_DIR")
                    if time.monotonic() > deadline:
                        raise QtestUnavailable(f"{self.name}: -accel qtest did not come up "
                                               "within 10 s")
                    try:
                        conn, _ = lsock.accept()
                    except TimeoutError:
                        continue
                with conn:
                    conn.settimeout(5)
                    f = conn.makefile("rwb")
                    json.loads(f.readline())
                    for cmd in ("qmp_capabilities", "quit"):
                        f.write(json.dumps({"execute": cmd}).encode() + b"\n")
                        f.flush()
                        f.readline()
            finally:
                lsock.close()
                if proc.poll() is None:
                    try:
                        proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                if proc.stderr:
                    proc.stderr.close()


_CACHE: dict[str, QemuBinary] = {}


def find_qemu(path: str | None = None) -> QemuBinary:
    """The QEMU for a qtest peer: ``path`` if given, else the lab's. Checked (``check()``) and
    cached per process; raises ``QtestUnavailable`` with the missing feature in the message."""
    key = path or ""
    q = _CACHE.get(key)
    if q is None:
        q = QemuBinary.at(path) if path else QemuBinary.from_lab()
        q.check()
        _CACHE[key] = q
    return q
