"""``balloon-hint serve --vfio-user`` and ``balloon-hint ctl`` as a user runs them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest


@pytest.fixture
def serve():  # type: ignore[no-untyped-def]
    d = tempfile.mkdtemp(prefix="bh-cli-")
    sock = os.path.join(d, "b.sock")
    p = subprocess.Popen([sys.executable, "-m", "vmsim", "serve", "--vfio-user", sock,
                          "--features", "STATS_VQ,FREE_PAGE_HINT"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 30
        while not any("QEMU options" in ln for ln in lines):
            assert time.monotonic() < deadline and p.poll() is None, (lines, p.stderr)
            lines.append(p.stdout.readline())  # type: ignore[union-attr]
        yield sock, lines
    finally:
        p.terminate()
        p.wait(10)
        for f in os.listdir(d):
            os.unlink(os.path.join(d, f))
        os.rmdir(d)


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmsim", "ctl", *args], capture_output=True,
                          text=True, timeout=30)


def test_serve_prints_qemu_options_and_ctl_talks_to_it(serve) -> None:  # type: ignore
    sock, lines = serve
    opts = next(ln for ln in lines if "QEMU options" in ln)
    assert "memory-backend-memfd" in opts and "share=on" in opts
    dev = opts[opts.index("'{") + 1:opts.rindex("}'") + 1]
    assert json.loads(dev) == {"driver": "vfio-user-pci", "id": "vfu0",
                               "socket": {"type": "unix", "path": sock}}
    r = ctl(sock + ".ctl", "stats")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)["return"]
    assert int(st["device_features"], 16) == (1 << 32) | (1 << 1) | (1 << 3)  # shown in hex
    assert st["connections"] == 0
    r = ctl(sock + ".ctl", "set-target", "256")
    assert r.returncode == 0 and json.loads(r.stdout) == {"return": {}}
    assert json.loads(ctl(sock + ".ctl", "stats").stdout)["return"]["num_pages"] == 256
    # No driver yet: hint-start is an error answer (exit 1), not a crash.
    r = ctl(sock + ".ctl", "hint-start")
    assert r.returncode == 1 and "error" in json.loads(r.stdout)
    assert ctl(sock + ".ctl", "set-target").returncode == 2
    assert ctl(sock + ".ctl", "stats").returncode == 0  # the server is still up


def test_ctl_reports_a_missing_socket() -> None:
    r = ctl("/nonexistent/ctl.sock", "stats")
    assert r.returncode == 1 and "ctl:" in r.stderr
