"""A peer that truncates guest RAM after handing it over must not kill the device server.

The attack: a vfio-user client (DMA_MAP) or vhost-user front-end (SET_MEM_TABLE) passes a memfd
created with MFD_ALLOW_SEALING but not sealed, gets the device running on rings inside it, then
``ftruncate``s the memfd to 0 and kicks. Without protection the server's next access to the
rings is a SIGBUS that kills the whole process. With ``balloon_dev.transport.guest_ram`` the
server sealed the fd against shrinking before mapping it, so the truncate fails with EPERM.

Both ends run in child processes, so a crash (of the server, or of the vhost-user attacker,
which maps the same RAM) cannot take pytest down: the server is ``balloon-hint serve`` as a user
starts it, the attacker is a function of this module run with ``python -c``. It prints one JSON
line with what it saw, then waits for a line on stdin before closing its connection, so the test
can read the server's ``stats`` (control socket) while the mapping is still in place. The test
asserts the truncate was refused, the server process is alive, still answers on both sockets,
and its stats count no unsealed mapping. A second case maps a memfd that cannot be sealed and
checks the mapping is accepted and counted (``dma_map_unsealed``) in those stats.
"""
from __future__ import annotations

import json
import mmap
import os
import select
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from guest_model.vring import DriverArea
from guestmem import GuestMemory
from protocol import vfio_user as vu
from protocol import vhost_user as vhu
from protocol import virtio_pci as vp
from vmsim.cmd_ctl import call as ctl_call
from vmsim.conformance.harness import start_server, stop_server

#: The checkout: the attacker child imports this module from it.
REPO_ROOT = Path(__file__).resolve().parents[2]
RW = vu.VFIO_DMA_MAP_FLAG_READ | vu.VFIO_DMA_MAP_FLAG_WRITE


def _ram_memfd(size: int, sealable: bool) -> int:
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0)
    fd = os.memfd_create("attacker-ram", flags)
    os.ftruncate(fd, size)
    return fd


def _shrink(fd: int) -> bool:
    """The attack itself. True if the file really shrank (the server is then at risk)."""
    try:
        os.ftruncate(fd, 0)
    except PermissionError:
        return False
    return True


def _report_and_wait(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)
    sys.stdin.readline()  # the parent has read the server's stats; now leave


# -- the attackers (run in a child process) -----------------------------------------------------
def attack_vfio_user(path: str, sealable: bool, shrink: bool) -> None:
    from tests.balloon_dev.transport.vfio_user.client import BAR4, RAM_SIZE
    from tests.fuzz.test_vfio_user_adversarial import FramingLost, SocketClient

    c = SocketClient(path)
    c.version()
    fd = _ram_memfd(RAM_SIZE, sealable)
    mine = os.dup(fd)
    c.ok(vu.Command.DMA_MAP, vu.build_dma_map(RW, 0, 0, RAM_SIZE), [fd])  # sends and closes fd
    c.driver_init(msix=True)
    nq = c.rd(BAR4, vp.COMMON_NUMQ, 2)
    shrunk = _shrink(mine) if shrink else False
    answered = True
    try:
        for q in range(nq):
            # A notify makes the device read the ring in RAM (rings start at 1 MiB).
            c.wr(BAR4, 0x3000 + 4 * q, q, 2)
        status = c.rd(BAR4, vp.COMMON_STATUS, 1)
    except (FramingLost, OSError):
        answered, status = False, -1
    _report_and_wait({"shrunk": shrunk, "answered": answered, "status": status})


def attack_vhost_user(path: str, sealable: bool, shrink: bool) -> None:
    from tests.balloon_dev.transport.vhost_user.frontend import (
        AREA_GPA,
        AREA_SIZE,
        RAM_GPA,
        RAM_SIZE,
        Frontend,
    )

    fe = Frontend(connect=path)
    # Guest RAM in a memfd of the attacker's choosing (Frontend makes an unsealable one).
    os.close(fe.memfd)
    fe.memfd = _ram_memfd(RAM_SIZE, sealable)
    fe.mm = mmap.mmap(fe.memfd, RAM_SIZE)
    fe.mem = GuestMemory()
    fe.mem.add_region(RAM_GPA, fe.mm, name="ram")
    fe.area = DriverArea(fe.mem, AREA_GPA, AREA_SIZE)
    fe.init()
    fe.start()
    fe.add_u32(fe.vrings[0], 0x800)  # an inflate buffer, published before the attack
    shrunk = _shrink(fe.memfd) if shrink else False
    fe.kick_ring(0)  # the device reads the ring (and the buffer) in RAM
    called = bool(select.select([fe.call[0]], [], [], 10)[0])
    answered = True
    try:
        r = fe.request(vhu.VhostUserRequest.GET_FEATURES)
        answered = r is not None and len(r.payload) == 8
    except (AssertionError, OSError):
        answered = False
    _report_and_wait({"shrunk": shrunk, "answered": answered, "called": called})


