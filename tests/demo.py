"""A migration of VM 100's conntrack state between two "hosts" on one machine.

Two network namespaces stand for the source and destination hosts, each with
its own private system-type dbus-daemon; a helper runs in each namespace on
its host's bus, and this script plays QEMU: Save on the source, Load on the
destination. Nothing
touches the host's own bus or conntrack table; everything is removed at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyroute2 import netns

from tests import client
from tests.support import REPO, Netns, PrivateBus, example_lines, helper_command, start_bus, synthetic_lines

VMID = 100


def on(bus: PrivateBus, fn: Callable[..., Any], *args: Any) -> Any:
    """Call a client function on one host's bus."""
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
    return fn(*args)


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="pvevmstate-demo-"))
    buses = [start_bus(tmp / "source-bus"), start_bus(tmp / "destination-bus")]
    names = ["pvevmstate-demo-src-%d" % os.getpid(), "pvevmstate-demo-dst-%d" % os.getpid()]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name in names:
            netns.create(name)
        src, dst = Netns(names[0]), Netns(names[1])
        src.load(example_lines(), mark=VMID)
        src.load(synthetic_lines(500, seed=1), mark=VMID)
        src.load(synthetic_lines(200, seed=2, base=30000), mark=101)
        print("source host: %d entries with mark %d, %d with mark 101"
              % (len(src.save_lines(VMID)), VMID, len(src.save_lines(101))))

        for ns, bus in zip((src, dst), buses, strict=True):
            env = dict(os.environ, PYTHONPATH=str(REPO), DBUS_SYSTEM_BUS_ADDRESS=bus.address)
            procs.append(subprocess.Popen(helper_command(ns, str(VMID), "--linger", "5"), env=env))
        name = client.vm(VMID)
        for bus in buses:
            deadline = time.monotonic() + 15
            while not on(bus, client.has_owner, name):
                if time.monotonic() > deadline:
                    raise SystemExit("a helper did not come up")
                time.sleep(0.05)
            owners = on(bus, client.queued_owners)
            print("queued for org.qemu.VMState1 on %s: %s" % (
                bus.address, ", ".join("%s (Id %s)" % (o, on(bus, client.get_id, o)) for o in owners)))

        t0 = time.perf_counter()
        data = on(buses[0], client.save, name)
        t1 = time.perf_counter()
        on(buses[1], client.load, name, data)
        t2 = time.perf_counter()
        print("Save: %d bytes in %.1f ms; Load in %.1f ms" % (len(data), (t1 - t0) * 1e3, (t2 - t1) * 1e3))
        print("NumMigratedEntries: source %d, destination %d"
              % (on(buses[0], client.count, name), on(buses[1], client.count, name)))
        print("destination host now: %d entries with mark %d, %d with mark 101"
              % (len(dst.save_lines(VMID)), VMID, len(dst.save_lines(101))))
        print("first lines on the destination (conntrack -L --mark %d -o save):" % VMID)
        for line in dst.save_lines(VMID)[:3]:
            print("  " + line)
        for bus in buses:
            on(bus, client.quit_helper, name)
        for proc in procs:
            print("helper exited with", proc.wait(15))
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for name in names:
            if name in netns.listnetns():
                netns.remove(name)
        for bus in buses:
            bus.stop()


if __name__ == "__main__":
    sys.exit(main())
