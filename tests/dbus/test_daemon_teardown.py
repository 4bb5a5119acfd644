"""The daemon's teardown order, on the private bus with a fake QEMU object:
the migration follower is off the VM's monitor before the object is removed."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from typing import cast

import pytest
from sdbus import sd_bus_open_system

from pvevmstate.daemon import Daemon, Settings
from pvevmstate.dbus.api import VMSTATE_PATH, VMState1Interface, VMStateHelperInterface, helper_bus_name
from pvevmstate.model import CreateBatch, CreateResult, Entry, TableStats
from pvevmstate.qemu.vmobject import QemuObject
from tests.support import PrivateBus


class EmptyTable:
    def dump(self, mark: int) -> list[Entry]:
        return []

    def reserve_seqs(self, n: int) -> int:
        return 1

    def create(self, batch: CreateBatch) -> CreateResult:
        return CreateResult(created=len(batch))

    def stats(self) -> TableStats:
        return TableStats(0, 262144)

    def close(self) -> None:
        pass


class OneClientMonitor:
    """Stands in for the VM's QEMU object; its monitor serves one session at a time."""

    helper_id = "pve-vmstate-100"
    qmp_socket = "/nonexistent/100.qmp"

    def __init__(self) -> None:
        self.session = False
        self.following = asyncio.Event()
        self.removed: list[bool] = []  # whether a session was still open at each removal

    async def add(self) -> bool:
        return False

    async def remove(self) -> bool:
        self.removed.append(self.session)
        return True

    async def _follow(self) -> str | None:
        self.session = True
        self.following.set()
        try:
            await asyncio.Event().wait()  # the migration never ends by itself
        finally:
            await asyncio.sleep(0.05)  # closing the session takes a moment
            self.session = False
        return None

    async def wait_outgoing_done(self, timeout: float) -> str | None:
        return await self._follow()

    async def wait_incoming_done(self, timeout: float) -> str | None:
        return await self._follow()


@pytest.fixture(autouse=True)
def _bus(system_bus: PrivateBus) -> None:
    """Every test here talks over the private bus."""


@pytest.fixture
def _signals() -> Iterator[None]:
    # The daemon leaves SIGTERM/SIGINT ignored at its end; give pytest its own back.
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.usefixtures("_signals")
def test_follower_leaves_the_monitor_before_the_object_is_removed() -> None:
    qemu = OneClientMonitor()

    async def main() -> int:
        # The fake has QemuObject's members the daemon uses; no QMP behind it.
        daemon = Daemon(Settings(100), backend_factory=EmptyTable, qemu=cast(QemuObject, qemu))
        run = asyncio.create_task(daemon.run())
        caller = sd_bus_open_system()
        try:
            vm = VMState1Interface.new_proxy(helper_bus_name(100), VMSTATE_PATH, caller)
            helper = VMStateHelperInterface.new_proxy(helper_bus_name(100), VMSTATE_PATH, caller)
            for _ in range(200):
                if daemon.registered:
                    break
                await asyncio.sleep(0.01)
            assert await vm.save() == b"\x00"
            await asyncio.wait_for(qemu.following.wait(), 5)  # the follower holds the monitor now
            await helper.quit()
            return await asyncio.wait_for(run, 10)
        finally:
            caller.close()

    assert asyncio.run(main()) == 0
    assert qemu.removed == [False]


def test_the_bus_layer_does_not_need_pyroute2() -> None:
    # Only the conntrack adapter talks netlink: the daemon, the service and
    # Save/Load's logic load without it (and their tests run without it).
    import subprocess
    import sys

    code = ("import sys, pvevmstate.daemon, pvevmstate.dbus.service, pvevmstate.vmstate, pvevmstate.payload; "
            "sys.exit('pyroute2' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_a_task_that_swallows_a_cancellation_still_ends() -> None:
    from pvevmstate.daemon import _cancelled

    async def stubborn() -> None:
        # Loses the first cancellation, as asyncio.wait_for can in Python 3.11
        # when the awaited call completes at the same moment.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(60)
        await asyncio.sleep(60)

    async def main() -> bool:
        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        await asyncio.wait_for(_cancelled(task), 5)
        return task.cancelled()

    assert asyncio.run(main())