# -- the test side ------------------------------------------------------------------------------
@contextmanager
def server(transport: str) -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:
    with tempfile.TemporaryDirectory(prefix="bh-shrink-") as d:
        sock, ctl = os.path.join(d, "dev.sock"), os.path.join(d, "dev.ctl")
        argv = [sys.executable, "-m", "vmsim", "serve", f"--{transport}", sock, "--control", ctl]
        proc = start_server(argv, sock, ctl)
        try:
            yield proc, sock, ctl
        finally:
            stop_server(proc)


@contextmanager
def attacker(fn: str, sock: str, sealable: bool,
             shrink: bool) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    code = f"from tests.fuzz.test_shrink_attack import {fn}; {fn}({sock!r}, {sealable}, {shrink})"
    child = subprocess.Popen([sys.executable, "-c", code], cwd=str(REPO_ROOT), env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()  # type: ignore[union-attr]
        if not line:
            child.wait(10)
            raise AssertionError(f"attacker died ({child.returncode}): "
                                 f"{child.stderr.read()[-3000:]}")  # type: ignore[union-attr]
        yield child, json.loads(line)
    finally:
        try:
            child.communicate("\n", timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def session_counters(ctl: str) -> dict[str, int]:
    ans = ctl_call(ctl, "stats")
    assert "return" in ans, ans
    return dict(ans["return"]["session_counters"])


def assert_server_alive(proc: subprocess.Popen[bytes], transport: str, sock: str,
                        ctl: str) -> None:
    assert proc.poll() is None, f"the server died: exit status {proc.returncode}"
    assert "return" in ctl_call(ctl, "stats")
    # And the device socket takes the next client.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock)
        if transport == "vfio-user":
            caps = {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20}
            s.sendall(vu.encode_request(1, vu.Command.VERSION, vu.build_version(0, 0, caps)))
            h = vu.decode_header(s.recv(vu.HEADER_SIZE, socket.MSG_WAITALL))
            assert h.is_reply and not h.flags & vu.VFIO_USER_F_ERROR
        else:
            s.sendall(vhu.build_request(vhu.VhostUserRequest.GET_FEATURES, b""))
            vh = vhu.parse_header(s.recv(vhu.HEADER_SIZE, socket.MSG_WAITALL))
            assert vh.request == vhu.VhostUserRequest.GET_FEATURES and vh.size == 8
    assert proc.poll() is None


ATTACKERS = {"vfio-user": "attack_vfio_user", "vhost-user": "attack_vhost_user"}


@pytest.mark.parametrize("transport", sorted(ATTACKERS))
def test_truncating_sealable_guest_ram_cannot_crash_the_server(transport: str) -> None:
    with server(transport) as (proc, sock, ctl):
        with attacker(ATTACKERS[transport], sock, sealable=True, shrink=True) as (_c, seen):
            try:
                proc.wait(0.5)  # a SIGBUS'd server would be gone by now
            except subprocess.TimeoutExpired:
                pass
            assert proc.poll() is None, f"the server died ({proc.returncode}); attacker: {seen}"
            # The server sealed the memfd before mapping it: the truncate was refused.
            assert seen["shrunk"] is False, seen
            assert seen["answered"], seen
            if transport == "vfio-user":
                assert seen["status"] == 1 | 2 | 4 | 8, seen  # DRIVER_OK, no NEEDS_RESET
            else:
                assert seen["called"], seen  # the inflate buffer was used
            assert proc.poll() is None
            counters = session_counters(ctl)
            assert counters.get("dma_map_unsealed", 0) == 0, counters
        assert_server_alive(proc, transport, sock, ctl)


@pytest.mark.parametrize("transport", sorted(ATTACKERS))
def test_unsealable_guest_ram_is_served_and_counted(transport: str) -> None:
    # No attack: a memfd without MFD_ALLOW_SEALING is a legitimate (if unprotected) guest RAM.
    with server(transport) as (proc, sock, ctl):
        with attacker(ATTACKERS[transport], sock, sealable=False, shrink=False) as (_c, seen):
            assert seen["answered"] and not seen["shrunk"], seen
            counters = session_counters(ctl)
            assert counters.get("dma_map_unsealed", 0) == 1, counters
        assert_server_alive(proc, transport, sock, ctl)
