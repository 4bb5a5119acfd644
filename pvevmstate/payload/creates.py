"""Load's create requests, straight from compact records.

Through an :class:`~pvevmstate.model.Entry`, a record costs two conversions
(record to Entry, Entry to request) that together take several times what the
kernel needs to create the entry. But the records of a table come in a
handful of *shapes* (family, protocol, ``present`` word), and within a shape
every record's request has the same attributes at the same offsets: only the
values differ. So each shape gets a builder, compiled once, that reads the
values it needs with one ``struct`` unpack of the record and packs the
request body (nfgenmsg and attributes, :func:`pvevmstate.netlink.body_layout`)
with one ``struct`` pack, byte for byte what
:func:`pvevmstate.netlink.create_body` makes of the record's entry.

Shapes whose request depends on more than the shape go through the Entry
path: an unknown family or unknown ``present`` bits (refused there, with the
reason), reply addresses or ports that are not the original ones swapped
(NAT: the request carries CTA_NAT_*, and the created entry is read back,
which needs its Entry), and labels (sent only when a bit is set, and created
again without them where the host has none). A builder hands a record whose
value decides on its own back to that path too: an EXPECTED entry, refused.

The builders are generated as source, like the ctnetlink walker
(:data:`pvevmstate.netlink.codec.WALKER_SOURCE`): one function per shape with
the values in locals reads as a hand-written one would, for a fraction of
what a generic loop over the layout costs per record. :func:`source` shows one.
"""

from __future__ import annotations

import linecache
import re
import struct
from collections.abc import Callable, Iterable
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

#: A shape's builder: (record buffer, offset, mark) -> request body, or None
#: when this record must go through its Entry.
Builder = Callable[[bytearray, int, int], bytes | None]

#: Most shapes remembered (compiled or not). A table has a few dozen at most;
#: the bound caps what a crafted payload of many shapes can cost (each
#: compilation takes a fraction of a millisecond). Past it, new shapes take
#: the Entry path, which is slower but the same.
MAX_SHAPES = 256

#: (struct code, size) of each record field, in :data:`compact.RECORD` order.
_FIELDS: tuple[tuple[str, int], ...] = tuple(
    (m.group(0), struct.calcsize("<" + m.group(0))) for m in re.finditer(r"\d*[a-zA-Z]", compact.RECORD.format[1:]))
assert len(_FIELDS) == compact.RECORD_FIELDS
_ORIG_SRC, _ORIG_DST, _FIRST_OPTIONAL = 3, 4, 7
_FIELD = {name: _FIRST_OPTIONAL + i for i, name in enumerate(compact.OPTIONAL)}
_BIT = {name: 1 << i for i, name in enumerate(compact.OPTIONAL)}
_PORTS = _BIT["sport"] | _BIT["dport"] | _BIT["reply_sport"] | _BIT["reply_dport"]

#: (family | protocol << 8, present): the first six bytes of a record.
_key_of: Callable[[Any, int], tuple[int, int]] = struct.Struct("<HI").unpack_from
#: The TCP flags a request sets for a TCP entry of each state that does not
#: carry both of its own (what netlink.tcp_flags decides, looked up).
_DEFAULT_FLAGS: tuple[tuple[int, int], ...] = tuple(
    netlink.tcp_flags(Entry(AF_INET, PROTO_TCP, b"", b"", b"", b"", state=state)) for state in range(256))


def _by_entry(_raw: bytearray, _off: int, _mark: int) -> None:
    """The builder of shapes that go through the Entry path."""
    return None


_builders: dict[tuple[int, int], Builder] = {}
#: The source of each compiled builder, and the name its code is filed under.
_sources: dict[tuple[int, int], tuple[str, str]] = {}


