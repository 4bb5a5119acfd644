"""The exported D-Bus object: declared members wired to the domain code.

This is the one place where errors meet the bus. Save and Load never send an
error to QEMU, because a failed Save or Load makes the destination QEMU exit
and the VM is lost (QEMU's dbus-vmstate treats an error, an empty array or more
than 1 MiB from Save as a malformed section, and an error from Load fails the
whole incoming migration): they log and degrade. Control members
turn known errors into ``com.proxmox.VMStateHelper.Error.*`` replies and
unknown ones into a generic error, with details only in the journal.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, Protocol, TypeVar, cast

from sdbus import dbus_method_async_override, dbus_property_async_override

from ..errors import VMStateError
from ..payload import NO_STATE
from ..vmstate import SaveReport, VMState
from .api import (
    HelperError,
    HelperInternalError,
    VMState1Interface,
    VMStateHelperInterface,
    helper_id,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
Method = Callable[P, Coroutine[Any, Any, R]]


class Lifecycle(Protocol):
    """What the service tells the daemon."""

    def work_done(self, member: str) -> None:
        """A Save or Load (``member``) has been answered."""

    async def quit(self) -> None:
        """``Quit`` was called: clean up; the process ends after the reply."""


class _Raise:
    """Marker: the member answers errors with a D-Bus error."""


RAISE = _Raise()


def boundary(member: str, fallback: object = RAISE) -> Callable[[Method[P, R]], Method[P, R]]:
    """Where errors meet the bus: log them once, then degrade or translate.

    With a ``fallback`` the member never fails on the bus: it logs and answers
    the fallback (Save and Load, whose errors would cost QEMU the VM). Without
    one, known errors become :class:`HelperError` carrying their message and
    anything else becomes :class:`HelperInternalError` with no internals.
    Tracebacks go to DEBUG.

    :param member: the D-Bus member name, for the journal
    :param fallback: what to answer instead of an error
    """

    def wrap(fn: Method[P, R]) -> Method[P, R]:
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await fn(*args, **kwargs)
            except Exception as err:
                known = isinstance(err, VMStateError)
                degrade = not isinstance(fallback, _Raise)
                log.error("%s failed%s%s: %s", member, "" if known else " unexpectedly",
                          ", answering without state" if degrade else "",
                          err if known else "%s: %s" % (type(err).__name__, err))
                log.debug("%s failure", member, exc_info=True)
                if degrade:
                    # The decorated member's declared result type is the fallback's.
                    return cast(R, fallback)
                if known:
                    raise HelperError("%s failed: %s" % (member, err)) from err
                raise HelperInternalError("internal error, see the helper's journal") from err

        functools.update_wrapper(wrapper, fn)
        return wrapper

    return wrap


class VMStateService(VMState1Interface, VMStateHelperInterface):
    """``/org/qemu/VMState1`` for one VM.

    :param state: the domain object doing Save and Load
    :param lifecycle: told when work is done and when Quit is called
    """

    def __init__(self, state: VMState, lifecycle: Lifecycle) -> None:
        super().__init__()
        self._state = state
        self._lifecycle = lifecycle
        self._id = helper_id(state.vmid)
        self._migrated = 0
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        #: The PropertiesChanged signals being sent (the loop keeps weak references to tasks only).
        self._tasks: set[asyncio.Future[None]] = set()

    def _started(self) -> None:
        self._busy += 1
        self._idle.clear()

    def _answered(self, member: str, count: int | None, spent: object = None) -> None:
        # sdbus sends the reply right after the method returns, in the same
        # task step (sd_bus_send writes it to the socket, whose send buffer
        # sd-bus sets to 8 MiB); call_soon runs after that. The count (a
        # property and its PropertiesChanged signal, which would go out on
        # the bus first) and the freeing of what the work left (``spent``)
        # wait for it: the caller, QEMU inside the VM's downtime, gets its
        # answer first.
        asyncio.get_running_loop().call_soon(self._replied, member, count, [spent])

    def _replied(self, member: str, count: int | None, spent: list[object]) -> None:
        spent.clear()  # freed here, after the answer
        if count is not None:
            # Set here, before the loop reads any later message: a Get sent
            # after the answer arrived reads it. The signal follows.
            self._migrated = count
            self._tasks.add(task := asyncio.ensure_future(self._announce()))
            task.add_done_callback(self._tasks.discard)
        self._busy -= 1
        if not self._busy:
            self._idle.set()
        self._lifecycle.work_done(member)

    async def drained(self) -> None:
        """Return once no Save or Load is waiting for its reply to go out.

        The helper must not leave the bus while QEMU waits for an answer:
        a missing answer costs the destination its VM.
        """
        await self._idle.wait()

    @dbus_property_async_override()
    def id(self) -> str:
        return self._id

    @dbus_property_async_override()
    def num_migrated_entries(self) -> int:
        return self._migrated

    @num_migrated_entries.setter_private
    def _set_num_migrated_entries(self, value: int) -> None:
        self._migrated = value

    async def _announce(self) -> None:
        # set_async also emits PropertiesChanged; the latest count, whichever
        # answer scheduled this. Get reads the count already: a signal that
        # cannot go out (the bus closing under the teardown) is only logged.
        try:
            await self.num_migrated_entries.set_async(self._migrated)
        except Exception as err:
            log.debug("NumMigratedEntries not announced: %s: %s", type(err).__name__, err)

    @dbus_method_async_override()
    @boundary("Save", NO_STATE)
    async def save(self) -> bytes:
        self._started()
        report: SaveReport | None = None
        try:
            report = await self._state.save()
            return report.encoded.data
        finally:
            self._answered("Save", None if report is None else report.encoded.sent, report)

    @dbus_method_async_override()
    @boundary("Load", None)
    async def load(self, data: bytes) -> None:
        self._started()
        created: int | None = None
        try:
            created = (await self._state.load(bytes(data))).result.created
        finally:
            self._answered("Load", created)

    @dbus_method_async_override()
    @boundary("Quit")
    async def quit(self) -> None:
        log.info("Quit called")
        await self._lifecycle.quit()
