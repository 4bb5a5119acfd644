"""Which entries go first when not all of them fit: Save's order, and Load's
when the destination's table cannot take them all.

Assured established TCP first (live connections the guest would lose), then
other TCP, then assured UDP, then the rest; within a class the longest
remaining timeout first.
"""

from __future__ import annotations

import heapq
import sys
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence

from ..model import IPS_ASSURED, PROTO_TCP, PROTO_UDP, TCP_STATE_ESTABLISHED, Entry

#: The priority classes, most important first (names as the journal shows them).
CLASSES = ("established TCP", "other TCP", "assured UDP", "other")


def class_of(proto: int, status: int, state: int | None) -> int:
    """0 for assured established TCP, 1 other TCP, 2 assured UDP, 3 the rest."""
    assured = bool(status & IPS_ASSURED)
    if proto == PROTO_TCP:
        return 0 if assured and state == TCP_STATE_ESTABLISHED else 1
    if proto == PROTO_UDP and assured:
        return 2
    return 3


def priority_class(e: Entry) -> int:
    """:func:`class_of` an entry."""
    return class_of(e.proto, e.status or 0, e.state)


def priority_key(e: Entry) -> tuple[int, int]:
    """Sorts entries most important first."""
    return priority_class(e), -(e.timeout or 0)


def by_priority(entries: Sequence[Entry]) -> list[Entry]:
    """The entries, most important first (stable within equal keys).

    Sorted as one int per entry in short runs (:func:`order`), not as key
    tuples in one call: Save runs this in a worker thread, and one C-level
    sort of 50,000 tuples holds the GIL for ~45 ms, while the event loop must
    keep answering ``Id`` reads.
    """
    return [entries[i] for i in order_of(entries)]


def first(entries: Sequence[Entry], k: int) -> list[Entry]:
    """The ``k`` most important of ``entries``, in :func:`by_priority` order.

    Cheaper than sorting all when ``k`` is small (Save's save lines behind a
    large compact section), and, like :func:`order`, the GIL is never held long:
    only the ``k`` smallest of each run of keys are kept (:func:`first_of_keys`).
    """
    if k >= len(entries) or len(entries) > POSITION_LIMIT:
        return by_priority(entries)[:k]
    return [entries[i] for i in first_positions(summaries(entries), k)]


def first_positions(items: Iterable[tuple[int, int, int, int | None]], k: int) -> list[int]:
    """Positions of the ``k`` most important items, given as for :func:`order`, in that order."""
    return first_of_keys(list(_keys(items)), k)


#: Every how many keys one goes into the sample :func:`first_of_keys` guesses its cut from.
SAMPLE = 16


