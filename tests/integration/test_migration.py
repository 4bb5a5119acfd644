"""Real QEMU live migrations between two "nodes" on one machine.

A node is a private dbus-daemon run with the machine's own system.conf and the
shipped policy (as on a real host), plus a network namespace with its own
conntrack table. Each VM has a source QEMU and a destination QEMU started
with ``-incoming``; a helper for the VM runs on each node, inside the node's
namespace, on the node's bus, registered with its QEMU. The test then does
what qemu-server does: ``migrate`` on the source, ``cont`` on the destination,
read ``NumMigratedEntries`` and call ``Quit`` on both helpers.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvevmstate import messages
from pvevmstate.payload import MAX_PAYLOAD
from tests import client
from tests.support import (
    MIGRATION_TIMEOUT,
    Helper,
    HelperFactory,
    Node,
    Qemu,
    QemuFactory,
    marked,
    migration_qemus,
    run_cleanup,
    start_migration,
    synthetic_lines,
    wait_migration,
    wait_until,
)


@dataclass
class Migration:
    vmid: int
    src_qemu: Qemu
    dst_qemu: Qemu
    src: Helper
    dst: Helper
    uri: str


def prepare(vmid: int, nodes: tuple[Node, Node], tmp_path: Path, qemu_factory: QemuFactory,
            helper_factory: HelperFactory) -> Migration:
    """Start both QEMUs and both helpers, as qemu-server does before ``migrate``."""
    source, target = nodes
    src_qemu, dst_qemu, uri = migration_qemus(vmid, tmp_path, qemu_factory)
    src = helper_factory(source.ns, vmid, "--linger", "60", bus=source.bus, qemu=src_qemu)
    dst = helper_factory(target.ns, vmid, "--linger", "60", bus=target.bus, qemu=dst_qemu)
    return Migration(vmid, src_qemu, dst_qemu, src, dst, uri)


def start(m: Migration) -> None:
    start_migration(m.src_qemu, m.uri)


def wait(m: Migration) -> str:
    return wait_migration(m.src_qemu, "migration of VM %d" % m.vmid)


def finish(m: Migration, source: Node, target: Node) -> tuple[int, int]:
    """After a completed migration: resume the target, then read the counts and Quit, like qemu-server."""
    wait_until(lambda: m.dst_qemu.status() != "inmigrate", 30, "destination to leave inmigrate")
    m.dst_qemu.qmp("cont")
    assert m.dst_qemu.status() == "running"
    # The destination helper removes its object once QEMU has left inmigrate.
    wait_until(lambda: "pve-vmstate" not in m.dst_qemu.objects(), 30, "object removal on the destination")
    counts = (client.count(client.vm(m.vmid), address=source.bus.address),
              client.count(client.vm(m.vmid), address=target.bus.address))
    client.quit_helper(client.vm(m.vmid), address=source.bus.address)
    client.quit_helper(client.vm(m.vmid), address=target.bus.address)
    assert m.src.wait_exit() == 0, m.src.journal()
    assert m.dst.wait_exit() == 0, m.dst.journal()
    for node in (source, target):
        assert not client.has_owner(client.vm(m.vmid), address=node.bus.address)
    return counts


def test_migration_carries_exactly_the_vms_entries(nodes: Any, tmp_path: Path, qemu_factory: QemuFactory,
                                                   helper_factory: HelperFactory) -> None:
    source, target = nodes
    source.ns.load(synthetic_lines(400, seed=21), mark=100)
    source.ns.load(synthetic_lines(150, seed=22, base=30000), mark=200)
    source.ns.load(synthetic_lines(50, seed=23, base=40000))
    expected = marked(source, 100)
    m = prepare(100, nodes, tmp_path, qemu_factory, helper_factory)
    start(m)
    assert wait(m) == "completed"
    sent, created = finish(m, source, target)
    assert marked(target, 100) == expected
    assert target.ns.save_lines() == target.ns.save_lines(100)  # nothing of other marks
    assert sent == created == len(expected) == 400
    assert "Save: 400 entries with mark 100, sent 400" in m.src.journal()
    assert "created 400 entries with mark 100" in m.dst.journal()


def test_empty_table_migrates_with_one_byte(nodes: Any, tmp_path: Path, qemu_factory: QemuFactory,
                                            helper_factory: HelperFactory) -> None:
    source, target = nodes
    source.ns.load(synthetic_lines(20, seed=24), mark=200)
    m = prepare(100, nodes, tmp_path, qemu_factory, helper_factory)
    start(m)
    assert wait(m) == "completed"
    assert finish(m, source, target) == (0, 0)
    assert "in 1 bytes" in m.src.journal()
    assert target.ns.save_lines() == []


def test_table_over_one_mib_migrates(nodes: Any, tmp_path: Path, qemu_factory: QemuFactory,
                                     helper_factory: HelperFactory) -> None:
    # 9,000 entries are ~1.7 MiB as text: the default format sends them compact, all of them.
    source, target = nodes
    source.ns.load(synthetic_lines(9000, seed=25), mark=100)
    expected = marked(source, 100)
    m = prepare(100, nodes, tmp_path, qemu_factory, helper_factory)
    start(m)
    assert wait(m) == "completed"
    assert finish(m, source, target) == (9000, 9000)
    assert marked(target, 100) == expected
    assert "as hybrid (limit %d), left out 0" % MAX_PAYLOAD in m.src.journal()


def test_two_vms_migrate_at_once_over_the_same_buses(nodes: Any, tmp_path: Path, qemu_factory: QemuFactory,
                                                     helper_factory: HelperFactory) -> None:
    source, target = nodes
    source.ns.load(synthetic_lines(300, seed=26), mark=100)
    source.ns.load(synthetic_lines(200, seed=27, base=30000), mark=101)
    expected = {vmid: marked(source, vmid) for vmid in (100, 101)}
    ms = [prepare(vmid, nodes, tmp_path, qemu_factory, helper_factory) for vmid in (100, 101)]
    for m in ms:
        start(m)
    for m in ms:
        assert wait(m) == "completed"
    for m in ms:
        assert finish(m, source, target) == (len(expected[m.vmid]),) * 2
        assert marked(target, m.vmid) == expected[m.vmid]
    assert len(target.ns.save_lines()) == 500


def test_failed_migration_after_save_leaves_no_object_on_the_source(nodes: Any, tmp_path: Path,
                                                                    qemu_factory: QemuFactory,
                                                                    helper_factory: HelperFactory) -> None:
    # With return-path the source completes only once the destination has
    # loaded everything. The destination's helper is frozen, so the
    # destination QEMU waits in Load; the test kills it there, after Save.
    source = nodes[0]
    source.ns.load(synthetic_lines(100, seed=28), mark=100)
    m = prepare(100, nodes, tmp_path, qemu_factory, helper_factory)
    for qemu in (m.src_qemu, m.dst_qemu):
        qemu.qmp("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])
    os.kill(m.dst.proc.pid, signal.SIGSTOP)
    try:
        start(m)
        wait_until(lambda: "Save: 100 entries" in m.src.journal(), MIGRATION_TIMEOUT, "Save on the source")
        m.dst_qemu.stop()
    finally:
        os.kill(m.dst.proc.pid, signal.SIGCONT)
    assert wait(m) == "failed"
    # The source VM runs on, without the object, and its helper is gone.
    assert m.src.wait_exit(30) == 0, m.src.journal()
    assert "pve-vmstate" not in m.src_qemu.objects()
    assert m.src_qemu.status() == "running"
    assert "outgoing migration failed after Save" in m.src.journal()
    assert messages.EXITING % (100, "migration failed") in m.src.journal()
    assert not client.has_owner(client.vm(100), address=source.bus.address)
    # Its entries are still in the source table, as they were.
    assert len(source.ns.save_lines(100)) == 100


def test_left_over_object_then_a_migration_without_helpers(nodes: Any, tmp_path: Path, qemu_factory: QemuFactory,
                                                           helper_factory: HelperFactory) -> None:
    # Seen with the Perl helper: a left-over object from an earlier failed run, then a
    # migration without conntrack state: the source sends the section, the
    # destination has no object for it and exits. First the crash, for real.
    source, _target = nodes
    src_qemu = qemu_factory("src", machine="pc")
    helper = helper_factory(source.ns, 100, bus=source.bus, qemu=src_qemu)
    helper.signal(signal.SIGKILL)  # the failed run: no chance to clean up
    helper.wait_exit()
    assert "pve-vmstate" in src_qemu.objects()

    def migrate_plainly(name: str) -> tuple[str, Qemu]:
        path = tmp_path / ("%s.sock" % name)
        dst = qemu_factory(name, machine="pc", incoming="unix:%s" % path, paused=True)
        wait_until(path.exists, 10, "the destination to listen")
        src_qemu.qmp("migrate", uri="unix:%s" % path)
        done = {"completed", "failed", "cancelled"}
        wait_until(lambda: src_qemu.migration().get("status") in done, MIGRATION_TIMEOUT, "migration", 0.1)
        return str(src_qemu.migration()["status"]), dst

    status, dst = migrate_plainly("dst-crashed")
    wait_until(lambda: dst.proc.poll() is not None, 30, "the destination QEMU to exit")
    assert dst.proc.returncode != 0
    assert status == "failed"
    assert src_qemu.status() == "running"

    # What the unit's ExecStopPost runs after a killed helper.
    code, err = run_cleanup(src_qemu)
    assert code == 0 and messages.CLEANUP_REMOVED % 100 in err
    status, dst = migrate_plainly("dst-clean")
    assert status == "completed"
    wait_until(lambda: dst.status() != "inmigrate", 30, "the destination to leave inmigrate")
    dst.qmp("cont")
    assert dst.status() == "running"