def _values(family: int, proto: int, present: int) -> dict[str, str | int] | None:
    """What each value of a shape's request is, by name: an expression of the
    builder (``fN``: record field N) or, if the shape fixes it, an int; None
    for the Entry path.

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


def _reader(fields: set[int], alen: int) -> str:
    """The little-endian struct format that reads record ``fields`` (and skips the others)."""
    fmt = ["<"]
    for n, (code, size) in enumerate(_FIELDS[:max(fields) + 1]):
        if n not in fields:
            fmt.append("%dx" % size)
        elif n in (_ORIG_SRC, _ORIG_DST):
            fmt.append("%ds%dx" % (alen, size - alen))  # an IPv4 address is the first 4 of 16 bytes
        else:
            fmt.append(code)
    return "".join(fmt)


def _builder_source(family: int, proto: int, present: int) -> tuple[str, str, str] | None:
    """(builder source, reader format, body format) of a shape; None for the Entry path."""
    values = _values(family, proto, present)
    if values is None:
        return None
    # Every run of places the shape fixes (headers, the protocol) is packed
    # once, here, into one bytes constant: the fewer values a pack takes, the
    # less it costs.
    body, args = [">"], []
    run_codes: list[str] = []
    run_values: list[int] = []
    for code, place in (*netlink.body_layout(family, proto, frozenset(values)), ("", "")):  # "": the end
        value = place if isinstance(place, int) else values.get(place, "")
        if isinstance(value, int):
            run_codes.append(code)
            run_values.append(value)
            continue
        if run_codes:
            fixed = struct.pack(">" + "".join(run_codes), *run_values)
            body.append("%ds" % len(fixed))
            args.append(repr(fixed))
            run_codes, run_values = [], []
        if code:
            body.append(code)
            args.append(value)
    fields = {int(n) for a in args for n in re.findall(r"^f(\d+)\b", a)} | {_ORIG_SRC, _ORIG_DST}
    lines = []
    if any(a.startswith("flags_") for a in args):
        fields.add(_FIELD["state"])
        lines.append("    flags_orig, flags_reply = _DEFAULT_FLAGS[f%d]" % _FIELD["state"])
    if present & _BIT["status"]:
        status = _FIELD["status"]
        fields.add(status)
        lines += ["    if f%d & %d:" % (status, IPS_EXPECTED),
                  "        return None  # EXPECTED: the Entry path refuses it"]
    names = ", ".join("f%d" % n for n in sorted(fields))
    source = "\n".join([
        "def build(raw, off, mark):",
        "    %s, = _read(raw, off)" % names,
        *lines,
        "    return _pack(%s)" % ", ".join(args),
        ""])
    return source, _reader(fields, 4 if family == AF_INET else 16), "".join(body)


def _compile(key: tuple[int, int]) -> Builder:
    family, proto = key[0] & 0xFF, key[0] >> 8
    made = _builder_source(family, proto, key[1])
    if made is None:
        return _by_entry
    source, reader, body = made
    name = "<create builder: family %d, protocol %d, present 0x%08x>" % (family, proto, key[1])
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    namespace: dict[str, Any] = {"_read": struct.Struct(reader).unpack_from, "_pack": struct.Struct(body).pack,
                                 "_DEFAULT_FLAGS": _DEFAULT_FLAGS}
    exec(compile(source, name, "exec"), namespace)
    _sources[key] = source, name
    built: Builder = namespace["build"]
    return built


def _builder(key: tuple[int, int]) -> Builder:
    if len(_builders) >= MAX_SHAPES:
        return _by_entry
    built = _builders[key] = _compile(key)
    return built


def source(family: int, proto: int, present: int) -> str | None:
    """The builder of a shape as source (None: the shape goes through the Entry path), for reading."""
    key = (family | proto << 8, present)
    _builders.get(key) or _builder(key)
    found = _sources.get(key)
    return found[0] if found is not None else None


def forget() -> None:
    """Drop every builder (tests: start from no shapes)."""
    _builders.clear()
    for _source, name in _sources.values():
        linecache.cache.pop(name, None)
    _sources.clear()


def batch(records: compact.Records, positions: Iterable[int], mark: int, refusals: Decoded) -> CreateBatch:
    """The create requests of the records at ``positions`` (0-based), in that order.

    Refused records are counted in ``refusals`` (1-based, with the reason
    :meth:`compact.Records.entry` gives) and left out. The batch keeps the
    Entry of every record that went through it (labels, NAT, rare shapes).
    """
    out = CreateBatch(mark)
    bodies, kept = out.bodies, out.entries
    raw, size = records.buffer, compact.RECORD.size
    get = _builders.get
    for i in positions:
        off = i * size
        key = _key_of(raw, off)
        build = get(key) or _builder(key)
        body = build(raw, off, mark)
        if body is not None:
            bodies.append(body)
            continue
        try:
            e = records.entry(i)
        except CodecError as err:
            refusals.refuse(i + 1, str(err))
            continue
        kept[len(bodies)] = e
        bodies.append(netlink.create_body(e, mark))
    return out
