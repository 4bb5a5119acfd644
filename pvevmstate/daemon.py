"""Lifecycle of one helper process: bus, names, readiness, waiting, teardown.

Order of start-up, and why:

1. open the conntrack socket: without netlink access there is nothing to do;
2. connect to the system bus and export ``/org/qemu/VMState1``;
3. take the per-VM name ``com.proxmox.VMStateHelper.VM<VMID>``, replacing a
   stale helper of the same VM, and wait until that one has left the bus, so
   QEMU never sees two owners with one Id (it silently calls the first);
4. queue for ``org.qemu.VMState1`` (never replacing anybody);
5. add the ``dbus-vmstate`` object to the VM's QEMU over QMP (replacing a
   left-over one): QEMU must know the helper before a migration can use it;
6. only then tell systemd we are ready, so ``systemctl start`` returning
   means QEMU knows the helper.

After its work the helper follows the migration through QMP: a destination
removes the object once QEMU has left ``inmigrate``; a source whose migration
failed or was cancelled removes it at once and exits. Teardown runs in
reverse: wait until no Save or Load is still waiting for its reply, remove the
QEMU object if QEMU still has it (not when a newer helper replaced this one:
the object is then the newer helper's), release the names, close the bus.

The process ends on Quit, SIGTERM/SIGINT, loss of the per-VM name, a failed
outgoing migration, or a linger period after its Save or Load was answered.
Once it is stopping, further SIGTERM/SIGINT are noted once per signal and
ignored until the teardown is done: an unanswered Load costs the destination
its VM. Only SIGKILL ends the helper sooner (the unit's ``ExecStopPost``
then removes the QEMU object).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import signal
from collections.abc import Callable
from dataclasses import dataclass

from sdbus import SdBus, sd_bus_open_system
from sdbus.exceptions import (
    DbusNameHasNoOwnerError,
    SdBusBaseError,
    SdBusRequestNameAlreadyOwnerError,
    SdBusRequestNameExistsError,
    SdBusRequestNameInQueueError,
)
from sdbus.sd_bus_internals import (
    NameAllowReplacementFlag,
    NameQueueFlag,
    NameReplaceExistingFlag,
)

from . import heap, messages
from .dbus.api import (
    BUS_DRIVER_NAME,
    BUS_DRIVER_PATH,
    VMSTATE_NAME,
    VMSTATE_PATH,
    BusDriver,
    helper_bus_name,
    helper_id,
)
from .dbus.service import VMStateService
from .errors import BusError, QMPError, VMStateError
from .journal import fields
from .notify import sd_notify
from .payload import Choice
from .qemu.qmp import DEFAULT_TIMEOUT as QMP_TIMEOUT
from .qemu.qmp import QMPClient
from .qemu.vmobject import QemuObject, default_qmp_socket, system_bus_address
from .savecache import ScanTable
from .vmstate import DEFAULT_TABLE_RESERVE, ConntrackBackend, VMState
from .warmer import INTERVAL as WARM_INTERVAL
from .warmer import Warmer

log = logging.getLogger(__name__)

#: Seconds a helper stays after its Save or Load was answered, so that
#: qemu-server can still read NumMigratedEntries and call Quit.
DEFAULT_LINGER = 30.0
#: How long a new helper waits for a replaced one to leave the bus.
TAKEOVER_TIMEOUT = 10.0
#: How often the bus socket is checked for a hang-up.
WATCHDOG_INTERVAL = 0.5
#: Timeout of the helper's own calls to the bus driver.
BUS_CALL_TIMEOUT_USEC = 5_000_000
#: How long the helper follows a migration after its Save or Load.
FOLLOW_TIMEOUT = 120.0
#: How long teardown waits for a Save or Load still running (QEMU's own call timeout).
DRAIN_TIMEOUT = 25.0
#: Seconds from an answered Save or Load to what comes after it (the heap's
#: trim, following the migration over QMP). A Save's 1 MiB answer takes ~5 to
#: 10 ms through dbus-daemon, inside the VM's downtime; each of the two made
#: it ~1 ms slower when they ran meanwhile (the trim's madvise, the QMP
#: connection), and the slowest answers slower still.
AFTER_ANSWER = 0.5

#: How long to wait for a cancelled task before cancelling it again.
CANCEL_RETRY = 0.1

POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_OK = 0
EXIT_FAILURE = 1


@dataclass(frozen=True, slots=True)
class Settings:
    """What the command line decides; the rest are this module's constants.

    The bus is not among them: QEMU is always told the address of the bus the
    helper itself is on (``DBUS_SYSTEM_BUS_ADDRESS``, else the system bus).
    """

    vmid: int
    linger: float = DEFAULT_LINGER
    qmp_socket: str = ""
    qmp_timeout: float = QMP_TIMEOUT
    payload_format: Choice = Choice.AUTO
    table_reserve: float = DEFAULT_TABLE_RESERVE
    #: Seconds between background dumps for Save's cache at least (0: no cache).
    cache_interval: float = WARM_INTERVAL

    @property
    def monitor(self) -> str:
        """The VM's QMP socket."""
        return self.qmp_socket or default_qmp_socket(self.vmid)

    def qemu_object(self, bus_address: str) -> QemuObject:
        """The VM's ``dbus-vmstate`` object, reached through :attr:`monitor`.

        :param bus_address: the bus QEMU is to call the helper on (only used to add it)
        """
        timeout = self.qmp_timeout
        return QemuObject(self.monitor, bus_address, helper_id(self.vmid), lambda path: QMPClient(path, timeout))


