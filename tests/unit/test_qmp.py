"""The QMP client and the QEMU object logic against a scripted QMP server.

The server speaks QMP the way QEMU 7.2 does (greeting, CRLF-terminated JSON,
``id`` echoed, events in between); the real QEMU is used by the integration tests.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from pvevmstate.errors import QMPConnectError, QMPError, QMPExecuteError, QMPTimeoutError
from pvevmstate.qemu.qmp import QMPClient
from pvevmstate.qemu.vmobject import QemuObject, system_bus_address

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}
Handler = Callable[[dict[str, Any]], Any]


class ScriptedQEMU:
    """A unix-socket QMP server; ``handler`` maps a command to its reply body."""

    def __init__(self, path: Path, handler: Handler, greeting: object = GREETING) -> None:
        self.path = path
        self.handler = handler
        self.greeting = greeting
        self.commands: list[dict[str, Any]] = []
        self.sessions = 0
        self.closed = 0

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        try:
            if self.greeting is not None:
                writer.write(json.dumps(self.greeting).encode() + b"\r\n")
            while line := await reader.readline():
                cmd = json.loads(line)
                self.commands.append(cmd)
                if cmd["execute"] == "qmp_capabilities":
                    reply: Any = {"return": {}}
                else:
                    reply = self.handler(cmd)
                if reply is None:
                    continue
                for message in reply if isinstance(reply, list) else [reply]:
                    if isinstance(message, bytes):
                        writer.write(message)
                        continue
                    answer = dict(message, id=cmd["id"]) if "return" in message or "error" in message else message
                    writer.write(json.dumps(answer).encode() + b"\r\n")
            self.closed += 1
        finally:
            writer.close()

    def names(self) -> list[str]:
        return [c["execute"] for c in self.commands]


def run(server: ScriptedQEMU, body: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        srv = await asyncio.start_unix_server(server.session, str(server.path))
        try:
            return await body()
        finally:
            srv.close()
            await srv.wait_closed()

    return asyncio.run(main())


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "100.qmp"


def test_execute_returns_the_value_and_skips_events(sock: Path) -> None:
    def handler(cmd: dict[str, Any]) -> Any:
        return [{"event": "STOP", "timestamp": {}}, {"return": {"status": "running"}}]

    server = ScriptedQEMU(sock, handler)

    async def body() -> Any:
        async with QMPClient(str(sock), timeout=2) as qmp:
            assert qmp.greeting["version"]["qemu"]["major"] == 7
            return await qmp.execute("query-status")

    assert run(server, body) == {"status": "running"}
    assert server.names() == ["qmp_capabilities", "query-status"]
    assert len({c["id"] for c in server.commands}) == 2
    assert server.closed == 1


def test_errors_carry_class_and_description(sock: Path) -> None:
    server = ScriptedQEMU(sock, lambda cmd: {"error": {"class": "GenericError",
                                                        "desc": "There is already an instance of dbus-vmstate"}})

    async def body() -> QMPExecuteError:
        async with QMPClient(str(sock), timeout=2) as qmp:
            with pytest.raises(QMPExecuteError) as exc:
                await qmp.execute("object-add", {"id": "x"})
            return exc.value

    err = run(server, body)
    assert (err.command, err.error_class, err.desc) == ("object-add", "GenericError",
                                                        "There is already an instance of dbus-vmstate")
    assert server.commands[-1]["arguments"] == {"id": "x"}


def test_missing_socket_is_a_connect_error(sock: Path) -> None:
    async def body() -> None:
        with pytest.raises(QMPConnectError, match="cannot connect"):
            await QMPClient(str(sock.with_name("gone.qmp")), timeout=1).connect()

    run(ScriptedQEMU(sock, lambda cmd: None), body)


def test_no_greeting_times_out_as_a_connect_error(sock: Path) -> None:
    # What a client sees while qemu-server holds the monitor: connected, no greeting.
    async def body() -> None:
        with pytest.raises(QMPConnectError, match="greeting"):
            await QMPClient(str(sock), timeout=0.2).connect()

    run(ScriptedQEMU(sock, lambda cmd: None, greeting=None), body)


def test_a_handshake_cancelled_closes_the_connection(sock: Path) -> None:
    # The teardown cancels a migration follower that may be in its handshake;
    # the monitor serves one client at a time, so that connection must close
    # at once, not when the garbage collector finds it.
    server = ScriptedQEMU(sock, lambda cmd: None, greeting=None)

    async def body() -> None:
        client = QMPClient(str(sock), timeout=30)
        task = asyncio.create_task(client.connect())
        while server.sessions == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if server.closed:
                break
            await asyncio.sleep(0.01)
        assert server.closed == 1
        del client, task

    run(server, body)


def test_not_qmp_is_a_connect_error(sock: Path) -> None:
    async def body() -> None:
        with pytest.raises(QMPConnectError, match="did not greet"):
            await QMPClient(str(sock), timeout=1).connect()

    run(ScriptedQEMU(sock, lambda cmd: None, greeting={"hello": 1}), body)


def test_unanswered_command_times_out(sock: Path) -> None:
    async def body() -> None:
        async with QMPClient(str(sock), timeout=0.2) as qmp:
            with pytest.raises(QMPTimeoutError):
                await qmp.execute("query-migrate")

    run(ScriptedQEMU(sock, lambda cmd: None), body)


@pytest.mark.parametrize("reply", [b"not json\r\n", b"[1, 2]\r\n", b'{"return": 1, "id": "other"}\r\n'])
def test_garbage_is_an_error(sock: Path, reply: bytes) -> None:
    async def body() -> None:
        async with QMPClient(str(sock), timeout=1) as qmp:
            with pytest.raises(QMPError):
                await qmp.execute("query-status")

    run(ScriptedQEMU(sock, lambda cmd: [reply]), body)


def test_closed_connection_is_an_error(sock: Path) -> None:
    def handler(cmd: dict[str, Any]) -> Any:
        raise ConnectionResetError  # ends the server's session

    async def body() -> None:
        async with QMPClient(str(sock), timeout=1) as qmp:
            with pytest.raises(QMPError, match="closed the connection"):
                await qmp.execute("query-status")

    run(ScriptedQEMU(sock, handler), body)


class ObjectsQEMU(ScriptedQEMU):
    """Keeps a set of /objects and a run and migration state."""

    def __init__(self, path: Path, objects: set[str], status: list[str] | None = None,
                 migration: list[str] | None = None) -> None:
        super().__init__(path, self.handle)
        self.objects = objects
        self.status = status or ["running"]
        self.migration = migration or []

    def handle(self, cmd: dict[str, Any]) -> Any:
        name, args = cmd["execute"], cmd.get("arguments", {})
        if name == "qom-list":
            return {"return": [{"name": "type", "type": "string"}]
                    + [{"name": o, "type": "child<dbus-vmstate>"} for o in sorted(self.objects)]}
        if name == "object-del":
            self.objects.remove(args["id"])
            return {"return": {}}
        if name == "object-add":
            if self.objects:
                return {"error": {"class": "GenericError", "desc": "There is already an instance of dbus-vmstate"}}
            self.objects.add(args["id"])
            return {"return": {}}
        if name == "query-status":
            return {"return": {"status": self.status.pop(0) if len(self.status) > 1 else self.status[0]}}
        if name == "query-migrate":
            if not self.migration:
                return {"return": {}}
            return {"return": {"status": self.migration.pop(0) if len(self.migration) > 1 else self.migration[0]}}
        return {"error": {"class": "CommandNotFound", "desc": name}}


def qemu_object(sock: Path) -> QemuObject:
    return QemuObject(str(sock), "unix:path=/run/dbus/system_bus_socket", "pve-vmstate-100",
                      lambda path: QMPClient(path, timeout=2))


def test_add_replaces_a_left_over_object_in_one_session(sock: Path) -> None:
    server = ObjectsQEMU(sock, {"pve-vmstate"})
    assert run(server, qemu_object(sock).add) is True
    assert server.names() == ["qmp_capabilities", "qom-list", "object-del", "object-add"]
    assert server.commands[-1]["arguments"] == {
        "qom-type": "dbus-vmstate", "id": "pve-vmstate",
        "addr": "unix:path=/run/dbus/system_bus_socket", "id-list": "pve-vmstate-100"}
    assert server.sessions == 1 and server.closed == 1


def test_add_without_left_over(sock: Path) -> None:
    server = ObjectsQEMU(sock, set())
    assert run(server, qemu_object(sock).add) is False
    assert server.objects == {"pve-vmstate"}


def test_add_to_a_qemu_without_objects_container(sock: Path) -> None:
    # QEMU 7.2 makes /objects only on first use: qom-list answers DeviceNotFound.
    server = ObjectsQEMU(sock, set())
    handle = server.handler
    server.handler = lambda cmd: ({"error": {"class": "DeviceNotFound", "desc": "Device '/objects' not found"}}
                                  if cmd["execute"] == "qom-list" else handle(cmd))
    assert run(server, qemu_object(sock).add) is False
    assert server.objects == {"pve-vmstate"}


def test_add_refused_raises(sock: Path) -> None:
    server = ObjectsQEMU(sock, {"someone-elses"})

    async def body() -> None:
        with pytest.raises(QMPExecuteError, match="already an instance"):
            await qemu_object(sock).add()

    run(server, body)
    assert server.objects == {"someone-elses"}


def test_remove_only_what_is_there(sock: Path) -> None:
    server = ObjectsQEMU(sock, {"pve-vmstate"})
    obj = qemu_object(sock)

    async def body() -> tuple[bool, bool]:
        return await obj.remove(), await obj.remove()

    assert run(server, body) == (True, False)
    assert server.names().count("object-del") == 1
    assert server.sessions == 2


def test_follow_incoming_until_inmigrate_is_left(sock: Path) -> None:
    server = ObjectsQEMU(sock, set(), status=["inmigrate", "inmigrate", "paused"])
    assert run(server, lambda: qemu_object(sock).wait_incoming_done(5)) == "paused"
    assert server.names().count("query-status") == 3
    # One session per poll: the monitor is never held between polls.
    assert server.sessions == 3 == server.closed


@pytest.mark.parametrize(("states", "result"), [
    (["active", "device", "completed"], "completed"),
    (["active", "failed"], "failed"),
    (["cancelling", "cancelled"], "cancelled"),
])
def test_follow_outgoing_until_final(sock: Path, states: list[str], result: str) -> None:
    server = ObjectsQEMU(sock, set(), migration=states)
    assert run(server, lambda: qemu_object(sock).wait_outgoing_done(5)) == result


def test_following_is_bounded_in_time(sock: Path) -> None:
    server = ObjectsQEMU(sock, set(), migration=["active"])
    assert run(server, lambda: qemu_object(sock).wait_outgoing_done(0.3)) is None
    # 50 ms growing by half: a handful of polls, not a busy loop.
    assert 3 <= server.names().count("query-migrate") <= 6


def test_bus_address_follows_the_environment() -> None:
    assert system_bus_address({}) == "unix:path=/run/dbus/system_bus_socket"
    assert system_bus_address({"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/tmp/b"}) == "unix:path=/tmp/b"


def test_connect_retries_a_monitor_that_refuses_for_a_moment(sock: Path) -> None:
    # The socket file exists but nobody listens yet (as between two clients).
    placeholder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    placeholder.bind(str(sock))
    server = ScriptedQEMU(sock, lambda cmd: {"return": {"status": "running"}})

    async def main() -> Any:
        async def listen_later() -> asyncio.AbstractServer:
            await asyncio.sleep(0.15)
            placeholder.close()
            sock.unlink()
            return await asyncio.start_unix_server(server.session, str(sock))
        starting = asyncio.ensure_future(listen_later())
        async with QMPClient(str(sock), timeout=5) as qmp:
            reply = await qmp.execute("query-status")
        srv = await starting
        srv.close()
        await srv.wait_closed()
        return reply

    assert asyncio.run(main()) == {"status": "running"}


def test_connect_gives_up_on_a_socket_nobody_listens_on(sock: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(sock))  # what a killed QEMU leaves behind
        t0 = time.monotonic()
        with pytest.raises(QMPConnectError, match=r"cannot connect to .*: Connection refused"):
            asyncio.run(QMPClient(str(sock), timeout=10).connect())
        # Given up after the short refused-retry window, not the 10 s step timeout.
        assert time.monotonic() - t0 < 5
