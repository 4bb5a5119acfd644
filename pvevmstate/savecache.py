"""Save's cache: each entry's encoded pieces, made ahead from background dumps.

The dump inside the VM's downtime stays the truth: Save sends exactly the
entries it finds there, as it finds them. What the cache saves is the
encoding. While the helper waits for Save (QEMU copies the VM's RAM
meanwhile: seconds to minutes), :mod:`pvevmstate.warmer` dumps the VM's
entries every few seconds through a :class:`Scan` and keeps each entry's
compact record and the rest of its save line (:class:`Pieces`). Save's own
dump goes through a :class:`Scan` of those pieces: a message found there
costs a lookup and its fresh timeout, and only what changed is decoded.

The key is a message's stable bytes (:attr:`pvevmstate.netlink.Layout.stable`):
all of it but the timeout's value, which Save reads fresh from the message
and writes into the pieces, and the values no entry field keeps (counters,
use count, ID, timestamps). So an entry that changed in anything Save sends
(protocol state, status bits, TCP flags, NAT, labels, zones) misses and is
encoded afresh, and one that only aged is found. The key holds 96 bits of
those bytes, not the bytes themselves (about 190 per entry, which would more
than double the cache): Python's SipHash of them (64 bits, keyed at random per
process, so no guest can aim at a collision) and their CRC-32. A changed
entry taken for an unchanged one needs a 96-bit collision: at 50,000 entries
that is about one Save in 10^19.

Pure: no I/O, no threads of its own. A published :class:`Pieces` is never
changed, so Save reads it while a background scan builds the next one.
"""

from __future__ import annotations

import heapq
import sys
import threading
import zlib
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from . import netlink, payload
from .model import IPS_EXPECTED, Entry
from .netlink import DumpChunk, LayoutCache
from .payload import compact, priority, savetext

_KEY_MASK = (1 << 64) - 1
#: The record an expected entry is cached as: Save never sends one.
EXPECTED = b""
_TIMEOUT_AT = compact.TIMEOUT_OFFSET
_NO_TIMEOUT = bytes(4)
_RECORD = compact.RECORD.size
#: Save lines whose rest is kept at most: no payload holds more lines than this.
MAX_LINES = payload.MAX_PAYLOAD // payload.MIN_TEXT_LINE + 1
#: Compact bytes per record (base64 included) below which a table of the
#: benchmark's mix never goes (~17 there): what the estimate of how many
#: save lines fit behind the compact section assumes.
MIN_ARMORED_RECORD = 12


