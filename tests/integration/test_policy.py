"""The shipped D-Bus policy, on a dbus-daemon run with the machine's own system.conf.

The helper (root) on that bus, registered with a real QEMU; clients are
dbus-send run as root and as ``nobody``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests import client
from tests.support import POLICY, HelperFactory, NetnsFactory, PrivateBus, start_policy_bus

DENIED = "org.freedesktop.DBus.Error.AccessDenied"
HELPER = ("/org/qemu/VMState1",)


@pytest.fixture
def policy_bus() -> Any:
    # Not under pytest's tmp_path: that is root's alone, and nobody must reach the socket.
    directory = Path(tempfile.mkdtemp(prefix="pvevmstate-policy-bus-"))
    directory.chmod(0o755)
    try:
        bus = start_policy_bus(directory)
        try:
            yield bus
        finally:
            bus.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def dbus_send(bus: PrivateBus, dest: str, path: str, member: str, *args: str,
              user: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = ["dbus-send", "--system", "--print-reply", "--reply-timeout=5000", "--dest=" + dest, path, member, *args]
    if user is not None:
        cmd = ["setpriv", "--reuid=" + user, "--regid=nogroup", "--clear-groups", *cmd]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DBUS_SYSTEM_BUS_ADDRESS": bus.address}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30, check=False)


def request_name(bus: PrivateBus, name: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    return dbus_send(bus, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus.RequestName",
                     "string:" + name, "uint32:4", user=user)


CALLS = {
    "Save": ("org.qemu.VMState1.Save",),
    "Load": ("org.qemu.VMState1.Load", "array:byte:0"),
    "Id": ("org.freedesktop.DBus.Properties.Get", "string:org.qemu.VMState1", "string:Id"),
    "NumMigratedEntries": ("org.freedesktop.DBus.Properties.Get", "string:com.proxmox.VMStateHelper",
                           "string:NumMigratedEntries"),
    "Introspect": ("org.freedesktop.DBus.Introspectable.Introspect",),
    "Quit": ("com.proxmox.VMStateHelper.Quit",),
}


def test_dbus_daemon_accepts_the_policy(tmp_path: Path) -> None:
    start_policy_bus(tmp_path / "bus", strict=True).stop()


@pytest.mark.parametrize("strict", [True, False])
def test_dbus_daemon_refuses_a_malformed_policy(tmp_path: Path, strict: bool) -> None:
    # Proves the check works: included strictly, a broken file stops the
    # daemon; in system.d (how the system bus reads it) it is skipped with a
    # warning naming the file.
    broken = tmp_path / POLICY.name
    broken.write_text(POLICY.read_text().replace("</busconfig>", "<policy"))
    with pytest.raises(RuntimeError, match="refused" if strict else "skipped"):
        start_policy_bus(tmp_path / "bus", broken, strict=strict).stop()


def test_nobody_may_not_own_the_names(policy_bus: PrivateBus) -> None:
    for name in ("org.qemu.VMState1", "com.proxmox.VMStateHelper.VM100", "com.proxmox.VMStateHelper"):
        proc = request_name(policy_bus, name, user="nobody")
        assert proc.returncode != 0 and DENIED in proc.stderr, (name, proc)


def test_root_may_own_the_names(policy_bus: PrivateBus) -> None:
    for name in ("org.qemu.VMState1", "com.proxmox.VMStateHelper.VM100"):
        proc = request_name(policy_bus, name)
        assert proc.returncode == 0, (name, proc.stderr)


def test_helper_serves_root_and_refuses_nobody(policy_bus: PrivateBus, netns_factory: NetnsFactory,
                                              helper_factory: HelperFactory) -> None:
    helper = helper_factory(netns_factory(), 100, bus=policy_bus)
    unique = client.owner(client.vm(100), address=policy_bus.address)
    # QEMU addresses helpers by their unique names (from ListQueuedOwners).
    for dest in (client.vm(100), unique):
        for what, call in CALLS.items():
            if what == "Quit":
                continue
            proc = dbus_send(policy_bus, dest, *HELPER, *call, user="nobody")
            assert proc.returncode != 0 and DENIED in proc.stderr, (dest, what, proc)
            proc = dbus_send(policy_bus, dest, *HELPER, *call)
            assert proc.returncode == 0, (dest, what, proc.stderr)
    assert "pve-vmstate-100" in dbus_send(policy_bus, unique, *HELPER, *CALLS["Id"]).stdout
    proc = dbus_send(policy_bus, unique, *HELPER, *CALLS["Quit"], user="nobody")
    assert proc.returncode != 0 and DENIED in proc.stderr
    assert helper.proc.poll() is None
    assert dbus_send(policy_bus, client.vm(100), *HELPER, *CALLS["Quit"]).returncode == 0
    assert helper.wait_exit() == 0
