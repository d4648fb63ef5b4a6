#!/usr/bin/env python3
"""The balloon device over vhost-user: kick-to-interrupt latency, and hint rounds with a real guest.

1. **Round trip** (no QEMU): the trio server (``VhostUserServer``) in one thread, a synchronous
   stand-in front-end (tests/balloon_dev/transport/vhost_user/frontend.py) in another, over a unix
   socket with a memfd as guest RAM. The front-end posts one inflate buffer, writes the kick eventfd
   and waits for the call eventfd; the time from kick to interrupt is what a guest would see (median
   and p90 over ``--kicks`` round trips).
2. **With QEMU** (``--qemu``): ``balloon-hint serve --vhost-user`` as a subprocess, the QEMU lab's
   1 GiB Linux guest with ``vhost-user-test-device-pci`` (virtio-id 5, 4 queues of 128; started
   by tests/qemu/served.py, as the QEMU tests do);
   ``--rounds`` hint rounds started with ``balloon-hint ctl``'s ``hint-start``, each followed by
   ``hint-done`` and a wait for the guest to free its blocks. Per round: hints, hinted MiB and the
   time from the request to the guest's STOP (the control socket's round log).

Usage: ``scripts/bench_vhost_user.py [--kicks 2000] [--qemu] [--rounds 3] [--json]``
"""
from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import trio  # noqa: E402

from balloon_dev.device import BalloonDevice  # noqa: E402
from balloon_dev.transport.vhost_user_server import VhostUserServer  # noqa: E402
from guestmem import GuestMemory  # noqa: E402


def round_trip(kicks: int) -> dict[str, Any]:
    from tests.balloon_dev.transport.vhost_user.frontend import Frontend

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "b.sock"
        mem = GuestMemory()
        server = VhostUserServer(BalloonDevice(mem), mem, path)
        ready = threading.Event()
        token_box: list[Any] = []
        done = threading.Event()

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.run)
                token_box.append(trio.lowlevel.current_trio_token())
                ready.set()
                await trio.to_thread.run_sync(done.wait)
                nursery.cancel_scope.cancel()

        t = threading.Thread(target=trio.run, args=(main,))
        t.start()
        ready.wait()
        fe = Frontend(connect=str(path))
        try:
            fe.init()
            fe.start()
            while not trio.from_thread.run_sync(lambda: server.session.live,
                                                trio_token=token_box[0]):
                time.sleep(0.01)
            vr = fe.vrings[0]
            buf = fe.area.alloc(4)
            lat = []
            for i in range(kicks):
                fe.mem.write_u32(buf, 0x1000 + i % 0x1000)
                vr.add_buf(out=[(buf, 4)])
                t0 = time.perf_counter()
                os.write(fe.kick[0], struct.pack("=Q", 1))
                if not select.select([fe.call[0]], [], [], 5)[0]:
                    raise SystemExit("no interrupt within 5 s")
                lat.append(time.perf_counter() - t0)
                os.read(fe.call[0], 8)
                vr.get_bufs()
                # The deflate path would give the pfn back; here we only care about latency.
        finally:
            fe.close()
            done.set()
            t.join()
    lat_us = sorted(x * 1e6 for x in lat)
    return {"kicks": kicks, "median_us": round(statistics.median(lat_us), 1),
            "p90_us": round(lat_us[int(0.9 * len(lat_us))], 1)}


def with_qemu(rounds: int) -> dict[str, Any]:
    from tests.qemu.served import mem_free, run_round, start_served, wait_mem_free
    from vmsim.qemu_lab import QemuLab

    t0 = time.monotonic()
    gen = start_served(QemuLab.find(), "vhost-user", append="init_on_alloc=0")
    s = next(gen)
    out: dict[str, Any] = {"rounds": []}
    try:
        s.wait_stats(lambda st: st["live"], "the back-end to go live", timeout=60)
        out["start_to_live_s"] = round(time.monotonic() - t0, 2)
        for _ in range(rounds):
            free = mem_free(s)
            r = run_round(s)
            s.ctl_call("hint-done")
            # Wait until the guest gave its blocks back, so the next round can hint again.
            wait_mem_free(s, free - (64 << 20))
            out["rounds"].append({"hints": r["hints"],
                                  "hinted_mib": r["hinted_bytes"] >> 20,
                                  "stop_after_s": round(r["stopped_after_s"], 3),
                                  "outside_ram": r["outside_ram"]})
        st = s.stats()
        out["peer_errors"] = st["session_counters"].get("peer_errors", 0)
        out["kicks"] = st["server_counters"].get("kicks", 0)
        out["calls"] = st["server_counters"].get("calls", 0)
    finally:
        gen.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kicks", type=int, default=2000)
    ap.add_argument("--qemu", action="store_true", help="also run hint rounds with a real guest")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res: dict[str, Any] = {"round_trip": round_trip(args.kicks)}
    if args.qemu:
        res["qemu"] = with_qemu(args.rounds)
    if args.json:
        print(json.dumps(res))
        return
    rt = res["round_trip"]
    print(f"kick -> call eventfd over the trio server: median {rt['median_us']} us, "
          f"p90 {rt['p90_us']} us ({rt['kicks']} inflate buffers)")
    if "qemu" in res:
        q = res["qemu"]
        print(f"QEMU 11.1 + Linux guest (1 GiB): start to live {q['start_to_live_s']} s, "
              f"kicks {q['kicks']}, calls {q['calls']}, peer errors {q['peer_errors']}")
        for i, r in enumerate(q["rounds"], 1):
            print(f"  round {i}: {r['hints']} hints, {r['hinted_mib']} MiB, STOP after "
                  f"{r['stop_after_s']} s, outside RAM {r['outside_ram']}")


if __name__ == "__main__":
    main()
