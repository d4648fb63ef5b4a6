"""`scripts/qemu-lab shell --device KIND:SOCK`: a lab guest on our served device, as documented.

The shell runs as a user would start it (its console on stdin/stdout, here pipes); the test
waits for the guest's shell, asks the guest which virtio devices it has, and quits with
Ctrl-A X. The device must be a bound virtio balloon (device id 5), with no option clash."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vmsim.conformance.harness import start_server, stop_server
from vmsim.qemu_lab import READY_MARKER, QemuLab

pytestmark = pytest.mark.qemu

QEMU_LAB = Path(__file__).resolve().parents[2] / "scripts" / "qemu-lab"


def read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    got = b""
    deadline = time.monotonic() + timeout
    while marker not in got:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise AssertionError(f"no {marker!r} (exit {proc.poll()}):\n"
                                 f"{got.decode(errors='replace')[-3000:]}")
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.05)
            continue
        got += chunk
    return got


@pytest.mark.parametrize("kind", ["vfio-user", "vhost-user"])
def test_shell_boots_a_guest_on_the_served_device(lab: QemuLab, kind):
    with tempfile.TemporaryDirectory(prefix="bh-shell-") as d:
        sock, ctl = os.path.join(d, "b.sock"), os.path.join(d, "b.sock.ctl")
        srv = start_server([sys.executable, "-m", "vmsim", "serve", f"--{kind}", sock], sock,
                           ctl)
        shell = subprocess.Popen([sys.executable, str(QEMU_LAB), "shell", "--device",
                                  f"{kind}:{sock}"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            read_until(shell, READY_MARKER.encode(), 180)
            assert shell.stdin is not None
            # The end marker is printed in two pieces so that an echo of the command can never
            # pass for it; the serial console ends lines with \r\n.
            shell.stdin.write(b"for d in /sys/bus/virtio/devices/*; do echo DEV $(cat $d/device)"
                              b" $(basename $(readlink $d/driver)); done; printf 'BH_%s\\n' DONE\n")
            shell.stdin.flush()
            out = read_until(shell, b"BH_DONE\r\n", 60).decode(errors="replace")
            assert "DEV 0x0005 virtio_balloon" in out, out[-2000:]
            assert "Duplicate ID" not in out
            shell.stdin.write(b"\x01x")  # Ctrl-A X: QEMU's mux console quits
            shell.stdin.flush()
            assert shell.wait(timeout=30) == 0
        finally:
            if shell.poll() is None:
                shell.kill()
                shell.wait()
            stop_server(srv)


def test_shell_refuses_a_bad_device_in_one_line(lab: QemuLab, tmp_path):
    r = subprocess.run([sys.executable, str(QEMU_LAB), "shell", "--device",
                        f"vfio-user:{tmp_path}/none"], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "is not a socket" in r.stderr
