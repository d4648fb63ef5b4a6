"""Our device served to a real QEMU guest: helpers shared by the vfio-user and vhost-user tests.

``start_served(lab, transport)`` runs ``balloon-hint serve --vfio-user|--vhost-user`` in a
subprocess on a socket in a temp folder, boots a 1 GiB guest whose QEMU connects to it, and yields
a ``Served``: the booted VM plus the server's control socket (``balloon-hint ctl``'s ``call``)
and log. It is a generator so module-scoped fixtures can ``yield from`` it; closing it shuts
QEMU, then the server, down and removes the temp folder.

The guest-side helpers read the guest through its shell (``vm.run``): the balloon's sysfs
directory, MemFree, and the kernel log's virtio complaints. ``run_round`` starts a host-driven
hint round and waits for the guest's STOP.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Generator
from typing import Any, Literal

import pytest

from protocol.balloon import HINT_BLOCK_BYTES
from vmsim.cmd_ctl import call
from vmsim.qemu_lab import QemuLab, stop_process

RAM_BYTES = 1 << 30
HINT_BLOCK = HINT_BLOCK_BYTES

Transport = Literal["vfio-user", "vhost-user"]

#: QEMU has no vhost-user balloon; its generic front-end with virtio-id=5 exposes what the
#: back-end offers (protocol.md 8.5). num_vqs=4: the default offer (STATS_VQ, FREE_PAGE_HINT)
#: gives four compacted queues (protocol.md 3.3; Linux fails probe with fewer); vq_size=128 is
#: the one size the front-end gives every queue (Linux needs >= 2 on the free page queue);
#: config_size=16 because PAGE_POISON is offered (protocol.md 3.2).
VHOST_USER_DEVICE = ("vhost-user-test-device-pci,chardev=vb,virtio-id=5,num_vqs=4,vq_size=128,"
                     "config_size=16")


class Served:
    """A booted guest on our served device, and the server's control socket and log."""

    def __init__(self, vm: Any, ctl: str, log_path: str) -> None:
        self.vm = vm
        self.ctl = ctl
        self.log_path = log_path

    def ctl_call(self, command: str, **arguments: Any) -> Any:
        ans = call(self.ctl, command, arguments or None, timeout=30)
        assert "error" not in ans, ans
        return ans["return"]

    def stats(self) -> dict[str, Any]:
        return dict(self.ctl_call("stats"))

    def wait_stats(self, pred: Callable[[dict[str, Any]], Any], what: str,
                   timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if pred(st):
                return st
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; last stats: {json.dumps(st)[:3000]}"
                            f"\nserver log tail:\n{self.server_log()[-3000:]}")
            time.sleep(0.5)

    def server_log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def vfio_user_device(sock: str) -> str:
    """The ``-device`` JSON for QEMU's vfio-user client on ``sock``."""
    return json.dumps({"driver": "vfio-user-pci", "id": "vfu0",
                       "socket": {"type": "unix", "path": sock}})


def start_served(lab: QemuLab, transport: Transport = "vfio-user", *, append: str = "",
                 features: str | None = None) -> Generator[Served, None, None]:
    """Serve the device from a ``balloon-hint serve`` subprocess and boot a 1 GiB guest on it."""
    tmp = tempfile.mkdtemp(prefix=f"bh-{transport}-")
    sock = os.path.join(tmp, "balloon.sock")
    ctl = sock + ".ctl"
    log_path = os.path.join(tmp, "serve.log")
    with open(log_path, "w") as log:
        argv = [sys.executable, "-m", "vmsim", "-v", "serve", f"--{transport}", sock,
                "--control", ctl]
        if features is not None:
            argv += ["--features", features]
        srv = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (os.path.exists(sock) and os.path.exists(ctl)):
            assert srv.poll() is None, open(log_path).read()
            assert time.monotonic() < deadline, "server socket did not appear"
            time.sleep(0.05)
        assert os.stat(sock).st_mode & 0o777 == 0o600
        if transport == "vfio-user":
            devices, extra = [vfio_user_device(sock)], []
        else:
            devices, extra = [VHOST_USER_DEVICE], ["-chardev", f"socket,id=vb,path={sock}"]
        with lab.boot(ram="1G", devices=devices, extra_args=extra, append=append,
                      timeout=180) as vm:
            yield Served(vm, ctl, log_path)
    finally:
        stop_process(srv)
        shutil.rmtree(tmp, ignore_errors=True)


def balloon_dev_dir(vm: Any) -> str:
    """The guest's sysfs directory of the virtio balloon (device id 5)."""
    out = vm.run("for d in /sys/bus/virtio/devices/*; do echo $d $(cat $d/device); done")
    for line in out.splitlines():
        path, _, devid = line.strip().partition(" ")
        if devid.strip() in ("0x0005", "5"):
            return path
    pytest.fail(f"no virtio balloon device in the guest: {out!r}")


def bound_balloon_features(vm: Any) -> str:
    """Check the guest's virtio_balloon driver is bound to the balloon; return the negotiated
    feature bits as sysfs shows them (character i is bit i)."""
    d = balloon_dev_dir(vm)
    driver = vm.run(f"basename $(readlink {d}/driver)").strip()
    assert driver == "virtio_balloon", driver
    return str(vm.run(f"cat {d}/features").strip())


def mem_free(served: Served) -> int:
    """The guest's MemFree in bytes."""
    out = served.vm.run("grep MemFree /proc/meminfo")
    return int(out.split()[1]) * 1024


def wait_mem_free(served: Served, at_least: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (free := mem_free(served)) < at_least:
        assert time.monotonic() < deadline, f"MemFree {free} never reached {at_least}"
        time.sleep(0.5)


def run_round(served: Served) -> dict[str, Any]:
    """Start a hint round and wait for the guest's STOP; returns the round's stats entry."""
    cmd_id = served.ctl_call("hint-start")["cmd-id"]
    assert cmd_id >= 0x80000001

    def stopped(st: dict[str, Any]) -> bool:
        return any(r["cmd_id"] == cmd_id and r["stopped_after_s"] is not None
                   for r in st["rounds"])

    st = served.wait_stats(stopped, f"hint round {cmd_id:#x} to stop")
    return next(r for r in st["rounds"] if r["cmd_id"] == cmd_id)


def virtio_errors(kernel_log: str) -> list[str]:
    """Kernel-log lines about virtio or the balloon that sound like a failure."""
    return [line for line in kernel_log.splitlines()
            if re.search(r"virtio|balloon", line, re.I)
            and re.search(r"error|fail|bug|warn|invalid|broken|call trace", line, re.I)]
