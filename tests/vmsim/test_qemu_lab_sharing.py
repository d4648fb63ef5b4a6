"""The QEMU lab's launcher wrapper, its locks and `--device` options, without booting a guest.

Every cache here is a temporary folder (``BALLOON_HINT_CACHE``), never the shared lab."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from protocol.errors import UsageError
from vmsim import qemu_lab
from vmsim.conformance.harness import start_server, stop_server

REPO_ROOT = Path(__file__).resolve().parents[2]
QEMU_LAB = REPO_ROOT / "scripts" / "qemu-lab"


def lab_script(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BALLOON_HINT_CACHE": str(cache)}
    return subprocess.run([sys.executable, str(QEMU_LAB), *args], env=env, capture_output=True,
                          text=True, timeout=120)


@contextmanager
def lab_user(cache: Path) -> Iterator[subprocess.Popen[str]]:
    """A process holding the cache's in-use lock, as a running lab QEMU does."""
    code = ("import sys, time; from pathlib import Path; from vmsim import qemu_lab; "
            "qemu_lab.in_use_fd(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(cache)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


needs_root_mount = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="the private module folder needs root and unshare(1)")


@needs_root_mount
def test_private_moddir_runs_the_whole_argv(tmp_path):
    """the wrapper execs argv unchanged (the old one shifted the loader away) with src mounted
    over dst in its own namespace only"""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "module.so").write_text("ours")
    argv = [sys.executable, "-c", "import sys, os; print(sys.argv[1:], os.listdir(sys.argv[2]))",
            "--library-path", str(dst)]
    out = subprocess.run(qemu_lab.private_moddir(src, dst, argv), capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"['--library-path', '{dst}'] ['module.so']"
    assert os.listdir(dst) == []  # the host's view never changed


def test_bundle_links_point_into_the_tree(tmp_path):
    """qemu-bundle next to the (real) loader links usr, etc, var back into the tree"""
    root = tmp_path / "trixie"
    (root / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (root / "lib64").mkdir()
    (root / "etc").mkdir()
    (root / "var").mkdir()
    real = root / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    real.write_text("")
    (root / "lib64/ld-linux-x86-64.so.2").symlink_to("../usr/lib/x86_64-linux-gnu/"
                                                      "ld-linux-x86-64.so.2")
    assert not qemu_lab.bundle_ok(root)
    assert qemu_lab.ensure_bundle(root) is True
    b = root / "usr/lib/x86_64-linux-gnu/qemu-bundle"
    assert qemu_lab.bundle_dir(root) == b
    assert (b / "usr/lib/x86_64-linux-gnu/qemu").resolve() == \
        (root / "usr/lib/x86_64-linux-gnu/qemu").resolve()
    assert (b / "etc").resolve() == (root / "etc").resolve()
    assert qemu_lab.bundle_ok(root) and qemu_lab.ensure_bundle(root) is False
    # relative links: the cache can move
    moved = tmp_path / "elsewhere"
    root.rename(moved)
    assert qemu_lab.bundle_ok(moved)


def test_qemu_argv_needs_no_namespace_with_the_bundle(tmp_path, monkeypatch):
    root = tmp_path / "trixie"
    (root / "lib64").mkdir(parents=True)
    (root / "lib64/ld-linux-x86-64.so.2").write_text("")
    host = tmp_path / "host-qemu-modules"
    host.mkdir()
    monkeypatch.setattr(qemu_lab, "HOST_QEMU_MODDIR", host)
    assert qemu_lab.qemu_argv(root)[0] == "unshare"  # a host QEMU and no bundle yet
    (root / "etc").mkdir()
    (root / "var").mkdir()
    (root / "usr").mkdir()
    qemu_lab.ensure_bundle(root)
    argv = qemu_lab.qemu_argv(root)
    assert argv[0] == str(root / "lib64/ld-linux-x86-64.so.2")


def test_setup_lock_lets_one_setup_in(tmp_path):
    code = ("import sys, time; from pathlib import Path; from vmsim import qemu_lab\n"
            "with qemu_lab.setup_lock(Path(sys.argv[1])):\n"
            "    print('in', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "in"
        with pytest.raises(BlockingIOError), qemu_lab.setup_lock(tmp_path, wait=False):
            pass
    finally:
        proc.kill()
        proc.wait()
    with qemu_lab.setup_lock(tmp_path, wait=False):
        pass


def test_exclusive_use_only_when_no_lab_qemu_runs(tmp_path):
    with lab_user(tmp_path), qemu_lab.exclusive_use(tmp_path) as free:
        assert free is False
    with qemu_lab.exclusive_use(tmp_path) as free:
        assert free is True


def test_clean_refuses_while_a_lab_qemu_runs(tmp_path):
    cache = tmp_path / "cache"
    (cache / "trixie").mkdir(parents=True)
    (cache / "lab.json").write_text("{}")
    with lab_user(cache):
        r = lab_script(cache, "clean")
        assert r.returncode == 1 and "is running; not removing it" in r.stderr
        assert (cache / "trixie").is_dir() and (cache / "lab.json").exists()
    r = lab_script(cache, "clean")
    assert r.returncode == 0, r.stderr
    assert not (cache / "trixie").exists() and not (cache / "lab.json").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="qemu-lab setup needs root")
def test_setup_never_deletes_a_tree_in_use(tmp_path):
    """a stamped tree whose QEMU does not verify is rebuilt only when no lab QEMU runs; while
    one does, setup stops and deletes nothing"""
    cache = tmp_path / "cache"
    tree = cache / "trixie"
    tree.mkdir(parents=True)
    (tree / ".balloon-hint-ok").write_text("11.1.3\n")
    (tree / "precious").write_text("a running QEMU's files")
    with lab_user(cache):
        t0 = time.monotonic()
        r = lab_script(cache, "setup")
    assert r.returncode != 0
    assert "nothing was deleted" in r.stderr, r.stdout + r.stderr
    assert (tree / "precious").read_text() == "a running QEMU's files"
    assert time.monotonic() - t0 < 60


def test_device_args_vfio_user(tmp_path):
    with pytest.raises(UsageError, match="expected vfio-user:SOCKET or vhost-user:SOCKET"):
        qemu_lab.device_args("vhost-net:/x")
    with pytest.raises(ValueError, match="is not a socket"):
        qemu_lab.device_args(f"vfio-user:{tmp_path}/none")
    with tempfile.TemporaryDirectory(prefix="bh-lab-dev-") as d:
        sock, ctl = os.path.join(d, "s"), os.path.join(d, "s.ctl")
        proc = start_server([sys.executable, "-m", "vmsim", "serve", "--vfio-user", sock], sock,
                            ctl)
        try:
            args = qemu_lab.device_args(f"vfio-user:{sock}")
        finally:
            stop_server(proc)
    assert args[0] == "-device"
    assert json.loads(args[1]) == {"driver": "vfio-user-pci", "id": "vfu0",
                                   "socket": {"type": "unix", "path": sock}}
    assert "memory-backend" not in " ".join(args)  # the lab's machine already has id=mem


@pytest.mark.parametrize("features,num_vqs,config_size", [
    (None, 4, 16),  # the default offer: STATS_VQ, FREE_PAGE_HINT, PAGE_POISON
    ("MUST_TELL_HOST", 2, 8),
    ("STATS_VQ,FREE_PAGE_HINT,PAGE_POISON,REPORTING", 5, 16),
])
def test_device_args_vhost_user_asks_the_control_socket(features, num_vqs, config_size):
    """num_vqs and config_size follow what the served device offers (read from SOCK.ctl), as
    QEMU's generic front-end needs them"""
    with tempfile.TemporaryDirectory(prefix="bh-lab-dev-") as d:
        sock, ctl = os.path.join(d, "s"), os.path.join(d, "s.ctl")
        argv = [sys.executable, "-m", "vmsim", "serve", "--vhost-user", sock]
        if features:
            argv += ["--features", features]
        proc = start_server(argv, sock, ctl)
        try:
            args = qemu_lab.device_args(f"vhost-user:{sock}")
        finally:
            stop_server(proc)
    assert args[:2] == ["-chardev", f"socket,id=vb,path={sock}"]
    assert args[2] == "-device"
    assert args[3] == (f"vhost-user-test-device-pci,chardev=vb,virtio-id=5,num_vqs={num_vqs},"
                       f"vq_size=128,config_size={config_size}")


def test_device_args_vhost_user_without_control_names_the_way_out(tmp_path):
    import socket

    path = str(tmp_path / "foreign.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
        with pytest.raises(ValueError, match="give num_vqs and config_size"):
            qemu_lab.device_args(f"vhost-user:{path}")
        assert qemu_lab.device_args(f"vhost-user:{path}", num_vqs=3, config_size=8)[3].endswith(
            "num_vqs=3,vq_size=128,config_size=8")


@pytest.mark.parametrize("kind", ["vfio-user", "vhost-user"])
def test_serve_names_the_lab_command(kind):
    """serve's own options define the memory backend (for a plain QEMU); for the lab it names
    `scripts/qemu-lab shell --device`, whose options do not clash"""
    with tempfile.TemporaryDirectory(prefix="bh-serve-lab-") as d:
        sock = os.path.join(d, "s")
        proc = subprocess.Popen([sys.executable, "-m", "vmsim", "serve", f"--{kind}", sock],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert proc.stdout is not None
            lines = [proc.stdout.readline() for _ in range(5)]
        finally:
            stop_server(proc)  # type: ignore[arg-type]
    assert f"  in the QEMU lab:  scripts/qemu-lab shell --device {kind}:{sock}\n" in lines


def test_parse_ram():
    assert qemu_lab.parse_ram("512M") == 512 << 20 and qemu_lab.parse_ram(" 1g ") == 1 << 30
    for bad in ("12X", "", "1.5G", "-1G"):
        with pytest.raises(UsageError, match="expected a size like 512M or 1G"):
            qemu_lab.parse_ram(bad)
    assert issubclass(qemu_lab.LabUsageError, ValueError)  # callers that catch ValueError


@pytest.mark.parametrize("args, rc, msg", [
    (["shell", "--ram", "12X"], 2, "qemu-lab shell: ram='12X': expected a size like 512M or 1G"),
    (["shell"], 1, "qemu-lab shell: no QEMU lab in "),
])
def test_shell_reports_a_bad_argument_or_a_missing_lab_on_one_line(tmp_path, args, rc, msg):
    r = lab_script(tmp_path / "no-lab", *args)
    assert r.returncode == rc, r.stderr
    assert r.stderr.startswith(msg) and r.stderr.count("\n") == 1, r.stderr
