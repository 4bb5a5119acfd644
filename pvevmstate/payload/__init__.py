"""What Save sends and Load reads: one place for every payload format.

Load tells the formats apart by their first bytes (:data:`READERS`), without
being told:

* ``\x00`` (or anything of at most one byte): no entries;
* the hybrid format (:mod:`.hybrid`, starts with ``#PVCT-HYBRID``): the
  compact records in comment lines, then save text; what ``auto`` sends;
* the compact format (:mod:`.compact`, starts with ``PVCT``): ``compact``;
* save text (:mod:`.savetext`), which the Perl helper writes and reads: ``text``.

When not everything fits, the entries that matter most go first
(:mod:`.priority`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from .. import netlink
from ..errors import CodecError
from ..model import IPS_EXPECTED, CreateBatch, Entry
from . import compact, creates, hybrid, priority, savetext
from .base import MAX_PAYLOAD, NO_STATE, Choice, Decoded, Format, Refusal
from .priority import CLASSES, by_priority, count_by_class
from .sendable import EntryList, Sendable

__all__ = [
    "CLASSES", "MAX_PAYLOAD", "MIN_TEXT_LINE", "NO_STATE", "READERS", "Choice", "Decoded", "Format", "Incoming",
    "Payload", "Refusal", "Sendable", "decode", "detect", "encode", "encode_sendable",
]

#: No save line is shorter than this: more entries than limit / this cannot fit as text.
MIN_TEXT_LINE = 90
#: Magic first bytes -> format, in the order Load tries them; anything else is save text.
READERS: tuple[tuple[bytes, Format], ...] = ((hybrid.MAGIC, Format.HYBRID), (compact.MAGIC, Format.COMPACT))
assert compact.MAX_RECORDS <= priority.POSITION_LIMIT


def detect(data: bytes) -> Format:
    """Which format ``data`` is, by its first bytes."""
    if len(data) <= 1:
        return Format.NONE
    for magic, fmt in READERS:
        if data.startswith(magic):
            return fmt
    return Format.TEXT


@dataclass(slots=True)
class Payload:
    """One Save's bytes and what they hold."""

    data: bytes
    format: Format
    sent: int
    #: Left out for lack of room, by priority class.
    left_out: Counter[str] = field(default_factory=Counter)
    #: Expected (helper-made) entries, left out in every format: no kernel
    #: creates one on request (EBUSY), and one such line stops conntrack(8).
    expected: int = 0
    #: Left out of save text because conntrack(8) would refuse their lines,
    #: by reason (savetext.text_problem).
    not_text: Counter[str] = field(default_factory=Counter)
    #: Hybrid: of the entries sent, how many also went as save lines (what a
    #: Perl destination restores).
    text_sent: int = 0

    @property
    def left_out_total(self) -> int:
        """Every dumped entry that was not sent, for whatever reason."""
        return sum(self.left_out.values()) + self.expected + sum(self.not_text.values())


def encode(entries: Sequence[Entry], mark: int, limit: int = MAX_PAYLOAD, fmt: Choice = Choice.AUTO) -> Payload:
    """Encode ``entries`` in ``fmt`` within ``limit`` bytes (never empty).

    :param entries: the VM's entries
    :param mark: the VM's mark (the text format appends it to every line)
    :param limit: byte budget, at least 1
    :param fmt: what to send
    """
    sendable = [e for e in entries if not (e.status or 0) & IPS_EXPECTED]
    out = encode_sendable(EntryList(sendable), mark, limit, fmt)
    out.expected = len(entries) - len(sendable)
    return out


def encode_sendable(items: Sendable, mark: int, limit: int = MAX_PAYLOAD, fmt: Choice = Choice.AUTO) -> Payload:
    """:func:`encode` of items that are records and save lines already (Save's cache).

    :param items: the entries to send, expected ones left out (the caller
        counts those in :attr:`Payload.expected`)
    """
    if not len(items):
        return Payload(NO_STATE, Format.NONE, 0)
    if fmt == Choice.TEXT:
        return _encode_text(items.entries(), mark, limit)
    if fmt == Choice.COMPACT:
        section = _compact_section(items, limit)
        n = section.sent
        if n == 0:
            return Payload(NO_STATE, Format.NONE, 0, section.left_out(0))
        return Payload(section.data, Format.COMPACT, n, section.left_out(n))
    return _encode_hybrid(items, mark, limit)


