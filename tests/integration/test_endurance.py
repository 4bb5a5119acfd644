"""Endurance: many start -> Save -> exit cycles on one bus leave nothing behind.

Four lanes (VMs 100..103, each with its own QEMU) run the cycles side by side,
as a host runs several helpers; afterwards no name is held, no namespace is
left, the bus and QEMU hold no more file descriptors than before, and no
process is left over, zombie or not.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

from pvevmstate.dbus.api import VMSTATE_NAME
from tests import client
from tests.support import HelperFactory, NetnsFactory, QemuFactory, realistic_lines, save_lines, start_bus

CYCLES = int(os.environ.get("ENDURANCE_CYCLES", "500"))
LANES = (100, 101, 102, 103)
#: Descriptors may wobble by a few (the bus's own housekeeping), never grow with the cycles.
FD_SLACK = 4


def _fds(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


def _children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process whose parent is ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc/%s/stat" % entry).read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append((int(entry), fields[0]))
    return out


def _netns() -> set[str]:
    # This run's namespaces only: another test run on the machine has its own.
    mine = "pvevmstate-%d-" % os.getpid()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    return {name for name in listed if name.startswith(mine)}


def test_start_save_exit_cycles_leave_nothing(netns_factory: NetnsFactory, helper_factory: HelperFactory,
                                              qemu_factory: QemuFactory, tmp_path: Path) -> None:
    bus = start_bus(tmp_path / "endurance-bus")
    try:
        ns = netns_factory()
        for vmid in LANES:
            ns.load(realistic_lines(10, seed=vmid, min_timeout=3600), mark=vmid)
        qemus = {vmid: qemu_factory("vm%d" % vmid) for vmid in LANES}
        namespaces = _netns()
        children = {pid for pid, _ in _children_of(os.getpid())}
        # One cycle first, then the baseline: lazily opened descriptors are not growth.
        first = helper_factory(ns, 100, "--linger", "0", bus=bus, qemu=qemus[100])
        client.save(client.vm(100), address=bus.address)
        assert first.wait_exit() == 0
        bus_fds = _fds(bus.proc.pid)
        qemu_fds = {vmid: _fds(q.proc.pid) for vmid, q in qemus.items()}
        errors: list[str] = []

        def lane(vmid: int, cycles: int) -> None:
            for n in range(cycles):
                helper = helper_factory(ns, vmid, "--linger", "0", bus=bus, qemu=qemus[vmid])
                data = client.save(client.vm(vmid), address=bus.address)
                if len(save_lines(data)) != 10:
                    errors.append("VM %d cycle %d: %d lines" % (vmid, n, len(save_lines(data))))
                code = helper.wait_exit(30)
                if code != 0:
                    errors.append("VM %d cycle %d: exit %d\n%s" % (vmid, n, code, helper.journal()))
                if errors:
                    return

        per_lane = -(-CYCLES // len(LANES))
        threads = [threading.Thread(target=lane, args=(vmid, per_lane)) for vmid in LANES]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]

        queued = [client.get_id(o, address=bus.address) for o in client.queued_owners(address=bus.address)]
        assert queued == [], queued
        for vmid in LANES:
            assert not client.has_owner(client.vm(vmid), address=bus.address)
            assert "pve-vmstate" not in qemus[vmid].objects()
        assert not client.has_owner(VMSTATE_NAME, address=bus.address)
        assert _netns() == namespaces
        assert _fds(bus.proc.pid) <= bus_fds + FD_SLACK, (bus_fds, _fds(bus.proc.pid))
        for vmid, q in qemus.items():
            assert _fds(q.proc.pid) <= qemu_fds[vmid] + FD_SLACK, (vmid, qemu_fds[vmid], _fds(q.proc.pid))
        left = [(pid, state) for pid, state in _children_of(os.getpid()) if pid not in children]
        assert left == [], "processes left over: %s" % left
    finally:
        bus.stop()
