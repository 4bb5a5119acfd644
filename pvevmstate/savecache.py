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
encoded afresh, and one that only aged is found. The key holds 64 bits of
those bytes, not the bytes themselves (about 190 per entry, which would more
than double the cache): Python's SipHash of them, keyed at random per
process, so no guest can aim at a collision. A changed entry taken for an
unchanged one needs its key to equal the one in its place in the last dump
(2^-64), or, where the table changed, any of the cached keys: at 50,000
cached entries about 3 in 10^15 for each entry that changed.

The kernel dumps a table in the same order each time (hash bucket by
bucket), so the cache keeps the entries in the order of the dump it came
from, and Save's scan expects each message to be the one after the last
found: a whole datagram of unchanged entries is checked by comparing its
keys with a slice of the cache's, and taken as one slice of records. Only
where the table changed does the scan search (a sorted index) and decode.

Pure: no I/O, no threads of its own. A published :class:`Pieces` is never
changed, so Save reads it while a background scan builds the next one.
"""

from __future__ import annotations

import heapq
import operator
import sys
import threading
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import add, itemgetter, rshift
from typing import Protocol, TypeVar, cast, runtime_checkable

from . import netlink, payload
from .model import IPS_EXPECTED, Entry
from .netlink import DumpChunk, Layout, LayoutCache
from .payload import compact, priority, savetext

_TIMEOUT_AT = compact.TIMEOUT_OFFSET
_NO_TIMEOUT = bytes(4)
_RECORD = compact.RECORD.size
#: Save lines whose rest is kept at most: no payload holds more lines than this.
MAX_LINES = payload.MAX_PAYLOAD // payload.MIN_TEXT_LINE + 1
#: Compact bytes per record (base64 included) below which a table of the
#: benchmark's mix never goes (~17 there): what the estimate of how many
#: save lines fit behind the compact section assumes.
MIN_ARMORED_RECORD = 12
_BIG_ENDIAN = sys.byteorder == "big"
#: Records Save's scan gathers before it shuffles them: few enough that it
#: is done before the kernel has the next datagrams ready, enough that the
#: ~130 slices per batch cost little per record.
STREAM_BATCH = 1024


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
    return hash(b"".join(parts))


#: Keys sorted in one C call at most: a background pass must not hold the
#: GIL for long either (the event loop answers every VM's ``Id``).
_RUN = 4096


def _sorted_slots(hashes: array[int]) -> array[int]:
    """The slots of ``hashes`` ordered by their key (sorted a run at a time, then merged)."""
    key = hashes.__getitem__
    runs = [sorted(range(i, min(i + _RUN, len(hashes))), key=key) for i in range(0, len(hashes), _RUN)]
    return array("i", heapq.merge(*runs, key=key))


#: A slot's save line rest when conntrack(8) cannot load its line (None: not kept).
_NO_LINE = b""


T = TypeVar("T")


def _picked(values: Sequence[T], positions: Sequence[int]) -> list[T]:
    """``[values[p] for p in positions]``, in one C call."""
    if len(positions) > 1:
        return list(itemgetter(*positions)(values))
    return [values[p] for p in positions]


class RecordTable:
    """One dump's entries, in its order: keys, records and save line rests.

    Dicts would hold a key object and a bytes object per entry (~260 bytes
    with the dict's own share); keys and records are flat buffers here, ~140
    bytes an entry and no object per entry, so the memory a background pass
    frees goes back to the system instead of staying in the heap around
    long-lived objects. The save line rests are objects (one per line that
    may go as text, a few thousand at most): Save splices them into its text
    as they are. A slot is an entry's place in the dump; a key not where it
    was expected is searched in the slots sorted by key (about 17 steps at
    50,000).

    :param hashes: each slot's key
    :param records: each slot's compact record (timeout 0), end to end
    :param rests: slot -> the rest of its save line (ASCII), or None when
        conntrack(8) cannot load its line, for the slots whose rest is kept
    :param expected: the keys of expected entries (Save never sends one)
    """

    __slots__ = ("_expected", "_order", "_rests", "data", "hashes", "unloadable")

    def __init__(self, hashes: array[int], records: bytes, rests: Mapping[int, bytes | None] | None = None,
                 expected: Iterable[int] = ()) -> None:
        assert len(records) == len(hashes) * _RECORD
        #: Each slot's key, and the records (read-only: Save's scan reads them inline).
        self.hashes = hashes
        self.data = records
        self._order = _sorted_slots(hashes)
        self._expected = frozenset(expected)
        kept: list[bytes | None] = [None] * len(hashes)
        for slot, rest in (rests or {}).items():
            kept[slot] = _NO_LINE if rest is None else rest
        self._rests = kept
        #: Whether some kept rest is "no line" (text lists are then filtered).
        self.unloadable = _NO_LINE in kept

    def __len__(self) -> int:
        return len(self.hashes) + len(self._expected)

    def find(self, key: int) -> int:
        """The slot of ``key``'s record, or -1 (also for an expected entry)."""
        hashes, order = self.hashes, self._order
        i = bisect_left(order, key, key=hashes.__getitem__)
        if i < len(order) and hashes[order[i]] == key:
            return order[i]
        return -1

    def expected(self, key: int) -> bool:
        """Whether ``key`` is an expected entry's."""
        return key in self._expected

    def record(self, slot: int) -> bytes:
        """The record in ``slot`` (timeout 0)."""
        return self.data[slot * _RECORD:(slot + 1) * _RECORD]

    def rest(self, slot: int) -> tuple[bool, bytes | None]:
        """Whether the rest of ``slot``'s save line is kept, and the rest (None: no line)."""
        rest = self._rests[slot]
        if rest is None:
            return False, None
        return True, rest or None

    def rests(self, slots: Sequence[int]) -> tuple[list[bytes | None], list[int]]:
        """The kept rests of many slots (:meth:`rest` in bulk; ``b""``: no
        line), and the indexes into ``slots`` whose rest is not kept or whose
        slot is -1: their places in the list hold nothing meaningful."""
        if not self._rests:
            return [None] * len(slots), list(range(len(slots)))
        rests = _picked(self._rests, slots)  # slot -1: the last one's, fixed below
        missing: list[int] = []
        if slots and (min(slots) < 0 or None in rests):
            missing = [k for k, (slot, rest) in enumerate(zip(slots, rests, strict=True))
                       if slot < 0 or rest is None]
        return rests, missing


@dataclass(frozen=True, slots=True)
class Pieces:
    """One generation of the cache: what a background dump found, ready to send.

    Never changed once made: Save reads it without a lock.
    """

    #: The dump's entries: each one's key and compact record with timeout 0,
    #: the keys of expected entries, and the rest of the save line
    #: (:func:`savetext.render_rest`) of the entries most likely to go as
    #: save lines (:func:`lines_wanted`).
    records: RecordTable = field(default_factory=lambda: RecordTable(array("q"), b""))
    #: The layouts the background dumps learned (safe to share between
    #: threads): Save's scan reads by them instead of learning them again.
    layouts: LayoutCache | None = None
    #: The records' columns compressed but for the timeout's
    #: (:func:`compact.stable_segments`): a Save that finds the very same
    #: entries in the same order compresses only their fresh timeouts.
    segments: compact.Precompressed | None = None

    def __len__(self) -> int:
        return len(self.records)


EMPTY = Pieces(RecordTable(array("q"), b""))


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


def _rest(e: Entry) -> bytes | None:
    return None if savetext.text_problem(e) is not None else savetext.render_rest(e).encode("ascii")


class _Readers:
    """What the bulk path reads a message by, from its (length, family): the
    first layout's stable bytes and where its timeout is, for layouts that
    have one."""

    __slots__ = ("stable", "timeout_at", "version")

    def __init__(self, known: Mapping[tuple[int, int], tuple[Layout, ...]]) -> None:
        self.version = known
        self.stable: dict[int, Callable[[bytes, int], tuple[bytes, ...]]] = {}
        self.timeout_at: dict[int, int] = {}
        for (mlen, family), lays in known.items():
            # (Netlink aligns every attribute to 4 bytes; one that were not
            # could not be read as a word.)
            if lays[0].timeout_at >= 0 and lays[0].timeout_at % 4 == 0:
                self.stable[mlen << 8 | family] = lays[0].stable
                self.timeout_at[mlen << 8 | family] = lays[0].timeout_at


class Scan:
    """One dump, message by message through the cache: the items Save sends.

    Feed it the dump's datagrams (:meth:`feed`); it is then a
    :class:`pvevmstate.payload.Sendable`: records with their fresh timeouts,
    save lines on demand. Expected entries are counted, not items.

    :param pieces: the cache to look messages up in (:data:`EMPTY`: none)
    :param layouts: the socket's learned message layouts
    :param collect: keep what this dump found, for :meth:`pieces` (background
        scans); else the records are byte-shuffled as they come (Save's scan,
        :class:`pvevmstate.payload.compact.ColumnStream`)
    :param after_feed: called after each datagram is taken in, while the
        kernel makes the next (Save: :meth:`pvevmstate.heap.Prefault.step`)
    :param ahead: Save's: make each datagram's priority keys as it comes,
        while the kernel makes the next (:meth:`priority_keys`)
    """

    def __init__(self, pieces: Pieces, layouts: LayoutCache, collect: bool = False,
                 after_feed: Callable[[], None] | None = None, ahead: bool = False) -> None:
        self._pieces = pieces
        self._layouts = layouts
        self._readers = _Readers({})
        self._collect = collect
        self._after_feed = after_feed
        #: The items' records (timeout 0) end to end, in pieces: a run of
        #: unchanged entries is one slice of the cache's records.
        self._chunks: list[bytes] = []
        self._joined: bytes | None = None
        self._count = 0
        #: Each item's key, its fresh timeout, and its slot in the cache's
        #: table (-1: encoded by this scan).
        self._keys = array("q")
        self._timeouts = array("I")
        self._slots = array("i")
        #: Items without a key (irregular messages: never cached).
        self._keyless: set[int] = set()
        #: Rests made by this scan, by item (misses, and lines not in the cache).
        self._rests: dict[int, bytes | None] = {}
        #: The keys of the expected entries found (background scans only).
        self._expected_keys: list[int] = []
        #: The slot the next message is expected to have.
        self._next = 0
        #: Save's records as they come, shuffled (not in background scans:
        #: they would pay for it on every pass), how many chunks went in, and
        #: the columns at the end.
        self._stream = None if collect else compact.ColumnStream()
        self._streamed = 0
        self._columns: Sequence[bytes] | None = None
        #: Made as the datagrams come (``ahead``): every item's priority key,
        #: a datagram's sorted apiece.
        self._keys_made: list[int] | None = [] if ahead else None
        #: Whether some item is not the cache's entry in the slot of its
        #: own position (item i in slot i: the table as the last dump had it).
        self._displaced = False
        #: Entries found in the cache, and expected entries left out.
        self.hits = self.expected = 0

    # ------------------------------------------------------------- scanning

    def feed(self, buf: bytes, size: int, seq: int) -> DumpChunk:
        """Take in one datagram of the dump whose request had ``seq``."""
        start, first_chunk = self._count, len(self._chunks)
        chunk = self._take(buf, size, seq)
        if self._keys_made is not None and self._count > start:
            self._make_keys(start, first_chunk)
        if self._after_feed is not None:
            self._after_feed()
        return chunk

    def _take(self, buf: bytes, size: int, seq: int) -> DumpChunk:
        # Runs once per datagram inside the downtime, so every step below is
        # one C loop over the datagram's messages (map), not a Python step
        # per message: keys, timeouts, and one comparison of the keys with
        # the cache's from the slot expected next.
        offsets, lengths, chunk = netlink.dump_entries(buf, size, seq)
        if not offsets:
            return chunk
        self._joined = None
        known = self._layouts.snapshot()
        readers = self._readers
        if readers.version != known:
            readers = self._readers = _Readers(known)
        kinds = list(map(operator.or_, map(operator.lshift, lengths, repeat(8)),
                         map(buf.__getitem__, map(add, offsets, repeat(16)))))
        stables = list(map(readers.stable.get, kinds))
        if None in stables or len(buf) % 4:
            # A layout not learned yet (or one without a timeout): message by message.
            for off, mlen in zip(offsets, lengths, strict=True):
                self._miss(buf, off, mlen, None)
            return chunk
        readable = cast("list[Callable[[bytes, int], tuple[bytes, ...]]]", stables)
        keys = array("q", map(hash, map(b"".join, map(operator.call, readable, repeat(buf), offsets))))
        # Timeouts are aligned 32-bit words (netlink pads to 4): read them as such.
        words = memoryview(buf).cast("I")
        timeouts = array("I", map(words.__getitem__, map(rshift, map(add, offsets, map(
            readers.timeout_at.__getitem__, kinds)), repeat(2))))
        if not _BIG_ENDIAN:
            timeouts.byteswap()
        table = self._pieces.records
        p, m = self._next, len(keys)
        if table.hashes[p:p + m] == keys:
            # All as in the last dump: one slice of records.
            self._chunks.append(table.data[p * _RECORD:(p + m) * _RECORD])
            self._keys += keys
            self._timeouts += timeouts
            self._displaced = self._displaced or p != self._count
            self._slots.extend(range(p, p + m))
            self._count += m
            self.hits += m
            self._next = p + m
        else:
            for k in range(m):
                if not self._cached(keys[k], timeouts[k]):
                    self._miss(buf, offsets[k], lengths[k], keys[k])
        if self._stream is not None and self._count - self._stream.count >= STREAM_BATCH:
            self._stream_more()
        return chunk

    def _make_keys(self, start: int, first_chunk: int) -> None:
        """The priority keys of the items from ``start`` on (their records:
        the chunks from ``first_chunk`` on), as a sorted run.

        Only the keys: ~50 µs a datagram. Making the save lines here too
        (~2 µs an entry) kept this thread busy for about as long as the
        kernel takes to make a datagram, and the dump took ~6 ms longer at
        5,000 entries: the receiving thread waited for the GIL.
        """
        if self._count > compact.MAX_RECORDS:
            # More than a compact section holds: the save lines follow the
            # section's own order, so keys made here would go unused.
            self._keys_made = None
            return
        assert self._keys_made is not None
        timeouts = self._timeouts[start:self._count]
        if _BIG_ENDIAN:
            timeouts.byteswap()
        keys = compact.priority_keys_at(b"".join(self._chunks[first_chunk:]), timeouts.tobytes(), start)
        keys.sort()  # sorted runs: sorting all of them at the end then costs half as much
        self._keys_made += keys

    def _stream_more(self) -> None:
        """Give the stream the records it has not had yet."""
        assert self._stream is not None and self._columns is None
        if self._streamed < len(self._chunks):
            self._stream.add(b"".join(self._chunks[self._streamed:]))
            self._streamed = len(self._chunks)

    def _cached(self, key: int, timeout: int) -> bool:
        """Take the message with ``key`` from the cache (at the slot expected
        next, or wherever it is); False when the cache does not hold it."""
        table = self._pieces.records
        p = self._next
        if p < len(table.hashes) and table.hashes[p] == key:
            slot = p
        else:
            slot = table.find(key)
        if slot >= 0:
            self._hit(slot, key, timeout)
        elif table.expected(key):
            self.hits += 1
            self._expect(key)
        else:
            return False
        return True

    def _hit(self, slot: int, key: int, timeout: int) -> None:
        self._chunks.append(self._pieces.records.record(slot))
        self._keys.append(key)
        self._timeouts.append(timeout)
        self._displaced = self._displaced or slot != self._count
        self._slots.append(slot)
        self._count += 1
        self.hits += 1
        self._next = slot + 1

    def _expect(self, key: int | None) -> None:
        self.expected += 1
        if self._collect and key is not None:
            self._expected_keys.append(key)

    def _miss(self, buf: bytes, off: int, mlen: int, tried: int | None) -> None:
        """A message not found under ``tried`` (None: not looked up): by its
        own layout it may still be cached; else it is decoded and encoded."""
        layouts = self._layouts
        lay = layouts.layout_of(buf, off, mlen)
        e = None
        if lay is None:
            e = layouts.decode_message(buf, off, mlen)  # learns its layout, if it has one
            lay = layouts.layout_of(buf, off, mlen)
        key = timeout = None
        if lay is not None:
            key = key_of(lay.stable(buf, off))
            at = lay.timeout_at
            timeout = int.from_bytes(buf[off + at:off + at + 4], "big") if at >= 0 else None
            if key != tried and timeout is not None and self._cached(key, timeout):
                return
        if e is None:
            e = layouts.decode_message(buf, off, mlen)
        if (e.status or 0) & IPS_EXPECTED:
            self._expect(key)
            return
        record = compact.records((e,))[0]
        # Kept with timeout 0: the fresh one is written in when it is sent.
        self._chunks.append(record[:_TIMEOUT_AT] + _NO_TIMEOUT + record[_TIMEOUT_AT + 4:])
        if key is None:
            self._keyless.add(self._count)
        self._keys.append(key or 0)
        self._timeouts.append(e.timeout or 0 if timeout is None else timeout)
        self._displaced = True
        self._slots.append(-1)
        self._count += 1

    # ------------------------------------------------------------- Sendable

    def __len__(self) -> int:
        return self._count

    def _records(self) -> bytes:
        """Every item's record (timeout 0), end to end."""
        if self._joined is None:
            if self._stream is not None and self._columns is None:
                self._stream_more()  # (it goes on from the one chunk left)
            self._joined = b"".join(self._chunks)
            self._chunks = [self._joined]
            self._streamed = 1
        return self._joined

    def _timeout_bytes(self) -> bytes:
        """Every item's timeout, 4 bytes little-endian each (as records hold them)."""
        timeouts = self._timeouts
        if _BIG_ENDIAN:
            timeouts = array("I", timeouts)
            timeouts.byteswap()
        return timeouts.tobytes()

    def columns(self) -> Sequence[bytes]:
        if self._columns is None:
            if self._stream is None:
                self._columns = compact.columns_of(self.raw())
            else:
                self._stream_more()
                self._columns = self._stream.finish(self._timeout_bytes())
        return self._columns

    def ready_segments(self) -> compact.Precompressed | None:
        # The cache's, when the items are its entries exactly: each one in
        # the slot of its place (nothing new, changed, gone or moved).
        table = self._pieces.records
        segments = self._pieces.segments
        if segments is None or self._count != len(table) or self._keyless:
            return None
        return None if self._displaced else segments

    def raw(self) -> bytearray:
        raw = bytearray(self._records())
        # The records' timeout fields, written column-wise (records are little-endian).
        data = self._timeout_bytes()
        for i in range(4):
            raw[_TIMEOUT_AT + i::_RECORD] = data[i::4]
        return raw

    def _entry(self, i: int) -> Entry:
        """Item ``i`` as an entry, made from its record (which carries every field a line shows)."""
        record = bytearray(self._records()[i * _RECORD:(i + 1) * _RECORD])
        record[_TIMEOUT_AT:_TIMEOUT_AT + 4] = self._timeouts[i].to_bytes(4, "little")
        return compact.entry_of(bytes(record))

    def rest(self, i: int) -> bytes | None:
        """The rest of item ``i``'s save line, or None when conntrack(8) cannot load it."""
        slot = self._slots[i]
        if slot >= 0:
            cached, rest = self._pieces.records.rest(slot)
            if cached:
                return rest
        if i in self._rests:
            return self._rests[i]
        rest = self._rests[i] = _rest(self._entry(i))
        return rest

    def priority_keys(self) -> list[int]:
        if self._keys_made is not None:
            return self._keys_made
        return compact.priority_keys_of(self.columns())

    def lines(self, positions: Sequence[int], mark: int) -> savetext.Lines:
        # In bulk, for the thousands of lines a hybrid payload may take: each
        # step below is one C loop over all the lines, not a Python step per
        # line. A line whose rest the cache holds is its fresh timeout and
        # that rest, as it is; the others (misses, rests not kept) are fixed
        # up after.
        table = self._pieces.records
        slots = _picked(self._slots, positions) if self._displaced else positions
        rests, missing = table.rests(slots)
        for k in missing:
            rests[k] = self.rest(positions[k]) or _NO_LINE
        timeouts = _picked(self._timeouts, positions)
        if (missing or table.unloadable) and _NO_LINE in rests:  # lines conntrack(8) cannot load are left out
            timeouts = [t for t, r in zip(timeouts, rests, strict=True) if r]
            rests = [r for r in rests if r]
        return savetext.join_rests(timeouts, cast("list[bytes]", rests), mark)

    def entries(self) -> Sequence[Entry]:
        return [self._entry(i) for i in range(self._count)]

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
        if lines is None:
            lines = lines_wanted(self._count)
        top = priority.first_of_keys(compact.priority_keys(self.raw()), lines)
        rests: dict[int, bytes | None] = {}
        for n, i in enumerate(top):
            if n % 256 == 0 and stop.is_set():
                return None
            rests[i] = self.rest(i)
        if stop.is_set():
            return None
        keys, records = self._keys, self._records()
        if self._keyless:  # an item without a key cannot be found: left out
            kept = [i for i in range(self._count) if i not in self._keyless]
            keys = array("q", map(keys.__getitem__, kept))
            records = b"".join([records[i * _RECORD:(i + 1) * _RECORD] for i in kept])
            slot_of = {i: n for n, i in enumerate(kept)}
            rests = {slot_of[i]: r for i, r in rests.items() if i in slot_of}
        segments = self.ready_segments()  # the last generation's, if nothing changed
        if segments is None:
            segments = compact.stable_segments(records, stop.is_set)
            if segments is None:
                return None
        return Pieces(RecordTable(keys, records, rests, self._expected_keys), self._layouts, segments)
