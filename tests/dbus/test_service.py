"""The service on a private system bus, called through a second connection,
with fake domain collaborators: error names, degradation, no leaked internals."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from sdbus import DbusFailedError, SdBus, sd_bus_open_system

from pvevmstate import payload
from pvevmstate.dbus.api import VMSTATE_PATH, VMState1Interface, VMStateHelperInterface
from pvevmstate.dbus.service import VMStateService
from pvevmstate.errors import ConntrackError, VMStateError
from pvevmstate.model import AF_INET, CreateBatch, CreateResult, Entry, TableStats
from pvevmstate.vmstate import SaveReport, VMState
from tests.corpus import entry_kinds
from tests.support import PrivateBus


class FakeBackend:
    def __init__(self, dump: list[Entry] | Exception, create: CreateResult | Exception) -> None:
        self._dump, self._create = dump, create
        self.created: list[bytes] = []

    def dump(self, mark: int) -> list[Entry]:
        if isinstance(self._dump, Exception):
            raise self._dump
        return self._dump

    def reserve_seqs(self, n: int) -> int:
        return 1

    def create(self, batch: CreateBatch) -> CreateResult:
        if isinstance(self._create, Exception):
            raise self._create
        self.created.extend(batch.requests() if batch.wire is not None else batch.bodies)
        return self._create

    def stats(self) -> TableStats:
        return TableStats(len(self.created), 262144)

    def close(self) -> None:
        pass


class FakeLifecycle:
    def __init__(self, quit_error: Exception | None = None) -> None:
        self.done: list[str] = []
        self.quits = 0
        self._quit_error = quit_error

    def work_done(self, member: str) -> None:
        self.done.append(member)

    async def quit(self) -> None:
        self.quits += 1
        if self._quit_error is not None:
            raise self._quit_error


Body = Callable[[VMState1Interface, VMStateHelperInterface], Awaitable[None]]


NAME = "com.proxmox.VMStateHelper.VM100"


@contextlib.asynccontextmanager
async def served(backend: FakeBackend, lifecycle: FakeLifecycle
                 ) -> AsyncIterator[tuple[VMState1Interface, VMStateHelperInterface, SdBus]]:
    """A service exported on one connection: its proxies on another, and that connection."""
    server: SdBus = sd_bus_open_system()
    caller: SdBus = sd_bus_open_system()
    service = VMStateService(VMState(100, backend), lifecycle)
    handle = service.export_to_dbus(VMSTATE_PATH, server)
    await server.request_name_async(NAME, 0)
    try:
        yield (VMState1Interface.new_proxy(NAME, VMSTATE_PATH, caller),
               VMStateHelperInterface.new_proxy(NAME, VMSTATE_PATH, caller), caller)
    finally:
        handle.stop()
        caller.close()
        server.close()


def serve(backend: FakeBackend, lifecycle: FakeLifecycle, body: Body) -> None:
    """Export a service on one connection and run ``body`` against it from another."""

    async def main() -> None:
        async with served(backend, lifecycle) as (vm, helper, _caller):
            await body(vm, helper)
            await asyncio.sleep(0)

    asyncio.run(main())


@pytest.fixture(autouse=True)
def _bus(system_bus: PrivateBus) -> None:
    """Every test here talks over the private bus."""


@pytest.mark.parametrize("failure", [ConntrackError("dump failed", 1), RuntimeError("secret /internal/path")])
def test_save_never_fails_on_the_bus(failure: Exception, caplog: pytest.LogCaptureFixture) -> None:
    lifecycle = FakeLifecycle()

    async def body(vm: VMState1Interface, helper: VMStateHelperInterface) -> None:
        assert await vm.save() == b"\x00"
        assert await helper.num_migrated_entries == 0

    serve(FakeBackend(failure, CreateResult()), lifecycle, body)
    assert lifecycle.done == ["Save"]
    assert "Save failed" in caplog.text


def test_load_never_fails_on_the_bus(caplog: pytest.LogCaptureFixture) -> None:
    lifecycle = FakeLifecycle()
    line = (b"-A -t 5 -s 10.0.0.1 -d 10.0.0.2 -r 10.0.0.2 -q 10.0.0.1 -p udp --sport 1 --dport 2 --mark 100\n")

    async def body(vm: VMState1Interface, helper: VMStateHelperInterface) -> None:
        await vm.load(line)
        await vm.load(b"\xff" * 1000)

    serve(FakeBackend([], ConntrackError("create failed", 12)), lifecycle, body)
    assert lifecycle.done == ["Load", "Load"]
    assert "Load failed, answering without state: create failed: ENOMEM" in caplog.text


def test_load_counts_what_was_created() -> None:
    backend = FakeBackend([], CreateResult(created=1))
    line = (b"-A -t 5 -s 10.0.0.1 -d 10.0.0.2 -r 10.0.0.2 -q 10.0.0.1 -p udp --sport 1 --dport 2\n")

    async def body(vm: VMState1Interface, helper: VMStateHelperInterface) -> None:
        await vm.load(line)
        assert await helper.num_migrated_entries == 1
        assert await vm.id == "pve-vmstate-100"

    serve(backend, FakeLifecycle(), body)
    assert len(backend.created) == 1


@pytest.mark.parametrize(("failure", "name", "text"), [
    (VMStateError("QEMU is gone"), "com.proxmox.VMStateHelper.Error.Failed", "Quit failed: QEMU is gone"),
    (KeyError("/secret/internal"), "com.proxmox.VMStateHelper.Error.Internal", "internal error"),
])
def test_quit_errors_are_translated_without_internals(failure: Exception, name: str, text: str) -> None:
    seen: dict[str, Any] = {}

    async def body(vm: VMState1Interface, helper: VMStateHelperInterface) -> None:
        with pytest.raises(DbusFailedError) as exc:
            await helper.quit()
        seen["error"] = exc.value

    lifecycle = FakeLifecycle(failure)
    serve(FakeBackend([], CreateResult()), lifecycle, body)
    assert lifecycle.quits == 1
    err = seen["error"]
    assert err.dbus_error_name == name
    assert text in str(err) and "secret" not in str(err)


def test_quit_asks_the_lifecycle_once_and_answers() -> None:
    lifecycle = FakeLifecycle()

    async def body(vm: VMState1Interface, helper: VMStateHelperInterface) -> None:
        await helper.quit()
        assert lifecycle.quits == 1

    serve(FakeBackend([], CreateResult()), lifecycle, body)
    assert lifecycle.quits == 1 and lifecycle.done == []


def test_id_is_read_only() -> None:
    async def body(vm: VMState1Interface, helper: VMStateHelperInterface) -> None:
        with pytest.raises(DbusFailedError):
            await vm.id.set_async("pve-vmstate-101")
        assert await vm.id == "pve-vmstate-100"

    serve(FakeBackend([], CreateResult()), FakeLifecycle(), body)


def test_drained_waits_for_the_reply_of_a_running_save() -> None:
    release = threading.Event()

    class SlowBackend(FakeBackend):
        def dump(self, mark: int) -> list[Entry]:
            release.wait(10)
            return []

    async def main() -> None:
        server: SdBus = sd_bus_open_system()
        caller: SdBus = sd_bus_open_system()
        service = VMStateService(VMState(100, SlowBackend([], CreateResult())), FakeLifecycle())
        handle = service.export_to_dbus(VMSTATE_PATH, server)
        await server.request_name_async("com.proxmox.VMStateHelper.VM100", 0)
        try:
            proxy = VMState1Interface.new_proxy("com.proxmox.VMStateHelper.VM100", VMSTATE_PATH, caller)
            save = asyncio.create_task(proxy.save())
            await asyncio.sleep(0.2)
            drained = asyncio.create_task(service.drained())
            await asyncio.sleep(0.2)
            assert not drained.done() and not save.done()
            release.set()
            assert await save == b"\x00"
            await asyncio.wait_for(drained, 5)
        finally:
            handle.stop()
            caller.close()
            server.close()

    asyncio.run(main())


def test_save_counts_what_it_sent_and_announces_it() -> None:
    entries = [e for e in entry_kinds() if e.family == AF_INET][:3]

    async def main() -> None:
        async with served(FakeBackend(entries, CreateResult()), FakeLifecycle()) as (vm, helper, caller):
            changes: asyncio.Queue[Any] = asyncio.Queue()
            # Returns once dbus-daemon has the match: no signal can slip by.
            match = await caller.match_signal_async(NAME, VMSTATE_PATH, "org.freedesktop.DBus.Properties",
                                                    "PropertiesChanged",
                                                    lambda m: changes.put_nowait(m.get_contents()))
            try:
                assert len(await vm.save()) > 1
                # Set before the loop reads anything after the answer: a Get right after it sees it.
                assert await helper.num_migrated_entries == 3
                interface, changed, _ = await asyncio.wait_for(changes.get(), 5)
                assert interface == "com.proxmox.VMStateHelper"
                assert changed == {"NumMigratedEntries": ("u", 3)}
            finally:
                match.close()

    asyncio.run(main())


def test_save_answers_before_it_frees_what_the_work_left() -> None:
    # Freeing Save's scan takes ~0.3 ms at 5,000 entries: after the answer,
    # which sdbus sends as soon as the method returns.
    class Spent:
        pass

    async def main() -> None:
        spent = Spent()
        left = weakref.ref(spent)
        state = VMState(100, FakeBackend([], CreateResult()))
        reports = [SaveReport(payload.Payload(b"\x00", payload.Format.NONE, 0), 0, 0.0, spent=spent)]
        del spent

        async def save() -> SaveReport:
            return reports.pop()  # the service holds the only reference

        state.save = save  # type: ignore[method-assign]
        service = VMStateService(state, FakeLifecycle())
        assert await service.save() == b"\x00"
        assert left() is not None  # still held when the method returns (when sdbus answers)
        await asyncio.sleep(0)
        assert left() is None

    asyncio.run(main())
