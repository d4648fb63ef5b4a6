"""Boot real Linux guests under a real QEMU (>= 10.1) from the cached QEMU lab.

``scripts/qemu-lab setup`` builds the lab into a cache folder and describes it in ``lab.json``;
this module reads that file (``QemuLab.find()``) and boots guests (``QemuLab.boot()``).

Theory of operation
-------------------
* **Running QEMU.** The QEMU binary lives in a debootstrap'd Debian trixie tree with its own
  libraries. It is started through that tree's dynamic loader (``ld-linux-x86-64.so.2
  --library-path ROOT/lib...:ROOT/usr/lib... ROOT/usr/bin/qemu-system-x86_64``), with ``-L`` for
  the firmware folders, so nothing of the host's libraries is used or changed.
  ``QemuLab.popen(args)`` (and ``start_qemu``) is the one way to start it with any arguments;
  ``qemu_argv`` is the bare argv prefix.
* **Modules.** QEMU looks for a loadable module first in ``QEMU_MODULE_DIR`` (the tree's), then
  in its built-in module folder, ``/usr/lib/x86_64-linux-gnu/qemu``, unless a folder
  ``qemu-bundle`` sits next to its executable, in which case every built-in path is looked up
  under that folder instead. Under the tree's loader the executable is the loader, so
  ``scripts/qemu-lab setup`` makes ``qemu-bundle`` there with ``usr``, ``etc`` and ``var``
  linking back into the tree (``ensure_bundle``). Without it, a host with Debian's own
  qemu-system-x86 would lend our QEMU its modules for the ones the tree lacks (ui-opengl,
  audio-*), built for another version; a tree made before the bundle existed still runs, in a
  private mount namespace with the tree's module folder bind-mounted over the host's (root only).
* **Sharing the cache.** Every QEMU started here holds a shared ``flock`` on
  ``CACHE/.in-use.lock`` for its whole life (the locked descriptor is passed to the process, so
  the lock lasts exactly as long as QEMU). ``scripts/qemu-lab`` takes ``CACHE/.setup.lock`` for a
  whole setup, and deletes or rebuilds a piece only with an exclusive lock on ``.in-use.lock``
  taken without waiting: a cache some QEMU is using is never deleted.
* **The guest.** A Debian 6.1 kernel and a busybox initramfs whose ``/init`` loads the virtio
  modules, prints ``BH_LAB_READY`` and runs a shell on the serial console (ttyS0, echo off,
  kernel messages kept off the console). QEMU's serial port is its stdio, connected to pipes.
  A reader thread appends everything the guest prints to ``GuestVM.console_log``.
* **Commands** (``GuestVM.run``) use a marker protocol over that console: the command text is sent
  base64-encoded (so no quoting or syntax in it can confuse the interactive shell), written to a
  file and run by ``sh`` between two ``printf`` markers carrying a sequence number; the end marker
  carries the exit status. Only whole lines equal to the markers count, so echoed input can never
  be mistaken for them.
* **QMP** is a unix socket in the guest's temp folder, opened after boot; ``GuestVM.qmp`` sends one
  command and returns its ``return`` value; events seen meanwhile are kept in ``qmp_events``.
* **Machine.** ``-accel tcg`` (the machines' /dev/kvm cannot run these guests: qemu-notes.md),
  ``q35``, ``-nodefaults``, guest RAM from ``memory-backend-memfd,share=on`` so external device
  servers (vfio-user, vhost-user) can map it.

This module is an I/O harness for tests and benchmarks, not core code: it uses subprocesses,
threads and the wall clock (for timeouts only).
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from protocol.errors import EnvironmentFailure, UsageError
from vmsim.qmp import QmpClient, QmpConnectionLost, kill_and_remove
from vmsim.qmp import QmpError as QmpError  # callers catch vmsim.qemu_lab.QmpError

log = logging.getLogger(__name__)

# Load order of the guest's virtio modules: each needs only the ones before it (qemu-notes.md).
GUEST_MODULES = [
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_ring",
    "virtio",
    "virtio_pci",
    "virtio_balloon",
]
READY_MARKER = "BH_LAB_READY"
SETUP_HINT = "scripts/qemu-lab setup"
#: The built-in module folder of Debian's QEMU builds (the host's, when it has one).
HOST_QEMU_MODDIR = Path("/usr/lib/x86_64-linux-gnu/qemu")
#: The tree's module folder, relative to the tree.
TREE_MODDIR = "usr/lib/x86_64-linux-gnu/qemu"
#: What ``qemu-bundle`` holds: the prefixes of QEMU's built-in paths, linked into the tree.
BUNDLE_PREFIXES = ("usr", "etc", "var")
IN_USE_LOCK = ".in-use.lock"
SETUP_LOCK = ".setup.lock"


class LabMissing(EnvironmentFailure):
    """The lab is not set up (or is broken): the message names the piece and the fix."""


class LabUsageError(UsageError, ValueError):
    """A bad lab argument (a RAM size, a ``--device`` spec): the CLI prints it on one line and
    exits 2 (a ``ValueError`` too, for callers that catch that)."""


class LabVMError(EnvironmentFailure):
    """The lab's VM failed: it did not boot, QEMU exited, a command timed out or failed. The
    message has the console tail."""


class GuestCommandError(LabVMError):
    """A guest command exited non-zero (``GuestVM.run(..., check=True)``)."""

    def __init__(self, cmd: str, status: int, output: str) -> None:
        super().__init__(f"guest command {cmd!r} exited {status}:\n{output[-2000:]}")
        self.cmd, self.status, self.output = cmd, status, output


def cache_dir() -> Path:
    """``$BALLOON_HINT_CACHE``, else ``$XDG_CACHE_HOME/balloon-hint``, else
    ``~/.cache/balloon-hint``."""
    if os.environ.get("BALLOON_HINT_CACHE"):
        return Path(os.environ["BALLOON_HINT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "balloon-hint"


def loader(root: Path) -> Path:
    return root / "lib64/ld-linux-x86-64.so.2"


def bundle_dir(root: Path) -> Path:
    """Where QEMU looks for ``qemu-bundle``: next to its executable, which is the tree's loader
    (the real file behind the ``lib64`` link)."""
    return Path(os.path.realpath(loader(root))).parent / "qemu-bundle"


def bundle_ok(root: Path) -> bool:
    b = bundle_dir(root)
    return all((b / p).resolve() == (root / p).resolve() for p in BUNDLE_PREFIXES)


def ensure_bundle(root: Path) -> bool:
    """Make ``qemu-bundle`` (see the module docstring); True if it had to be made. Each link is
    made under a temporary name and renamed into place, so a QEMU starting meanwhile sees either
    no link or a whole one."""
    if bundle_ok(root) or not loader(root).exists():
        return False
    b = bundle_dir(root)
    b.mkdir(exist_ok=True)
    for prefix in BUNDLE_PREFIXES:
        tmp = b / f".{prefix}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.path.relpath(root / prefix, b))
        tmp.rename(b / prefix)
    return True


def private_moddir(src: Path, dst: Path, argv: Sequence[str]) -> list[str]:
    """``argv`` run in a private mount namespace with folder ``src`` bind-mounted over ``dst``
    (needs root). ``sh -c SCRIPT NAME ARGS...`` puts NAME in ``$0`` and ARGS in ``$1...``, so the
    two folders are ``$1`` ``$2`` and, once shifted, ``"$@"`` is exactly ``argv``."""
    return ["unshare", "-m", "sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"',
            "qemu-lab", str(src), str(dst), *argv]


def qemu_argv(root: Path) -> list[str]:
    """The argv prefix that starts the tree's qemu-system-x86_64 from the host (no lock: use
    ``QemuLab.popen`` to start a QEMU)."""
    libs = ":".join(str(root / d) for d in (
        "lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu/ceph"))
    argv = [str(loader(root)), "--library-path", libs,
            str(root / "usr/bin/qemu-system-x86_64"),
            "-L", str(root / "usr/share/qemu"), "-L", str(root / "usr/share/seabios")]
    if HOST_QEMU_MODDIR.is_dir() and not bundle_ok(root):
        # A tree without qemu-bundle would borrow the host QEMU's modules: hide them.
        argv = private_moddir(root / TREE_MODDIR, HOST_QEMU_MODDIR, argv)
    return argv


def in_use_fd(cache: Path) -> int:
    """A descriptor holding a shared lock on the cache's in-use lock (waits while a setup is
    deleting or rebuilding a piece). Inheritable: pass it to the QEMU process."""
    cache.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache / IN_USE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


@contextlib.contextmanager
def exclusive_use(cache: Path) -> Iterator[bool]:
    """Try to own the cache exclusively, without waiting: yields True while no QEMU started
    here is running (they then wait for this to end), False when one is."""
    cache.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache / IN_USE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def setup_lock(cache: Path, wait: bool = True) -> Iterator[None]:
    """One setup (or clean) at a time per cache; the second one waits for the first."""
    cache.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache / SETUP_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise
            log.warning("another qemu-lab setup is running on %s: waiting for it", cache)
            print(f"qemu-lab: another setup is running on {cache}: waiting for it", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def qemu_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["QEMU_MODULE_DIR"] = str(root / "usr/lib/x86_64-linux-gnu/qemu")
    return env


def module_paths(moddir: Path, names: Sequence[str]) -> list[Path]:
    """Paths of the named modules, from the kernel's modules.dep (written by depmod -b)."""
    dep = moddir / "modules.dep"
    if not dep.exists():
        raise LabMissing(f"{dep} is missing (depmod not run): run {SETUP_HINT}")
    by_name: dict[str, Path] = {}
    for line in dep.read_text().splitlines():
        rel = line.split(":", 1)[0]
        base = os.path.basename(rel)
        by_name[re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base).replace("-", "_")] = moddir / rel
    out = []
    for n in names:
        p = by_name.get(n)
        if p is None:
            raise LabMissing(f"kernel module {n} is not in {dep}: run {SETUP_HINT}")
        if not p.exists():
            raise LabMissing(f"kernel module file {p} is missing: run {SETUP_HINT}")
        if p.suffix != ".ko":
            raise LabMissing(f"{p} is compressed; busybox insmod needs a plain .ko")
        out.append(p)
    return out


