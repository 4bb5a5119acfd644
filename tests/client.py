"""A D-Bus client for tests: a second connection that calls the helper like QEMU does."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from sdbus import DbusNameHasNoOwnerError, sd_bus_open_system

from pvevmstate.dbus.api import (
    BUS_DRIVER_NAME,
    BUS_DRIVER_PATH,
    VMSTATE_NAME,
    VMSTATE_PATH,
    BusDriver,
    VMState1Interface,
    VMStateHelperInterface,
    helper_bus_name,
)


def open_bus(address: str | None = None) -> Any:
    """Connect to the session-wide private bus, or to the bus at ``address``.

    sd-bus takes the system bus address only from the environment.
    """
    if address is None:
        return sd_bus_open_system()
    old = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address
    try:
        return sd_bus_open_system()
    finally:
        if old is None:
            del os.environ["DBUS_SYSTEM_BUS_ADDRESS"]
        else:
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = old


async def _with_bus(address: str | None, fn: Any, *args: Any) -> Any:
    bus = open_bus(address)
    try:
        return await fn(bus, *args)
    finally:
        bus.close()


def _run(fn: Any, *args: Any, address: str | None = None) -> Any:
    return asyncio.run(_with_bus(address, fn, *args))


async def _save(bus: Any, dest: str) -> bytes:
    return bytes(await VMState1Interface.new_proxy(dest, VMSTATE_PATH, bus).save())


async def _load(bus: Any, dest: str, data: bytes) -> None:
    await VMState1Interface.new_proxy(dest, VMSTATE_PATH, bus).load(data)


async def _id(bus: Any, dest: str) -> str:
    return str(await VMState1Interface.new_proxy(dest, VMSTATE_PATH, bus).id.get_async())


async def _count(bus: Any, dest: str) -> int:
    return int(await VMStateHelperInterface.new_proxy(dest, VMSTATE_PATH, bus).num_migrated_entries.get_async())


async def _quit(bus: Any, dest: str) -> None:
    await VMStateHelperInterface.new_proxy(dest, VMSTATE_PATH, bus).quit()


async def _queued(bus: Any) -> list[str]:
    try:
        return list(await BusDriver.new_proxy(BUS_DRIVER_NAME, BUS_DRIVER_PATH, bus).list_queued_owners(VMSTATE_NAME))
    except DbusNameHasNoOwnerError:
        return []


async def _has_owner(bus: Any, name: str) -> bool:
    return bool(await BusDriver.new_proxy(BUS_DRIVER_NAME, BUS_DRIVER_PATH, bus).name_has_owner(name))


async def _owner(bus: Any, name: str) -> str:
    return str(await BusDriver.new_proxy(BUS_DRIVER_NAME, BUS_DRIVER_PATH, bus).get_name_owner(name))


def vm(vmid: int) -> str:
    return helper_bus_name(vmid)


def save(dest: str, address: str | None = None) -> bytes:
    return bytes(_run(_save, dest, address=address))


def load(dest: str, data: bytes, address: str | None = None) -> None:
    _run(_load, dest, data, address=address)


def get_id(dest: str, address: str | None = None) -> str:
    return str(_run(_id, dest, address=address))


def count(dest: str, address: str | None = None) -> int:
    return int(_run(_count, dest, address=address))


def quit_helper(dest: str, address: str | None = None) -> None:
    _run(_quit, dest, address=address)


def queued_owners(address: str | None = None) -> list[str]:
    return list(_run(_queued, address=address))


def has_owner(name: str, address: str | None = None) -> bool:
    return bool(_run(_has_owner, name, address=address))


def owner(name: str, address: str | None = None) -> str:
    return str(_run(_owner, name, address=address))
