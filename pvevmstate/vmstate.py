"""The migration work itself: Save dumps and encodes, Load decodes and creates.

Blocking netlink and CPU work runs in a worker thread, one operation at a
time, so the event loop keeps answering QEMU's ``Id`` reads for every VM on
the host while a Save or Load is under way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from . import codec, payload
from .conntrack import CreateResult
from .entry import Entry
from .errors import errno_text

log = logging.getLogger(__name__)


class ConntrackBackend(Protocol):
    """What Save and Load need from the conntrack table (blocking calls)."""

    def dump(self, mark: int) -> list[Entry]: ...

    def create(self, entries: list[Entry], mark: int) -> CreateResult: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class SaveReport:
    """What one Save produced: the encoded payload and what went into it."""

    encoded: payload.Payload
    dumped: int
    ms: float


@dataclass(slots=True)
class LoadReport:
    """What one Load did: what the payload held and what the kernel made of it."""

    received: int
    lines: int
    refused: int
    samples: list[codec.Refusal]
    result: CreateResult
    ms: float


class VMState:
    """Save and Load of one VM's conntrack entries (mark == VMID).

    :param vmid: the VM, which is also the CONNMARK its entries carry
    :param backend: the conntrack table
    :param limit: payload byte budget (QEMU's 1 MiB)
    :param fmt: what Save sends: ``auto``, ``text`` or ``compact`` (Load reads all)
    """

    def __init__(self, vmid: int, backend: ConntrackBackend, limit: int = codec.MAX_PAYLOAD,
                 fmt: str = "auto") -> None:
        self.vmid = vmid
        self._backend = backend
        self._limit = limit
        self._format = fmt
        self._lock = asyncio.Lock()

    def _save(self) -> SaveReport:
        t0 = time.perf_counter()
        entries = self._backend.dump(self.vmid)
        out = payload.encode(entries, self.vmid, self._limit, self._format)
        return SaveReport(out, len(entries), (time.perf_counter() - t0) * 1000)

    def _load(self, data: bytes) -> LoadReport:
        t0 = time.perf_counter()
        decoded = payload.decode(data, self.vmid)
        result = self._backend.create(decoded.entries, self.vmid) if decoded.entries else CreateResult()
        return LoadReport(len(data), len(decoded.entries) + decoded.refused, decoded.refused,
                          decoded.samples, result, (time.perf_counter() - t0) * 1000)

    async def save(self) -> SaveReport:
        """Dump this VM's entries and encode them within the limit.

        :raises VMStateError: when the table cannot be read
        """
        async with self._lock:
            report = await asyncio.to_thread(self._save)
        out = report.encoded
        left_out = out.left_out_total
        level = logging.WARNING if left_out else logging.INFO
        log.log(level, "Save: %d entries with mark %d, sent %d in %d bytes as %s (limit %d), left out %d, "
                "%.1f ms", report.dumped, self.vmid, out.sent, len(out.data), out.format,
                self._limit, left_out, report.ms)
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
        async with self._lock:
            report = await asyncio.to_thread(self._load, data)
        for sample in report.samples:
            log.warning("Load: line %d refused: %s", sample.line_no, sample.reason)
        if report.refused > len(report.samples):
            log.warning("Load: %d more lines refused", report.refused - len(report.samples))
        result = report.result
        for code, count in sorted(result.failed.items()):
            log.warning("Load: kernel refused %d entries: %s", count, errno_text(code))
        failed = result.failed_total
        level = logging.WARNING if report.refused or failed or result.unknown else logging.INFO
        log.log(level, "Load: %d bytes, %d lines, created %d entries with mark %d, refused %d, "
                "failed %d, unknown %d, %.1f ms", report.received, report.lines, result.created,
                self.vmid, report.refused, failed, result.unknown, report.ms)
        return report
