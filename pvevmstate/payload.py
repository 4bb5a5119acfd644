"""What Save sends and Load reads: format choice, the 1 MiB limit, priorities.

Three payloads exist, and Load tells them apart without being told:

* ``\\x00`` (or anything of at most one byte): no entries;
* the compact format (:mod:`pvevmstate.compact`, starts with ``PVCT``);
* save text (:mod:`pvevmstate.codec`), which the Perl helper writes and reads.

Save writes text when everything fits as text and the format allows it
(``text`` or ``auto``), otherwise compact (``compact`` or ``auto``). When not
everything fits, the entries that matter most for live traffic go first:
assured established TCP, then other TCP, then assured UDP, then the rest;
within a class the longest remaining timeout first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from . import codec, compact
from .entry import IPS_ASSURED, IPS_EXPECTED, PROTO_TCP, PROTO_UDP, Entry
from .errors import CodecError

FORMATS = ("auto", "text", "compact")
MAX_PAYLOAD = codec.MAX_PAYLOAD
NO_STATE = codec.NO_STATE
#: The priority classes, most important first.
CLASSES = ("established TCP", "other TCP", "assured UDP", "other")
_TCP_ESTABLISHED = 3
#: No save line is shorter than this: more entries than limit / this cannot fit as text.
MIN_TEXT_LINE = 90


def class_of(proto: int, status: int, state: int | None) -> int:
    """0 for assured established TCP, 1 other TCP, 2 assured UDP, 3 the rest."""
    assured = bool(status & IPS_ASSURED)
    if proto == PROTO_TCP:
        return 0 if assured and state == _TCP_ESTABLISHED else 1
    if proto == PROTO_UDP and assured:
        return 2
    return 3


def priority_class(e: Entry) -> int:
    """:func:`class_of` an entry."""
    return class_of(e.proto, e.status or 0, e.state)


def by_priority(entries: Sequence[Entry]) -> list[Entry]:
    """The entries, most important first (stable within equal keys)."""
    return sorted(entries, key=_priority_key)


# One int per item sorts like (class, -timeout, position): the order
# by_priority() gives, without a tuple per item. 24 bits of position cover
# every compact payload and any text a D-Bus message (128 MiB at most) holds.
_POSITION_BITS = 24
_TIMEOUT_BITS = 32
_CLASS_SHIFT = _POSITION_BITS + _TIMEOUT_BITS
_POSITION_MASK = (1 << _POSITION_BITS) - 1
_TIMEOUT_MAX = (1 << _TIMEOUT_BITS) - 1
assert compact.MAX_RECORDS <= _POSITION_MASK + 1


@dataclass(slots=True)
class Payload:
    """One Save's bytes and what they hold."""

    data: bytes
    format: str
    sent: int
    #: Left out for lack of room, by priority class.
    left_out: Counter[str] = field(default_factory=Counter)
    #: Expected (helper-made) entries, left out in every format: no kernel
    #: creates one on request (EBUSY), and one such line stops conntrack(8).
    expected: int = 0
    #: Left out of save text because conntrack(8) would refuse their lines,
    #: by reason (codec.text_problem).
    not_text: Counter[str] = field(default_factory=Counter)

    @property
    def left_out_total(self) -> int:
        """Every dumped entry that was not sent, for whatever reason."""
        return sum(self.left_out.values()) + self.expected + sum(self.not_text.values())


def _left_out(entries: Sequence[Entry]) -> Counter[str]:
    return Counter(CLASSES[priority_class(e)] for e in entries)


def encode(entries: Sequence[Entry], mark: int, limit: int = MAX_PAYLOAD, fmt: str = "auto") -> Payload:
    """Encode ``entries`` in ``fmt`` within ``limit`` bytes (never empty).

    :param entries: the VM's entries
    :param mark: the VM's mark (the text format appends it to every line)
    :param limit: byte budget, at least 1
    :param fmt: ``auto``, ``text`` or ``compact``
    """
    sendable = [e for e in entries if not (e.status or 0) & IPS_EXPECTED]
    out = _encode(sendable, mark, limit, fmt)
    out.expected = len(entries) - len(sendable)
    return out


def _encode(entries: list[Entry], mark: int, limit: int, fmt: str) -> Payload:
    if not entries:
        return Payload(NO_STATE, "none", 0)
    if fmt == "text" or (fmt == "auto" and len(entries) * MIN_TEXT_LINE <= limit):
        # Only lines conntrack --load-file takes: the Perl helper's Load would
        # refuse the whole payload for one it cannot parse, or stop at one the
        # kernel refuses. `auto` stays text then (a Perl destination gets all
        # it can load); the rest is counted.
        not_text: Counter[str] = Counter()
        lines: list[Entry] = []
        for e in entries:
            problem = codec.text_problem(e)
            if problem is None:
                lines.append(e)
            else:
                not_text[problem] += 1
        text = codec.encode_text(lines, mark, limit)
        if not text.left_out:
            return Payload(text.data, "text" if text.sent else "none", text.sent, not_text=not_text)
        if fmt == "text":
            ordered = by_priority(lines)
            text = codec.encode_text(ordered, mark, limit)
            return Payload(text.data, "text", text.sent, _left_out(ordered[text.sent:]), not_text=not_text)
    return _encode_compact(entries, limit)