def first_of_keys(keys: list[int], k: int) -> list[int]:
    """:func:`first_positions` of items given by their keys (:func:`column_keys`)."""
    if len(keys) >= 4 * k >= 4 * RUN // SAMPLE:
        # Few of many (the save lines behind a large compact section): a
        # sample's order gives a key about twice as far down as the k-th;
        # only the keys up to it are sorted. Keys are distinct, so if at
        # least k are that small, the k smallest are theirs: the same answer
        # as sorting all (~10 instead of ~16 ms at 50,000 here).
        sample = sorted(keys[::SAMPLE])
        cut = sample[min(len(sample) - 1, 2 * k // SAMPLE + 8)]
        few = sorted([key for key in keys if key <= cut])
        if len(few) >= k:
            return [key & _POSITION_MASK for key in few[:k]]
    # Each run sorted on its own (the GIL is held per run only), its k
    # smallest kept; the k smallest of those are the k smallest of all.
    best: list[int] = []
    for i in range(0, len(keys), RUN):
        best += sorted(keys[i:i + RUN])[:k]
    best.sort()
    return [key & _POSITION_MASK for key in best[:k]]


def order_of_keys(keys: list[int]) -> list[int]:
    """:func:`order` of items given by their keys (``_keys``, :func:`column_keys`)."""
    if len(keys) <= RUN:
        return [k & _POSITION_MASK for k in sorted(keys)]
    runs = [sorted(keys[i:i + RUN]) for i in range(0, len(keys), RUN)]
    return [k & _POSITION_MASK for k in heapq.merge(*runs)]


def class_of_key(key: int) -> int:
    """The priority class a key (:func:`column_keys`) sorts by."""
    return key >> _CLASS_SHIFT


def _byte_table(pred: Callable[[int], bool]) -> bytes:
    return bytes(1 if pred(b) else 0 for b in range(256))


_IS_TCP = _byte_table(lambda b: b == PROTO_TCP)
_IS_UDP = _byte_table(lambda b: b == PROTO_UDP)
_IS_ASSURED = _byte_table(lambda b: bool(b & IPS_ASSURED))
_IS_ESTABLISHED = _byte_table(lambda b: b == TCP_STATE_ESTABLISHED)
_COMPLEMENT = bytes(255 - b for b in range(256))


def column_keys(protos: bytes, status_low: bytes, states: bytes, timeouts: bytes, start: int = 0) -> list[int]:
    """The sort keys :func:`order` makes, of items given column by column.

    The same ints as ``_keys`` gives for ``(protocol, timeout, status, state)``
    items, made by whole-column operations in C (translate tables, big-integer
    bit operations, strided copies) instead of Python per item: Save orders
    every entry inside the downtime, ~50 ms at 50,000 entries the other way.
    States are 0 where absent (as in compact records).

    :param protos: each item's protocol number, one byte each
    :param status_low: the low byte of each item's status bits
    :param states: each item's protocol state, one byte each
    :param timeouts: each item's timeout, 4 bytes little-endian each
    :param start: the first item's position (items given a run at a time)
    """
    n = len(protos)
    if not n:
        return []
    if start + n > POSITION_LIMIT:
        raise ValueError("%d items exceed %d" % (start + n, POSITION_LIMIT))
    as_int = int.from_bytes
    tcp, udp = as_int(protos.translate(_IS_TCP), "big"), as_int(protos.translate(_IS_UDP), "big")
    assured = as_int(status_low.translate(_IS_ASSURED), "big")
    established = as_int(states.translate(_IS_ESTABLISHED), "big")
    ones = as_int(b"\x01" * n, "big")
    # One bit per item, at the bottom of its byte: which class it is in.
    c0 = tcp & assured & established
    c1 = tcp ^ c0
    c2 = udp & assured
    c3 = ones ^ (tcp | c2)
    classes = ((c1 | c3) | (c2 | c3) << 1).to_bytes(n, "big")
    # Each key big-endian: class, timeout complemented (most significant
    # byte first), position (3 bytes).
    buf = bytearray(8 * n)
    buf[0::8] = classes
    inverted = timeouts.translate(_COMPLEMENT)
    for i in range(4):
        buf[1 + i::8] = inverted[3 - i::4]
    positions = array("I", range(start, start + n))
    if sys.byteorder == "little":
        positions.byteswap()
    raw_positions = positions.tobytes()
    for i in range(3):
        buf[5 + i::8] = raw_positions[1 + i::4]
    keys = array("Q")
    keys.frombytes(bytes(buf))
    if sys.byteorder == "little":
        keys.byteswap()
    return keys.tolist()


def order_of(entries: Sequence[Entry]) -> list[int]:
    """Positions of ``entries``, most important first (the order of :func:`by_priority`)."""
    if len(entries) > POSITION_LIMIT:
        return sorted(range(len(entries)), key=lambda i: priority_key(entries[i]))
    return order(summaries(entries))


def summaries(entries: Iterable[Entry]) -> Iterator[tuple[int, int, int, int | None]]:
    """``(protocol, timeout, status, state)`` of each entry, 0 where absent: what the order reads."""
    return ((e.proto, e.timeout or 0, e.status or 0, e.state) for e in entries)


def count_by_class(entries: Iterable[Entry]) -> Counter[str]:
    """How many of ``entries`` each class has."""
    return Counter(CLASSES[priority_class(e)] for e in entries)


# One int per item sorts like (class, -timeout, position): the order
# by_priority() gives, without a tuple per item. 24 bits of position cover
# every compact payload and any text a D-Bus message (128 MiB at most) holds.
POSITION_LIMIT = 1 << 24
_POSITION_BITS = 24
_TIMEOUT_BITS = 32
_CLASS_SHIFT = _POSITION_BITS + _TIMEOUT_BITS
_POSITION_MASK = (1 << _POSITION_BITS) - 1
_TIMEOUT_MAX = (1 << _TIMEOUT_BITS) - 1


#: Items sorted in one C call: sorting holds the GIL, and the event loop's
#: thread must get it back within milliseconds (QEMU reads every helper's Id).
RUN = 4096


def _keys(items: Iterable[tuple[int, int, int, int | None]]) -> Iterator[int]:
    # One int per item that sorts like (class, -timeout, position).
    for i, (proto, timeout, status, state) in enumerate(items):
        yield (class_of(proto, status, state) << _CLASS_SHIFT
               | (_TIMEOUT_MAX - min(timeout, _TIMEOUT_MAX)) << _POSITION_BITS | i)


def order(items: Iterable[tuple[int, int, int, int | None]]) -> list[int]:
    """Positions of items given as ``(protocol, timeout, status, state)``, most important first.

    Same order as :func:`by_priority`, without building entries (Load sorts
    compact records this way). At most :data:`POSITION_LIMIT` items. Runs of
    :data:`RUN` keys are sorted apiece and merged by a Python-level generator,
    so no single call holds the GIL for long (one ``list.sort`` of 50,000 keys
    holds it for ~20 ms).
    """
    return order_of_keys(list(_keys(items)))