def parse_ram(ram: str) -> int:
    """Bytes of a QEMU ``-m`` size such as ``512M`` or ``1G`` (``LabUsageError`` otherwise)."""
    m = re.fullmatch(r"(\d+)([KMGT]?)", ram.strip().upper())
    if not m:
        raise LabUsageError(f"ram={ram!r}: expected a size like 512M or 1G")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2)]


class QemuLab:
    """The cached lab: paths to QEMU, the kernel and the initramfs."""

    def __init__(self, cache: Path, manifest: dict[str, Any]) -> None:
        self.cache = cache
        self.root = cache / manifest["qemu_root"]
        self.kernel = cache / manifest["kernel"]
        self.initrd = cache / manifest["initrd"]
        self.kernel_release: str = manifest["kernel_release"]
        self.qemu_version: str = manifest["qemu_version"]

    @classmethod
    def find(cls) -> QemuLab:
        cache = cache_dir()
        mf = cache / "lab.json"
        if not mf.exists():
            raise LabMissing(f"no QEMU lab in {cache} (lab.json missing): run {SETUP_HINT}")
        try:
            manifest = json.loads(mf.read_text())
            lab = cls(cache, manifest)
        except (ValueError, KeyError) as e:
            raise LabMissing(f"{mf} is unreadable ({e}): run {SETUP_HINT}") from e
        for what, p in (("QEMU tree stamp", lab.root / ".balloon-hint-ok"),
                        ("QEMU binary", lab.root / "usr/bin/qemu-system-x86_64"),
                        ("QEMU's loader", lab.root / "lib64/ld-linux-x86-64.so.2"),
                        ("guest kernel", lab.kernel), ("initramfs", lab.initrd)):
            if not p.exists():
                raise LabMissing(f"{what} {p} is missing: run {SETUP_HINT}")
        return lab

    def env(self) -> dict[str, str]:
        return qemu_env(self.root)

    def qemu_command(self, args: Sequence[str]) -> list[str]:
        """The full argv that runs the lab's QEMU with ``args``."""
        return [*qemu_argv(self.root), *args]

    def popen(self, args: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start the lab's QEMU with ``args`` (any QEMU options), holding the cache's in-use
        lock for the life of the process; keyword arguments go to ``subprocess.Popen``
        (``env`` is added to the lab's environment)."""
        env = self.env()
        env.update(popen_kwargs.pop("env", None) or {})
        fd = in_use_fd(self.cache)
        try:
            pass_fds = (*popen_kwargs.pop("pass_fds", ()), fd)
            return subprocess.Popen(self.qemu_command(args), env=env, pass_fds=pass_fds,
                                    **popen_kwargs)
        finally:
            os.close(fd)  # the child keeps the lock

    def run(self, args: Sequence[str], timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run the lab's QEMU to completion (``-version``, ``-device help``): text output.
        ``env``: variables added to the lab's environment."""
        with self.popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True, env=env) as proc:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                raise LabVMError(f"QEMU {' '.join(args)} did not finish in {timeout} s") \
                    from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def machine_args(self, *, ram: str = "1G", devices: Sequence[str] = (),
                     extra_args: Sequence[str] = (), append: str = "",
                     serial: str = "stdio", qmp_path: str | None = None) -> list[str]:
        """QEMU's options for a lab guest (without the launcher prefix)."""
        size = parse_ram(ram)
        # -m in KiB when the size is not whole MiB (QEMU takes a K suffix).
        mem = str(size >> 20) if size % (1 << 20) == 0 else f"{size >> 10}K"
        cmd = ["-accel", "tcg", "-M", "q35,memory-backend=mem", "-m", mem,
               # Shareable guest RAM: external device servers map it by fd.
               "-object", f"memory-backend-memfd,id=mem,size={size},share=on",
               "-nodefaults", "-display", "none", "-no-reboot",
               "-serial", serial,
               "-kernel", str(self.kernel), "-initrd", str(self.initrd),
               # panic=-1 + -no-reboot: a guest panic ends QEMU instead of hanging the test.
               "-append", f"console=ttyS0 panic=-1 {append}".strip()]
        if qmp_path:
            cmd += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
        for d in devices:
            cmd += ["-device", d]
        cmd += list(extra_args)
        return cmd

    def command_line(self, **machine: Any) -> list[str]:
        """The full QEMU argv for a guest: ``qemu_command(machine_args(**machine))``."""
        return self.qemu_command(self.machine_args(**machine))

    def boot(self, *, ram: str = "1G", devices: Sequence[str] = (),
             extra_args: Sequence[str] = (), append: str = "", timeout: float = 120,
             wait_ready: bool = True) -> GuestVM:
        """Start a guest and wait for its shell. Use as a context manager: QEMU is killed on
        exit. Raises LabVMError (with the console tail) when the guest does not come up.

        ``wait_ready=False`` returns at once: for a migration destination (``extra_args=
        ["-incoming", "defer"]`` + QMP ``migrate-incoming``), whose guest arrives with its shell
        already running, so ``run`` works once the migration is over."""
        vm = GuestVM(self, ram=ram, devices=devices, extra_args=extra_args, append=append)
        try:
            if wait_ready:
                vm._wait_ready(timeout)
            else:
                vm._qmp_connect()  # fails early (with QEMU's stderr) if QEMU did not start
        except BaseException:
            vm.close()
            raise
        return vm


def start_qemu(args: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
    """Start the lab's QEMU with any ``args`` (``QemuLab.popen``); ``LabMissing`` when the lab
    is not set up."""
    return QemuLab.find().popen(args, **popen_kwargs)


#: vhost-user: every ring gets this size from QEMU's generic front-end (``serve --vhost-user``
#: sizes its queues to match).
VHOST_USER_VQ_SIZE = 128


def device_args(spec: str, *, control: str | None = None, num_vqs: int | None = None,
                config_size: int | None = None) -> list[str]:
    """QEMU options that give a lab guest the balloon device served on ``spec``
    (``vfio-user:SOCK`` or ``vhost-user:SOCK``), to add to ``machine_args``: only the device
    (and its chardev), since the lab's machine already has shareable RAM (``id=mem``).

    QEMU's generic vhost-user front-end must be told the device's queue count and config size.
    They come from ``num_vqs`` / ``config_size`` if given, else from the offered features the
    device's control socket reports (``control``, default ``SOCK.ctl``, as ``balloon-hint serve``
    makes it). ``LabUsageError`` names what is missing."""
    kind, sep, path = spec.partition(":")
    if not sep or not path or kind not in ("vfio-user", "vhost-user"):
        raise LabUsageError(f"--device {spec!r}: expected vfio-user:SOCKET or vhost-user:SOCKET")
    if not Path(path).is_socket():
        raise LabUsageError(f"--device {spec!r}: {path} is not a socket (is the server "
                            "running?)")
    if kind == "vfio-user":
        return ["-device", json.dumps({"driver": "vfio-user-pci", "id": "vfu0",
                                       "socket": {"type": "unix", "path": path}})]
    if num_vqs is None or config_size is None:
        from protocol.balloon import config_size as config_bytes  # noqa: PLC0415
        from protocol.balloon import queue_layout  # noqa: PLC0415
        from vmsim.cmd_ctl import call  # noqa: PLC0415

        ctl = control or f"{path}.ctl"
        try:
            ans = call(ctl, "stats", None)
            features = int(ans["return"]["device_features"])
        except (OSError, RuntimeError, KeyError, TypeError, ValueError) as e:
            raise LabUsageError(f"--device {spec!r}: cannot read the offered features from the "
                                f"control socket {ctl} ({e}); give num_vqs and config_size "
                                "instead") from None
        num_vqs = len(queue_layout(features)) if num_vqs is None else num_vqs
        config_size = config_bytes(features) if config_size is None else config_size
    return ["-chardev", f"socket,id=vb,path={path}",
            "-device", f"vhost-user-test-device-pci,chardev=vb,virtio-id=5,num_vqs={num_vqs},"
            f"vq_size={VHOST_USER_VQ_SIZE},config_size={config_size}"]


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Stop a helper process (a device server next to the guest): SIGTERM so it can clean up,
    then SIGKILL if it is still there after ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class GuestVM:
    """One running guest. ``console_log`` holds everything it printed (``\\r`` removed)."""

    def __init__(self, lab: QemuLab, *, ram: str, devices: Sequence[str],
                 extra_args: Sequence[str], append: str) -> None:
        self.lab = lab
        self.tmpdir = tempfile.mkdtemp(prefix="bh-qemu-")
        self.qmp_path = os.path.join(self.tmpdir, "qmp.sock")
        args = lab.machine_args(ram=ram, devices=devices, extra_args=extra_args,
                                append=append, qmp_path=self.qmp_path)
        self.argv = lab.qemu_command(args)
        self._stderr_path = os.path.join(self.tmpdir, "qemu.stderr")
        self._stderr = open(self._stderr_path, "wb")
        log.info("starting %s", " ".join(self.argv))
        self.proc = lab.popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=self._stderr)
        self._finalizer = weakref.finalize(self, kill_and_remove, self.proc, self.tmpdir)
        self._chunks: list[str] = []
        self._len = 0
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read_console, daemon=True,
                                        name=f"qemu-console-{self.proc.pid}")
        self._reader.start()
        self._seq = 0
        self._qmp: QmpClient | None = None
        self.qmp_events: list[dict[str, Any]] = []
        self.last_status: int | None = None
        self.boot_seconds: float | None = None

    # -- console -------------------------------------------------------------------------------

    def _read_console(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._eof = True
                    self._cond.notify_all()
                    return
                text = data.decode("utf-8", errors="replace").replace("\r", "")
                self._chunks.append(text)
                self._len += len(text)
                self._cond.notify_all()

    @property
    def console_log(self) -> str:
        with self._cond:
            if len(self._chunks) > 1:
                self._chunks[:] = ["".join(self._chunks)]
            return self._chunks[0] if self._chunks else ""

    @property
    def qemu_stderr(self) -> str:
        try:
            return Path(self._stderr_path).read_text(errors="replace")
        except OSError:
            return ""

    def _tail(self, n: int = 3000) -> str:
        err = self.qemu_stderr.strip()
        return (f"--- console tail ---\n{self.console_log[-n:]}"
                + (f"\n--- qemu stderr ---\n{err[-n:]}" if err else ""))

    def wait_console(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        """Wait until ``pattern`` (a regex, MULTILINE) matches the console log from ``start``."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                text = "".join(self._chunks)
                self._chunks[:] = [text] if text else []
                m = rx.search(text, start)
                if m:
                    return m
                if self._eof:
                    raise LabVMError(f"QEMU exited (status {self.proc.poll()}) before "
                                     f"{pattern!r}\n{self._tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LabVMError(f"timed out after {timeout:.0f} s waiting for "
                                     f"{pattern!r}\n{self._tail()}")
                self._cond.wait(min(left, 1.0))

    def _wait_ready(self, timeout: float) -> None:
        t0 = time.monotonic()
        self.wait_console(rf"^{READY_MARKER}$", timeout)
        self.boot_seconds = time.monotonic() - t0
        failed = re.findall(r"^BH_INSMOD_FAILED (\S+)", self.console_log, re.M)
        if failed:
            raise LabVMError(f"guest could not load modules {failed}\n{self._tail()}")

    def _send(self, text: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(text.encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise LabVMError(f"QEMU's console is closed ({e})\n{self._tail()}") from e

    def run(self, cmd: str, timeout: float = 60, *, check: bool = True) -> str:
        """Run ``cmd`` with ``sh`` in the guest; returns its stdout+stderr. The exit status is
        kept in ``last_status``; with ``check`` a non-zero status raises GuestCommandError."""
        self._seq += 1
        n = self._seq
        start = self._len
        # The tty's canonical mode caps a line at 4095 bytes: send the script in short lines.
        b64 = base64.b64encode(cmd.encode()).decode()
        lines = [": >/tmp/.bh_cmd.b64"]
        lines += [f"echo {b64[i:i + 2000]} >>/tmp/.bh_cmd.b64" for i in range(0, len(b64), 2000)]
        lines.append(f"base64 -d </tmp/.bh_cmd.b64 >/tmp/.bh_cmd; printf '\\n%s\\n' BH_BEGIN_{n}; "
                     f"sh /tmp/.bh_cmd </dev/null 2>&1; printf '\\n%s %s\\n' BH_END_{n} $?")
        self._send("\n".join(lines) + "\n")
        m = self.wait_console(rf"\nBH_BEGIN_{n}\n([\s\S]*?)\nBH_END_{n} (\d+)$", timeout, start)
        out, status = m.group(1), int(m.group(2))
        self.last_status = status
        if check and status != 0:
            raise GuestCommandError(cmd, status, out)
        return out

    def dmesg(self) -> str:
        return self.run("dmesg")

    # -- QMP -----------------------------------------------------------------------------------

    def _qmp_connect(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.qmp_path)
                break
            except OSError as e:
                s.close()
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise LabVMError(f"cannot connect to QMP at {self.qmp_path}: {e}\n"
                                     f"{self._tail()}") from e
                time.sleep(0.1)
        try:
            self._qmp = QmpClient(s, 60, events=self.qmp_events)
        except QmpConnectionLost as e:
            s.close()
            raise LabVMError(f"{e}\n{self._tail()}") from e

    def qmp(self, command: str, **args: Any) -> Any:
        """Send a QMP command; returns its ``return`` value (a dict, or a list for some
        queries). Hyphenated argument names go in as ``**{"max-bandwidth": n}``."""
        if self._qmp is None:
            self._qmp_connect()
        assert self._qmp is not None
        try:
            return self._qmp.execute(command, args)
        except QmpConnectionLost as e:  # QEMU gone: its console says why
            raise LabVMError(f"{e}\n{self._tail()}") from e

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill QEMU and remove the temp folder (idempotent)."""
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        self._finalizer()
        self._reader.join(timeout=5)
        self._stderr.close()

    def __enter__(self) -> GuestVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