def _priority_key(e: Entry) -> tuple[int, int]:
    return priority_class(e), -(e.timeout or 0)


def _encode_compact(entries: Sequence[Entry], limit: int) -> Payload:
    # The records are built once (most of the cost); when everything does not
    # fit, they are put in priority order and the largest prefix that fits is
    # found by sizing prefixes exactly, not by estimating from the unsorted
    # table (which sent ~72,000 of 120,000 entries where ~94,000 fit).
    if len(entries) <= compact.MAX_RECORDS:
        recs = compact.records(entries)
        data = compact.encode_records(recs)
        if len(data) <= limit:
            return Payload(data, "compact", len(entries))
        per_record = (len(data) - compact.HEADER.size) / len(entries)
        order = sorted(range(len(entries)), key=lambda i: _priority_key(entries[i]))
        ordered = [entries[i] for i in order]
        recs = [recs[i] for i in order]
    else:
        ordered = by_priority(entries)
        recs = compact.records(ordered[:compact.MAX_RECORDS])
        per_record = 16.0  # a typical table's bytes per entry; only the first guess
    n, data = compact.largest_prefix(recs, limit, per_record)
    if n == 0:
        return Payload(NO_STATE, "none", 0, _left_out(ordered))
    return Payload(data, "compact", n, _left_out(ordered[n:]))


class Incoming:
    """What a Load payload holds, to be created a chunk at a time.

    A save-text payload is parsed whole (1 MiB of text is at most ~12,000
    lines); a compact one is inflated into its record buffer and its entries
    are built only for the chunk being created, which bounds Load's memory.
    Refused lines and records are counted in :attr:`refusals`.
    """

    def __init__(self, data: bytes, mark: int) -> None:
        self.refusals = codec.DecodedPayload()
        self._entries: list[Entry] | None = None
        self._records: compact.Records | None = None
        self.format = "none"
        #: Items that may become entries, and lines or records read in all.
        self.size = self.lines = 0
        if len(data) <= 1:
            pass
        elif compact.is_compact(data):
            self.format = "compact"
            try:
                self._records = compact.Records(data)
                self.size = self.lines = self._records.count
            except CodecError as err:
                self.refusals.refuse(0, str(err))
                self.lines = 1
        else:
            self.format = "text"
            decoded = codec.decode_payload(data, mark)
            self.refusals = decoded
            self._entries = decoded.entries
            self.size = len(decoded.entries)
            self.lines = self.size + decoded.refused

    def _summaries(self) -> Iterator[tuple[int, int, int, int | None]]:
        if self._records is not None:
            return self._records.summaries()
        return ((e.proto, e.timeout or 0, e.status or 0, e.state) for e in self._entries or ())

    def classes(self) -> list[int]:
        """The priority class of every item, in payload order."""
        return [class_of(proto, status, state) for proto, _t, status, state in self._summaries()]

    def by_priority(self) -> list[int]:
        """Positions of the items, most important first (the order Save uses)."""
        keys = [class_of(proto, status, state) << _CLASS_SHIFT
                | (_TIMEOUT_MAX - min(timeout, _TIMEOUT_MAX)) << _POSITION_BITS | i
                for i, (proto, timeout, status, state) in enumerate(self._summaries())]
        keys.sort()
        return [k & _POSITION_MASK for k in keys]

    def entries(self, positions: Iterable[int]) -> list[Entry]:
        """The entries at ``positions``; refused records are counted and skipped."""
        if self._entries is not None:
            have = self._entries
            return [have[i] for i in positions]
        records = self._records
        out: list[Entry] = []
        if records is None:
            return out
        for i in positions:
            try:
                out.append(records.entry(i))
            except CodecError as err:
                self.refusals.refuse(i + 1, str(err))
        return out


def decode(data: bytes, mark: int) -> codec.DecodedPayload:
    """Read any of the three payloads whole; never raises for bad input.

    A compact payload that is unusable as a whole (corrupt, truncated, over
    its bounds) gives no entries and one refusal saying why.

    :param data: the bytes QEMU passed to Load
    :param mark: the VM's mark (text lines carrying another one are refused)
    """
    incoming = Incoming(data, mark)
    result = incoming.refusals
    if incoming.format == "compact":
        result.entries = incoming.entries(range(incoming.size))
    return result