async def _cancelled(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait until it has ended.

    Cancelled again until it ends: a task can lose one cancellation (Python
    3.11's ``asyncio.wait_for`` drops it when the awaited call completes at
    the same moment), and the teardown must not wait out its polling.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_RETRY)
    if not task.cancelled() and task.exception() is not None:
        log.debug("%s ended with an error", task.get_name(), exc_info=task.exception())


def _ignore_stop_signals(loop: asyncio.AbstractEventLoop) -> None:
    """After the teardown: ignore SIGTERM/SIGINT for the rest of the process.

    Nothing is left for them to stop. Left to the loop, closing it would give
    SIGINT back to Python's default handler (a KeyboardInterrupt traceback
    while the process exits) and SIGTERM to the default action (a helper
    that did everything right would count as killed).
    """
    for sig in STOP_SIGNALS:
        loop.remove_signal_handler(sig)
        # A SIGINT between these two lines raises KeyboardInterrupt, which the
        # command line turns into a clean exit: the work is done by now.
        signal.signal(sig, signal.SIG_IGN)


def open_table() -> ConntrackBackend:
    """The conntrack table of this process's network namespace.

    Imported here, not at the top: only a real table needs pyroute2, so the
    D-Bus layer and its tests do not.
    """
    from .netlink.conntrack import Conntrack

    return Conntrack()