def _textable(entries: Sequence[Entry]) -> tuple[list[Entry], Counter[str]]:
    # Only lines conntrack --load-file takes: the Perl helper's Load would
    # refuse the whole payload for one it cannot parse, or stop at one the
    # kernel refuses.
    not_text: Counter[str] = Counter()
    lines: list[Entry] = []
    for e in entries:
        problem = savetext.text_problem(e)
        if problem is None:
            lines.append(e)
        else:
            not_text[problem] += 1
    return lines, not_text


def _encode_text(entries: Sequence[Entry], mark: int, limit: int) -> Payload:
    lines, not_text = _textable(entries)
    text = savetext.encode_text(lines, mark, limit)
    if not text.left_out:
        return Payload(text.data, Format.TEXT if text.sent else Format.NONE, text.sent, not_text=not_text)
    ordered = by_priority(lines)
    text = savetext.encode_text(ordered, mark, limit)
    return Payload(text.data, Format.TEXT, text.sent, count_by_class(ordered[text.sent:]), not_text=not_text)


@dataclass(slots=True)
class _Section:
    """A compact section: how many items it carries, its bytes, and the order they went in."""

    sent: int
    data: bytes
    #: Positions most important first, when not all items fit (None: item order).
    order: list[int] | None = None
    #: Each item's priority class, when not all items fit.
    classes: list[int] = field(default_factory=list)

    def left_out(self, n: int) -> Counter[str]:
        """What the items after the first ``n`` in :attr:`order` are, by class."""
        if self.order is None:
            return Counter()
        classes = self.classes
        return Counter(CLASSES[classes[i]] for i in self.order[n:])


def _compact_section(items: Sendable, limit: int) -> _Section:
    """The largest compact payload of at most ``limit`` bytes, most important items first."""
    # The records are built once (most of the cost); when everything does not
    # fit, they are put in priority order and the largest prefix that fits is
    # found by sizing prefixes exactly, not by estimating from the unsorted
    # table (which sent ~72,000 of 120,000 entries where ~94,000 fit).
    size = compact.RECORD.size
    count = len(items)
    if count <= compact.MAX_RECORDS:
        columns = items.columns()
        data = compact.encode_columns(columns, items.ready_segments())
        if len(data) <= limit:
            return _Section(count, data)
        per_record = (len(data) - compact.HEADER.size) / count
        keys = compact.priority_keys_of(columns)
        order = priority.order_of_keys(keys)
        classes = [priority.class_of_key(k) for k in keys]
        view = memoryview(items.raw())
        ordered = b"".join([view[i * size:(i + 1) * size] for i in order])
    else:
        entries = items.entries()
        order = priority.order_of(entries)
        classes = [priority.priority_class(e) for e in entries]
        ordered = b"".join(compact.records([entries[i] for i in order[:compact.MAX_RECORDS]]))
        per_record = 16.0  # a typical table's bytes per entry; only the first guess
    n, data = compact.largest_prefix(ordered, limit, per_record)
    # Not all fit: the save lines follow this order, no keys are needed again.
    return _Section(n, data, order, classes)


def _encode_hybrid(items: Sendable, mark: int, limit: int) -> Payload:
    # First the compact section with every entry that fits (what this
    # helper's Load reads), then save lines, most important first, in what
    # is left of the limit (what a Perl destination's conntrack(8) reads).
    compacted = _compact_section(items, hybrid.binary_budget(limit))
    n = compacted.sent
    if n == 0:
        return _encode_text(items.entries(), mark, limit)  # a limit too small for any section
    section = hybrid.armor(compacted.data, n)
    room = limit - len(section)
    # The save lines go most important first even when all of them fit:
    # conntrack(8) stops at the first entry the destination's kernel refuses
    # (one that exists already, say), and what follows is lost. Only as many
    # as can fit are ordered and checked: behind a large compact section that
    # is a few hundred of tens of thousands.
    most = room // MIN_TEXT_LINE + 1  # more lines than this never fit
    order = compacted.order
    if order is None:  # all went into the section: order as many as may fit
        keys = items.priority_keys()
        candidates = priority.first_of_keys(keys, most)
    else:
        candidates = order[:most]
    lines = items.lines(candidates, mark)
    end, sent = savetext.fit(lines, room)
    if sent == lines.count and len(candidates) < len(items):
        # Lines conntrack cannot load were skipped and the candidates ran out
        # before the room did: go on through all of them, in order, a window
        # more at a time, until the room is full.
        if order is None:
            order = priority.order_of_keys(keys)
        for at in range(2 * most, len(order) + most, most):
            lines = items.lines(order[:at], mark)
            end, sent = savetext.fit(lines, room)
            if sent < lines.count:
                break
    # One copy of the lines, not two (a slice, then the two joined): a fresh
    # MiB costs a millisecond of page faults here.
    body = b"".join((section, memoryview(lines.data)[:end])) if sent else section
    return Payload(body, Format.HYBRID, n, compacted.left_out(n), text_sent=sent)


