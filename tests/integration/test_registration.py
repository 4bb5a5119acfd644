"""Registration with a real QEMU over QMP, and the object's removal."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pvevmstate import messages
from tests import client
from tests.support import (
    HelperFactory,
    NetnsFactory,
    PrivateBus,
    Qemu,
    QemuFactory,
    QMPFailed,
    helper_command,
    ready_line,
    run_cleanup,
    wait_until,
)

VMID = 100


def object_props(qemu: Qemu) -> tuple[str, str]:
    return (qemu.qmp("qom-get", path="/objects/pve-vmstate", property="addr"),
            qemu.qmp("qom-get", path="/objects/pve-vmstate", property="id-list"))


def fill(path: Path) -> int:
    """Queue datagrams on the socket at ``path`` until its queue is full; how many it took.

    Full means a fresh sender is refused too: one sender alone may run out of
    its own send buffer first (net.unix.max_dgram_qlen is 512 where systemd
    sets it, 10 by the kernel's default).
    """
    count = 0
    while True:
        sent = 0
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    sender.sendto(b"FILLER=1", str(path))
                    sent += 1
        if not sent:
            return count
        count += sent


def has_object(qemu: Qemu) -> bool:
    try:
        return "pve-vmstate" in qemu.objects()
    except QMPFailed as err:  # QEMU makes /objects with the first object
        if "DeviceNotFound" not in str(err):
            raise
        return False


def test_ready_only_once_qemu_has_the_object(netns_factory: NetnsFactory, helper_factory: HelperFactory,
                                             qemu_factory: QemuFactory, system_bus: PrivateBus,
                                             *, monkeypatch: pytest.MonkeyPatch) -> None:
    # READY=1 goes to a NOTIFY_SOCKET whose queue is full, so the helper's
    # sd_notify blocks in send() until the test reads: READY cannot be reported
    # before the test lets it through. The object must appear in QEMU while
    # that is so; a helper that notified before it registered would block
    # before object-add, and the object would never appear.
    qemu = qemu_factory("vm")
    notify_path = qemu.qmp_path.parent / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        filled = fill(notify_path)
        monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
        helper = helper_factory(netns_factory(), VMID, qemu=qemu, ready=False)
        wait_until(lambda: has_object(qemu), 15, "QEMU to have the object before READY=1")
        assert ready_line(VMID) not in helper.journal()
        notify.settimeout(15)
        received = [notify.recv(4096) for _ in range(filled + 1)]
        assert received[:filled] == [b"FILLER=1"] * filled
        assert received[filled] == b"READY=1\nSTATUS=serving pve-vmstate-100"
        helper.wait_ready()
    # The object names this helper's Id and the bus the helper is on.
    assert object_props(qemu) == (system_bus.address, "pve-vmstate-100")
    journal = helper.journal()
    assert journal.index("ready:") > 0 and "QEMU %s" % qemu.qmp_path in journal


def test_left_over_object_is_replaced(netns_factory: NetnsFactory, helper_factory: HelperFactory,
                                      qemu_factory: QemuFactory, system_bus: PrivateBus) -> None:
    qemu = qemu_factory("vm")
    qemu.qmp("object-add", **{"qom-type": "dbus-vmstate", "id": "pve-vmstate", "addr": system_bus.address,
                              "id-list": "pve-vmstate-999"})
    helper = helper_factory(netns_factory(), VMID, qemu=qemu)
    assert object_props(qemu) == (system_bus.address, "pve-vmstate-100")
    assert "<4>" + messages.REPLACED_LEFT_OVER % VMID in helper.journal()


def run_failing(ns: Any, qmp: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(helper_command(ns, str(VMID), "--qmp-socket", str(qmp), *args),
                          capture_output=True, timeout=timeout, check=False)


def assert_nothing_left(proc: subprocess.CompletedProcess[bytes], why: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    errors = [ln for ln in err.splitlines() if ln.startswith("<3>")]
    assert len(errors) == 1 and why in errors[0], err
    assert not client.has_owner(client.vm(VMID))
    assert not any(client.get_id(o) == "pve-vmstate-100" for o in client.queued_owners())


def test_no_qemu_exits_1_and_leaves_nothing(netns_factory: NetnsFactory, system_bus: PrivateBus,
                                            tmp_path: Path) -> None:
    proc = run_failing(netns_factory(), tmp_path / "100.qmp")
    assert_nothing_left(proc, "cannot register with the QEMU of VM 100: cannot connect to")


def test_silent_monitor_times_out(netns_factory: NetnsFactory, system_bus: PrivateBus, tmp_path: Path) -> None:
    # A monitor that accepts and never greets: what a hung QEMU looks like.
    path = tmp_path / "100.qmp"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(4)
        proc = run_failing(netns_factory(), path, "--qmp-timeout", "0.5")
    finally:
        listener.close()
    assert_nothing_left(proc, "no answer to the greeting")


def test_refused_object_exits_1_and_keeps_the_other_object(netns_factory: NetnsFactory, system_bus: PrivateBus,
                                                           qemu_factory: QemuFactory) -> None:
    # Only one dbus-vmstate object may exist; somebody else's is not ours to remove.
    qemu = qemu_factory("vm")
    qemu.qmp("object-add", **{"qom-type": "dbus-vmstate", "id": "other", "addr": system_bus.address,
                              "id-list": "other"})
    proc = run_failing(netns_factory(), qemu.qmp_path)
    assert_nothing_left(proc, "There is already an instance of dbus-vmstate")
    assert qemu.objects() == {"other"}


def test_quit_removes_the_object(netns_factory: NetnsFactory, helper_factory: HelperFactory,
                                 qemu_factory: QemuFactory) -> None:
    qemu = qemu_factory("vm")
    helper = helper_factory(netns_factory(), VMID, qemu=qemu)
    client.quit_helper(client.vm(VMID))
    assert helper.wait_exit() == 0
    assert "pve-vmstate" not in qemu.objects()
    assert messages.head(messages.OBJECT_REMOVED) in helper.journal()


def test_sigterm_removes_the_object(netns_factory: NetnsFactory, helper_factory: HelperFactory,
                                    qemu_factory: QemuFactory) -> None:
    qemu = qemu_factory("vm")
    helper = helper_factory(netns_factory(), VMID, qemu=qemu)
    helper.signal(signal.SIGTERM)
    assert helper.wait_exit() == 0
    assert "pve-vmstate" not in qemu.objects()


def test_quit_after_qemu_is_gone(netns_factory: NetnsFactory, helper_factory: HelperFactory,
                                 qemu_factory: QemuFactory) -> None:
    qemu = qemu_factory("vm")
    helper = helper_factory(netns_factory(), VMID, qemu=qemu)
    qemu.stop()
    client.quit_helper(client.vm(VMID))
    assert helper.wait_exit() == 0
    assert messages.head(messages.OBJECT_NOT_REMOVED) in helper.journal()


def test_replaced_helper_leaves_the_object_to_its_successor(netns_factory: NetnsFactory, helper_factory: HelperFactory,
                                                            qemu_factory: QemuFactory) -> None:
    ns, qemu = netns_factory(), qemu_factory("vm")
    first = helper_factory(ns, VMID, qemu=qemu)
    second = helper_factory(ns, VMID, qemu=qemu)
    assert first.wait_exit() == 0
    assert "pve-vmstate" in qemu.objects()
    assert messages.head(messages.OBJECT_REMOVED) not in first.journal()
    # The successor registered after the first had left and owns the object now.
    client.quit_helper(client.vm(VMID))
    assert second.wait_exit() == 0
    assert "pve-vmstate" not in qemu.objects()


def test_load_on_a_running_vm_removes_the_object(netns_factory: NetnsFactory, helper_factory: HelperFactory,
                                                 qemu_factory: QemuFactory) -> None:
    # Load outside an incoming migration: QEMU is not in inmigrate, so the
    # object has nothing left to serve and goes at once.
    qemu = qemu_factory("vm")
    helper = helper_factory(netns_factory(), VMID, qemu=qemu)
    client.load(client.vm(VMID), b"\x00")
    wait_until(lambda: "pve-vmstate" not in qemu.objects(), 10, "object removal")
    assert "incoming migration finished, VM is running" in helper.journal()


def object_left_by_a_killed_helper(netns_factory: NetnsFactory, helper_factory: HelperFactory,
                                   qemu_factory: QemuFactory) -> Qemu:
    """A QEMU whose helper was killed (SIGKILL, as the OOM killer would): its object is left."""
    qemu = qemu_factory("vm")
    helper = helper_factory(netns_factory(), VMID, qemu=qemu)
    helper.signal(signal.SIGKILL)
    helper.wait_exit()
    assert "pve-vmstate" in qemu.objects()
    return qemu


def test_cleanup_removes_the_object_a_killed_helper_left(netns_factory: NetnsFactory, helper_factory: HelperFactory,
                                                        qemu_factory: QemuFactory) -> None:
    qemu = object_left_by_a_killed_helper(netns_factory, helper_factory, qemu_factory)
    # After a helper that exited by itself cleanly (0) or never started (2),
    # the cleanup does nothing at all.
    assert run_cleanup(qemu, exit_code="exited", exit_status="0") == (0, "")
    assert run_cleanup(qemu, exit_code="exited", exit_status="2") == (0, "")
    assert "pve-vmstate" in qemu.objects()
    code, err = run_cleanup(qemu)
    assert code == 0 and "pve-vmstate" not in qemu.objects()
    assert err == "<4>%s\n" % (messages.CLEANUP_REMOVED % VMID)
    assert run_cleanup(qemu) == (0, "<6>%s\n" % (messages.CLEANUP_NONE_LEFT % VMID))
    qemu.stop()
    code, err = run_cleanup(qemu)
    assert code == 0 and err.startswith("<6>" + messages.CLEANUP_NOTHING.split(": %s")[0] % VMID + ": ")


def test_cleanup_after_a_fatal_exit_removes_a_left_object(netns_factory: NetnsFactory, helper_factory: HelperFactory,
                                                           qemu_factory: QemuFactory) -> None:
    # Exit status 1 can come from an unexpected error after the object was
    # added: ExecStopPost then looks, and removes what is left.
    qemu = object_left_by_a_killed_helper(netns_factory, helper_factory, qemu_factory)
    code, err = run_cleanup(qemu, exit_code="exited", exit_status="1")
    assert code == 0 and "pve-vmstate" not in qemu.objects()
    assert err == "<4>%s\n" % (messages.CLEANUP_REMOVED % VMID)
