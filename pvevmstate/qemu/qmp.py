"""A small asyncio client for QEMU's monitor protocol (QMP), shaped like qemu.qmp.

qemu.qmp is not packaged in Debian, and the helper needs little of it: one
short session per operation (greeting, ``qmp_capabilities``, a few
``execute`` calls, close). A QMP socket serves one client at a time and
qemu-server uses the same socket, so a session is never kept open longer
than its commands take, and every step has a timeout.

    async with QMPClient("/var/run/qemu-server/100.qmp") as qmp:
        status = await qmp.execute("query-status")
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from ..errors import QMPConnectError, QMPError, QMPExecuteError, QMPTimeoutError

log = logging.getLogger(__name__)

#: Seconds each step (connect, greeting, one command) may take. QEMU answers
#: at once unless its main loop is busy, e.g. in a migration's stop-and-copy
#: phase, where it may sit for the whole downtime plus our own Save.
DEFAULT_TIMEOUT = 10.0
#: Longest QMP message we accept; replies we ask for are a few hundred bytes.
MAX_MESSAGE = 1 << 20
#: How long a refused connection is retried. QEMU's monitor can refuse for a
#: moment while it re-arms after another client (qemu-server, a probe) left;
#: a QEMU that is gone leaves a socket that refuses for good, and that must
#: still be reported quickly. First retry interval, and the longest.
REFUSED_RETRY = 1.0
REFUSED_FIRST, REFUSED_MAX = 0.02, 0.2


class QMPClient:
    """One QMP session on a unix socket.

    :param path: the monitor socket (``/var/run/qemu-server/VMID.qmp`` on Proxmox)
    :param timeout: seconds for each step
    """

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.greeting: dict[str, Any] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._next_id = 0

    async def __aenter__(self) -> QMPClient:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, read the greeting and leave capabilities negotiation mode.

        :raises QMPConnectError: when the socket is missing or refuses, QEMU
            does not greet in time (another client holds the monitor), or the
            peer does not speak QMP
        """
        loop = asyncio.get_running_loop()
        give_up = loop.time() + REFUSED_RETRY
        interval = REFUSED_FIRST
        while True:
            try:
                async with asyncio.timeout(self.timeout):
                    self._reader, self._writer = await asyncio.open_unix_connection(self.path, limit=MAX_MESSAGE)
                break
            except TimeoutError as err:
                raise QMPConnectError("connecting to %s timed out" % self.path) from err
            except ConnectionRefusedError as err:
                if loop.time() + interval > give_up:
                    raise QMPConnectError("cannot connect to %s: %s" % (self.path, err.strerror or err)) from err
                await asyncio.sleep(interval)
                interval = min(interval * 2, REFUSED_MAX)
            except OSError as err:
                raise QMPConnectError("cannot connect to %s: %s" % (self.path, err.strerror or err)) from err
        try:
            greeting = await self._receive("the greeting", QMPConnectError)
            if not isinstance(greeting.get("QMP"), dict):
                raise QMPConnectError("%s did not greet with QMP" % self.path)
            self.greeting = greeting["QMP"]
            await self.execute("qmp_capabilities")
        except QMPConnectError:
            await self.close()
            raise
        except QMPError as err:
            await self.close()
            raise QMPConnectError("QMP negotiation on %s failed: %s" % (self.path, err)) from err
        except BaseException:
            # Cancelled during the handshake (the teardown stops a migration
            # follower): ``async with`` does not close a session whose
            # connect did not return, and the monitor serves one client at a
            # time, so an open socket left to the garbage collector would
            # keep the next session (the object's removal) from its greeting.
            self._abort()
            raise

    def _abort(self) -> None:
        """Close the connection now, without waiting (for a cancelled caller)."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()

    async def close(self) -> None:
        """Close the session; never raises."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is None:
            return
        writer.close()
        try:
            async with asyncio.timeout(self.timeout):
                await writer.wait_closed()
        except (TimeoutError, OSError) as err:
            log.debug("closing QMP session on %s: %s", self.path, err)

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run one command and return its ``return`` value.

        Events that arrive meanwhile are skipped: the helper subscribes to none.

        :param command: e.g. ``object-add``
        :param arguments: the command's arguments
        :raises QMPExecuteError: QEMU answered with an error (class and description kept)
        :raises QMPTimeoutError: no answer within the timeout
        :raises QMPError: the connection broke or the peer sent garbage
        """
        if self._writer is None:
            raise QMPError("QMP session on %s is not open" % self.path)
        self._next_id += 1
        msg_id = "pvevmstate-%d" % self._next_id
        message: dict[str, object] = {"execute": command, "id": msg_id}
        if arguments:
            message["arguments"] = dict(arguments)
        self._writer.write(json.dumps(message).encode() + b"\n")
        try:
            async with asyncio.timeout(self.timeout):
                await self._writer.drain()
        except TimeoutError as err:
            raise QMPTimeoutError("sending %s to %s timed out" % (command, self.path)) from err
        except OSError as err:
            raise QMPError("sending %s to %s failed: %s" % (command, self.path, err)) from err
        while True:
            reply = await self._receive(command)
            if "event" in reply:
                log.debug("QMP event skipped: %s", reply.get("event"))
                continue
            if reply.get("id") != msg_id:
                raise QMPError("%s: unexpected reply to %s: %.200s" % (self.path, command, reply))
            if "return" in reply:
                return reply["return"]
            error = reply.get("error")
            if isinstance(error, dict):
                raise QMPExecuteError(command, str(error.get("class", "GenericError")),
                                      str(error.get("desc", "")))
            raise QMPError("%s: malformed reply to %s: %.200s" % (self.path, command, reply))

    async def _receive(self, what: str, on_timeout: type[QMPError] = QMPTimeoutError) -> dict[str, Any]:
        assert self._reader is not None
        try:
            async with asyncio.timeout(self.timeout):
                line = await self._reader.readline()
        except TimeoutError as err:
            # Without a greeting, another client (qemu-server) most likely holds the monitor.
            raise on_timeout("%s: no answer to %s within %.0f s" % (self.path, what, self.timeout)) from err
        except (OSError, ValueError) as err:  # ValueError: a line over MAX_MESSAGE
            raise QMPError("%s: reading the answer to %s failed: %s" % (self.path, what, err)) from err
        if not line:
            raise QMPError("%s: QEMU closed the connection before answering %s" % (self.path, what))
        try:
            message = json.loads(line)
        except ValueError as err:
            raise QMPError("%s: not JSON in answer to %s: %.100r" % (self.path, what, line)) from err
        if not isinstance(message, dict):
            raise QMPError("%s: not a QMP message in answer to %s: %.100r" % (self.path, what, line))
        return message
