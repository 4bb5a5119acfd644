"""A D-Bus client for tests: a second connection that calls the helper like QEMU does."""

from __future__ import annotations

import asyncio
from typing import Any

from sdbus import DbusNameHasNoOwnerError, sd_bus_open_system

from pvevmstate.dbus_api import (
    BUS_DRIVER_NAME,
    BUS_DRIVER_PATH,
    VMSTATE_NAME,
    VMSTATE_PATH,
    BusDriver,
    VMState1Interface,
    VMStateHelperInterface,
    helper_bus_name,
)


async def _with_bus(fn: Any, *args: Any) -> Any:
    bus = sd_bus_open_system()
    try:
        return await fn(bus, *args)
    finally:
        bus.close()


def _run(fn: Any, *args: Any) -> Any:
    return asyncio.run(_with_bus(fn, *args))


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


def save(dest: str) -> bytes:
    return bytes(_run(_save, dest))


def load(dest: str, data: bytes) -> None:
    _run(_load, dest, data)


def get_id(dest: str) -> str:
    return str(_run(_id, dest))


def count(dest: str) -> int:
    return int(_run(_count, dest))


def quit_helper(dest: str) -> None:
    _run(_quit, dest)


def queued_owners() -> list[str]:
    return list(_run(_queued))


def has_owner(name: str) -> bool:
    return bool(_run(_has_owner, name))


def owner(name: str) -> str:
    return str(_run(_owner, name))
