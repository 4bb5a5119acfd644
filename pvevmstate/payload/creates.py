"""Load's create requests, straight from compact records, a shape at a time.

Through an :class:`~pvevmstate.model.Entry`, a record costs two conversions
(record to Entry, Entry to request) that together take several times what the
kernel needs to create the entry. But the records of a table come in a
handful of *shapes* (family, protocol, ``present`` word), and within a shape
every record's request has the same attributes at the same offsets: each
byte of the request is a constant (headers, the protocol, the mark), a byte
of the record (addresses and ports as they are, numbers turned from the
record's little-endian to the request's big-endian), or a function of one
byte of the record (the status' bits Load keeps, the TCP flags a state
implies). So each shape gets a :class:`Plan`, derived once from the
attribute table (:func:`pvevmstate.netlink.body_layout`), and the requests of
all records of one shape in a batch are made together: the constants by
repeating one template, every other byte place by one strided slice copy
(or ``bytes.translate``) over all of them, the sequence numbers likewise.
Python then spends a few operations per *byte place of the shape*, not per
record: at 5,000 records half the time one ``struct`` unpack and pack per
record took with the headers (~1.5 against ~3 µs a request in a slow period
of this machine, grouping by shape included). The
requests are byte for byte what :func:`pvevmstate.netlink.create_request`
makes of the record's entry (``tests/unit/test_creates.py``).

Shapes whose request depends on more than the shape go through the Entry
path: an unknown family or unknown ``present`` bits (refused there, with the
reason), reply addresses or ports that are not the original ones swapped
(NAT: the request carries CTA_NAT_*, and the created entry is read back,
which needs its Entry), and labels (sent only when a bit is set, and created
again without them where the host has none). So does a record whose value
decides on its own: an EXPECTED entry, refused.

Within a batch the requests go shape by shape, then those of the Entry path
in payload order. The order of creation within a batch does not matter:
Load decides before each batch whether the table has room for all of it,
and a payload from one dump holds no two entries of one tuple (of two
records that clash, as a crafted payload may hold, which one is created
depends on their shapes).
"""

from __future__ import annotations

import functools
import re
import struct
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import netlink
from ..errors import CodecError
from ..model import (
    AF_INET,
    AF_INET6,
    IPS_CONFIRMED,
    IPS_EXPECTED,
    PROTO_TCP,
    STATUS_TEXT_MASK,
    CreateBatch,
    Entry,
)
from . import compact
from .base import Decoded

#: Most shapes remembered (with a plan or not). A table has a few dozen at
#: most; the bound caps what a crafted payload of many shapes can cost. Past
#: it, new shapes take the Entry path, which is slower but the same.
MAX_SHAPES = 256

#: (struct code, size, offset) of each record field, in :data:`compact.RECORD` order.
_FIELDS: tuple[tuple[str, int, int], ...] = tuple(
    (m.group(0), struct.calcsize("<" + m.group(0)), struct.calcsize(compact.RECORD.format[:m.start() + 1]))
    for m in re.finditer(r"\d*[a-zA-Z]", compact.RECORD.format[1:]))
assert len(_FIELDS) == compact.RECORD_FIELDS
_ORIG_SRC, _ORIG_DST, _FIRST_OPTIONAL = 3, 4, 7
_FIELD = {name: _FIRST_OPTIONAL + i for i, name in enumerate(compact.OPTIONAL)}
_BIT = {name: 1 << i for i, name in enumerate(compact.OPTIONAL)}
_PORTS = _BIT["sport"] | _BIT["dport"] | _BIT["reply_sport"] | _BIT["reply_dport"]
_RECORD = compact.RECORD.size

#: (family | protocol << 8, present): the first six bytes of a record.
_key_of: Callable[[Any, int], tuple[int, int]] = struct.Struct("<HI").unpack_from
#: The TCP flags a request sets for a TCP entry of each state that does not
#: carry both of its own (what netlink.tcp_flags decides, looked up).
_DEFAULT_FLAGS: tuple[tuple[int, int], ...] = tuple(
    netlink.tcp_flags(Entry(AF_INET, PROTO_TCP, b"", b"", b"", b"", state=state)) for state in range(256))
#: 1 where a status' low byte has IPS_EXPECTED.
_EXPECTED = bytes(1 if b & IPS_EXPECTED else 0 for b in range(256))
assert IPS_EXPECTED < 256 and array("I").itemsize == 4


