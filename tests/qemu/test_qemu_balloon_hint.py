"""QEMU's own virtio-balloon with free page hinting, driven by a real Linux guest.

This is the reference behaviour our device is measured against (protocol.md section 5): the
guest's driver binds and negotiates VIRTIO_BALLOON_F_FREE_PAGE_HINT (bit 3), a migration makes
QEMU start a hint round, the guest hands over its free memory (its MemFree drops while it holds
the hinted pages), the migration skips those pages and completes, and DONE at the end of the
migration gives the pages back to the guest.

One guest is booted for the whole module (TCG guests are slow and the cores are shared).
``init_on_alloc=0``: otherwise the guest zeroes every page it allocates for hinting, which
dirties it again (qemu-notes.md).
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from protocol.balloon import VIRTIO_BALLOON_F_FREE_PAGE_HINT, VIRTIO_BALLOON_F_STATS_VQ
from protocol.virtio import VIRTIO_F_VERSION_1, VIRTIO_ID_BALLOON
from vmsim.qemu_lab import GuestVM

pytestmark = pytest.mark.qemu

RAM = "512M"
RAM_PAGES = 512 * 256


@pytest.fixture(scope="module")
def guest(lab):
    with lab.boot(
        ram=RAM,
        # protocol.md 5.1: free-page-hint needs an iothread, or realize fails.
        extra_args=["-object", "iothread,id=io0"],
        devices=["virtio-balloon-pci,id=balloon0,free-page-hint=on,iothread=io0"],
        append="init_on_alloc=0",
        timeout=180,
    ) as vm:
        yield vm


def balloon_sysfs(vm: GuestVM) -> tuple[str, str, str]:
    """(virtioN, driver name, features bit string) of the guest's balloon device."""
    out = vm.run("for d in /sys/bus/virtio/devices/*; do "
                 "echo $(basename $d) $(cat $d/device) $(basename $(readlink $d/driver)) "
                 "$(cat $d/features); done")
    for line in out.splitlines():
        name, dev, driver, features = line.split()
        if int(dev, 16) == VIRTIO_ID_BALLOON:
            return name, driver, features
    raise AssertionError(f"no virtio balloon device in the guest:\n{out}")


def mem_free_kib(vm: GuestVM) -> int:
    m = re.search(r"^MemFree:\s+(\d+) kB", vm.run("cat /proc/meminfo"), re.M)
    assert m
    return int(m.group(1))


def migrate_to_file(vm: GuestVM, path: Path, timeout: float = 120) -> dict:
    """Migrate to ``exec:cat > path``; returns the final query-migrate answer."""
    # 7.2 defaulted to 32 MiB/s; set both so the run does not depend on the version's defaults.
    vm.qmp("migrate-set-parameters", **{"max-bandwidth": 256 << 20, "downtime-limit": 300})
    vm.qmp("migrate", uri=f"exec:cat > {path}")
    deadline = time.monotonic() + timeout
    while True:
        st = vm.qmp("query-migrate")
        if st.get("status") in ("completed", "failed", "cancelled"):
            return st
        assert time.monotonic() < deadline, f"migration still {st.get('status')}: {st}"
        time.sleep(0.2)


@pytest.mark.spec("DR-10")
def test_driver_binds_and_negotiates_free_page_hint(guest):
    name, driver, features = balloon_sysfs(guest)
    assert driver == "virtio_balloon"
    # sysfs shows one character per feature bit, bit 0 first.
    assert features[VIRTIO_BALLOON_F_FREE_PAGE_HINT] == "1", features
    assert features[VIRTIO_BALLOON_F_STATS_VQ] == "1", features
    assert features[VIRTIO_F_VERSION_1] == "1", features
    # The driver set up the free page virtqueue: its vq is listed with the device's irqs.
    assert "virtio_balloon" in guest.run("cat /proc/modules")
    assert guest.qmp("query-balloon")["actual"] == 512 << 20


