"""What went wrong in qemu-server's Perl helper in its first months: each lesson is a test.

Lesson -> where it is reproduced with real components:

1. Parallel migrations: a control call reached the wrong VM's helper and
   removed the wrong VM's QEMU object -> ``test_stopping_one_vm_leaves_the_other_vms_object``
   here; ten helpers and qemu-server's Perl caller in ``test_parallel.py``;
   two VMs migrating at once in ``test_migration.py``.
2. The object was not yet added when the destination loaded -> READY and the
   per-VM name only after ``object-add``:
   ``test_registration.py::test_ready_only_once_qemu_has_the_object`` and, under
   systemd, ``tests/package/boot.sh`` (``systemctl start`` returns after it).
3. A left-over object, then a migration without conntrack state ->
   ``test_migration.py::test_left_over_object_then_a_migration_without_helpers``
   (the crash, then the cleanup that prevents it); the unit's ExecStopPost in
   ``boot.sh``; a left-over object at start in ``test_registration.py``.
4. A failed unit blocked the VM's scope -> ``boot.sh`` (CollectMode, 101.scope).
5. Shutdown order, the bus gone first -> ``boot.sh`` (stopping the bus stops the
   helper first, which exits cleanly and removes its object).
6. The entry count parsed with a one-digit pattern ->
   ``test_count_is_the_whole_number`` here.
7. The 1 MiB check ignored the `` --mark`` suffix ->
   ``test_helper.py::test_text_format_over_one_mib_is_capped`` (the whole payload,
   suffixes included) and the size bound in ``tests/unit/test_payload.py``.
8. ``conntrack --load-file`` stopped at the first refused entry ->
   ``test_one_refused_line_costs_only_itself`` here.
9. ``-D`` and ``-F`` lines were handed to conntrack ->
   ``test_helper.py::test_hostile_lines_are_refused_and_touch_nothing_else`` and
   the fuzz run in ``test_hostile_payloads.py``.
"""

from __future__ import annotations

import subprocess

from tests import client
from tests.support import (
    PERL_CALLER,
    HelperFactory,
    NetnsFactory,
    QemuFactory,
    require,
    save_lines,
    strip_timeout,
    synthetic_lines,
)


def test_stopping_one_vm_leaves_the_other_vms_object(netns_factory: NetnsFactory, helper_factory: HelperFactory,
                                                     qemu_factory: QemuFactory) -> None:
    require(subprocess.run(["perl", "-MNet::DBus", "-e", "1"], check=False, capture_output=True).returncode == 0,
            "needs Perl's Net::DBus (Debian: libnet-dbus-perl)")
    ns = netns_factory()
    qemus = {vmid: qemu_factory("vm%d" % vmid) for vmid in (100, 101)}
    helpers = {vmid: helper_factory(ns, vmid, qemu=qemus[vmid]) for vmid in (100, 101)}
    # What qemu-server does for VM 101 while VM 100 migrates too.
    out = subprocess.run(["perl", str(PERL_CALLER), "101"], capture_output=True, text=True, timeout=90,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert helpers[101].wait_exit() == 0
    assert "pve-vmstate" not in qemus[101].objects()
    assert "pve-vmstate" in qemus[100].objects()
    assert helpers[100].proc.poll() is None


def test_count_is_the_whole_number(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    ns = netns_factory()
    ns.load(synthetic_lines(1234, seed=31), mark=100)
    helper_factory(ns, 100)
    assert len(save_lines(client.save(client.vm(100)))) == 1234
    assert client.count(client.vm(100)) == 1234


def test_one_refused_line_costs_only_itself(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    dst = netns_factory()
    lines = synthetic_lines(100, seed=32)
    # On the destination, entry 50 exists already (assured) under the VM's mark.
    dst.load([lines[50]], mark=100)
    expected = "-A -t 100 -u EXPECTED -s 10.9.9.1 -d 10.9.9.2 -r 10.9.9.2 -q 10.9.9.1 -p udp --sport 1 --dport 2"
    payload = "".join("%s --mark 100\n" % ln for ln in [*lines[:10], expected, *lines[10:]])
    helper_factory(dst, 100)
    client.load(client.vm(100), payload.encode())
    # conntrack --load-file would have stopped at line 11: here only the EXPECTED
    # line is refused and only the existing entry fails; all others are there.
    assert sorted(map(strip_timeout, dst.save_lines(100))) == sorted(map(strip_timeout, lines))
    assert client.count(client.vm(100)) == 99
