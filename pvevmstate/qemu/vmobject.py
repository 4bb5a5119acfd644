"""The helper's QEMU object: add it, remove it, and follow the migration it serves.

QEMU calls a helper only if its ``dbus-vmstate`` object names the helper's Id.
Each operation opens its own short QMP session (see :mod:`pvevmstate.qemu.qmp`).
The object must never outlive its helper: a QEMU that has the object sends a
``dbus-vmstate`` section, and a destination without the object (or without a
helper) exits on it, taking the VM with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping

from ..errors import QMPExecuteError
from .qmp import QMPClient

log = logging.getLogger(__name__)

#: The object id qemu-server's Perl helper uses; only one dbus-vmstate object may exist per QEMU.
OBJECT_ID = "pve-vmstate"
QOM_TYPE = "dbus-vmstate"
#: Where sd-bus and QEMU find the system bus unless DBUS_SYSTEM_BUS_ADDRESS says otherwise.
SYSTEM_BUS_ADDRESS = "unix:path=/run/dbus/system_bus_socket"
#: Final states of an outgoing migration (``query-migrate``).
MIGRATION_DONE = frozenset({"completed", "failed", "cancelled"})
#: Polling QEMU: first interval, growth, longest interval (seconds).
POLL_FIRST, POLL_GROWTH, POLL_MAX = 0.05, 1.5, 1.0

ClientFactory = Callable[[str], QMPClient]


def default_qmp_socket(vmid: int) -> str:
    """The monitor socket qemu-server gives VM ``vmid``."""
    return "/var/run/qemu-server/%d.qmp" % vmid


def system_bus_address(environ: Mapping[str, str] = os.environ) -> str:
    """The address of the bus the helper connects to, which QEMU must use too.

    sd-bus reads DBUS_SYSTEM_BUS_ADDRESS the same way, so both end up on one bus.
    """
    return environ.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS_ADDRESS


class QemuObject:
    """The ``dbus-vmstate`` object of one VM's QEMU.

    :param qmp_socket: the VM's monitor socket
    :param bus_address: the D-Bus address QEMU connects to (the helper's bus)
    :param helper_id: the helper's ``Id``, the object's only ``id-list`` entry
    :param client_factory: opens a QMP session for a socket path
    """

    def __init__(self, qmp_socket: str, bus_address: str, helper_id: str,
                 client_factory: ClientFactory = QMPClient) -> None:
        self.qmp_socket = qmp_socket
        self.bus_address = bus_address
        self.helper_id = helper_id
        self._client = client_factory

    async def _has_object(self, qmp: QMPClient) -> bool:
        try:
            objects = await qmp.execute("qom-list", {"path": "/objects"})
        except QMPExecuteError as err:
            # QEMU makes /objects on first use: a QEMU without any -object has none.
            if err.error_class == "DeviceNotFound":
                return False
            raise
        return any(isinstance(o, dict) and o.get("name") == OBJECT_ID for o in objects or ())

    async def add(self) -> bool:
        """Add the object, replacing one left over from an earlier helper.

        A left-over object may carry another bus address or Id list, and the
        helper it was made for is gone; removing and re-adding is the one way
        to be sure it matches this helper.

        :returns: whether a left-over object was replaced
        :raises QMPError: when QEMU cannot be reached or refuses the object
        """
        async with self._client(self.qmp_socket) as qmp:
            replaced = await self._has_object(qmp)
            if replaced:
                await qmp.execute("object-del", {"id": OBJECT_ID})
            await qmp.execute("object-add", {"qom-type": QOM_TYPE, "id": OBJECT_ID,
                                             "addr": self.bus_address, "id-list": self.helper_id})
        return replaced

    async def remove(self) -> bool:
        """Remove the object if QEMU has it.

        :returns: whether there was one to remove
        :raises QMPError: when QEMU cannot be reached or refuses
        """
        async with self._client(self.qmp_socket) as qmp:
            if not await self._has_object(qmp):
                return False
            await qmp.execute("object-del", {"id": OBJECT_ID})
            return True

    async def vm_status(self) -> str:
        """QEMU's run state (``running``, ``inmigrate``, ``postmigrate`` ...).

        :raises QMPError: when QEMU cannot be reached
        """
        async with self._client(self.qmp_socket) as qmp:
            reply = await qmp.execute("query-status")
        return str(reply.get("status", "unknown")) if isinstance(reply, dict) else "unknown"

    async def migration_status(self) -> str:
        """The state of this QEMU's outgoing migration, ``none`` if it never had one.

        :raises QMPError: when QEMU cannot be reached
        """
        async with self._client(self.qmp_socket) as qmp:
            reply = await qmp.execute("query-migrate")
        return str(reply.get("status", "none")) if isinstance(reply, dict) else "none"

    async def wait_incoming_done(self, timeout: float) -> str | None:
        """Poll until QEMU has left ``inmigrate``.

        :returns: the new run state, or None when ``timeout`` passed first
        :raises QMPError: when QEMU cannot be reached
        """
        return await _poll(self.vm_status, lambda s: s != "inmigrate", timeout)

    async def wait_outgoing_done(self, timeout: float) -> str | None:
        """Poll until the outgoing migration has completed, failed or been cancelled.

        :returns: the final migration state, or None when ``timeout`` passed first
        :raises QMPError: when QEMU cannot be reached
        """
        return await _poll(self.migration_status, MIGRATION_DONE.__contains__, timeout)


async def _poll(query: Callable[[], Awaitable[str]], done: Callable[[str], bool], timeout: float) -> str | None:
    # Bounded in time and in frequency: QEMU's monitor is shared with
    # qemu-server, so the interval grows from 50 ms to 1 s.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    interval = POLL_FIRST
    while True:
        state = await query()
        if done(state):
            return state
        if loop.time() + interval > deadline:
            return None
        await asyncio.sleep(interval)
        interval = min(interval * POLL_GROWTH, POLL_MAX)