class Incoming:
    """What a Load payload holds, to be created a chunk at a time.

    A save-text payload is parsed whole (1 MiB of text is at most ~12,000
    lines); a compact one is inflated into its record buffer and its create
    requests (or entries) are built only for the chunk being created, which
    bounds Load's memory.
    Refused lines and records are counted in :attr:`refusals`.
    """

    def __init__(self, data: bytes, mark: int) -> None:
        self._mark = mark
        self.refusals = Decoded()
        self._entries: list[Entry] | None = None
        self._records: compact.Records | None = None
        self.format = detect(data)
        #: Items that may become entries, and lines or records read in all.
        self.size = self.lines = 0
        if self.format == Format.HYBRID:
            try:
                self._records = compact.Records(hybrid.unarmor(data))
                self.size = self.lines = self._records.count
            except CodecError as err:
                # The save lines after the section carry the most important
                # entries again: take those instead of nothing.
                self.refusals.refuse(0, "%s; reading its save lines instead" % err)
                self.format = Format.TEXT
        elif self.format == Format.COMPACT:
            try:
                self._records = compact.Records(data)
                self.size = self.lines = self._records.count
            except CodecError as err:
                self.refusals.refuse(0, str(err))
                self.lines = 1
        if self.format == Format.TEXT:
            decoded = savetext.decode_payload(data, mark)
            decoded.refused += self.refusals.refused
            decoded.samples[:0] = self.refusals.samples
            self.refusals = decoded
            self._entries = decoded.entries
            self.size = len(decoded.entries)
            self.lines = self.size + decoded.refused

    def _summaries(self) -> Iterator[tuple[int, int, int, int | None]]:
        if self._records is not None:
            return self._records.summaries()
        return priority.summaries(self._entries or ())

    def classes(self) -> list[int]:
        """The priority class of every item, in payload order."""
        return [priority.class_of(proto, status, state) for proto, _t, status, state in self._summaries()]

    def by_priority(self) -> list[int]:
        """Positions of the items, most important first (the order Save uses)."""
        return priority.order(self._summaries())

    def batch(self, positions: Sequence[int], reserve_seqs: Callable[[int], int],
              refusals: Decoded | None = None) -> CreateBatch:
        """The create requests of the items at ``positions``, with the mark Load
        was given; refused records are counted (in ``refusals``, by default
        :attr:`refusals`) and left out.

        Compact records become numbered requests, shape by shape, without an
        Entry where their shape allows (:mod:`.creates`), their sequence
        numbers from ``reserve_seqs(n)`` (the adapter's: see
        :meth:`pvevmstate.netlink.conntrack.Conntrack.reserve_seqs`); save
        lines were parsed into entries already, whose batch the adapter numbers.
        """
        if self._records is not None:
            return creates.batch(self._records, positions, self._mark,
                                 self.refusals if refusals is None else refusals, reserve_seqs)
        have = self._entries or []
        return netlink.create_batch((have[i] for i in positions), self._mark)

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


def decode(data: bytes, mark: int) -> Decoded:
    """Read any payload whole (for tools and tests; Load goes through Incoming); never raises for bad input.

    A compact payload that is unusable as a whole (corrupt, truncated, over
    its bounds) gives no entries and one refusal saying why.

    :param data: the bytes QEMU passed to Load
    :param mark: the VM's mark (text lines carrying another one are refused)
    """
    incoming = Incoming(data, mark)
    result = incoming.refusals
    if incoming.format in (Format.COMPACT, Format.HYBRID):
        result.entries = incoming.entries(range(incoming.size))
    return result