class Daemon:
    """One helper process for one VM.

    :param settings: the VMID and timing
    :param bus_factory: opens the bus connection (the system bus by default)
    :param backend_factory: opens the conntrack table
    :param qemu: the VM's QEMU object (made from the settings by default)
    :param scan_factory: opens the table the background dumps for Save's
        cache read (another socket; by default ``backend_factory``'s)
    """

    def __init__(
        self,
        settings: Settings,
        bus_factory: Callable[[], SdBus] = sd_bus_open_system,
        backend_factory: Callable[[], ConntrackBackend] = open_table,
        qemu: QemuObject | None = None,
        scan_factory: Callable[[], ConntrackBackend] | None = None,
    ) -> None:
        self.settings = settings
        self._bus_factory = bus_factory
        self._backend_factory = backend_factory
        self._scan_factory = scan_factory or backend_factory
        self.qemu = qemu or settings.qemu_object(system_bus_address())
        self._stop: asyncio.Event | None = None
        self._reason = ""
        self._exit = EXIT_OK
        self._linger: asyncio.TimerHandle | None = None
        self._after_answer: asyncio.TimerHandle | None = None
        self._follow: asyncio.Task[None] | None = None
        self._warmer_of: Warmer | None = None
        self._warming: asyncio.Task[None] | None = None
        # Whether QEMU may still hold our object; False once it was removed,
        # once QEMU is gone, or once a newer helper took over.
        self._registered = False
        self._bus_lost = False
        # Signals already noted as ignored while stopping (one journal line each).
        self._ignored: set[str] = set()

    @property
    def exit_status(self) -> int:
        """The status :meth:`run` returns (or would have, had it not been interrupted)."""
        return self._exit

    @property
    def registered(self) -> bool:
        """Whether QEMU may hold this helper's object now."""
        return self._registered

    # -------------------------------------------------------- Lifecycle

    def stop(self, reason: str, code: int = EXIT_OK) -> None:
        """End the process soon; the first reason given wins."""
        if self._stop is None or self._stop.is_set():
            return
        self._reason, self._exit = reason, code
        self._stop.set()

    def on_signal(self, name: str) -> None:
        """SIGTERM/SIGINT: stop; once stopping, note a further one once and ignore it.

        The teardown waits for pending Save/Load answers (at most
        DRAIN_TIMEOUT) and removes the QEMU object; a second signal from an
        impatient operator or a stop script must not cut that short.
        """
        if self._stop is None or not self._stop.is_set():
            self.stop(name)
            return
        if name not in self._ignored:
            self._ignored.add(name)
            log.warning(messages.ALREADY_STOPPING, self._reason, name, DRAIN_TIMEOUT)

    def work_done(self, member: str) -> None:
        """Follow the migration and start the linger period after an answered Save or Load."""
        if self._stop is not None and self._stop.is_set():
            # Answered during the teardown, which removes the object and exits
            # anyway: no follow, and no "exiting in 30 s" line that is not true.
            return
        loop = asyncio.get_running_loop()
        if self._after_answer is None:
            self._after_answer = loop.call_later(AFTER_ANSWER, self._answer_gone, member)
        if self._linger is not None:
            return
        log.info("work done, exiting in %.1f s (or on Quit)", self.settings.linger)
        self._linger = loop.call_later(self.settings.linger, self.stop, "work done")

    def _answer_gone(self, member: str) -> None:
        """What follows an answered Save or Load, once its answer has gone out (:data:`AFTER_ANSWER`)."""
        self._after_answer = None
        if self._stop is not None and self._stop.is_set():
            return
        # What the work allocated goes back to the system while the helper
        # lingers (the heap does not trim when a block is freed,
        # pvevmstate.heap), in a worker thread: the loop answers on.
        asyncio.get_running_loop().run_in_executor(None, heap.trim)
        if self._follow is None and self._registered:
            follow = self._follow_outgoing if member == "Save" else self._follow_incoming
            self._follow = asyncio.create_task(follow())

    async def quit(self) -> None:
        """Quit was called; the reply goes out before the loop sees the stop."""
        asyncio.get_running_loop().call_soon(self.stop, "Quit called")

    # -------------------------------------------------------- running

    async def run(self) -> int:
        """Run until stopped; return the process exit status.

        Every resource registers its release on one exit stack as soon as it
        is acquired, so the teardown runs in reverse order by construction:
        tell systemd we stop, wait for pending Save/Load answers, stop the
        linger timer and the migration follower (awaited, so that it is off
        the single-client monitor before the next QMP session), remove the
        QEMU object, stop watching the names and release them, stop the bus
        watchdog, unexport, close the bus and the conntrack socket.
        """
        self._stop = asyncio.Event()
        vmid = self.settings.vmid
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self._log_exit)
            # Last of all: nothing is left for a signal to stop.
            stack.callback(_ignore_stop_signals, loop)
            try:
                backend = self._backend_factory()
            except VMStateError as err:
                log.error("cannot use the conntrack table: %s", err)
                self._reason, self._exit = "no conntrack table", EXIT_FAILURE
                return EXIT_FAILURE
            stack.callback(backend.close)
            try:
                bus = self._bus_factory()
                bus.method_call_timeout_usec = BUS_CALL_TIMEOUT_USEC
            except (OSError, SdBusBaseError) as err:
                log.error("cannot connect to the system bus: %s", err)
                self._reason, self._exit = "no bus", EXIT_FAILURE
                return EXIT_FAILURE
            stack.callback(bus.close)
            # The handlers stay until the end of the teardown: a signal during
            # it must not end the process before the pending answers went out.
            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, self.on_signal, sig.name)
            driver = BusDriver.new_proxy(BUS_DRIVER_NAME, BUS_DRIVER_PATH, bus)
            warmer = self._warmer(backend)
            service = VMStateService(VMState(vmid, backend, fmt=self.settings.payload_format,
                                               reserve=self.settings.table_reserve, warmer=warmer), self)
            stack.callback(service.export_to_dbus(VMSTATE_PATH, bus).stop)
            stack.push_async_callback(_cancelled, asyncio.create_task(self._watch_connection(bus)))
            names: list[str] = []
            stack.push_async_callback(self._release, driver, names)
            # Watching starts before the names are requested (a takeover may
            # come at once) and ends before they are released (losing them is
            # then no news).
            stack.push_async_callback(_cancelled, asyncio.create_task(self._watch_names(driver)))
            stack.push_async_callback(self._unregister, "the helper exits")
            stack.push_async_callback(self._stop_following)
            stack.callback(self._cancel_linger)
            stack.push_async_callback(self._drain, service)
            # Before the drain, so that nothing dumps in the background while
            # the last Save or Load finishes.
            stack.push_async_callback(self._stop_warming)
            stack.callback(sd_notify, "STOPPING=1")
            return await self._serve(driver, bus, names)

    def _log_exit(self) -> None:
        # No reason means an exception is on its way out, and main() exits with 1.
        log.info(messages.EXITING, self.settings.vmid, self._reason or "error",
                 extra=fields(VMID=self.settings.vmid, REASON=self._reason or "error",
                              EXIT_STATUS=self._exit if self._reason else EXIT_FAILURE))

    async def _serve(self, driver: BusDriver, bus: SdBus, names: list[str]) -> int:
        vmid = self.settings.vmid
        try:
            unique = await self._take_names(bus, driver, names)
            await self._register()
            if self._warmer_of is not None and not self._warmer_of.stopped:
                self._warming = asyncio.create_task(self._warmer_of.run())
            sd_notify("READY=1\nSTATUS=serving %s" % helper_id(vmid))
            log.info(messages.READY, vmid, helper_id(vmid), helper_bus_name(vmid), VMSTATE_NAME, unique,
                     self.qemu.qmp_socket, extra=fields(VMID=vmid, HELPER_ID=helper_id(vmid), UNIQUE_NAME=unique))
            assert self._stop is not None
            await self._stop.wait()
            log.log(logging.ERROR if self._exit else logging.INFO, messages.STOPPING, self._reason)
            return self._exit
        except (BusError, SdBusBaseError) as err:
            log.error("D-Bus start-up failed: %s", err)
            self._reason, self._exit = "D-Bus start-up failed", EXIT_FAILURE
            return EXIT_FAILURE
        except QMPError as err:
            log.error("cannot register with the QEMU of VM %d: %s", vmid, err)
            self._reason, self._exit = "not registered with QEMU", EXIT_FAILURE
            return EXIT_FAILURE

    def _warmer(self, backend: ConntrackBackend) -> Warmer | None:
        """The background dumps for Save's cache, on a socket of their own; None when off."""
        if self.settings.cache_interval <= 0 or not isinstance(backend, ScanTable):
            return None
        factory = self._scan_factory

        def open_scan_table() -> ScanTable:
            table = factory()
            if not isinstance(table, ScanTable):
                table.close()
                raise VMStateError("the conntrack table cannot be scanned")
            return table

        self._warmer_of = Warmer(self.settings.vmid, open_scan_table, self.settings.cache_interval)
        return self._warmer_of

    async def _stop_warming(self) -> None:
        if self._warmer_of is not None:
            self._warmer_of.stop()
        if self._warming is not None:
            await _cancelled(self._warming)

    def _cancel_linger(self) -> None:
        for handle in (self._linger, self._after_answer):
            if handle is not None:
                handle.cancel()

    async def _stop_following(self) -> None:
        # Awaited, not just cancelled: the follower may hold a session on the
        # VM's monitor, which serves one client at a time, and the teardown's
        # next step opens one to remove the object.
        if self._follow is not None:
            await _cancelled(self._follow)

    async def _register(self) -> None:
        qemu = self.qemu
        log.debug("adding %s to QEMU at %s", qemu.helper_id, qemu.qmp_socket)
        replaced = await qemu.add()
        self._registered = True
        if replaced:
            log.warning(messages.REPLACED_LEFT_OVER, self.settings.vmid)

    async def _unregister(self, why: str) -> None:
        if not self._registered:
            return
        try:
            if await self.qemu.remove():
                log.info(messages.OBJECT_REMOVED, why)
        except QMPError as err:
            # Most often the VM has already been stopped; then there is nothing to remove.
            log.info(messages.OBJECT_NOT_REMOVED, why, err)
        # Not in a finally: a removal cut short by cancellation is tried again at teardown.
        self._registered = False

    async def _drain(self, service: VMStateService) -> None:
        if self._bus_lost:
            return  # nobody is left to read an answer
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await service.drained()
        except TimeoutError:
            log.error("a Save or Load still runs after %.0f s; leaving anyway", DRAIN_TIMEOUT)

    async def _follow_incoming(self) -> None:
        # Destination: QEMU calls Load inside the incoming migration; once it
        # has left inmigrate the object has served and must go, so that a later
        # migration without conntrack state does not meet a section nobody sends.
        try:
            state = await self.qemu.wait_incoming_done(FOLLOW_TIMEOUT)
        except QMPError as err:
            log.info("stopped following the incoming migration: %s", err)
            return
        if state is None:
            log.warning("QEMU still in inmigrate %.0f s after Load", FOLLOW_TIMEOUT)
            return
        log.info("incoming migration finished, VM is %s", state)
        await self._unregister("incoming migration finished")

    async def _follow_outgoing(self) -> None:
        # Source: after Save the migration completes or fails. On failure the
        # VM keeps running here, and an object left behind would break its next
        # migration, so it goes now and so does the helper.
        try:
            state = await self.qemu.wait_outgoing_done(FOLLOW_TIMEOUT)
        except QMPError as err:
            log.info("stopped following the outgoing migration: %s", err)
            return
        if state is None:
            log.warning("migration still not finished %.0f s after Save", FOLLOW_TIMEOUT)
        elif state == "completed":
            log.info("outgoing migration completed")
        else:
            log.warning("outgoing migration %s after Save", state)
            await self._unregister("migration %s" % state)
            self.stop("migration %s" % state)

    async def _take_names(self, bus: SdBus, driver: BusDriver, names: list[str]) -> str:
        vmid = self.settings.vmid
        own = helper_bus_name(vmid)
        stale = ""
        with contextlib.suppress(DbusNameHasNoOwnerError):
            stale = await driver.get_name_owner(own)
        try:
            # Allow replacement: the next helper for this VM must be able to
            # take over from us if we are ever left behind.
            await bus.request_name_async(own, NameAllowReplacementFlag | NameReplaceExistingFlag)
        except SdBusRequestNameAlreadyOwnerError:
            pass
        except SdBusRequestNameExistsError as err:
            raise BusError("%s is held by a process that does not let it go" % own) from err
        names.append(own)
        unique = await driver.get_name_owner(own)
        if stale and stale != unique:
            log.warning("replacing the stale helper %s of VM %d", stale, vmid)
            await self._wait_gone(driver, stale)
        # Queued behind other VMs' helpers is exactly what QEMU expects.
        with contextlib.suppress(SdBusRequestNameInQueueError, SdBusRequestNameAlreadyOwnerError):
            await bus.request_name_async(VMSTATE_NAME, NameQueueFlag)
        names.append(VMSTATE_NAME)
        return unique

    async def _wait_gone(self, driver: BusDriver, unique: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TAKEOVER_TIMEOUT
        while await driver.name_has_owner(unique):
            if loop.time() > deadline:
                raise BusError("stale helper %s did not leave the bus within %.0f s"
                               % (unique, TAKEOVER_TIMEOUT))
            await asyncio.sleep(0.02)

    async def _watch_names(self, driver: BusDriver) -> None:
        own = helper_bus_name(self.settings.vmid)
        async for name in driver.name_lost.catch():
            if name == own:
                log.warning(messages.TAKEN_OVER, self.settings.vmid, own)
                self._registered = False  # the QEMU object is the newer helper's now
                self.stop("replaced by a newer helper")
            elif name == VMSTATE_NAME:
                self.stop("lost %s" % VMSTATE_NAME, EXIT_FAILURE)

    async def _watch_connection(self, bus: SdBus) -> None:
        # Without this a helper whose dbus-daemon went away would wait forever:
        # sdbus reports no disconnect (its match on sd-bus's local Disconnected
        # signal never completes), so look at the socket itself.
        lost = select.POLLHUP | select.POLLERR | select.POLLNVAL | POLLRDHUP
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL)
            try:
                poller = select.poll()
                poller.register(bus.get_fd(), select.POLLIN | POLLRDHUP)
                events = poller.poll(0)
            except (OSError, ValueError, SdBusBaseError):
                events = [(-1, select.POLLNVAL)]
            if any(ev & lost for _fd, ev in events):
                self._bus_lost = True
                self.stop("the connection to the system bus was lost", EXIT_FAILURE)
                return

    async def _release(self, driver: BusDriver, names: list[str]) -> None:
        if self._bus_lost:
            return
        for name in reversed(names):
            try:
                await driver.release_name(name)
            except SdBusBaseError as err:
                log.debug("releasing %s failed: %s", name, err)
