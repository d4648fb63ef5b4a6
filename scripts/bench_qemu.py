#!/usr/bin/env python3
"""Side by side: QEMU's own virtio-balloon free page hinting vs our device over vfio-user.

The same idle Linux guest (the QEMU lab's, default 1 GiB, ``init_on_alloc=0``) is booted once per
measurement, one guest at a time:

1. **QEMU, free-page-hint=on**: ``virtio-balloon-pci,free-page-hint=on,iothread=io0``. QEMU starts
   a hint round only when it migrates, so the guest is migrated to ``exec:cat > /dev/null``.
2. **QEMU, free-page-hint=off** (baseline; ``--no-baseline`` skips it): the same migration.
   QEMU 11.1 has no trace event for free page hints (``-trace help`` lists only
   ``virtio_balloon_{bad_addr,handle_output,get_config,set_config,to_target}``), so QEMU's hinted
   bytes are taken from the migration statistics: pages QEMU scanned (``ram.normal +
   ram.duplicate``) without hints minus with hints = pages the hints let it skip.
3. **Ours**: ``balloon-hint serve --vfio-user SOCK --control CTL`` as a subprocess, the guest gets
   ``vfio-user-pci``; ``balloon-hint ctl CTL hint-start`` starts a round, the device's ``stats``
   give hints, hinted bytes and the time from the request to the guest's STOP; ``hint-done``
   gives the pages back.

In every guest a sampler (shell builtins, ~10 ms) logs ``/proc/uptime`` and MemFree: the guest
holds hinted pages until DONE, so MemFree falls by the hinted amount. From it, for both devices:
guest-view hinted bytes (MemFree before - lowest), the latency from the request to the first
drop, and the round's duration (first drop to within one 4 MiB block of the lowest value).
The sampler's resolution (10-20 ms) is coarser than a round of an idle 1 GiB guest, so the
round is also timed inside the guest with ftrace: function_graph (depth 1) on the driver's
``report_free_page_func``, the work item that takes every free 4 MiB block, queues it and ends
with STOP; its first call's duration is the round as the guest runs it.

Usage: ``scripts/bench_qemu.py [--ram 1G] [--no-baseline] [--skip-ours] [--skip-qemu] [--json]``
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vmsim.cmd_ctl import call  # noqa: E402
from vmsim.qemu_lab import GuestVM, LabMissing, QemuLab, stop_process  # noqa: E402

PAGE = 4096
BLOCK = 4 << 20  # Linux hints MAX_ORDER-1 blocks: 4 MiB on x86-64
VIRTIO_ID_BALLOON = 5
FREE_PAGE_HINT_BIT = 3

SAMPLER = ("(while :; do read up idle </proc/uptime; "
           "while read k v u; do [ $k = MemFree: ] && break; done </proc/meminfo; "
           "echo $up $v; usleep 10000; done >/tmp/memfree.log) >/dev/null 2>&1 & "
           "echo $! >/tmp/memfree.pid")


# -- guest-side helpers -------------------------------------------------------------------------


def guest_uptime(vm: GuestVM) -> float:
    return float(vm.run("cat /proc/uptime").split()[0])


def mem_free_kib(vm: GuestVM) -> int:
    for line in vm.run("cat /proc/meminfo").splitlines():
        if line.startswith("MemFree:"):
            return int(line.split()[1])
    raise RuntimeError("no MemFree in /proc/meminfo")


def balloon_features(vm: GuestVM, timeout: float = 30) -> str:
    """The balloon's negotiated feature bits (sysfs string, bit 0 first), once its driver bound."""
    deadline = time.monotonic() + timeout
    while True:
        out = vm.run("for d in /sys/bus/virtio/devices/*; do [ -e $d/driver ] && "
                     "echo $(cat $d/device) $(cat $d/features); done; true")
        for line in out.splitlines():
            dev, feats = line.split()
            if int(dev, 16) == VIRTIO_ID_BALLOON:
                return feats
        if time.monotonic() > deadline:
            raise RuntimeError(f"no bound virtio balloon in the guest:\n{out}")
        time.sleep(0.5)