@dataclass(frozen=True, slots=True)
class Plan:
    """How every request of one shape is made from its records."""

    #: Bytes of one request, netlink header included.
    size: int
    #: One request with every constant in place; zeros where values go.
    template: bytes
    #: Where the mark (big-endian) goes.
    mark_at: int
    #: (request byte, record byte): copied as they are.
    copies: tuple[tuple[int, int], ...]
    #: (request byte, record byte, table): the record byte through ``bytes.translate``.
    mapped: tuple[tuple[int, int, bytes], ...]
    #: The record byte whose lowest bit is IPS_EXPECTED (the status' lowest), if the shape has a status.
    expected_at: int | None


def _values(family: int, proto: int, present: int) -> dict[str, str | int] | None:
    """What each value of a shape's request is, by name: ``fN`` (record field
    N), ``fN & MASK | BITS``, ``flags_orig``/``flags_reply`` (the TCP flags
    the state implies), ``mark``, or an int the shape fixes; None for the Entry path.

    The names are exactly the values that are not None in the request
    (netlink.codec._create_values) of every entry of this shape.
    """
    if family not in (AF_INET, AF_INET6) or present & ~compact.KNOWN:
        return None  # refused: the Entry path says why
    ports_mirrored = present & compact.PORTS_SWAPPED or not present & _PORTS
    if not present & compact.ADDRS_SWAPPED or not ports_mirrored or present & _BIT["labels"]:
        return None
    values: dict[str, str | int] = {
        "orig_src": "f%d" % _ORIG_SRC, "orig_dst": "f%d" % _ORIG_DST, "reply_src": "f%d" % _ORIG_DST,
        "reply_dst": "f%d" % _ORIG_SRC, "proto": proto, "mark": "mark"}
    values.update((name, "f%d" % _FIELD[name]) for name in compact.OPTIONAL if present & _BIT[name])
    if present & compact.PORTS_SWAPPED:
        # As compact._entry: the reply ports are the original ones swapped, whatever the record's own say.
        values.pop("reply_sport", None)
        values.pop("reply_dport", None)
        if "dport" in values:
            values["reply_sport"] = values["dport"]
        if "sport" in values:
            values["reply_dport"] = values["sport"]
    if "status" in values:
        values["status"] = "%s & %d | %d" % (values["status"], STATUS_TEXT_MASK, IPS_CONFIRMED)
    if proto == PROTO_TCP and "state" in values and not (
            present & _BIT["tcp_flags_orig"] and present & _BIT["tcp_flags_reply"]):
        values["tcp_flags_orig"], values["tcp_flags_reply"] = "flags_orig", "flags_reply"
    return values


_VALUE = re.compile(r"f(\d+)(?: & (\d+) \| (\d+))?")
_PADDING = re.compile(r"\d*x$")


@functools.cache
def _masked(mask: int, bits: int) -> bytes:
    """The table that turns a byte into ``byte & mask | bits``."""
    return bytes(b & mask | bits for b in range(256))


@functools.cache
def _flags(code: str, reply: bool, i: int) -> bytes:
    """The table that turns a TCP state into byte ``i`` of the flags (struct ``code``) it implies."""
    return bytes(struct.pack(">" + code, flags[reply])[i] for flags in _DEFAULT_FLAGS)


def plan_of(family: int, proto: int, present: int) -> Plan | None:
    """The plan of a shape; None for the Entry path."""
    values = _values(family, proto, present)
    if values is None:
        return None
    layout = netlink.body_layout(family, proto, frozenset(values))
    size = 16 + struct.calcsize(">" + "".join(code for code, _place in layout))
    template = bytearray(netlink.create_header(size - 16, 0))
    copies: list[tuple[int, int]] = []
    mapped: list[tuple[int, int, bytes]] = []
    mark_at = -1
    for code, place in layout:
        at = len(template)
        value = place if isinstance(place, int) else values[place]
        template += struct.pack(">" + code, value) if isinstance(value, int) else bytes(struct.calcsize(">" + code))
        if isinstance(value, int):
            continue
        own = _PADDING.sub("", code)  # the value's own bytes come first, then the attribute's padding
        width = struct.calcsize(">" + own)
        found = _VALUE.fullmatch(value)
        if value == "mark" and own == "I":
            mark_at = at
        elif value in ("flags_orig", "flags_reply"):
            state = _FIELDS[_FIELD["state"]][2]
            mapped += [(at + i, state, _flags(own, value == "flags_reply", i)) for i in range(width)]
        elif found is None:
            return None  # (no such value: the Entry path is right for any)
        else:
            rcode, rwidth, roff = _FIELDS[int(found.group(1))]
            if own.endswith("s") and rcode.endswith("s") and width <= rwidth:
                # Bytes: the first ``width`` of the field (an IPv4 address of 16).
                copies += [(at + i, roff + i) for i in range(width)]
            elif own.endswith("s") or rcode.endswith("s") or rwidth != width:
                return None
            elif found.group(2) is None:  # the record's numbers are little-endian, the request's big-endian
                copies += [(at + i, roff + width - 1 - i) for i in range(width)]
            else:
                mask, bits = (int(found.group(g)).to_bytes(width, "big") for g in (2, 3))
                for i in range(width):
                    if mask[i]:
                        mapped.append((at + i, roff + width - 1 - i, _masked(mask[i], bits[i])))
                    else:
                        template[at + i] = bits[i]
    if mark_at < 0 or len(template) != size:
        return None
    expected_at = _FIELDS[_FIELD["status"]][2] if present & _BIT["status"] else None
    return Plan(size, bytes(template), mark_at, tuple(copies), tuple(mapped), expected_at)


