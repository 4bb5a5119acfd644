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
from collections.abc import Sequence
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


def priority_class(e: Entry) -> int:
    """0 for assured established TCP, 1 other TCP, 2 assured UDP, 3 the rest."""
    assured = bool((e.status or 0) & IPS_ASSURED)
    if e.proto == PROTO_TCP:
        return 0 if assured and e.state == _TCP_ESTABLISHED else 1
    if e.proto == PROTO_UDP and assured:
        return 2
    return 3


def by_priority(entries: Sequence[Entry]) -> list[Entry]:
    """The entries, most important first (stable within equal keys)."""
    return sorted(entries, key=_priority_key)


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


def decode(data: bytes, mark: int) -> codec.DecodedPayload:
    """Read any of the three payloads; never raises for bad input.

    A compact payload that is unusable as a whole (corrupt, truncated, over
    its bounds) gives no entries and one refusal saying why.

    :param data: the bytes QEMU passed to Load
    :param mark: the VM's mark (text lines carrying another one are refused)
    """
    if len(data) <= 1 or not compact.is_compact(data):
        return codec.decode_payload(data, mark)
    result = codec.DecodedPayload()
    try:
        decoded = compact.decode(data)
    except CodecError as err:
        result.refuse(0, str(err))
        return result
    result.entries = decoded.entries
    for no, reason in decoded.refused:
        result.refuse(no, reason)
    return result
