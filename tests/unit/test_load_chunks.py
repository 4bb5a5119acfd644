"""Load's chunks: each built while the one before is created, never past the table's room.

The kernel is stood in for by a table that takes its time to create a chunk
and may see other flows arrive meanwhile: what is checked here is Load's own
bookkeeping (sizes, the fill read between chunks only, refusals counted once).
The real kernel's side is in tests/integration/test_table_limits.py.
"""

from __future__ import annotations

import errno
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from pvevmstate import payload
from pvevmstate.errors import ConntrackError
from pvevmstate.model import CreateBatch, CreateResult, Entry, TableStats
from pvevmstate.vmstate import (
    DEFAULT_TABLE_RESERVE,
    LOAD_CHUNK,
    LOAD_FIRST_CHUNK,
    LOAD_SWITCH_INTERVAL,
    VMState,
    frequent_switches,
    load_ceiling,
    next_chunk,
)
from tests.corpus import raw_record, records

VMID = 100
MAXIMUM = 262_144


class Table:
    """A table whose creates take a while and let ``arrivals`` other flows in."""

    def __init__(self, count: int, arrivals: list[int]) -> None:
        self.count = count
        self.arrivals = arrivals
        self.sizes: list[int] = []
        self.peak = count
        self.reads = 0
        self.creating = threading.Event()
        #: When each create ran.
        self.spans: list[tuple[float, float]] = []
        #: The GIL's switch interval during each create.
        self.switch: list[float] = []
        #: For each batch numbered: the thread that numbered it.
        self.numbered: list[str] = []

    def reserve_seqs(self, n: int) -> int:
        self.numbered.append(threading.current_thread().name)
        return 1

    def create(self, batch: CreateBatch) -> CreateResult:
        assert not self.creating.is_set()
        self.creating.set()
        self.switch.append(sys.getswitchinterval())
        t0 = time.monotonic()
        time.sleep(0.1)  # the kernel's time: Load builds the next chunk meanwhile
        self.sizes.append(len(batch))
        self.count += len(batch)
        self.peak = max(self.peak, self.count)
        self.count += self.arrivals.pop(0) if self.arrivals else 0
        self.spans.append((t0, time.monotonic()))
        self.creating.clear()
        return CreateResult(created=len(batch))

    def stats(self) -> TableStats:
        assert not self.creating.is_set(), "the fill read while a chunk is in flight"
        self.reads += 1
        return TableStats(self.count, MAXIMUM)

    def dump(self, mark: int) -> list[Entry]:
        return []

    def close(self) -> None:
        pass


def _payload(n: int) -> tuple[bytes, set[int]]:
    """``n`` records, every 500th one refused (an unknown family): the data and their positions."""
    bad = set(range(7, n, 500))
    good = raw_record()
    return records(*(raw_record(family=7) if i in bad else good for i in range(n))), bad


def _sizes(n: int) -> list[tuple[int, int]]:
    """Load's chunks of ``n`` items with room for all: (start, stop) of each."""
    spans, start, size = [], 0, LOAD_FIRST_CHUNK
    while start < n:
        spans.append((start, min(start + size, n)))
        start, size = start + size, next_chunk(size)
    return spans


def test_chunks_start_small_and_grow_by_half_up_to_the_most() -> None:
    assert LOAD_FIRST_CHUNK < LOAD_CHUNK
    assert [s - a for a, s in _sizes(20_000)] == [256, 384, 576, 864, 1296, 1944, 2916, 4096, 4096, 3572]
    assert next_chunk(LOAD_CHUNK) == LOAD_CHUNK
    assert [next_chunk(size) for size in (1, 2, 3)] == [2, 3, 4]  # growing from any size


