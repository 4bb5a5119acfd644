"""The background dumps for Save's cache: they publish, stay within their
budget, and end for good when Save or Load begins."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from pvevmstate import netlink, savecache, warmer
from pvevmstate.savecache import Scan
from tests.corpus import _golden


class CannedTable:
    """A ScanTable whose every dump is the golden file's first datagram."""

    def __init__(self) -> None:
        d = _golden()["dumps"][0]
        self.datagram, self.seq = bytes.fromhex(d["datagram"]), d["seq"]
        self.layouts = netlink.LayoutCache()
        self.dumps: list[float] = []
        self.closed = False

    def dump_into(self, mark: int, sink: Callable[[], Scan], stop: threading.Event | None = None,
                  overlap: bool = False) -> Scan | None:
        assert not self.closed
        self.dumps.append(time.monotonic())
        scan = sink()
        scan.feed(self.datagram, len(self.datagram), self.seq)
        return None if stop is not None and stop.is_set() else scan

    def close(self) -> None:
        self.closed = True


def test_passes_publish_and_stop_ends_them() -> None:
    table = CannedTable()
    w = warmer.Warmer(100, lambda: table, interval=0.02)
    assert isinstance(table, savecache.ScanTable)

    async def scenario() -> None:
        task = asyncio.create_task(w.run())
        while w.passes < 3:
            await asyncio.sleep(0.01)
        pieces = w.stop()
        assert len(pieces) > 10 and w.stopped
        dumps = len(table.dumps)
        await asyncio.sleep(0.2)
        assert len(table.dumps) == dumps  # nothing after stop
        await task

    asyncio.run(scenario())
    assert table.closed


def test_the_pause_keeps_the_passes_within_their_budget() -> None:
    class Costly(warmer.Warmer):
        def _pass(self) -> float:
            super()._pass()
            return 0.05  # as if a pass took 50 ms of CPU

    table = CannedTable()
    w = Costly(100, lambda: table, interval=0.01)

    async def scenario() -> None:
        task = asyncio.create_task(w.run())
        while len(table.dumps) < 3:
            await asyncio.sleep(0.01)
        w.stop()
        await task

    asyncio.run(scenario())
    gaps = [b - a for a, b in zip(table.dumps, table.dumps[1:], strict=False)]
    # 50 ms of CPU, and at least 500 ms from one pass to the next: at most a
    # tenth of a core.
    assert all(gap >= 0.05 / warmer.BUDGET for gap in gaps), gaps


def test_a_failing_pass_ends_the_dumps_and_leaves_save_alone(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(CannedTable):
        def dump_into(self, mark: int, sink: Callable[[], Scan], stop: threading.Event | None = None,
                      overlap: bool = False) -> Scan | None:
            raise RuntimeError("a bug")

    table = Broken()
    w = warmer.Warmer(100, lambda: table, interval=0.01)
    asyncio.run(w.run())
    assert w.stopped and w.stop() is savecache.EMPTY and table.closed
    assert "background dump for Save's cache failed unexpectedly: RuntimeError: a bug" in caplog.text
