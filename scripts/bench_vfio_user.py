#!/usr/bin/env python3
"""The balloon device over vfio-user: kick-to-interrupt latency, and hint rounds with a real guest.

1. **Round trip** (no QEMU): ``balloon-hint serve --vfio-user`` in a subprocess, a synchronous
   client
   (tests/balloon_dev/transport/vfio_user/client.py's register helpers, over a unix socket) in this
   one, with a memfd as guest RAM mapped by DMA_MAP and MSI-X eventfds from SET_IRQS. The client
   posts one inflate buffer, writes the notify register with a posted REGION_WRITE (as QEMU does for
   a guest's kick) and waits for the queue's MSI-X eventfd; median and p90 over ``--kicks``. Also
   the rate of synchronous REGION_READs (a guest's config reads).
2. **With QEMU** (``--qemu``): ``balloon-hint serve --vfio-user`` as a subprocess, the QEMU lab's
   1 GiB Linux guest with ``vfio-user-pci``; ``--rounds`` hint rounds started with
   ``balloon-hint ctl``'s ``hint-start``, each followed by ``hint-done`` and a wait for the guest
   to free its blocks. Per round: hints, hinted MiB and the time from the request to the guest's
   STOP (the control socket's round log).

Usage: ``scripts/bench_vfio_user.py [--kicks 2000] [--qemu] [--rounds 3] [--json]``
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from guestmem import GuestMemory  # noqa: E402
from protocol import vfio_user as vu  # noqa: E402
from protocol import virtio_pci as vp  # noqa: E402
from protocol.virtio import VIRTIO_F_RING_EVENT_IDX, feature_mask  # noqa: E402


def round_trip(kicks: int) -> dict[str, Any]:
    import array

    from tests.balloon_dev.transport.vfio_user.client import RAM_SIZE, Client
    from vmsim.conformance.rings import RawRing

    class SocketClient(Client):
        """The test client's register helpers, over a real socket instead of a session."""

        def __init__(self, sock: socket.socket) -> None:
            super().__init__()
            self.sock = sock

        def _recv(self, n: int) -> bytes:
            buf = b""
            while len(buf) < n:
                chunk = self.sock.recv(n - len(buf))
                if not chunk:
                    raise EOFError("server closed")
                buf += chunk
            return buf

        def raw(self, data: bytes, fds: list[int] | None = None) -> tuple[Any, bytes, list[Any]]:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            self.sock.sendmsg([data], anc)
            for fd in fds or []:
                os.close(fd)
            if vu.decode_header(data[:16]).no_reply:
                return None, b"", []
            h = vu.decode_header(self._recv(vu.HEADER_SIZE))
            return h, self._recv(h.payload_size), []

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "b.sock")
        # The server in its own process, as QEMU sees it (a thread would share our GIL).
        srv = subprocess.Popen([sys.executable, "-m", "vmsim", "serve", "--vfio-user", path],
                               stdout=subprocess.DEVNULL, cwd=REPO)
        deadline = time.monotonic() + 20
        # Both sockets: the server may bind the control socket before the device socket.
        while not (os.path.exists(path) and os.path.exists(path + ".ctl")):
            if time.monotonic() > deadline or srv.poll() is not None:
                raise SystemExit("bench: balloon-hint serve did not start")
            time.sleep(0.05)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        c = SocketClient(sock)
        c.version()
        ram_fd = c.map_ram()
        # The raw ring below does not maintain used_event, so run without EVENT_IDX.
        fds = c.driver_init(msix=True, features_mask=~feature_mask(VIRTIO_F_RING_EVENT_IDX))
        # Our own view of the memfd: the "guest" writes its rings and buffers there.
        mm = mmap.mmap(ram_fd, RAM_SIZE)
        guest = GuestMemory()
        guest.add_region(0, mm)
        size, desc, avail, used = c.queue_rings(0)
        ring = RawRing(guest, size, desc, avail, used)
        pfn_buf = 0x900000
        lat = []
        notify = vu.build_region_access(vp.NOTIFY_CFG_OFFSET, vp.MODERN_BAR, 2, b"\0\0")
        for i in range(kicks):
            guest.write(pfn_buf, struct.pack("<I", 0x1000 + i))  # each pfn once (DR-6)
            ring.publish(ring.chain([(pfn_buf, 4, 0)], start=i % size))
            t0 = time.perf_counter()
            c.raw(vu.encode_request(i & 0xFFFF, vu.Command.REGION_WRITE, notify,
                                    flags=vu.VFIO_USER_F_NO_REPLY))
            select.select([fds[1]], [], [], 5)
            os.read(fds[1], 8)
            lat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        reads = max(kicks, 1)
        for _ in range(reads):
            c.rd(vp.MODERN_BAR, vp.COMMON_NUMQ, 2)
        read_rate = reads / (time.perf_counter() - t0)
        sock.close()
        srv.terminate()
        srv.wait(10)
        del ring, guest
        lat.sort()
        return {"kicks": kicks, "kick_to_irq_median_us": round(statistics.median(lat) * 1e6, 1),
                "kick_to_irq_p90_us": round(lat[int(len(lat) * 0.9)] * 1e6, 1),
                "region_reads_per_s": round(read_rate)}


def with_qemu(rounds: int) -> dict[str, Any]:
    from tests.qemu.served import mem_free, run_round, start_served, wait_mem_free
    from vmsim.qemu_lab import QemuLab

    gen = start_served(QemuLab.find(), "vfio-user")
    s = next(gen)
    out = []
    try:
        for _ in range(rounds):
            free = mem_free(s)
            r = run_round(s)
            s.ctl_call("hint-done")
            wait_mem_free(s, free)
            out.append({"cmd_id": hex(r["cmd_id"]), "hints": r["hints"],
                        "hinted_mib": r["hinted_bytes"] >> 20,
                        "outside_ram": r["outside_ram"],
                        "request_to_stop_s": round(r["stopped_after_s"], 2)})
        st = s.stats()
    finally:
        gen.close()
    return {"rounds": out, "dr_violations": st["dr_violations"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kicks", type=int, default=2000)
    ap.add_argument("--qemu", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    res: dict[str, Any] = {"round_trip": round_trip(a.kicks)}
    if a.qemu:
        res["qemu"] = with_qemu(a.rounds)
    if a.json:
        print(json.dumps(res))
        return
    rt = res["round_trip"]
    print(f"kick -> MSI-X eventfd over vfio-user: median {rt['kick_to_irq_median_us']} us, "
          f"p90 {rt['kick_to_irq_p90_us']} us ({rt['kicks']} kicks); "
          f"{rt['region_reads_per_s']} REGION_READs/s")
    for r in res.get("qemu", {}).get("rounds", []):
        print(f"round {r['cmd_id']}: {r['hints']} hints, {r['hinted_mib']} MiB, "
              f"{r['outside_ram']} outside RAM, STOP after {r['request_to_stop_s']} s")
    if "qemu" in res:
        print(f"driver checker violations: {res['qemu']['dr_violations']}")


if __name__ == "__main__":
    main()