@pytest.mark.spec("DR-10")
@pytest.mark.spec("DR-11")
@pytest.mark.spec("D-13")
def test_migration_with_hints_completes_and_skips_free_pages(guest, tmp_path):
    before = mem_free_kib(guest)
    # A guest-side sampler: MemFree every 10 ms, with shell builtins only (no forks to slow it).
    guest.run("(while :; do read up idle </proc/uptime; "
              "while read k v u; do [ $k = MemFree: ] && break; done </proc/meminfo; "
              "echo $up $v; usleep 10000; done >/tmp/memfree.log) >/dev/null 2>&1 & "
              "echo $! >/tmp/memfree.pid")
    time.sleep(0.3)
    st = migrate_to_file(guest, tmp_path / "migration.bin")
    assert st["status"] == "completed", st
    assert (tmp_path / "migration.bin").stat().st_size > 0
    ram = st["ram"]
    scanned = ram["normal"] + ram["duplicate"]
    # The idle guest has most of its RAM free: hinted pages are never scanned or sent.
    assert before * 1024 > RAM_PAGES * 4096 // 2
    assert scanned < RAM_PAGES * 0.75, ram
    assert guest.qmp("query-status")["status"] == "postmigrate"
    guest.qmp("cont")
    # DONE (at the end of the migration) makes the driver give all hinted pages back.
    deadline = time.monotonic() + 30
    while (after := mem_free_kib(guest)) < before - 16 * 1024:
        assert time.monotonic() < deadline, f"MemFree {after} kB, was {before} kB"
        time.sleep(0.5)
    guest.run("kill $(cat /tmp/memfree.pid)")
    samples = [line.split() for line in guest.run("cat /tmp/memfree.log").splitlines()]
    lowest = min(int(v) for _t, v in samples if v.isdigit())
    # While the round ran the guest held its free memory for the host: MemFree fell by most of it.
    assert before - lowest > before // 2, (before, lowest)


@pytest.mark.spec("D-9")
def test_second_migration_runs_a_new_round(guest, tmp_path):
    """A new migration gets a new command id; the guest hints again (the old round was DONE)."""
    st = migrate_to_file(guest, tmp_path / "again.bin")
    assert st["status"] == "completed", st
    ram = st["ram"]
    assert ram["normal"] + ram["duplicate"] < RAM_PAGES * 0.75, ram
    guest.qmp("cont")
    assert balloon_sysfs(guest)[1] == "virtio_balloon"


@pytest.mark.spec("DR-11")
@pytest.mark.spec("D-13")
def test_live_migration_to_a_second_qemu(lab):
    """Migrate to a second QEMU (-incoming defer): the guest carries on there with its shell and
    its balloon, and has all of its hinted pages back (DONE reached it)."""
    kw = dict(ram=RAM, append="init_on_alloc=0",
              devices=["virtio-balloon-pci,id=balloon0,free-page-hint=on,iothread=io0"])
    with lab.boot(extra_args=["-object", "iothread,id=io0"], timeout=180, **kw) as src:
        before = mem_free_kib(src)
        with lab.boot(extra_args=["-object", "iothread,id=io0", "-incoming", "defer"],
                      wait_ready=False, **kw) as dst:
            sock = f"{dst.tmpdir}/migration.sock"
            dst.qmp("migrate-incoming", uri=f"unix:{sock}")
            src.qmp("migrate-set-parameters", **{"max-bandwidth": 256 << 20,
                                                 "downtime-limit": 300})
            src.qmp("migrate", uri=f"unix:{sock}")
            deadline = time.monotonic() + 120
            while (st := src.qmp("query-migrate"))["status"] not in ("completed", "failed"):
                assert time.monotonic() < deadline, st
                time.sleep(0.2)
            assert st["status"] == "completed", st
            assert st["ram"]["normal"] + st["ram"]["duplicate"] < RAM_PAGES * 0.75, st["ram"]
            src.close()  # one guest at a time from here on
            deadline = time.monotonic() + 30
            while dst.qmp("query-status")["status"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert balloon_sysfs(dst)[1] == "virtio_balloon"
            deadline = time.monotonic() + 30
            while (after := mem_free_kib(dst)) < before - 16 * 1024:
                assert time.monotonic() < deadline, f"MemFree {after} kB, was {before} kB"
                time.sleep(0.5)