def lines_wanted(count: int, limit: int = payload.MAX_PAYLOAD) -> int:
    """How many save line rests to keep for a table of ``count`` entries.

    As many as can fit behind the smallest compact section such a table may
    have, and at least a few hundred: a line needed but not kept costs Save
    ~6 µs to make, a line kept costs ~250 bytes for as long as the helper waits.
    """
    room = limit - count * MIN_ARMORED_RECORD
    return min(MAX_LINES, max(256, room // payload.MIN_TEXT_LINE + 1))


def key_of(parts: Iterable[bytes]) -> int:
    """The cache key of a message's stable bytes (in pieces, as :attr:`Layout.stable` reads them)."""
    data = b"".join(parts)
    return hash(data) & _KEY_MASK | zlib.crc32(data) << 64


#: Keys sorted in one C call: a background pass must not hold the GIL for
#: long either (the event loop answers every VM's ``Id``).
_RUN = 4096


def _sorted_halves(keys: Iterable[int]) -> tuple[list[int], array[int], array[int]]:
    """The keys sorted by their low 64 bits, and their two halves as arrays."""
    pairs = [(k & _KEY_MASK, k) for k in keys]
    runs = [sorted(pairs[i:i + _RUN]) for i in range(0, len(pairs), _RUN)]
    ordered = [k for _low, k in heapq.merge(*runs)]
    return ordered, array("Q", [k & _KEY_MASK for k in ordered]), array("I", [k >> 64 for k in ordered])


def _find(hashes: array[int], crcs: array[int], key: int) -> int:
    """Where ``key`` is in the sorted halves, or -1."""
    low = key & _KEY_MASK
    i = bisect_left(hashes, low)
    crc = key >> 64
    while i < len(hashes) and hashes[i] == low:
        if crcs[i] == crc:
            return i
        i += 1
    return -1


#: A record's save line rest: not kept, or conntrack(8) cannot load its line.
_NOT_KEPT, _NO_LINE = -1, -2


class RecordTable:
    """key -> record and save line rest, in flat buffers instead of dicts of objects.

    Dicts would hold a key object and a bytes object per entry (~260 bytes
    with the dict's own share); these buffers hold ~150 bytes an entry and no
    object per entry at all, so the memory a background pass frees goes back
    to the system instead of staying in the heap around long-lived objects.
    Lookups bisect the sorted 64-bit halves of the keys (about 17 steps at
    50,000 entries) and compare the CRC half; the slot found gives the record
    and the rest both.

    :param found: key -> record (:data:`EXPECTED` for an expected entry)
    :param rests: key -> the rest of its save line, or None when conntrack(8)
        cannot load its line, for the keys whose rest is kept
    """

    __slots__ = ("_ends", "_expected", "_records", "_starts", "_text", "crcs", "hashes")

    def __init__(self, found: Mapping[int, bytes], rests: Mapping[int, str | None] | None = None) -> None:
        # The keys' low and high halves, sorted by the low one (read-only:
        # Save's scan searches them inline).
        keys, self.hashes, self.crcs = _sorted_halves(k for k, r in found.items() if r)
        self._records = b"".join([found[k] for k in keys])
        self._expected = frozenset(k for k, r in found.items() if not r)
        rests = rests or {}
        texts: list[str] = []
        self._starts, self._ends = array("i"), array("i")
        at = 0
        for k in keys:
            rest = rests.get(k, _NOT_KEPT)
            if isinstance(rest, str):
                texts.append(rest)
                self._starts.append(at)
                at += len(rest)
                self._ends.append(at)
            else:
                self._starts.append(_NOT_KEPT if rest == _NOT_KEPT else _NO_LINE)
                self._ends.append(0)
        self._text = "".join(texts)

    def __len__(self) -> int:
        return len(self.hashes) + len(self._expected)

    def find(self, key: int) -> int:
        """The slot of ``key``'s record, or -1 (also for an expected entry)."""
        return _find(self.hashes, self.crcs, key)

    def expected(self, key: int) -> bool:
        """Whether ``key`` is an expected entry's."""
        return key in self._expected

    def record(self, slot: int) -> bytes:
        """The record in ``slot`` (timeout 0)."""
        return self._records[slot * _RECORD:(slot + 1) * _RECORD]

    def rest(self, slot: int) -> tuple[bool, str | None]:
        """Whether the rest of ``slot``'s save line is kept, and the rest (None: no line)."""
        start = self._starts[slot]
        if start >= 0:
            return True, self._text[start:self._ends[slot]]
        return start == _NO_LINE, None


@dataclass(frozen=True, slots=True)
class Pieces:
    """One generation of the cache: what a background dump found, ready to send.

    Never changed once made: Save reads it without a lock.
    """

    #: key -> the entry's compact record with timeout 0 (:data:`EXPECTED` for
    #: an expected entry), and the rest of its save line
    #: (:func:`savetext.render_rest`) for the entries most likely to go as
    #: save lines (:func:`lines_wanted`).
    records: RecordTable = field(default_factory=lambda: RecordTable({}))
    #: The layouts the background dumps learned (safe to share between
    #: threads): Save's scan reads by them instead of learning them again.
    layouts: LayoutCache | None = None

    def __len__(self) -> int:
        return len(self.records)


EMPTY = Pieces(RecordTable({}))


@runtime_checkable
class ScanTable(Protocol):
    """A conntrack table whose dumps a :class:`Scan` can read (blocking calls;
    :class:`pvevmstate.netlink.conntrack.Conntrack`)."""

    @property
    def layouts(self) -> LayoutCache:
        """The message layouts learned on this table's dumps."""
        ...

    def dump_into(self, mark: int, sink: Callable[[], Scan],
                  stop: threading.Event | None = None, overlap: bool = False) -> Scan | None:
        """Feed a dump of the entries with ``mark`` to a new ``sink()``; None when stopped."""
        ...

    def close(self) -> None:
        """Close the socket."""
        ...


def _rest(e: Entry) -> str | None:
    return None if savetext.text_problem(e) is not None else savetext.render_rest(e)


class Scan:
    """One dump, message by message through the cache: the items Save sends.

    Feed it the dump's datagrams (:meth:`feed`); it is then a
    :class:`pvevmstate.payload.Sendable`: records with their fresh timeouts,
    save lines on demand. Expected entries are counted, not items.

    :param pieces: the cache to look messages up in (:data:`EMPTY`: none)
    :param layouts: the socket's learned message layouts
    :param collect: keep what this dump found, for :meth:`pieces` (background scans)
    """

    def __init__(self, pieces: Pieces, layouts: LayoutCache, collect: bool = False) -> None:
        self._pieces = pieces
        self._layouts = layouts
        self.keys: list[int] = []
        self._records: list[bytes] = []
        self._timeouts = array("I")
        #: Each item's slot in the cache's table (-1: encoded by this scan).
        self._slots = array("i")
        #: Rests made during this scan (misses, and lines not in the cache).
        self._rests: dict[int, str | None] = {}
        #: The next generation's records (background scans only).
        self._found: dict[int, bytes] | None = {} if collect else None
        #: Entries found in the cache, and expected entries left out.
        self.hits = self.expected = 0

    # ------------------------------------------------------------- scanning

    def feed(self, buf: bytes, size: int, seq: int) -> DumpChunk:
        """Take in one datagram of the dump whose request had ``seq``."""
        # Once per entry inside the downtime: a found entry costs one read of
        # its stable bytes, one lookup and one read of its timeout; so the
        # names it uses are locals here.
        layouts = self._layouts
        known = layouts.snapshot()
        table = self._pieces.records
        find, record_at = table.find, table.record
        hashes, crcs = table.hashes, table.crcs
        size_of = len(hashes)
        keys, records, timeouts, slots = self.keys, self._records, self._timeouts, self._slots
        found = self._found
        join, crc32, mask = b"".join, zlib.crc32, _KEY_MASK
        from_bytes = int.from_bytes

        def message(buf: bytes, off: int, mlen: int) -> None:
            nonlocal known
            lays = known.get((mlen, buf[off + 16]))
            if lays is None:
                # Learned since this datagram began (a miss learns its layout)?
                known = layouts.snapshot()
                lays = known.get((mlen, buf[off + 16]))
            if lays is not None:
                for lay in lays:
                    data = join(lay.stable(buf, off))
                    # key_of's two halves, apart for the inline search.
                    low, crc = hash(data) & mask, crc32(data)
                    key = low | crc << 64
                    # The search of RecordTable.find, inline for the common case.
                    slot = bisect_left(hashes, low)
                    if not (slot < size_of and hashes[slot] == low and crcs[slot] == crc):
                        slot = find(key)
                    if slot < 0:
                        if table.expected(key):
                            self.hits += 1
                            self._take(key, EXPECTED, buf, off, -1)
                            return
                        continue
                    self.hits += 1
                    record = record_at(slot)
                    if found is not None:
                        self._take(key, record, buf, off, lay.timeout_at, slot=slot)
                        return
                    at = lay.timeout_at
                    keys.append(key)
                    records.append(record)
                    slots.append(slot)
                    timeouts.append(from_bytes(buf[off + at:off + at + 4], "big") if at >= 0 else 0)
                    return
            self._miss(buf, off, mlen)

        return netlink.walk_dump(buf, size, seq, message)

    def _take(self, key: int, record: bytes, buf: bytes, off: int, at: int, *, slot: int = -1) -> None:
        if self._found is not None and key >= 0:
            self._found[key] = record
        if not record:  # EXPECTED
            self.expected += 1
            return
        self.keys.append(key)
        self._records.append(record)
        self._slots.append(slot)
        self._timeouts.append(int.from_bytes(buf[off + at:off + at + 4], "big") if at >= 0 else 0)

    def _miss(self, buf: bytes, off: int, mlen: int) -> None:
        e = self._layouts.decode_message(buf, off, mlen)
        lay = self._layouts.layout_of(buf, off, mlen)
        # An irregular message has no layout and so no key: a negative one,
        # which no cache holds, keeps it out.
        key = key_of(lay.stable(buf, off)) if lay is not None else -1 - len(self.keys)
        if (e.status or 0) & IPS_EXPECTED:
            self._take(key, EXPECTED, buf, off, -1)
            return
        record = compact.records((e,))[0]
        # Cached with timeout 0: the fresh one is written in when it is sent.
        record = record[:_TIMEOUT_AT] + _NO_TIMEOUT + record[_TIMEOUT_AT + 4:]
        self._take(key, record, buf, off, lay.timeout_at if lay is not None else -1)
        if lay is None:
            self._timeouts[-1] = e.timeout or 0

    # ------------------------------------------------------------- Sendable

    def __len__(self) -> int:
        return len(self._records)

    def raw(self) -> bytearray:
        raw = bytearray(b"".join(self._records))
        timeouts = self._timeouts
        if sys.byteorder != "little":
            timeouts = array("I", timeouts)
            timeouts.byteswap()
        # The records' timeout fields, written column-wise (records are little-endian).
        data = timeouts.tobytes()
        for i in range(4):
            raw[_TIMEOUT_AT + i::_RECORD] = data[i::4]
        return raw

    def _entry(self, i: int) -> Entry:
        """Item ``i`` as an entry, made from its record (which carries every field a line shows)."""
        record = bytearray(self._records[i])
        record[_TIMEOUT_AT:_TIMEOUT_AT + 4] = self._timeouts[i].to_bytes(4, "little")
        return compact.entry_of(bytes(record))

    def rest(self, i: int) -> str | None:
        """The rest of item ``i``'s save line, or None when conntrack(8) cannot load it."""
        key = self.keys[i]
        slot = self._slots[i]
        if slot >= 0:
            cached, rest = self._pieces.records.rest(slot)
            if cached:
                return rest
        if key in self._rests:
            return self._rests[key]
        rest = self._rests[key] = _rest(self._entry(i))
        return rest

    def lines(self, positions: Iterable[int]) -> Iterator[str]:
        timeouts = self._timeouts
        for i in positions:
            rest = self.rest(i)
            if rest is not None:
                yield "-A -t %d%s" % (timeouts[i], rest)

    def entries(self) -> Sequence[Entry]:
        return [self._entry(i) for i in range(len(self._records))]

    # ------------------------------------------------------------- background

    def pieces(self, lines: int | None = None) -> Pieces:
        """The next generation (a scan made with ``collect``): every entry of
        this dump, and the save line rests of the ``lines`` most important,
        made now where missing."""
        made = self.pieces_until(threading.Event(), lines)
        assert made is not None
        return made

    def pieces_until(self, stop: threading.Event, lines: int | None = None) -> Pieces | None:
        """:meth:`pieces`, or None when ``stop`` is set meanwhile (Save has
        begun: a background thread must not compete with it for long)."""
        found = self._found if self._found is not None else {}
        if lines is None:
            lines = lines_wanted(len(self._records))
        top = priority.first_of_keys(compact.priority_keys(self.raw()), lines)
        rests: dict[int, str | None] = {}
        for n, i in enumerate(top):
            if n % 256 == 0 and stop.is_set():
                return None
            if self.keys[i] >= 0:
                rests[self.keys[i]] = self.rest(i)
        if stop.is_set():
            return None
        return Pieces(RecordTable(found, rests), self._layouts)