def start_ftrace(vm: GuestVM) -> None:
    """Time the driver's hint work in the guest: function_graph on report_free_page_func (the
    work item that runs a whole round: take free blocks, send them, send STOP), depth 1."""
    vm.run("mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null; cd /sys/kernel/tracing && "
           "echo report_free_page_func > set_graph_function && echo 1 > max_graph_depth && "
           "echo function_graph > current_tracer && echo > trace && echo 1 > tracing_on")


def read_ftrace(vm: GuestVM) -> list[float]:
    """Durations (s) of each report_free_page_func call, in order."""
    out = []
    for line in vm.run("cat /sys/kernel/tracing/trace").splitlines():
        m = re.search(r"([\d.]+) us\s*\|\s*report_free_page_func", line)
        if m:
            out.append(float(m.group(1)) / 1e6)
    return out


def start_sampler(vm: GuestVM) -> None:
    vm.run(SAMPLER)
    time.sleep(0.3)


def stop_sampler(vm: GuestVM) -> list[tuple[float, int]]:
    vm.run("kill $(cat /tmp/memfree.pid)")
    out = []
    for line in vm.run("cat /tmp/memfree.log").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out.append((float(parts[0]), int(parts[1])))
    return out


def analyse_round(samples: list[tuple[float, int]], before_kib: int, t_request: float
                  ) -> dict[str, Any]:
    """Guest view of one hint round from the MemFree samples (see the module docstring)."""
    after = [(t, v) for t, v in samples if t >= t_request]
    if not after:
        return {"guest_hinted_bytes": 0, "note": "no samples after the request"}
    lowest = min(v for _t, v in after)
    block_kib = BLOCK // 1024
    first_drop = next((t for t, v in after if v < before_kib - block_kib), None)
    plateau = next((t for t, v in after if v <= lowest + block_kib), None)
    res: dict[str, Any] = {"guest_hinted_bytes": (before_kib - lowest) * 1024,
                           "sample_period_s": _median_period(after)}
    if first_drop is not None and plateau is not None:
        res["guest_latency_s"] = round(first_drop - t_request, 3)
        res["guest_round_s"] = round(plateau - first_drop, 3)
    return res


