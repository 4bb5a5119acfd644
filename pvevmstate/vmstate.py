"""The migration work itself: Save dumps and encodes, Load decodes and creates.

Blocking netlink and CPU work runs in a worker thread, one operation at a
time, so the event loop keeps answering QEMU's ``Id`` reads for every VM on
the host while a Save or Load is under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from . import heap, journal, messages, payload, savecache
from .errors import errno_text
from .model import CreateBatch, CreateResult, Entry, TableStats
from .savecache import Pieces, Scan, ScanTable
from .warmer import Warmer

log = logging.getLogger(__name__)


#: Share of ``nf_conntrack_max`` that Load leaves free, in percent. The kernel
#: starts evicting entries that are not yet assured (any VM's) once a
#: namespace holds ``nf_conntrack_max / 100 * 95`` entries (its GC worker's
#: early drop), and every new flow evicts or fails once it is full; stopping
#: at 90 % keeps both away and leaves the other 5 % for flows that start
#: while the VM migrates.
DEFAULT_TABLE_RESERVE = 10.0
#: The least reserve: Load never reaches the GC's early-drop threshold.
MIN_TABLE_RESERVE = 5.0


def load_ceiling(maximum: int, reserve: float) -> int:
    """How many entries Load lets the table hold: ``reserve`` percent short of
    ``maximum``, and always below the kernel's early-drop threshold."""
    return min(int(maximum * (100 - reserve) / 100), maximum // 100 * 95 - 1)


#: Most entries created between two looks at how full the table is.
LOAD_CHUNK = 4096
#: Load's first chunk. Until it is built the kernel has nothing to create, so
#: it is small; each chunk after it is half again the one before, up to
#: :data:`LOAD_CHUNK` (:func:`next_chunk`). Building a request takes about half
#: of what the kernel takes to create one (~1.5 and ~2.5 to 4.5 µs here), so
#: the chunk built meanwhile, half again as large, is ready about when the one
#: in flight is done.
#: Measured once through fresh helpers at 5,000 entries, interleaved: 47.9 ms
#: (median of 12) growing by half, 52.8 ms doubling; no difference at 50,000.
LOAD_FIRST_CHUNK = 256
#: The GIL's switch interval (seconds) while Load's two threads overlap. A
#: thread that comes back from the kernel, or is handed a chunk, waits for the
#: GIL until the thread holding it lets go, by default up to 5 ms, and the
#: kernel creates nothing meanwhile: on a timeline of both threads at 5,000
#: entries, the sender began each chunk only once the next one was built. At
#: 0.2 ms it mostly began within a fraction of a millisecond (in the helper
#: some chunks still began 1 to 3 ms late, for a reason not found).
LOAD_SWITCH_INTERVAL = 0.0002


def next_chunk(size: int) -> int:
    """The size of Load's chunk after one of ``size``."""
    return min(max(size + 1, size * 3 // 2), LOAD_CHUNK)


class _Switches:
    """Who asked for :func:`frequent_switches`, and the interval before the first."""

    lock = threading.Lock()
    users = 0
    before = 0.0


@contextlib.contextmanager
def frequent_switches() -> Iterator[None]:
    """The GIL's switch interval at most :data:`LOAD_SWITCH_INTERVAL` within;
    as before once the last of the threads that asked for it is done.

    The interval is the process's: counted, so that two Loads that overlap
    (two :class:`VMState` in one process) leave it as they found it.
    """
    with _Switches.lock:
        if not _Switches.users:
            _Switches.before = sys.getswitchinterval()
            sys.setswitchinterval(min(_Switches.before, LOAD_SWITCH_INTERVAL))
        _Switches.users += 1
    try:
        yield
    finally:
        with _Switches.lock:
            _Switches.users -= 1
            if not _Switches.users:
                # Whole microseconds, as CPython keeps it: set back unrounded,
                # 0.0002 would read 0.000199 afterwards.
                sys.setswitchinterval((round(_Switches.before * 1e6) + 0.5) / 1e6)


class ConntrackBackend(Protocol):
    """What Save and Load need from the conntrack table (blocking calls)."""

    def dump(self, mark: int) -> list[Entry]: ...

    def reserve_seqs(self, n: int) -> int: ...

    def create(self, batch: CreateBatch) -> CreateResult: ...

    def stats(self) -> TableStats: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class SaveReport:
    """What one Save produced: the encoded payload and what went into it."""

    encoded: payload.Payload
    dumped: int
    ms: float
    #: Entries whose pieces came from the cache (the rest were encoded now).
    cached: int = 0
    #: What the dump built on its way (Save's scan through the cache), held
    #: until the answer is on the bus: freeing it takes ~0.3 ms at 5,000
    #: entries, which the caller, inside the VM's downtime, need not wait for.
    spent: object = None


@dataclass(slots=True)
class LoadReport:
    """What one Load did: what the payload held and what the kernel made of it."""

    received: int
    lines: int
    refused: int
    samples: list[payload.Refusal]
    result: CreateResult
    ms: float
    #: Entries not created because the table reached its reserve, by class.
    left_out: Counter[str] = field(default_factory=Counter)
    #: The table before Load, and the fill Load stops at.
    before: TableStats | None = None
    ceiling: int = 0
    #: What the payload was, as read (a damaged hybrid payload is read as text).
    format: payload.Format = payload.Format.NONE


class VMState:
    """Save and Load of one VM's conntrack entries (mark == VMID).

    :param vmid: the VM, which is also the CONNMARK its entries carry
    :param backend: the conntrack table
    :param limit: payload byte budget (QEMU's 1 MiB)
    :param fmt: what Save sends (Load reads every format)
    :param reserve: percent of ``nf_conntrack_max`` Load never fills
    :param warmer: keeps Save's cache warm until Save or Load (None: no cache)
    """

    def __init__(self, vmid: int, backend: ConntrackBackend, limit: int = payload.MAX_PAYLOAD,
                 fmt: payload.Choice = payload.Choice.AUTO, reserve: float = DEFAULT_TABLE_RESERVE,
                 *, warmer: Warmer | None = None) -> None:
        self.vmid = vmid
        self._backend = backend
        self._limit = limit
        self._format = fmt
        self._reserve = reserve
        self._lock = asyncio.Lock()
        self.warmer = warmer

    def _stop_warming(self) -> Pieces:
        return self.warmer.stop() if self.warmer is not None else savecache.EMPTY

    def _save(self, pieces: Pieces) -> SaveReport:
        # Save allocates an object or two per entry and frees none until it
        # ends: the cyclic collector would walk every object of the process
        # again and again (the cache holds no cycles, nor does the payload).
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._save_now(pieces)
        finally:
            if enabled:
                gc.enable()

    def _save_now(self, pieces: Pieces) -> SaveReport:
        t0 = time.perf_counter()
        backend = self._backend
        if pieces and self._format != payload.Choice.TEXT and isinstance(backend, ScanTable):
            # The dump is still the truth; the cache only spares encoding
            # what has not changed since a background dump.
            layouts = pieces.layouts or backend.layouts
            # The dump's reading thread waits for the kernel most of the
            # time: it maps meanwhile the memory the assembly will need and
            # the last background dump did not keep mapped.
            prefault = heap.Prefault(heap.prefault_size(len(pieces)), heap.kept())
            # Priority keys made during the dump serve the hybrid payload's save lines only.
            keys = self._format == payload.Choice.AUTO
            try:
                scan = backend.dump_into(
                    self.vmid, lambda: Scan(pieces, layouts, after_feed=prefault.step, ahead=keys), overlap=True)
            finally:
                prefault.release()
            assert scan is not None  # never stopped
            out = payload.encode_sendable(scan, self.vmid, self._limit, self._format)
            out.expected = scan.expected
            return SaveReport(out, len(scan) + scan.expected, (time.perf_counter() - t0) * 1000, scan.hits,
                              spent=scan)
        entries = backend.dump(self.vmid)
        out = payload.encode(entries, self.vmid, self._limit, self._format)
        return SaveReport(out, len(entries), (time.perf_counter() - t0) * 1000)

    def _load(self, data: bytes) -> LoadReport:
        t0 = time.perf_counter()
        incoming = payload.Incoming(data, self.vmid)
        result = CreateResult()
        left_out: Counter[str] = Counter()
        before: TableStats | None = None
        ceiling = 0
        n = incoming.size
        if n:
            # Creating into a nearly full table would make the kernel evict
            # other VMs' entries: look at its fill before every chunk.
            before = stats = self._backend.stats()
            ceiling = load_ceiling(stats.maximum, self._reserve)
            room = ceiling - stats.count
            # Payload order unless the table cannot take everything: then the
            # entries that matter most go first, as Save orders them.
            order: Sequence[int] = range(n) if room >= n else incoming.by_priority()
            done = self._create(incoming, order, ceiling, room, result)
            if done < n:
                classes = incoming.classes()
                left_out.update(payload.CLASSES[classes[i]] for i in order[done:])
        refusals = incoming.refusals
        return LoadReport(len(data), incoming.lines, refusals.refused, refusals.samples, result,
                          (time.perf_counter() - t0) * 1000, left_out, before, ceiling, incoming.format)

    def _create(self, incoming: payload.Incoming, order: Sequence[int], ceiling: int, room: int,
                result: CreateResult) -> int:
        """Create the items in ``order`` a chunk at a time while the table has
        room (``room`` now, at most ``ceiling`` entries); how many were taken.

        The kernel creates a chunk inside the ``sendmsg`` that carries it,
        with the GIL let go, so a second thread sends each chunk while this
        one builds the next, numbered (sequence numbers reserved from the
        adapter), sized by the room the chunk in flight leaves: Load costs
        about the longer of the two instead of their sum. The
        chunks start small and grow (:func:`next_chunk`), and the GIL
        changes hands often meanwhile (:data:`LOAD_SWITCH_INTERVAL`). The
        table's fill is read between two chunks, never while one is in
        flight (one socket); a chunk built ahead that no longer fits is
        built again, smaller, and its refusals are counted only once.
        """
        n = len(order)
        done = 0
        pending: Future[CreateResult] | None = None
        flying = 0  # items of the chunk in flight
        fresh = True  # room was read since the last chunk went out
        step = LOAD_FIRST_CHUNK
        with frequent_switches(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-create") as sender:
            while pending is not None or done < n:
                ahead: tuple[Sequence[int], CreateBatch, payload.Decoded] | None = None
                if pending is not None:
                    size = min(step, room - flying, n - done)
                    if size > 0:  # built while the kernel creates the chunk in flight
                        refusals = payload.Decoded()
                        chunk = order[done:done + size]
                        ahead = (chunk, incoming.batch(chunk, self._backend.reserve_seqs, refusals), refusals)
                    result.add(pending.result())
                    pending, flying = None, 0
                    if done == n:
                        break
                    room, fresh = ceiling - self._backend.stats().count, True
                if ahead is not None and len(ahead[0]) <= room:
                    chunk, batch, refusals = ahead
                    incoming.refusals.merge(refusals)
                else:  # nothing built ahead, or too much for the room left: build what fits now
                    if not fresh:
                        room = ceiling - self._backend.stats().count
                    size = min(step, room, n - done)
                    if size <= 0:
                        break
                    chunk = order[done:done + size]
                    batch = incoming.batch(chunk, self._backend.reserve_seqs)
                fresh = False
                done += len(chunk)
                step = next_chunk(step)
                if batch:
                    pending, flying = sender.submit(self._backend.create, batch), len(chunk)
        return done

    async def save(self) -> SaveReport:
        """Dump this VM's entries and encode them within the limit.

        :raises VMStateError: when the table cannot be read
        """
        pieces = self._stop_warming()
        async with self._lock:
            report = await asyncio.to_thread(self._save, pieces)
        out = report.encoded
        left_out = out.left_out_total
        level = logging.WARNING if left_out else logging.INFO
        # The same numbers as fields, for journalctl -o json (README: "Journal fields").
        fields: dict[str, journal.FieldValue] = {
            "VMID": self.vmid, "ENTRIES": report.dumped, "SENT": out.sent, "LEFT_OUT": left_out,
            "BYTES": len(out.data), "FORMAT": out.format.value, "DURATION_MS": report.ms,
            "CACHED": report.cached}
        if out.format == payload.Format.HYBRID:
            fields["TEXT_SENT"] = out.text_sent  # what a Perl destination restores
        log.log(level, "Save: %d entries with mark %d, sent %d in %d bytes as %s (limit %d), left out %d, "
                "%.1f ms, %d of them encoded ahead", report.dumped, self.vmid, out.sent, len(out.data), out.format,
                self._limit, left_out, report.ms, report.cached, extra=journal.fields(**fields))
        if out.left_out:
            log.warning("Save: left out by class: %s", ", ".join(
                "%d %s" % (out.left_out[c], c) for c in payload.CLASSES if out.left_out[c]))
        if out.expected:
            log.warning("Save: left out %d expected (helper-made) entries, which no kernel can create",
                        out.expected)
        if out.not_text:
            log.warning("Save: left out %d entries whose save lines conntrack --load-file refuses: %s "
                        "(--format compact carries them)", sum(out.not_text.values()), ", ".join(
                            "%d %s" % (n, why) for why, n in sorted(out.not_text.items())))
        return report

    async def load(self, data: bytes) -> LoadReport:
        """Create the payload's entries with this VM's mark; bad lines are skipped.

        :raises VMStateError: when the table cannot be written at all
        """
        self._stop_warming()
        async with self._lock:
            report = await asyncio.to_thread(self._load, data)
        for sample in report.samples:
            log.warning("Load: line %d refused: %s", sample.line_no, sample.reason)
        if report.refused > len(report.samples):
            log.warning("Load: %d more lines refused", report.refused - len(report.samples))
        result = report.result
        for code, count in sorted(result.failed.items()):
            log.warning("Load: kernel refused %d entries: %s", count, errno_text(code))
        if result.remapped:
            log.warning(messages.LOAD_REMAPPED, result.remapped)
        if report.left_out:
            before = report.before
            assert before is not None
            log.warning(messages.LOAD_TABLE_FULL, sum(report.left_out.values()), report.ceiling, before.maximum,
                        before.count, ", ".join("%d %s" % (report.left_out[c], c)
                                                for c in payload.CLASSES if report.left_out[c]))
        failed = result.failed_total
        level = (logging.WARNING if report.refused or failed or result.unknown or result.remapped
                 or report.left_out else logging.INFO)
        left_out = sum(report.left_out.values())
        log.log(level, "Load: %d bytes, %d lines, created %d entries with mark %d, refused %d, "
                "failed %d, unknown %d, left out %d, %.1f ms", report.received, report.lines,
                result.created, self.vmid, report.refused, failed, result.unknown, left_out, report.ms,
                extra=journal.fields(VMID=self.vmid, BYTES=report.received, LINES=report.lines,
                                     CREATED=result.created, REFUSED=report.refused, FAILED=failed,
                                     UNKNOWN=result.unknown, LEFT_OUT=left_out, DURATION_MS=report.ms,
                                     FORMAT=report.format.value))
        return report
