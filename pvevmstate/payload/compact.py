"""The compact payload: every field of every entry, in a fraction of the save text.

QEMU carries at most 1 MiB; the save text fills that at about 5,000 entries and
drops what conntrack(8) does not print (TCP window scale and flags, labels,
NAT that changes ports only). This format keeps all of it and carries more
than 50,000 typical entries. It is pure conversion, no I/O.

Layout (all integers little-endian)::

    offset size  field
    0      4     magic  b"PVCT"
    4      1     version (1)
    5      1     compression (1 = zlib)
    6      2     record size (130 in version 1)
    8      4     number of records
    12     ...   zlib stream of the records, byte-shuffled: byte 0 of every
                 record, then byte 1 of every record, ... (so columns of
                 similar bytes sit together and compress well)

The encoder deflates each column on its own and ends it with a full flush, so
the stream is one zlib stream made of 130 independent deflate segments (any
inflater reads it as usual). This costs nothing in size (columns share little)
and lets Save size every prefix of a table exactly without compressing it
again from the start (:func:`largest_prefix`).

A record (:data:`RECORD`, 130 bytes)::

    B family (2 = IPv4, 10 = IPv6)   B protocol number     I present (bits below)
    16s orig src  16s orig dst  16s reply src  16s reply dst   (IPv4: first 4 bytes)
    H sport  H dport  H reply sport  H reply dport             (GRE: keys)
    B icmp type  B icmp code  H icmp id  B reply type  B reply code  H reply id
    I timeout (s)  I status (IPS_* bits)
    H zone  H orig zone  H reply zone
    B state  B DCCP role  I SCTP vtag orig  I SCTP vtag reply
    B TCP wscale orig  B TCP wscale reply  B TCP flags orig  B TCP flags reply
    16s labels

``present`` bit n (:data:`OPTIONAL` order) says field n was present (absent
fields are zero). Bit 30: the reply addresses are the original ones swapped
(no NAT); bit 31: so are the reply ports. Both save the reply tuple's bytes.
The mark is not carried: Load gives every entry the VM's mark.

Decoding is bounded: at most :data:`MAX_RECORDS` records, the inflated size
must be exactly ``count * 130`` bytes and is never inflated beyond that, so a
crafted payload can cost at most one ~26 MB record buffer and one pass over it;
entries are built from it a batch at a time (:class:`Records`).
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

from ..errors import CodecError
from ..memo import Memo
from ..model import AF_INET, AF_INET6, IPS_EXPECTED, Entry
from . import priority
from .base import Decoded

MAGIC = b"PVCT"
VERSION = 1
COMPRESSION_ZLIB = 1
HEADER = struct.Struct("<4sBBHI")
RECORD = struct.Struct("<BBI16s16s16s16sHHHHBBHBBHIIHHHBBIIBBBB16s")
RECORD_FIELDS = len(RECORD.unpack(bytes(RECORD.size)))
#: Where a record's timeout sits (Save writes fresh timeouts into cached records there).
TIMEOUT_OFFSET = struct.calcsize("<BBI16s16s16s16sHHHHBBHBBH")
#: Most records one payload may hold (~26 MB inflated, ~0.5 s to decode).
MAX_RECORDS = 200_000
#: zlib's strategy: run-length matches only (distance 1). A byte-shuffled
#: column is runs of equal bytes where it is not close to random, and
#: deflate's longer matches rarely pay for their bits there. Measured on a
#: typical 50,000-entry table: 626 KB in 18 ms of CPU, where the default
#: strategy makes 683 KB in 58 ms at level 4 and 669 KB in 128 ms at level 6.
#: Any inflate reads it (it is plain deflate). Machine-made tables of
#: sequential addresses and ports compress less well than with the default
#: strategy, which finds their repeats further back (200,000 such entries:
#: 430 KB instead of under 64 KB), still far within the 1 MiB.
STRATEGY = zlib.Z_RLE
#: zlib level (run-length matching makes the same bytes at every level above 0).
LEVEL = 6

#: Optional Entry fields, in ``present`` bit order.
OPTIONAL: tuple[str, ...] = (
    "sport", "dport", "reply_sport", "reply_dport",
    "icmp_type", "icmp_code", "icmp_id", "reply_icmp_type", "reply_icmp_code", "reply_icmp_id",
    "timeout", "status", "zone", "orig_zone", "reply_zone", "state", "dccp_role",
    "vtag_orig", "vtag_reply", "tcp_wscale_orig", "tcp_wscale_reply", "tcp_flags_orig",
    "tcp_flags_reply", "labels",
)
_BIT = {name: 1 << i for i, name in enumerate(OPTIONAL)}
ADDRS_SWAPPED = 1 << 30
PORTS_SWAPPED = 1 << 31
#: Every bit a ``present`` word may have; a record with another one is refused.
KNOWN = (1 << len(OPTIONAL)) - 1 | ADDRS_SWAPPED | PORTS_SWAPPED
_PAD = bytes(16)


def is_compact(data: bytes) -> bool:
    """Whether ``data`` starts like a compact payload (not save text, not ``\\x00``)."""
    return data[:4] == MAGIC


_optional_of = operator.attrgetter(*OPTIONAL)
_NONE_TYPE = type(None)
#: Per pattern of absent fields (the types of the optional values): the
#: ``present`` bits and a picker that puts 0 (or b"" for labels) where a
#: field is absent. Entries of a table share a handful of patterns, and
#: looking one up is much cheaper than testing 24 fields one by one.
_patterns: Memo[tuple[type, ...], tuple[int, Callable[[tuple[Any, ...]], tuple[Any, ...]]]] = Memo(4096)


def _pattern(types: tuple[type, ...]) -> tuple[int, Callable[[tuple[Any, ...]], tuple[Any, ...]]]:
    present = 0
    picks = []
    n = len(OPTIONAL)
    for i, (name, t) in enumerate(zip(OPTIONAL, types, strict=True)):
        if t is _NONE_TYPE:
            picks.append(n + 1 if name == "labels" else n)  # the 0 or the b"" after the values
        else:
            present |= _BIT[name]
            picks.append(i)
    found = (present, operator.itemgetter(*picks))
    _patterns.add(types, found)
    return found


def _record(e: Entry) -> bytes:
    values = _optional_of(e)
    types = tuple(map(type, values))
    found = _patterns.get(types)
    present, pick = found if found is not None else _pattern(types)
    osrc, odst, rsrc, rdst = e.orig_src, e.orig_dst, e.reply_src, e.reply_dst
    if rsrc == odst and rdst == osrc:
        present |= ADDRS_SWAPPED
        rsrc = rdst = _PAD
    fields = pick((*values, 0, b""))
    sport, dport, rsport, rdport = values[0], values[1], values[2], values[3]
    if sport is not None and rsport == dport and rdport == sport:
        present |= PORTS_SWAPPED
        fields = (fields[0], fields[1], 0, 0, *fields[4:])
    return RECORD.pack(e.family, e.proto, present, osrc, odst, rsrc, rdst, *fields)


def records(entries: Sequence[Entry]) -> list[bytes]:
    """The records of ``entries``, in order (one per entry, :data:`RECORD`)."""
    return [_record(e) for e in entries]


#: zlib header of a stream with a 32 KB window at the default level
#: (RFC 1950: CMF 0x78, FLG 0x9c, a multiple of 31 together).
_ZLIB_HEADER = b"\x78\x9c"
#: An empty final block (fixed Huffman, BFINAL set): ends the deflate stream
#: after the last column's full flush.
_FINAL_BLOCK = b"\x03\x00"


def _column_compressor() -> Any:
    # Raw deflate: the segments are joined under one zlib header and checksum.
    return zlib.compressobj(LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS, 8, STRATEGY)


_ADLER_BASE = 65521


def adler32_combine(adler1: int, adler2: int, len2: int) -> int:
    """The Adler-32 of two byte strings end to end, from the checksum of each
    and the second's length (zlib's ``adler32_combine``, which Python's zlib
    module does not offer): a column compressed ahead need not be read again."""
    rem = len2 % _ADLER_BASE
    sum1 = adler1 & 0xFFFF
    sum2 = rem * sum1 % _ADLER_BASE
    sum1 = (sum1 + (adler2 & 0xFFFF) + _ADLER_BASE - 1) % _ADLER_BASE
    sum2 = (sum2 + (adler1 >> 16) + (adler2 >> 16) + _ADLER_BASE - rem) % _ADLER_BASE
    return sum1 | sum2 << 16


@dataclasses.dataclass(frozen=True, slots=True)
class Precompressed:
    """Columns compressed ahead (:func:`stable_segments`): each one's deflate
    segment and Adler-32, None for the columns still to compress."""

    segments: Sequence[bytes | None]
    checksums: Sequence[int | None]


def _assemble(columns: Sequence[bytes], n: int, segments: Sequence[bytes],
              checksums: Sequence[int | None] | None = None) -> bytes:
    adler = 1
    for i in range(len(columns)):  # (a column whose checksum is known is not read)
        known = checksums[i] if checksums is not None else None
        adler = zlib.adler32(memoryview(columns[i])[:n], adler) if known is None else adler32_combine(adler, known, n)
    return b"".join((HEADER.pack(MAGIC, VERSION, COMPRESSION_ZLIB, RECORD.size, n), _ZLIB_HEADER, *segments,
                     _FINAL_BLOCK, adler.to_bytes(4, "big")))


#: Bytes a payload has besides its column segments.
_OVERHEAD = HEADER.size + len(_ZLIB_HEADER) + len(_FINAL_BLOCK) + 4


def columns_of(raw: bytes | bytearray | memoryview) -> list[bytes]:
    """The records of ``raw`` byte-shuffled: column i holds byte i of every record."""
    size = RECORD.size
    # Byte-shuffle: column i holds byte i of every record.
    return [bytes(raw[i::size]) for i in range(size)]


def encode_records(recs: Sequence[bytes]) -> bytes:
    """The compact payload of records from :func:`records` (at most :data:`MAX_RECORDS`).

    :raises CodecError: when there are too many records
    """
    return encode_raw(b"".join(recs))


def encode_raw(raw: bytes | bytearray) -> bytes:
    """The compact payload of records laid end to end (at most :data:`MAX_RECORDS`).

    :raises CodecError: when there are too many records
    """
    return encode_columns(columns_of(raw))


def encode_columns(columns: Sequence[bytes], ready: Precompressed | None = None) -> bytes:
    """:func:`encode_raw` of records given as their columns (:func:`columns_of`).

    :param ready: the columns compressed already (:func:`stable_segments`
        of the same records)
    :raises CodecError: when there are too many records
    """
    n = len(columns[0])
    if n > MAX_RECORDS:
        raise CodecError("%d entries exceed the compact format's %d" % (n, MAX_RECORDS))
    if ready is None:
        return _assemble(columns, n, _compressed(columns))
    todo = [i for i, seg in enumerate(ready.segments) if seg is None]
    made = dict(zip(todo, _compressed([columns[i] for i in todo]), strict=True))
    return _assemble(columns, n, [made[i] if seg is None else seg for i, seg in enumerate(ready.segments)],
                     ready.checksums)


#: The columns a record's timeout fills: the ones that change from one dump to the next.
TIMEOUT_COLUMNS = range(TIMEOUT_OFFSET, TIMEOUT_OFFSET + 4)


def stable_segments(raw: bytes, stop: Callable[[], bool] | None = None) -> Precompressed | None:
    """Every column of ``raw`` (records laid end to end) compressed but the
    timeout's, or None when ``stop()`` turned true meanwhile.

    What Save's cache keeps: a Save of the very same records (in the same
    order, timeouts aside) then compresses and checksums only their timeouts.
    """
    z = _column_compressor()
    segments: list[bytes | None] = []
    checksums: list[int | None] = []
    for i, col in enumerate(columns_of(raw)):
        if stop is not None and stop():
            return None
        stable = i not in TIMEOUT_COLUMNS
        segments.append(_segments((col,), z)[0] if stable else None)
        checksums.append(zlib.adler32(col) if stable else None)
    return Precompressed(segments, checksums)


#: Column bytes from which a second thread compresses half the columns.
PARALLEL_FROM = 1 << 18


def _segments(columns: Sequence[bytes], z: Any = None) -> list[bytes]:
    """Each column as a deflate segment (raw deflate, ended by a full flush).

    One compressor does them all: a full flush that has taken in all its
    input leaves deflate as a new one (history and hash cleared, output
    byte-aligned, window position back to 0), so each segment is the bytes a
    compressor of its own makes (``test_payload.py`` checks this). A new
    compressor costs ~260 KB of fresh memory, 126 of them ~10 ms of page
    faults inside the downtime.

    :param z: the compressor to go on with (:func:`_column_compressor`; None: a new one)
    """
    if z is None:
        z = _column_compressor()
    return [z.compress(col) + z.flush(zlib.Z_FULL_FLUSH) for col in columns]


def _compressed(columns: Sequence[bytes]) -> list[bytes]:
    """:func:`_segments`, on two threads for a large table.

    zlib lets go of the GIL while it compresses, so for a large table a
    second thread compresses too: Save's compression runs inside the
    downtime, on a host with more than one core. The two take the next
    column as each is free (columns differ much in how long they take), each
    with its own compressor.
    """
    if sum(map(len, columns)) < PARALLEL_FROM:
        return _segments(columns)
    out: list[bytes | None] = [None] * len(columns)
    # next() on a shared counter is one step under the GIL: no column twice.
    todo = itertools.count()

    def work() -> None:
        z = _column_compressor()
        while (i := next(todo)) < len(columns):
            out[i] = _segments(columns[i:i + 1], z)[0]

    helper = threading.Thread(target=work, name="compress")
    helper.start()
    work()
    helper.join()
    # A column the helper took but did not finish (it failed) is compressed here.
    return [seg if seg is not None else _segments(columns[i:i + 1])[0] for i, seg in enumerate(out)]


class ColumnStream:
    """Records byte-shuffled as they come, a batch at a time.

    Save's scan feeds it while the kernel is still dumping (the scan's thread
    would otherwise wait for the next datagram), so that the columns are only
    joined once the dump ends. The timeout columns are left out until
    :meth:`finish`: the records come with timeout 0 and the fresh timeouts
    are known only at the end.
    """

    __slots__ = ("_pieces", "count")

    def __init__(self) -> None:
        self._pieces: list[list[bytes]] = [[] for _ in range(RECORD.size)]
        #: Records taken in so far.
        self.count = 0

    def add(self, raw: bytes) -> None:
        """Take in records laid end to end (their timeouts are ignored)."""
        size = RECORD.size
        for i, pieces in enumerate(self._pieces):
            pieces.append(raw[i::size])
        self.count += len(raw) // size

    def finish(self, timeouts: bytes) -> Sequence[bytes]:
        """The columns (:func:`columns_of`) of all records taken in.

        :param timeouts: every record's timeout, 4 bytes little-endian each
        """
        return _JoinedColumns(self._pieces, {column: timeouts[i::4] for i, column in enumerate(TIMEOUT_COLUMNS)})


class _JoinedColumns(Sequence[bytes]):
    """Columns joined from their pieces when first read: Save reads only the
    timeout columns of a table its cache holds compressed (and checksummed)
    already, ~0.6 ms at 5,000 entries spared."""

    __slots__ = ("_columns", "_pieces")

    def __init__(self, pieces: list[list[bytes]], given: dict[int, bytes]) -> None:
        self._pieces = pieces
        self._columns = given

    def __len__(self) -> int:
        return len(self._pieces)

    @overload
    def __getitem__(self, i: int) -> bytes: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[bytes]: ...

    def __getitem__(self, i: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(i, slice):
            return [self[k] for k in range(len(self))[i]]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError("column index out of range")
        column = self._columns.get(i)
        if column is None:
            column = self._columns[i] = b"".join(self._pieces[i])
        return column


def encode(entries: Sequence[Entry]) -> bytes:
    """Encode ``entries`` (at most :data:`MAX_RECORDS`) as a compact payload.

    :raises CodecError: when there are too many entries
    """
    if len(entries) > MAX_RECORDS:
        raise CodecError("%d entries exceed the compact format's %d" % (len(entries), MAX_RECORDS))
    return encode_records(records(entries))


#: Most sizes :func:`largest_prefix` measures before it settles for the
#: largest prefix found to fit (typically it needs 6 to 10).
MAX_PROBES = 40


def largest_prefix(raw: bytes | bytearray, limit: int, per_record: float) -> tuple[int, bytes]:
    """The largest ``n`` whose payload of the first ``n`` records of ``raw`` fits in ``limit`` bytes, and that payload.

    The payload equals ``encode_raw(raw[:n * RECORD.size])``; ``n + 1`` records do not
    fit (or ``n`` is all of them) unless :data:`MAX_PROBES` sizes were not
    enough, when the largest prefix measured to fit is used. ``n`` may be 0.

    Every column's compressor is fed forward only: a size is measured on
    copies (compress the new records, then a full flush), and when it fits
    the copies become the state. So the whole search compresses each byte
    about once plus the probes' small steps, instead of a full compression
    per attempt.

    :param raw: records laid end to end, most important first
    :param limit: byte budget
    :param per_record: expected compressed bytes per record, for the first guess
    """
    total = min(len(raw) // RECORD.size, MAX_RECORDS)
    columns = columns_of(memoryview(raw)[:total * RECORD.size])
    comps = [_column_compressor() for _ in columns]
    done: list[list[bytes]] = [[] for _ in columns]
    tails = [c.copy().flush(zlib.Z_FULL_FLUSH) for c in comps]
    done_bytes = 0
    lo, size_lo = 0, _OVERHEAD + sum(map(len, tails))
    if size_lo > limit:
        return 0, b""
    hi = total + 1  # the smallest count known not to fit
    # Aim a little low first: a step that fits is kept, one that does not is wasted.
    guess = int((limit - size_lo) / max(per_record, 0.5) * 0.97)
    for _ in range(MAX_PROBES):
        if hi - lo <= 1:
            break
        n = min(max(guess, lo + 1), hi - 1)
        new_comps = [c.copy() for c in comps]
        pieces = [z.compress(col[lo:n]) for z, col in zip(new_comps, columns, strict=True)]
        new_tails = [z.copy().flush(zlib.Z_FULL_FLUSH) for z in new_comps]
        size = _OVERHEAD + done_bytes + sum(map(len, pieces)) + sum(map(len, new_tails))
        if size <= limit:
            rate = (size - size_lo) / (n - lo)
            lo, size_lo, comps, tails = n, size, new_comps, new_tails
            for chunks, piece in zip(done, pieces, strict=True):
                chunks.append(piece)
            done_bytes += sum(map(len, pieces))
            # Step by the rate just seen, a little short while the step is
            # long: an overshoot is compressed again from lo, a short step is kept.
            step = (limit - size_lo) / max(rate, 0.5)
            guess = lo + max(1, int(step * 0.9 if step > 256 else step))
        else:
            hi = n
            rate = (size - size_lo) / (n - lo)
            # Interpolate into the bracket (the size grows about linearly
            # with the records; below lo + 1 means lo + 1 is the one to try);
            # bisect where that points beyond it.
            guess = lo + int((limit - size_lo) / max(rate, 0.5))
            if guess >= hi:
                guess = (lo + hi) // 2
    if lo == 0:
        return 0, b""
    segments = [b"".join(chunks) + tail for chunks, tail in zip(done, tails, strict=True)]
    return lo, _assemble(columns, lo, segments)


#: Just the fields the priority order reads, at their offsets in a record.
_STATUS_OFFSET = TIMEOUT_OFFSET + 4
_STATE_OFFSET = struct.calcsize("<BBI16s16s16s16sHHHHBBHBBHIIHHH")
_SUMMARY = struct.Struct("<xB4x64x8x8xII6xB%dx" % (RECORD.size - 101))
#: Inflate this much at a time: memory stays one record buffer plus a chunk.
_CHUNK = 1 << 16


def priority_keys(raw: bytes | bytearray) -> list[int]:
    """The priority sort keys (:func:`.priority.column_keys`) of the records of ``raw``."""
    return priority_keys_of(columns_of(raw))


def priority_keys_of(columns: Sequence[bytes]) -> list[int]:
    """:func:`priority_keys` of records given as their columns (:func:`columns_of`)."""
    n = len(columns[0])
    timeouts = bytearray(4 * n)
    for i in range(4):
        timeouts[i::4] = columns[TIMEOUT_OFFSET + i]
    return priority.column_keys(columns[1], columns[_STATUS_OFFSET], columns[_STATE_OFFSET], bytes(timeouts))


def priority_keys_at(raw: bytes, timeouts: bytes, start: int) -> list[int]:
    """:func:`priority_keys` of records whose timeouts are given apart
    (``timeouts``: 4 bytes little-endian each; the records' own are not
    read), the first of them at position ``start``: keys made a run of
    records at a time."""
    size = RECORD.size
    return priority.column_keys(raw[1::size], raw[_STATUS_OFFSET::size], raw[_STATE_OFFSET::size], timeouts, start)


def summaries(raw: bytes | bytearray) -> Iterator[tuple[int, int, int, int]]:
    """``(protocol, timeout, status, state)`` of every record of ``raw``, 0 where absent."""
    return _SUMMARY.iter_unpack(raw)


class Records:
    """The records of a compact payload, inflated once, turned into entries on demand.

    Only the record buffer (``count * 130`` bytes) is kept: the zlib stream
    is inflated in chunks straight into its columns, and entries are built
    one batch at a time, so a 200,000-record Load never holds 200,000 entry
    objects.

    :param data: the whole payload
    :raises CodecError: when the payload as a whole is unusable (header,
        size bound, corrupt or truncated stream)
    """

    def __init__(self, data: bytes) -> None:
        if len(data) < HEADER.size:
            raise CodecError("compact payload shorter than its header")
        magic, version, compression, size, count = HEADER.unpack_from(data)
        if magic != MAGIC or version != VERSION:
            raise CodecError("unknown compact payload version %d" % version)
        if compression != COMPRESSION_ZLIB or size != RECORD.size:
            raise CodecError("unsupported compact payload (compression %d, record %d bytes)" % (compression, size))
        if count > MAX_RECORDS:
            raise CodecError("compact payload claims %d records, more than %d" % (count, MAX_RECORDS))
        self.count: int = count
        self._raw = self._inflate(memoryview(data)[HEADER.size:], count, size)

    @staticmethod
    def _inflate(stream: memoryview, count: int, size: int) -> bytearray:
        want = count * size
        raw = bytearray(want)
        inflater = zlib.decompressobj()
        pos = 0  # bytes of the shuffled stream placed so far
        pending: bytes | memoryview = stream
        try:
            while pos < want:
                # max_length bounds the work a crafted stream (a "zip bomb") can cause.
                piece = inflater.decompress(pending, min(_CHUNK, want - pos))
                pending = inflater.unconsumed_tail
                if not piece:
                    break
                # The stream is column after column: byte i of every record.
                done = 0
                while done < len(piece):
                    col, row = divmod(pos, count)
                    take = min(count - row, len(piece) - done)
                    raw[col + row * size:col + (row + take) * size:size] = piece[done:done + take]
                    done += take
                    pos += take
            extra = inflater.decompress(pending, 1) if pos == want else b""
        except zlib.error as err:
            raise CodecError("compact payload is corrupt: %s" % err) from err
        if pos != want or extra or not inflater.eof or inflater.unconsumed_tail:
            raise CodecError("compact payload holds %d bytes of records, not %d"
                             % (pos + len(extra), want))
        return raw

    @property
    def buffer(self) -> bytearray:
        """The records, :data:`RECORD` after :data:`RECORD`, in payload order (not to be changed)."""
        return self._raw

    def summaries(self) -> Iterator[tuple[int, int, int, int]]:
        """``(protocol, timeout, status, state)`` of every record, 0 where absent."""
        return summaries(self._raw)

    def entry(self, index: int) -> Entry:
        """The entry of record ``index`` (0-based).

        :raises CodecError: when the record is refused
        """
        return _entry(RECORD.unpack_from(self._raw, index * RECORD.size))


def decode(data: bytes) -> Decoded:
    """Decode a compact payload; bad records are refused, one by one.

    :raises CodecError: when the payload as a whole is unusable (header,
        size bound, corrupt or truncated stream); nothing is decoded then
    """
    records = Records(data)
    out = Decoded()
    for i in range(records.count):
        try:
            out.entries.append(records.entry(i))
        except CodecError as err:
            out.refuse(i + 1, str(err))
    return out


#: Per ``present`` value: a picker of the Entry fields after the addresses
#: (None where absent; the mark is never carried). Bounded: only known bits
#: get here, and real payloads hold few patterns.
_entry_picks: Memo[int, Callable[[tuple[Any, ...]], tuple[Any, ...]]] = Memo(4096)
_ENTRY_REST = tuple(f.name for f in dataclasses.fields(Entry))[6:]


def _entry_pick(present: int) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    pick = _entry_picks.get(present)
    if pick is None:
        none_index = RECORD_FIELDS
        picks = [7 + OPTIONAL.index(name) if name in _BIT and present & _BIT[name] else none_index
                 for name in _ENTRY_REST]
        pick = operator.itemgetter(*picks)
        _entry_picks.add(present, pick)
    return pick


def entry_of(record: bytes) -> Entry:
    """The entry of one record (:data:`RECORD`).

    :raises CodecError: when the record is refused
    """
    return _entry(RECORD.unpack(record))


def _entry(r: tuple[Any, ...]) -> Entry:
    family, proto, present = r[0], r[1], r[2]
    if family == AF_INET:
        alen = 4
    elif family == AF_INET6:
        alen = 16
    else:
        raise CodecError("unknown address family %d" % family)
    if present & ~KNOWN:
        raise CodecError("unknown fields 0x%x" % (present & ~KNOWN))
    osrc, odst = r[3][:alen], r[4][:alen]
    if present & ADDRS_SWAPPED:
        rsrc, rdst = odst, osrc
    else:
        rsrc, rdst = r[5][:alen], r[6][:alen]
    e = Entry(family, proto, osrc, odst, rsrc, rdst, *_entry_pick(present)((*r, None)))
    if present & PORTS_SWAPPED:
        e.reply_sport, e.reply_dport = e.dport, e.sport
    if e.status is not None and e.status & IPS_EXPECTED:
        raise CodecError("EXPECTED entries cannot be created")
    return e