@pytest.fixture
def switch() -> Iterator[float]:
    """The process's switch interval set to Python's default for the test, and set back."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield sys.getswitchinterval()
    sys.setswitchinterval(before)


def test_the_switch_interval_is_set_back_when_create_fails(switch: float) -> None:
    class Failing(Table):
        def create(self, batch: CreateBatch) -> CreateResult:
            self.switch.append(sys.getswitchinterval())
            raise ConntrackError("sending create requests failed", errno.ENOBUFS)

    table = Failing(0, [])
    with pytest.raises(ConntrackError):
        VMState(VMID, table)._load(_payload(1000)[0])
    assert table.switch == [pytest.approx(LOAD_SWITCH_INTERVAL)]
    assert sys.getswitchinterval() == switch


def test_overlapping_loads_set_the_switch_interval_back_once_both_are_done(switch: float) -> None:
    first, second = frequent_switches(), frequent_switches()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert sys.getswitchinterval() == pytest.approx(LOAD_SWITCH_INTERVAL)  # the second still runs
    second.__exit__(None, None, None)
    assert sys.getswitchinterval() == switch
    for _ in range(3):  # whole microseconds: no drift, Load after Load
        sys.setswitchinterval(0.0002)
        before = sys.getswitchinterval()
        with frequent_switches():
            pass
        assert sys.getswitchinterval() == before


def test_every_chunk_is_built_while_the_one_before_is_created(monkeypatch: pytest.MonkeyPatch, switch: float) -> None:
    data, bad = _payload(12_000)
    table = Table(0, [])
    builds: list[tuple[float, float]] = []
    batch = payload.Incoming.batch

    def timed(self: payload.Incoming, *args: Any) -> CreateBatch:
        t0 = time.monotonic()
        try:
            return batch(self, *args)
        finally:
            builds.append((t0, time.monotonic()))

    monkeypatch.setattr(payload.Incoming, "batch", timed)
    assert switch > LOAD_SWITCH_INTERVAL
    report = VMState(VMID, table)._load(data)
    # Each chunk after the first was built while the chunk before was created.
    chunks = _sizes(12_000)
    assert len(builds) == len(table.spans) == len(chunks) == 8
    assert all(built[1] > span[0] and built[0] < span[1] for built, span in zip(builds[1:], table.spans, strict=False))
    # ... and numbered there, so the thread that sends it has nothing left to do but send.
    assert table.numbered == [threading.current_thread().name] * 8
    assert table.reads == 1 + 7  # before Load, then between two chunks (none after the last)
    assert table.sizes == [stop - start - sum(start <= i < stop for i in bad) for start, stop in chunks]
    # The GIL changed hands often while the chunks were created, and as before once Load was done.
    assert table.switch == [pytest.approx(LOAD_SWITCH_INTERVAL)] * 8
    assert sys.getswitchinterval() == switch
    assert report.result.created == 12_000 - len(bad)
    assert report.refused == len(bad) and not report.left_out
    assert [s.line_no for s in report.samples] == sorted(i + 1 for i in bad)[:len(report.samples)]


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every chunk Load builds, in order (one built again counts twice)."""
    sizes: list[int] = []
    batch = payload.Incoming.batch

    def counted(self: payload.Incoming, chunk: Sequence[int], *args: Any) -> CreateBatch:
        sizes.append(len(chunk))
        return batch(self, chunk, *args)

    monkeypatch.setattr(payload.Incoming, "batch", counted)
    return sizes


def test_a_chunk_built_ahead_is_sized_by_the_room_the_one_in_flight_leaves(builds: list[int]) -> None:
    # Room for 500: the first chunk takes 256, so the next is built for the 244 left, not for 384.
    data, _bad = _payload(12_000)
    ceiling = load_ceiling(MAXIMUM, DEFAULT_TABLE_RESERVE)
    table = Table(ceiling - 500, [])
    VMState(VMID, table)._load(data)
    assert builds[:2] == [256, 244] and table.peak <= ceiling


@pytest.mark.parametrize(("arrivals", "again"), [(600, True), (362, True), (361, False)])
def test_a_chunk_built_ahead_that_no_longer_fits_is_built_again(builds: list[int], arrivals: int, again: bool) -> None:
    # Room for 1,000: the first chunk takes 256 (one of them refused), the
    # next is built for 384 of the 744 left; ``arrivals`` other flows arrive
    # meanwhile. Past 361 the 384 no longer fit, and the chunk is built again
    # for what is left. Nothing goes past the ceiling, and the records
    # refused in the chunk built twice count once.
    data, bad = _payload(12_000)
    ceiling = load_ceiling(MAXIMUM, DEFAULT_TABLE_RESERVE)
    table = Table(ceiling - 1000, [arrivals])
    report = VMState(VMID, table)._load(data)
    assert table.peak <= ceiling and table.count == ceiling  # (a refused record takes no room)
    assert table.sizes[0] == LOAD_FIRST_CHUNK - 1
    left = 1000 - arrivals - table.sizes[0]
    if again:  # the 384 built again for what was left
        assert builds[:3] == [256, 384, left]
    else:  # taken as built; the next chunk fills what is left after it
        assert builds[:3] == [256, 384, left - table.sizes[1]]
    order = payload.Incoming(data, VMID).by_priority()
    taken = sum(table.sizes) + report.refused
    assert report.refused == sum(1 for i in order[:taken] if i in bad) > 0
    assert sum(report.left_out.values()) == 12_000 - taken