_plans: dict[tuple[int, int], Plan | None] = {}


def _plan(key: tuple[int, int]) -> Plan | None:
    if key in _plans:
        return _plans[key]
    if key[0] & 0xFF not in (AF_INET, AF_INET6) or key[1] & ~compact.KNOWN or len(_plans) >= MAX_SHAPES:
        return None  # refused (not remembered: odd payloads leave the room for real shapes), or past the bound
    made = _plans[key] = plan_of(key[0] & 0xFF, key[0] >> 8, key[1])
    return made


def forget() -> None:
    """Drop every plan (tests: start from no shapes)."""
    _plans.clear()


def plans() -> dict[tuple[int, int], Plan | None]:
    """The shapes seen so far, by (family | protocol << 8, present), and their plans (None: Entry path)."""
    return dict(_plans)


def _requests(plan: Plan, raw: bytearray, rows: list[int], mark: int, seq: int) -> tuple[bytearray, list[int]]:
    """The requests of the records ``rows`` (of ``plan``'s shape), numbered
    from ``seq``, back to back; and the rows left to the Entry path (EXPECTED)."""
    def gathered(rows: list[int]) -> bytes:
        return b"".join([raw[i * _RECORD:(i + 1) * _RECORD] for i in rows])

    recs = gathered(rows)
    left: list[int] = []
    if plan.expected_at is not None:
        expected = recs[plan.expected_at::_RECORD].translate(_EXPECTED)
        if 1 in expected:  # rare: those go to the Entry path, which refuses them
            left = [i for i, bad in zip(rows, expected, strict=True) if bad]
            rows = [i for i, bad in zip(rows, expected, strict=True) if not bad]
            recs = gathered(rows)
    k, size, at = len(rows), plan.size, plan.mark_at
    template = plan.template
    out = bytearray((template[:at] + mark.to_bytes(4, "big") + template[at + 4:]) * k)
    for to, frm in plan.copies:
        out[to::size] = recs[frm::_RECORD]
    for to, frm, table in plan.mapped:
        out[to::size] = recs[frm::_RECORD].translate(table)
    seqs = array("I", range(seq, seq + k)).tobytes()
    for i in range(4):
        out[8 + i::size] = seqs[i::4]
    return out, left


def batch(records: compact.Records, positions: Sequence[int], mark: int, refusals: Decoded,
          reserve_seqs: Callable[[int], int]) -> CreateBatch:
    """The create requests of the records at ``positions`` (0-based), numbered.

    :param reserve_seqs: gives the first of n sequence numbers (the adapter's)

    Refused records are counted in ``refusals`` (1-based, with the reason
    :meth:`compact.Records.entry` gives) and left out. The batch keeps the
    Entry of every record that went through it (labels, NAT, rare shapes).
    """
    raw = records.buffer
    shapes: dict[tuple[int, int], list[int]] = {}
    get = shapes.get
    for i in positions:
        key = _key_of(raw, i * _RECORD)
        rows = get(key)
        if rows is None:
            shapes[key] = [i]
        else:
            rows.append(i)
    first = reserve_seqs(len(positions))  # (refused records leave the last unused)
    wire = bytearray()
    starts: list[int] = []
    out = CreateBatch(mark, wire=wire, starts=starts, first_seq=first)
    by_entry: list[int] = []
    for key, rows in shapes.items():
        plan = _plan(key)
        if plan is None:
            by_entry += rows
        else:
            made, left = _requests(plan, raw, rows, mark, first + len(starts))
            by_entry += left
            starts += range(len(wire), len(wire) + len(made), plan.size)
            wire += made
    kept = out.entries
    for i in sorted(by_entry):
        try:
            e = records.entry(i)
        except CodecError as err:
            refusals.refuse(i + 1, str(err))
            continue
        kept[len(starts)] = e
        starts.append(len(wire))
        wire += netlink.create_request(e, mark, first + len(starts) - 1, False)
    starts.append(len(wire))
    return out
