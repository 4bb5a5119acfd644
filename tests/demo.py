"""A live migration of VM 100, with its conntrack state, between two "hosts" on one machine.

The same setup as tests/integration/test_migration.py: each host is a network
namespace with its own conntrack table plus a private system-type
dbus-daemon; a source QEMU and a destination QEMU (``-incoming``, ``-S``) run
VM 100; a helper runs on each host, inside its namespace, on its bus,
registered with its QEMU. The script then does what qemu-server does:
``migrate``, ``cont`` on the destination, read ``NumMigratedEntries`` and
``Quit`` both helpers. The helpers' journal lines go to this terminal.
Nothing touches the host's own bus or conntrack table; everything started is
stopped by PID and removed at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pyroute2 import netns

from tests import client
from tests.support import (
    REPO,
    Netns,
    PrivateBus,
    Qemu,
    example_lines,
    helper_command,
    start_bus,
    start_qemu,
    synthetic_lines,
)

VMID = 100


def wait(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for " + what)
        time.sleep(0.05)


def say(text: str) -> None:
    print("\n### " + text, flush=True)


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="pvevmstate-demo-"))
    buses: list[PrivateBus] = []
    qemus: list[Qemu] = []
    names = ["pvevmstate-demo-src-%d" % os.getpid(), "pvevmstate-demo-dst-%d" % os.getpid()]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        buses += [start_bus(tmp / "source-bus"), start_bus(tmp / "destination-bus")]
        for name in names:
            netns.create(name)
        src, dst = Netns(names[0]), Netns(names[1])
        src.load(example_lines(), mark=VMID)
        src.load(synthetic_lines(500, seed=1), mark=VMID)
        src.load(synthetic_lines(200, seed=2, base=30000), mark=101)
        say("source host: %d entries with mark %d, %d with mark 101"
            % (len(src.save_lines(VMID)), VMID, len(src.save_lines(101))))

        uri = "unix:%s" % (tmp / "migrate.sock")
        qemus.append(start_qemu(tmp, "source-vm100", machine="pc"))
        qemus.append(start_qemu(tmp, "destination-vm100", machine="pc", incoming=uri, paused=True))
        say("QEMU started: source %s, destination %s" % (qemus[0].status(), qemus[1].status()))

        name = client.vm(VMID)
        for ns, bus, qemu in zip((src, dst), buses, qemus, strict=True):
            env = dict(os.environ, PYTHONPATH=str(REPO), DBUS_SYSTEM_BUS_ADDRESS=bus.address)
            procs.append(subprocess.Popen(
                helper_command(ns, str(VMID), "--qmp-socket", str(qemu.qmp_path), "--linger", "30"), env=env))
            wait(lambda: all(client.has_owner(name, address=b.address) for b in buses[:len(procs)])
                 and all("pve-vmstate" in q.objects() for q in qemus[:len(procs)]), "a helper to register")
        say("both helpers registered; QEMU objects: source %s, destination %s"
            % (sorted(qemus[0].objects()), sorted(qemus[1].objects())))

        qemus[0].qmp("migrate-set-parameters", **{"max-bandwidth": 1 << 30})
        qemus[0].qmp("migrate", uri=uri)
        wait(lambda: qemus[0].migration().get("status") in ("completed", "failed", "cancelled"), "the migration")
        info = qemus[0].migration()
        say("migration %s: total %s ms, downtime %s ms"
            % (info["status"], info.get("total-time"), info.get("downtime")))
        if info["status"] != "completed":
            return 1
        wait(lambda: qemus[1].status() != "inmigrate", "the destination")
        qemus[1].qmp("cont")
        wait(lambda: "pve-vmstate" not in qemus[1].objects(), "the destination helper to remove its object")
        say("destination VM %s, its QEMU objects now: %s" % (qemus[1].status(), sorted(qemus[1].objects())))
        say("NumMigratedEntries: source %d, destination %d"
            % (client.count(name, address=buses[0].address), client.count(name, address=buses[1].address)))
        for bus in buses:
            client.quit_helper(name, address=bus.address)
        for proc in procs:
            proc.wait(15)
        say("helpers exited with %s" % [p.returncode for p in procs])
        say("destination host: %d entries with mark %d, %d with mark 101; first lines:"
            % (len(dst.save_lines(VMID)), VMID, len(dst.save_lines(101))))
        for line in dst.save_lines(VMID)[:3]:
            print("  " + line)
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for qemu in qemus:
            qemu.stop()
        for name in names:
            if name in netns.listnetns():
                netns.remove(name)
        for bus in buses:
            bus.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
