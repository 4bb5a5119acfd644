"""Background dumps that keep Save's cache (:mod:`pvevmstate.savecache`) warm.

A helper is started when the migration starts and waits for Save while QEMU
copies the VM's RAM (seconds to minutes). Meanwhile this dumps the VM's
entries every few seconds, in a worker thread on a netlink socket of its
own, and publishes what it found as the cache's next generation. Save stops
it first thing (:meth:`Warmer.stop`): the dump in progress is abandoned
between two datagrams, and nothing runs after Save or Load.

Cost: a pass is one mark-filtered dump (the kernel's walk over every hash
bucket plus ~3 µs an entry here) and a lookup per entry; the first pass, and
an entry that changed, also encode. The pause after a pass is at least
:data:`INTERVAL`, and long enough that the pass and its pause together take
at least its CPU time (the whole process's, measured) divided by :data:`PACE`,
a fifth below :data:`BUDGET`: whatever the table's size, and over any window
that holds a pass and the start of the next (the first pass, which encodes
every entry, costs several times the next ones), the passes take at most
:data:`BUDGET` of one core.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from . import heap, messages, savecache
from .errors import VMStateError
from .savecache import Pieces, Scan, ScanTable

log = logging.getLogger(__name__)

#: Seconds between two passes at least.
INTERVAL = 3.0
#: Seconds from the start to the first pass: a helper whose Save comes at once
#: (a migration of a VM with little RAM) is spared a dump it cannot use, and
#: the start of many helpers at once is not slowed by theirs.
FIRST_DELAY = 1.0
#: Share of one core the passes may take.
BUDGET = 0.1
#: The share the pause is computed for.
PACE = BUDGET * 0.8


class Warmer:
    """Keeps Save's cache of one VM's entries warm until :meth:`stop`.

    :param vmid: the VM (its entries carry this mark)
    :param open_table: opens the socket the passes dump on (its own, so that
        Save never waits for one); it must support ``dump_into``
    :param interval: seconds between passes at least
    """

    def __init__(self, vmid: int, open_table: Callable[[], ScanTable], interval: float = INTERVAL) -> None:
        self.vmid = vmid
        self._open = open_table
        self.interval = interval
        #: The latest generation (published whole, read without a lock).
        self.pieces: Pieces = savecache.EMPTY
        self._stopped = threading.Event()
        self._table: ScanTable | None = None
        # Held by a pass: the socket is closed only between passes, never
        # under a thread that may still read it (its descriptor could be
        # reused by then, by the QMP connection of the teardown, say).
        self._busy = threading.Lock()
        self.passes = 0

    def stop(self) -> Pieces:
        """Stop for good (an unfinished pass is abandoned); the latest generation."""
        self._stopped.set()
        return self.pieces

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopped.is_set()

    async def run(self) -> None:
        """Dump, publish and pause until stopped; a failing pass is logged, never raised."""
        try:
            await asyncio.sleep(min(self.interval, FIRST_DELAY))
            while not self._stopped.is_set():
                try:
                    started = time.monotonic()
                    cost = await asyncio.to_thread(self._pass)
                except VMStateError as err:
                    log.warning("background dump for Save's cache failed: %s; Save dumps without it", err)
                    return
                except Exception as err:  # the cache only spares work: Save must not suffer from it
                    log.warning("background dump for Save's cache failed unexpectedly: %s: %s; Save dumps "
                                "without it", type(err).__name__, err, exc_info=log.isEnabledFor(logging.DEBUG))
                    return
                await asyncio.sleep(max(self.interval, cost / PACE - (time.monotonic() - started)))
        finally:
            self._stopped.set()
            await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._busy:
            if self._table is not None:
                self._table.close()
                self._table = None

    def _pass(self) -> float:
        """One background dump; its CPU seconds."""
        with self._busy:
            return self._pass_locked()

    def _pass_locked(self) -> float:
        # The process's CPU, not the thread's: what the pass makes others do counts too.
        t0, c0 = time.perf_counter(), time.process_time()
        if self._table is None:
            self._table = self._open()
        table = self._table
        old = self.pieces
        scan = table.dump_into(self.vmid, lambda: Scan(old, table.layouts, collect=True), self._stopped)
        if scan is None or self._stopped.is_set():
            return 0.0
        pieces = scan.pieces_until(self._stopped)
        if pieces is None or self._stopped.is_set():
            return 0.0  # Save has begun with the generation before: leave it be
        self.pieces = pieces
        hits = scan.hits
        del scan
        old = savecache.EMPTY  # (the generation before: freed before the trim)
        # What Save's assembly will touch is mapped again here, not during
        # its dump; nothing is trimmed or touched once Save has begun.
        heap.trim(heap.keep_size(len(pieces)), self._stopped)
        cpu = time.process_time() - c0
        self.passes += 1
        if self.passes == 1:
            log.info(messages.CACHE_WARM, len(pieces), (time.perf_counter() - t0) * 1e3, cpu * 1e3)
        log.debug("background dump %d: %d entries (%d found cached), %.1f ms, %.1f ms CPU",
                  self.passes, len(pieces), hits, (time.perf_counter() - t0) * 1e3, cpu * 1e3)
        return cpu