def _median_period(samples: list[tuple[float, int]]) -> float:
    d = sorted(b[0] - a[0] for a, b in itertools.pairwise(samples))
    return round(d[len(d) // 2], 3) if d else 0.0


def begin_measure(vm: GuestVM, device: str) -> tuple[dict[str, Any], int]:
    """What both measurements start with once the guest is up: the result record (device name,
    boot time, whether hinting was negotiated), MemFree before the round (KiB), and the guest's
    tracing and MemFree sampler switched on."""
    res: dict[str, Any] = {"device": device, "boot_s": round(vm.boot_seconds or 0.0, 2)}
    res["free_page_hint_negotiated"] = balloon_features(vm)[FREE_PAGE_HINT_BIT] == "1"
    before = mem_free_kib(vm)
    start_ftrace(vm)
    start_sampler(vm)
    return res, before


# -- QEMU's own balloon ---------------------------------------------------------------------------


def measure_qemu(lab: QemuLab, ram: str, hint: bool, append: str) -> dict[str, Any]:
    dev = f"virtio-balloon-pci,id=balloon0,free-page-hint={'on' if hint else 'off'},iothread=io0"
    t0 = time.monotonic()
    with lab.boot(ram=ram, devices=[dev], extra_args=["-object", "iothread,id=io0"],
                  append=append, timeout=180) as vm:
        res, before = begin_measure(
            vm, "QEMU virtio-balloon-pci free-page-hint=" + ("on" if hint else "off"))
        vm.qmp("migrate-set-parameters", **{"max-bandwidth": 256 << 20, "downtime-limit": 300})
        t_req = guest_uptime(vm)
        t_mig = time.monotonic()
        vm.qmp("migrate", uri="exec:cat > /dev/null")
        while True:
            st = vm.qmp("query-migrate")
            if st.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() - t_mig > 300:
                raise RuntimeError(f"migration stuck: {st}")
            time.sleep(0.1)
        res["migration_status"] = st["status"]
        res["migration_s"] = round(st.get("total-time", 0) / 1000, 3)
        ram_st = st.get("ram", {})
        res["scanned_pages"] = ram_st.get("normal", 0) + ram_st.get("duplicate", 0)
        res["transferred_bytes"] = ram_st.get("transferred", 0)
        vm.qmp("cont")  # the config irq of DONE reaches the guest once it runs again
        time.sleep(1.0)
        res.update(analyse_round(stop_sampler(vm), before, t_req))
        res["mem_free_before_kib"] = before
        res["guest_work_calls_s"] = read_ftrace(vm)
    res["wall_s"] = round(time.monotonic() - t0, 1)
    return res


# -- our device over vfio-user --------------------------------------------------------------------


def ctl(ctl_path: str, command: str, timeout: float = 20) -> Any:
    """``balloon-hint ctl CTL COMMAND``, in-process through ``vmsim.cmd_ctl.call`` (a plain
    socket client) so the request time is not a Python start-up."""
    ans = call(ctl_path, command, timeout=timeout)
    if "error" in ans:
        raise RuntimeError(f"balloon-hint ctl {command} failed: {ans['error']}")
    return ans.get("return", ans)


def measure_ours(lab: QemuLab, ram: str, append: str) -> dict[str, Any]:
    """Our device: `balloon-hint serve --vfio-user` + `balloon-hint ctl`. Returns the same
    figures as measure_qemu, plus the device's own round log."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bh-bench-") as d:
        sock, ctl_path = os.path.join(d, "vfu.sock"), os.path.join(d, "ctl.sock")
        log_path = os.path.join(d, "serve.log")
        with open(log_path, "wb") as logf:
            server = subprocess.Popen([sys.executable, "-m", "vmsim", "serve", "--vfio-user", sock,
                                       "--control", ctl_path], stdout=logf, stderr=logf, cwd=REPO)
        try:
            deadline = time.monotonic() + 30
            while not (os.path.exists(sock) and os.path.exists(ctl_path)):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("balloon-hint serve did not come up:\n"
                                       + Path(log_path).read_text(errors="replace")[-3000:])
                time.sleep(0.1)
            dev = json.dumps({"driver": "vfio-user-pci", "id": "vfu0",
                              "socket": {"type": "unix", "path": sock}})
            with lab.boot(ram=ram, devices=[dev], append=append, timeout=180) as vm:
                res, before = begin_measure(vm, "ours over vfio-user")
                t_req = guest_uptime(vm)
                cmd = ctl(ctl_path, "hint-start")
                cmd_id = cmd.get("cmd-id")
                # The round ends when the guest sends STOP (it ran out of free pages).
                deadline = time.monotonic() + 120
                while True:
                    rounds = ctl(ctl_path, "stats").get("rounds", [])
                    rnd = next((r for r in rounds if r.get("cmd_id") == cmd_id), None)
                    if rnd and rnd.get("stopped_after_s") is not None:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"round {cmd_id} did not stop: {rnd}")
                    time.sleep(0.2)
                time.sleep(0.3)
                samples = stop_sampler(vm)
                ctl(ctl_path, "hint-done")
                res["device_hints"] = rnd["hints"]
                res["device_hinted_bytes"] = rnd["hinted_bytes"]
                res["device_round_s"] = round(rnd["stopped_after_s"], 3)
                res["hints_outside_ram"] = rnd.get("outside_ram")
                res["hints_not_4mib_blocks"] = rnd.get("not_block_aligned")
                res.update(analyse_round(samples, before, t_req))
                res["mem_free_before_kib"] = before
                time.sleep(1.0)
                res["mem_free_after_done_kib"] = mem_free_kib(vm)
                res["guest_work_calls_s"] = read_ftrace(vm)
        finally:
            stop_process(server)
    res["wall_s"] = round(time.monotonic() - t0, 1)
    return res


# -- report ---------------------------------------------------------------------------------------


def _round_ms(r: dict[str, Any]) -> str:
    calls = r.get("guest_work_calls_s") or []
    if not calls or not r.get("free_page_hint_negotiated"):
        return "-"
    # The first call is the round itself; later ones handle STOP/DONE (DONE frees the pages).
    return f"{calls[0] * 1e3:.1f} ms (+{len(calls) - 1} STOP/DONE calls)"


def mib(b: Any) -> str:
    return f"{b / 2**20:.1f} MiB" if isinstance(b, (int, float)) else "-"


def report(results: list[dict[str, Any]], baseline: dict[str, Any] | None) -> None:
    rows = [
        ("free page hint negotiated", lambda r: str(r.get("free_page_hint_negotiated", "-"))),
        ("guest boot", lambda r: f"{r['boot_s']} s"),
        ("hinted bytes (host view)", lambda r: mib(r.get("host_hinted_bytes"))),
        ("hints (4 MiB blocks)", lambda r: str(r.get("device_hints", "-"))),
        ("hint round, host view", lambda r: f"{r['device_round_s']} s" if "device_round_s" in r
         else "-"),
        ("hinted bytes (guest MemFree drop)", lambda r: mib(r.get("guest_hinted_bytes"))),
        ("request -> first drop (guest)", lambda r: f"{r.get('guest_latency_s', '-')} s"),
        ("hint round, guest ftrace", lambda r: _round_ms(r)),
        ("MemFree drop, first->last block", lambda r: f"{r.get('guest_round_s', '-')} s "
         f"(sampled every {r.get('sample_period_s', '-')} s)"),
        ("migration time", lambda r: f"{r['migration_s']} s" if "migration_s" in r else "-"),
        ("pages scanned by migration", lambda r: str(r.get("scanned_pages", "-"))),
        ("wall time incl. boot", lambda r: f"{r['wall_s']} s"),
    ]
    cols = [r["device"] for r in results]
    w0 = max(len(n) for n, _ in rows) + 2
    ws = [max(len(c), 14) + 2 for c in cols]
    print("".ljust(w0) + "".join(c.ljust(w) for c, w in zip(cols, ws, strict=True)))
    for name, fn in rows:
        print(name.ljust(w0) + "".join(fn(r).ljust(w) for r, w in zip(results, ws, strict=True)))
    if baseline:
        print(f"(QEMU host-view hinted bytes = pages scanned with free-page-hint=off "
              f"({baseline['scanned_pages']}) minus with it on, x 4096)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ram", default="1G")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the free-page-hint=off run (no host-view bytes for QEMU)")
    ap.add_argument("--skip-qemu", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--init-on-alloc", action="store_true",
                    help="keep the kernel's default init_on_alloc=1 (zeroes hinted pages)")
    ap.add_argument("--json", action="store_true", help="print the raw figures as JSON too")
    args = ap.parse_args(argv)
    try:
        lab = QemuLab.find()
    except LabMissing as e:
        print(f"bench_qemu: {e}", file=sys.stderr)
        return 2
    append = "" if args.init_on_alloc else "init_on_alloc=0"
    results: list[dict[str, Any]] = []
    baseline = None
    if not args.skip_qemu:
        print(f"bench_qemu: QEMU {lab.qemu_version}, guest {args.ram}, free-page-hint=on ...",
              flush=True)
        on = measure_qemu(lab, args.ram, True, append)
        if not args.no_baseline:
            print("bench_qemu: free-page-hint=off (baseline) ...", flush=True)
            baseline = measure_qemu(lab, args.ram, False, append)
            on["host_hinted_bytes"] = (baseline["scanned_pages"] - on["scanned_pages"]) * PAGE
            results += [on, baseline]
        else:
            results.append(on)
    if not args.skip_ours:
        print("bench_qemu: our device over vfio-user ...", flush=True)
        ours = measure_ours(lab, args.ram, append)
        ours["host_hinted_bytes"] = ours.get("device_hinted_bytes")
        results.append(ours)
    if not results:
        return 1
    report(results, baseline)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
