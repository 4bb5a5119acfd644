"""D-Bus declarations: names, paths, interfaces and error names. No logic.

The wire names are pinned (``method_name=``, ``property_name=``) because QEMU
and qemu-server call them by these exact names.
"""

from __future__ import annotations

from sdbus import (
    DbusFailedError,
    DbusInterfaceCommonAsync,
    DbusPropertyEmitsChangeFlag,
    dbus_method_async,
    dbus_property_async,
    dbus_signal_async,
)

VMSTATE_NAME = "org.qemu.VMState1"
VMSTATE_PATH = "/org/qemu/VMState1"
VMSTATE_INTERFACE = "org.qemu.VMState1"
HELPER_INTERFACE = "com.proxmox.VMStateHelper"
HELPER_NAME_PREFIX = "com.proxmox.VMStateHelper.VM"
ERROR_PREFIX = "com.proxmox.VMStateHelper.Error."


def helper_id(vmid: int) -> str:
    """The ``Id`` QEMU's id-list names for this VM (same as the Perl helper)."""
    return "pve-vmstate-%d" % vmid


def helper_bus_name(vmid: int) -> str:
    """The per-VM bus name that addresses exactly one VM's helper."""
    return "%s%d" % (HELPER_NAME_PREFIX, vmid)


class VMState1Interface(DbusInterfaceCommonAsync, interface_name=VMSTATE_INTERFACE):
    """QEMU's ``org.qemu.VMState1`` (docs/interop/dbus-vmstate.rst)."""

    @dbus_property_async("s", property_name="Id")
    def id(self) -> str:
        raise NotImplementedError

    @dbus_method_async(result_signature="ay", method_name="Save")
    async def save(self) -> bytes:
        raise NotImplementedError

    @dbus_method_async(input_signature="ay", method_name="Load")
    async def load(self, data: bytes) -> None:
        raise NotImplementedError


class VMStateHelperInterface(DbusInterfaceCommonAsync, interface_name=HELPER_INTERFACE):
    """Proxmox's control interface, read and called by qemu-server."""

    @dbus_property_async("u", property_name="NumMigratedEntries", flags=DbusPropertyEmitsChangeFlag)
    def num_migrated_entries(self) -> int:
        raise NotImplementedError

    @dbus_method_async(method_name="Quit")
    async def quit(self) -> None:
        raise NotImplementedError


class BusDriver(DbusInterfaceCommonAsync, interface_name="org.freedesktop.DBus"):
    """The members of the bus driver this package needs."""

    @dbus_method_async("s", "s", method_name="GetNameOwner")
    async def get_name_owner(self, name: str) -> str:
        raise NotImplementedError

    @dbus_method_async("s", "b", method_name="NameHasOwner")
    async def name_has_owner(self, name: str) -> bool:
        raise NotImplementedError

    @dbus_method_async("s", "as", method_name="ListQueuedOwners")
    async def list_queued_owners(self, name: str) -> list[str]:
        raise NotImplementedError

    @dbus_method_async("s", "u", method_name="ReleaseName")
    async def release_name(self, name: str) -> int:
        raise NotImplementedError

    @dbus_signal_async("s", signal_name="NameLost")
    def name_lost(self) -> str:
        raise NotImplementedError


BUS_DRIVER_NAME = "org.freedesktop.DBus"
BUS_DRIVER_PATH = "/org/freedesktop/DBus"


class HelperError(DbusFailedError):
    """A known failure of a control call; the message says what went wrong."""

    dbus_error_name = ERROR_PREFIX + "Failed"


class HelperInternalError(DbusFailedError):
    """An unexpected failure; details are in the journal, not on the bus."""

    dbus_error_name = ERROR_PREFIX + "Internal"
