"""Encoding and decoding of ctnetlink messages (no sockets), derived from :mod:`.schema`.

pyroute2's generic attribute classes cost many times what the kernel does for
an entry; this module reads and writes exactly the attributes conntrack
entries use, with ``struct`` on flat buffers. Nothing here knows an attribute
number by heart: the walker, the learned layouts, the general encoder and the
fast create structs are all built from :data:`.schema.TABLE` when the module
loads. What is written by hand is what requests *mean* (:func:`_create_values`
and :func:`tcp_flags`), not where the bytes go.
"""

from __future__ import annotations

import dataclasses
import linecache
import operator
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..errors import ConntrackError
from ..model import (
    AF_INET,
    AF_INET6,
    IPS_CONFIRMED,
    IPS_DST_NAT_DONE,
    IPS_SRC_NAT_DONE,
    PROTO_TCP,
    PROTO_UDP,
    STATUS_TEXT_MASK,
    TCP_STATE_TIME_WAIT,
    CreateBatch,
    Entry,
)
from .schema import (
    ADDR,
    CTA_MARK,
    CTA_MARK_MASK,
    CTA_STATS_GLOBAL_ENTRIES,
    CTA_STATS_GLOBAL_MAX_ENTRIES,
    CTA_TIMEOUT,
    CTA_TUPLE_ORIG,
    CTA_ZONE,
    IPCTNL_MSG_CT_GET,
    IPCTNL_MSG_CT_GET_STATS,
    IPCTNL_MSG_CT_NEW,
    NLA_F_NESTED,
    NLA_TYPE_MASK,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    REQUEST_ONLY,
    TABLE,
    Leaf,
    Nest,
    Node,
)

# TCP flag bits conntrack(8) sends with every TCP entry it restores: the text
# has no window-tracking data, so BE_LIBERAL switches window tracking off.
TCP_FLAG_SACK_PERM = 0x02
TCP_FLAG_CLOSE_INIT = 0x04
TCP_FLAG_BE_LIBERAL = 0x08

_NLMSGHDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_U16BE = struct.Struct("!H")
_U32BE = struct.Struct("!I")
_ERRCODE = struct.Struct("=i")
_hdr_from = _NLMSGHDR.unpack_from
_nla_from = _NLA.unpack_from
_nla_pack = _NLA.pack
_u16_from = _U16BE.unpack_from
_u32_from = _U32BE.unpack_from

# ---------------------------------------------------------------- value slots
#
# The encoders take a request's values as a list indexed by slot: the Entry
# fields in their order, then the request-only values.

ENTRY_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Entry))
_SLOTS: tuple[str, ...] = ENTRY_FIELDS + REQUEST_ONLY
SLOT: Mapping[str, int] = MappingProxyType({name: i for i, name in enumerate(_SLOTS)})
_N_ENTRY = len(ENTRY_FIELDS)
_entry_values: Callable[[Entry], tuple[Any, ...]] = operator.attrgetter(*ENTRY_FIELDS)


def _leaves(nodes: tuple[Node, ...], path: tuple[int, ...] = ()) -> Iterator[tuple[tuple[int, ...], Leaf]]:
    for node in nodes:
        if isinstance(node, Leaf):
            yield (*path, node.type), node
        else:
            yield from _leaves(node.children, (*path, node.type))


for _path, _leaf in _leaves(TABLE):
    if _leaf.field not in SLOT:
        raise AssertionError("schema: %s carries %r, neither an Entry field nor request-only"
                             % (_leaf.name, _leaf.field))
del _path, _leaf


def _decoded(node: Node) -> bool:
    """Whether decoders read ``node``: it carries (or holds) an Entry field."""
    if isinstance(node, Leaf):
        return SLOT[node.field] < _N_ENTRY
    return any(_decoded(child) for child in node.children)


# ---------------------------------------------------------------- the walker
#
# decode_entry() walks a message's attributes in nested loops that compare
# each attribute's type with the table's and keep the value in a local, as a
# hand-written walker does; only the loops are written out from the table
# when the module loads. (A loop that interprets the table instead costs a
# quarter more an entry, and the walk is what each message costs until its
# layout is learned, and every message of an irregular layout.) The code is
# in WALKER_SOURCE, for reading; tracebacks show its lines.

_READ_EXPR = {"B": "buf[{v}]", "H": "_u16_from(buf, {v})[0]", "I": "_u32_from(buf, {v})[0]", "s": "buf[{v}:{end}]"}
#: What decode_entry() leaves in a field no attribute filled: the field's
#: default, or the zero of its type for those without one.
_DEFAULTS: tuple[Any, ...] = tuple(
    f.default if f.default is not dataclasses.MISSING else {"int": 0, "bytes": b""}[str(f.type)]
    for f in dataclasses.fields(Entry))


def _walk_lines(nodes: tuple[Node, ...], error: str, walk_others: bool, depth: int) -> list[str]:
    """The loop over the attributes ``nodes`` describes, at nesting ``depth``."""
    pad = "    " * (2 * depth + 1)
    o, e, ln, t, v = ("off", "end", "alen", "atype", "v") if not depth else \
        ("o%d" % depth, "e%d" % depth, "l%d" % depth, "t%d" % depth, "v%d" % depth)
    out = ["%swhile %s + 4 <= %s:" % (pad, o, e),
           "%s    %s, %s = _nla_from(buf, %s)" % (pad, ln, t, o),
           "%s    if %s < 4:" % (pad, ln),
           "%s        raise ConntrackError(%r)" % (pad, error),
           "%s    %s &= %d" % (pad, t, NLA_TYPE_MASK),
           "%s    %s = %s + 4" % (pad, v, o)]
    # (types, code, names): one branch for the types that fill one field alike
    branches: list[tuple[list[int], list[str], list[str]]] = []
    reads: dict[tuple[str, str], int] = {}
    for node in nodes:
        if not _decoded(node):
            continue  # request-only: skipped like any attribute we do not keep
        if isinstance(node, Leaf):
            key = (node.field, node.kind.read)
            if key in reads:
                types, _code, names = branches[reads[key]]
                types.append(node.type)
                names.append(node.name)
                continue
            reads[key] = len(branches)
            expr = _READ_EXPR[node.kind.read].format(v=v, end="%s + %s" % (o, ln))
            branches.append(([node.type], ["%s        f_%s = %s" % (pad, node.field, expr)], [node.name]))
            continue
        body = []
        if not depth:
            # A tuple's addresses are the ones it carries (b"" when it carries none).
            body += ["%s        f_%s = b\"\"" % (pad, field) for field in dict.fromkeys(
                leaf.field for _p, leaf in _leaves(node.children) if leaf.kind is ADDR and SLOT[leaf.field] < _N_ENTRY)]
        inner = "o%d, e%d" % (depth + 1, depth + 1)
        body.append("%s        %s = %s, %s + %s" % (pad, inner, v, o, ln))
        body += _walk_lines(node.children, "malformed %s attribute from the kernel" % node.what,
                            node.walk_others, depth + 1)
        branches.append(([node.type], body, [node.name]))
    for i, (types, code, names) in enumerate(branches):
        test = "%s == %d" % (t, types[0]) if len(types) == 1 else "%s in %r" % (t, tuple(types))
        out.append("%s    %s %s:  # %s" % (pad, "elif" if i else "if", test, ", ".join(names)))
        out += code
    if walk_others:
        # CTA_PROTOINFO has always had its unknown children's headers checked too.
        out.append("%s    else:" % pad)
        inner = "o%d, e%d" % (depth + 1, depth + 1)
        out.append("%s        %s = %s, %s + %s" % (pad, inner, v, o, ln))
        out += _walk_lines((), error, False, depth + 1)
    out.append("%s    %s += (%s + 3) & ~3" % (pad, o, ln))
    return out


def _walker_source() -> str:
    fields = ENTRY_FIELDS[1:]
    return "\n".join([
        "def decode_entry(buf, off, end, family):",
        *("    f_%s = %r" % (name, value) for name, value in zip(fields, _DEFAULTS[1:], strict=True)),
        *_walk_lines(TABLE, "malformed attribute from the kernel", False, 0),
        "    return Entry(family, %s)" % ", ".join("f_" + name for name in fields),
        ""])


WALKER_SOURCE = _walker_source()
_WALKER_FILE = "<ctnetlink walker from schema.TABLE>"
linecache.cache[_WALKER_FILE] = (len(WALKER_SOURCE), None, WALKER_SOURCE.splitlines(True), _WALKER_FILE)
_namespace: dict[str, Any] = {"_nla_from": _nla_from, "_u16_from": _u16_from, "_u32_from": _u32_from,
                              "ConntrackError": ConntrackError, "Entry": Entry}
exec(compile(WALKER_SOURCE, _WALKER_FILE, "exec"), _namespace)
_decode_entry: Callable[[bytes, int, int, int], Entry] = _namespace["decode_entry"]


def decode_entry(buf: bytes, off: int, end: int, family: int) -> Entry:
    """Decode the attributes of one IPCTNL_MSG_CT_NEW message body by walking them.

    :param buf: the received datagram
    :param off: offset of the first attribute (after nlmsghdr and nfgenmsg)
    :param end: end of this message
    :param family: ``nfgen_family`` of the message
    :raises ConntrackError: on a malformed attribute
    """
    return _decode_entry(buf, off, end, family)


# ------------------------------------------------- decoding by learned layout
#
# ctnetlink lays out every entry of a kind the same way: the same attributes,
# nested the same, in the same order, at the same offsets (an established IPv4
# TCP entry always looks alike; only the values differ). So the first message
# of each layout is walked once to learn it, and every later message of that
# length and family is checked against it (all attribute headers, nested ones
# too, compared in one go) and read with one precompiled ``struct`` unpack,
# about half the cost of a walk. A message whose headers differ from every
# learned layout is walked.

#: (path of attribute types) -> (Entry field, struct code); absent paths are skipped.
LEAVES: Mapping[tuple[int, ...], tuple[str, str]] = MappingProxyType({
    path: (leaf.field, leaf.kind.read) for path, leaf in _leaves(TABLE) if SLOT[leaf.field] < _N_ENTRY})
#: Attribute paths the decoder descends into (every other attribute is a leaf).
_NESTS = frozenset(path[:i] for path in LEAVES for i in range(1, len(path)))
_SIZES = {"B": 1, "H": 2, "I": 4}
#: Values of fields a layout does not carry: what :func:`decode_entry` leaves there.
_ABSENT: dict[str, Any] = dict(zip(ENTRY_FIELDS, _DEFAULTS, strict=True))
#: Bounds on what is learned, whatever the kernel sends.
MAX_LAYOUTS = 256
MAX_LAYOUTS_PER_KEY = 4


@dataclass(frozen=True, slots=True)
class Layout:
    """One learned message layout: the struct that reads it, and the headers it must have."""

    unpack: Callable[[bytes, int], tuple[Any, ...]]
    heads_of: Callable[[tuple[Any, ...]], tuple[Any, ...]]
    heads: tuple[Any, ...]
    pick: Callable[[tuple[Any, ...]], tuple[Any, ...]]
    tail: tuple[Any, ...]
    #: ``(buffer, message offset)`` -> the message's stable bytes, in pieces:
    #: everything from the nfgenmsg on except the timeout's value and the
    #: values no Entry field keeps (counters, use count, ID, timestamps, ...).
    #: Save's cache keys an entry's pieces by them (:func:`stable_parts`).
    stable: Callable[[bytes, int], tuple[bytes, ...]]
    #: Where the timeout's value (big-endian u32) sits in the message, or -1.
    timeout_at: int


def _heads_and_leaves(buf: bytes, off: int, end: int, path: tuple[int, ...], *,
                      heads: list[int], leaves: list[tuple[int, int, tuple[int, ...]]]) -> bool:
    """Collect header offsets and leaves; False when an attribute overruns its parent."""
    while off + 4 <= end:
        alen, atype = _nla_from(buf, off)
        if alen < 4 or off + alen > end:
            return False
        heads.append(off)
        sub = (*path, atype & NLA_TYPE_MASK)
        if sub in _NESTS:
            if not _heads_and_leaves(buf, off + 4, off + alen, sub, heads=heads, leaves=leaves):
                return False
        else:
            leaves.append((off + 4, alen - 4, sub))
        off += (alen + 3) & ~3
    return True


def _learn(buf: bytes, start: int, end: int, family: int) -> Layout | None:
    """The layout of the message body ``buf[start:end]``, or None when it is irregular."""
    heads: list[int] = []
    leaves: list[tuple[int, int, tuple[int, ...]]] = []
    if not _heads_and_leaves(buf, start, end, (), heads=heads, leaves=leaves):
        return None
    # (offset, struct code, Entry field or None for a header word to compare)
    items: list[tuple[int, str, str | None]] = [(o, "I", None) for o in heads]
    for o, ln, path in leaves:
        leaf = LEAVES.get(path)
        if leaf is None:
            continue  # an attribute we do not keep (id, use count, counters, ...)
        name, kind = leaf
        if kind != "s" and _SIZES[kind] > ln:
            return None
        items.append((o, "%ds" % ln if kind == "s" else kind, name))
    # One big-endian struct over the whole body, pad bytes where nothing is read.
    fmt: list[str] = [">"]
    order: list[str | None] = []
    pos = start
    for o, code, slot in sorted(items, key=lambda it: it[0]):
        if o < pos:
            return None
        if o > pos:
            fmt.append("%dx" % (o - pos))
        fmt.append(code)
        order.append(slot)
        pos = o + (int(code[:-1]) if code.endswith("s") else _SIZES[code])
    if pos > end:
        return None
    unpack = struct.Struct("".join(fmt)).unpack_from
    heads_pick = operator.itemgetter(*[i for i, name in enumerate(order) if name is None])
    # The last occurrence wins for a repeated attribute, as in decode_entry().
    slots = {name: i for i, name in enumerate(order) if name is not None}
    tail: list[Any] = []
    picks: list[int] = []
    for fname in ENTRY_FIELDS:
        if fname in slots:
            picks.append(slots[fname])
        else:
            picks.append(len(order) + len(tail))
            tail.append(family if fname == "family" else _ABSENT[fname])
    stable, timeout_at = _stable_parts(start, end, leaves)
    return Layout(unpack, heads_pick, heads_pick(unpack(buf, start)),
                  operator.itemgetter(*picks), tuple(tail), stable, timeout_at)


#: The leaf whose value Save's cache masks and reads fresh.
_TIMEOUT_PATH = (CTA_TIMEOUT,)


def _stable_parts(start: int, end: int, leaves: list[tuple[int, int, tuple[int, ...]]]
                  ) -> tuple[Callable[[bytes, int], tuple[bytes, ...]], int]:
    """The reader of a layout's stable bytes (:attr:`Layout.stable`) and its timeout's offset.

    ``start`` is where the attributes begin (nlmsghdr and nfgenmsg before
    it); offsets returned are from the message's first byte.
    """
    base = start - 20
    timeout_at = -1
    masked: list[tuple[int, int]] = []
    for o, ln, path in leaves:
        if path == _TIMEOUT_PATH and ln == 4:
            timeout_at = o - base
            masked.append((o, ln))
        elif path not in LEAVES:
            masked.append((o, ln))
    # The nlmsghdr (length, type, flags, sequence, port) is skipped: the
    # length and family select the layout, the rest names the request.
    fmt = ["<16x"]
    pos = start - 4  # the nfgenmsg: family, version, resource id
    for o, ln in sorted(masked):
        if o > pos:
            fmt.append("%ds" % (o - pos))
        fmt.append("%dx" % ln)
        pos = o + ln
    if end > pos:
        fmt.append("%ds" % (end - pos))
    return struct.Struct("".join(fmt)).unpack_from, timeout_at


class LayoutCache:
    """The layouts learned from the messages one owner decodes, bounded.

    The bounds hold whatever the kernel sends: at most ``max_layouts``
    (length, family) keys, at most ``max_per_key`` layouts each.

    Safe for several threads (an event listener may decode while a dump
    does): reads take the published mapping, which is never changed once
    published, without a lock; learning, rare (once per layout kind), builds a
    new mapping under a lock and publishes it with one assignment. A lock
    around every read would cost the hot path that learning is there to speed
    up, and per-thread caches would learn every layout once per thread.
    """

    __slots__ = ("_known", "_lock", "max_layouts", "max_per_key")

    def __init__(self, max_layouts: int = MAX_LAYOUTS, max_per_key: int = MAX_LAYOUTS_PER_KEY) -> None:
        self.max_layouts = max_layouts
        self.max_per_key = max_per_key
        self._known: dict[tuple[int, int], tuple[Layout, ...]] = {}
        self._lock = threading.Lock()

    def snapshot(self) -> Mapping[tuple[int, int], tuple[Layout, ...]]:
        """The layouts learned so far, by (message length, family)."""
        return MappingProxyType(self._known)

    def decode_message(self, buf: bytes, off: int, mlen: int) -> Entry:
        """Decode the IPCTNL_MSG_CT_NEW message at ``buf[off:off+mlen]`` into an entry.

        Same result as :func:`decode_entry`, by a learned layout when one fits.

        :raises ConntrackError: on a malformed attribute
        """
        family = buf[off + 16]
        key = (mlen, family)
        known = self._known.get(key)
        if known is not None:
            for lay in known:
                vals = lay.unpack(buf, off + 20)
                if lay.heads_of(vals) == lay.heads:
                    return Entry(*lay.pick((*vals, *lay.tail)))
        e = decode_entry(buf, off + 20, off + mlen, family)
        self._learn(buf, off, mlen, key)
        return e

    def layout_of(self, buf: bytes, off: int, mlen: int) -> Layout | None:
        """The learned layout the message at ``buf[off:off+mlen]`` has, if any."""
        for lay in self._known.get((mlen, buf[off + 16]), ()):
            if lay.heads_of(lay.unpack(buf, off + 20)) == lay.heads:
                return lay
        return None

    def _learn(self, buf: bytes, off: int, mlen: int, key: tuple[int, int]) -> None:
        # The bounds are checked here only, under the lock, so that two threads
        # cannot both add the last layout a key has room for. (The lock costs a
        # small fraction of the walk that precedes it.)
        with self._lock:
            known = self._known.get(key, ())
            if (not known and len(self._known) >= self.max_layouts) or len(known) >= self.max_per_key:
                return
            learned = _learn(buf, off + 20, off + mlen, key[1])
            if learned is None or any(lay.heads == learned.heads for lay in known):
                return  # irregular, or another thread learned it meanwhile
            self._known = {**self._known, key: (*known, learned)}


#: The cache of callers that do not bring their own (module-level convenience;
#: the Conntrack adapter and the tests each own theirs).
DEFAULT_LAYOUTS = LayoutCache()


def decode_message(buf: bytes, off: int, mlen: int, layouts: LayoutCache = DEFAULT_LAYOUTS) -> Entry:
    """:meth:`LayoutCache.decode_message` of ``layouts``."""
    return layouts.decode_message(buf, off, mlen)


@dataclass(slots=True)
class DumpChunk:
    """What one received datagram of a dump held."""

    done: bool = False
    interrupted: bool = False


def decode_dump(buf: bytes, size: int, seq: int, out: list[Entry],
                layouts: LayoutCache = DEFAULT_LAYOUTS) -> DumpChunk:
    """Decode the messages of one dump datagram, appending entries to ``out``.

    :param buf: the datagram
    :param size: its length
    :param seq: the dump request's sequence number (others are skipped)
    :param out: where decoded entries go
    :param layouts: where layouts are learned and looked up
    :raises ConntrackError: when the kernel answered the dump with an error
    """
    decode = layouts.decode_message
    append = out.append
    return walk_dump(buf, size, seq, lambda b, off, mlen: append(decode(b, off, mlen)))


def dump_entries(buf: bytes, size: int, seq: int) -> tuple[list[int], list[int], DumpChunk]:
    """The offsets and lengths of the entry messages of one dump datagram.

    :param buf: the datagram
    :param size: its length
    :param seq: the dump request's sequence number (others are skipped)
    :raises ConntrackError: when the kernel answered the dump with an error
    """
    chunk = DumpChunk()
    offsets: list[int] = []
    lengths: list[int] = []
    off = 0
    while off + 16 <= size:
        mlen, mtype, mflags, mseq, _pid = _hdr_from(buf, off)
        if mlen < 16 or off + mlen > size:
            raise ConntrackError("truncated netlink message from the kernel")
        if mseq == seq:
            if mflags & NLM_F_DUMP_INTR:
                chunk.interrupted = True
            if mtype == IPCTNL_MSG_CT_NEW and mlen >= 20:
                offsets.append(off)
                lengths.append(mlen)
            elif mtype == NLMSG_DONE:
                chunk.done = True
                break
            elif mtype == NLMSG_ERROR:
                code = -_ERRCODE.unpack_from(buf, off + 16)[0]
                if code:
                    raise ConntrackError("conntrack dump refused", code)
                chunk.done = True
                break
        off += (mlen + 3) & ~3
    return offsets, lengths, chunk


def walk_dump(buf: bytes, size: int, seq: int, on_entry: Callable[[bytes, int, int], object]) -> DumpChunk:
    """Call ``on_entry(buf, offset, length)`` for each entry message of one dump datagram.

    (:func:`dump_entries`, one call per entry.)

    :raises ConntrackError: when the kernel answered the dump with an error
    """
    offsets, lengths, chunk = dump_entries(buf, size, seq)
    for off, mlen in zip(offsets, lengths, strict=True):
        on_entry(buf, off, mlen)
    return chunk


def _messages(buf: bytes, size: int, strict: bool = False) -> Iterator[tuple[int, int, int, int]]:
    """``(offset, length, type, seq)`` of each netlink message in a datagram.

    A truncated message ends the walk, or raises with ``strict``. (dump_entries
    walks inline instead: it runs once per entry inside the VM's downtime.)
    """
    off = 0
    while off + 16 <= size:
        mlen, mtype, _flags, mseq, _pid = _hdr_from(buf, off)
        if mlen < 16 or off + mlen > size:
            if strict:
                raise ConntrackError("truncated netlink message from the kernel")
            return
        yield off, mlen, mtype, mseq
        off += (mlen + 3) & ~3


def iter_acks(buf: bytes, size: int) -> Iterator[tuple[int, int]]:
    """Yield ``(seq, errno)`` for each NLMSG_ERROR (0 = ACK) in a datagram."""
    for off, mlen, mtype, mseq in _messages(buf, size):
        if mtype == NLMSG_ERROR and mlen >= 20:
            yield mseq, -_ERRCODE.unpack_from(buf, off + 16)[0]


def iter_get_replies(buf: bytes, size: int,
                     layouts: LayoutCache = DEFAULT_LAYOUTS) -> Iterator[tuple[int, Entry | None, int]]:
    """Yield ``(seq, entry, errno)`` for each answer to a :func:`get_request` in a datagram.

    A found entry comes as ``(seq, entry, 0)``, a refusal as ``(seq, None, errno)``.
    """
    for off, mlen, mtype, mseq in _messages(buf, size):
        if mtype == IPCTNL_MSG_CT_NEW and mlen >= 20:
            yield mseq, layouts.decode_message(buf, off, mlen), 0
        elif mtype == NLMSG_ERROR and mlen >= 20:
            code = -_ERRCODE.unpack_from(buf, off + 16)[0]
            if code:
                yield mseq, None, code


def stats_request(seq: int) -> bytes:
    """An IPCTNL_MSG_CT_GET_STATS request: how full is this namespace's table."""
    return _message(IPCTNL_MSG_CT_GET_STATS, NLM_F_REQUEST, seq, socket.AF_UNSPEC, b"")


def decode_stats(buf: bytes, size: int, seq: int) -> tuple[int, int | None] | None:
    """``(entries, nf_conntrack_max)`` from the answer to :func:`stats_request`.

    The maximum is None where the kernel does not report it. None when the
    datagram holds no answer to ``seq``. (Two flat attributes of their own
    number space, enum ctattr_stats_global: not entry attributes, so not in
    the table.)

    :raises ConntrackError: when the kernel refused the request
    """
    for off, mlen, mtype, mseq in _messages(buf, size, strict=True):
        if mseq == seq:
            if mtype == NLMSG_ERROR and mlen >= 20:
                code = -_ERRCODE.unpack_from(buf, off + 16)[0]
                raise ConntrackError("conntrack statistics refused", code or None)
            if mtype == IPCTNL_MSG_CT_GET_STATS:
                count: int | None = None
                maximum: int | None = None
                a, end = off + 20, off + mlen
                while a + 8 <= end:
                    alen, atype = _nla_from(buf, a)
                    if alen < 4:
                        break
                    atype &= NLA_TYPE_MASK
                    if atype == CTA_STATS_GLOBAL_ENTRIES and alen >= 8:
                        count = _u32_from(buf, a + 4)[0]
                    elif atype == CTA_STATS_GLOBAL_MAX_ENTRIES and alen >= 8:
                        maximum = _u32_from(buf, a + 4)[0]
                    a += (alen + 3) & ~3
                if count is None:
                    raise ConntrackError("conntrack statistics without an entry count")
                return count, maximum
    return None


# ---------------------------------------------------------------- encoding
#
# Which attributes a request carries depends on the family (IPv4 or IPv6
# address attributes) and the protocol (ports or ICMP fields, which protoinfo):
# the table is compiled once per (family, protocol kind, attributes asked for)
# into a plan, and a plan is filled from a list of values by slot, leaving out
# absent (None) values, nests left empty, and nests whose required value is
# absent.

def _header_word(length: int, atype: int) -> int:
    """An attribute header (host order) as the big-endian word a big-endian struct packs."""
    return int.from_bytes(_NLA.pack(length, atype), "big")


def _nodes(nodes: tuple[Node, ...]) -> Iterator[Node]:
    for node in nodes:
        yield node
        if isinstance(node, Nest):
            yield from _nodes(node.children)


#: The protocols the table sends something particular for.
_PROTOS_NAMED: frozenset[int] = frozenset().union(
    *((node.protos or frozenset()) | (node.exclude if isinstance(node, Leaf) else frozenset())
      for node in _nodes(TABLE)))


def _plan_key(family: int, proto: int) -> tuple[int, int]:
    # Anything but IPv4 goes with the IPv6 attributes, as it always has; every
    # protocol the table does not name is sent alike.
    return (AF_INET if family == AF_INET else AF_INET6), (proto if proto in _PROTOS_NAMED else -1)


def _sent(node: Node, family: int, proto: int) -> bool:
    """Whether ``node`` belongs in a request for ``family`` and ``proto``."""
    if node.protos is not None and proto not in node.protos:
        return False
    if isinstance(node, Leaf):
        return (node.family is None or node.family == family) and proto not in node.exclude
    return True


# A plan item: (slot, pack, header, required) for a leaf, (-1, None, nest type, items) for a nest.
_PlanItem = tuple[int, Any, int, Any]


def _leaf_packer(leaf: Leaf) -> tuple[Callable[[int, Any], bytes], int]:
    """(pack(header, value) -> the attribute, header) for ``leaf``."""
    atype, write = leaf.type, leaf.kind.write
    if write is None:
        def raw(atype: int, v: bytes) -> bytes:
            alen = 4 + len(v)
            return _NLA.pack(alen, atype) + v + b"\0" * (-alen & 3)
        return raw, atype
    size = struct.calcsize(">" + write)
    pad = -size & 3
    if write == "B" * len(write):
        # As bytes((...)), as they always were (a value over 255 is a ValueError).
        head = _NLA.pack(4 + size, atype)
        if write == "B":
            return (lambda _h, v: head + bytes((v, 0, 0, 0))), 0
        copies, zeros = len(write), (0,) * pad
        return (lambda _h, v: head + bytes((v,) * copies + zeros)), 0
    if len(write) != 1:
        raise ValueError("%s: only bytes are sent more than once" % leaf.name)
    # Header and value in one big-endian pack: the header as the word its host-order bytes make.
    return struct.Struct(">I" + write + "%dx" % pad).pack, _header_word(4 + size, atype)


_PACKERS: dict[Leaf, tuple[Callable[[int, Any], bytes], int]] = {
    leaf: _leaf_packer(leaf) for _p, leaf in _leaves(TABLE)}


def _compile_plan(nodes: tuple[Node, ...], family: int, proto: int) -> tuple[_PlanItem, ...]:
    items: list[_PlanItem] = []
    for node in nodes:
        if not _sent(node, family, proto):
            continue
        if isinstance(node, Leaf):
            items.append((SLOT[node.field], *_PACKERS[node], node.required))
        elif inner := _compile_plan(node.children, family, proto):  # a nest with nothing to send is left out
            items.append((-1, None, node.type | NLA_F_NESTED, inner))
    return tuple(items)


_PLANS: dict[tuple[int, int, frozenset[int] | None], tuple[_PlanItem, ...]] = {}


def _plan(family: int, proto: int, tops: frozenset[int] | None = None) -> tuple[_PlanItem, ...]:
    """The compiled table for a request (only the top-level attributes ``tops``, if given)."""
    fam, kind = _plan_key(family, proto)
    key = (fam, kind, tops)
    plan = _PLANS.get(key)
    if plan is None:
        nodes = TABLE if tops is None else tuple(node for node in TABLE if node.type in tops)
        # Bounded: two families, the protocols the table names plus one, the few ``tops`` used here.
        plan = _PLANS[key] = _compile_plan(nodes, fam, kind)
    return plan


def _encode(plan: tuple[_PlanItem, ...], vals: list[Any]) -> bytes | None:
    """The attributes of ``plan`` for ``vals``; None when a required value is absent."""
    parts: list[bytes] = []
    for slot, pack, head, more in plan:
        if slot >= 0:
            v = vals[slot]
            if v is None:
                if more:
                    return None
                continue
            parts.append(pack(head, v))
        else:
            body = _encode(more, vals)
            if body:
                parts.append(_nla_pack(4 + len(body), head) + body)
    return b"".join(parts)


def _message(mtype: int, flags: int, seq: int, family: int, attrs: bytes) -> bytes:
    return _NLMSGHDR.pack(20 + len(attrs), mtype, flags, seq, 0) + bytes((family, 0, 0, 0)) + attrs


_NO_REQUEST_ONLY: tuple[None, ...] = (None,) * len(REQUEST_ONLY)
_DUMP_TOPS = frozenset({CTA_MARK, CTA_MARK_MASK})
_GET_TOPS = frozenset({CTA_TUPLE_ORIG, CTA_ZONE})


def dump_request(seq: int, mark: int) -> bytes:
    """A CT_GET dump of every family, filtered in the kernel by ``mark``.

    The mark always travels with a full mask: without a mask the kernel
    does not filter by mark (and pyroute2's own dump leaves a mark of 0 out);
    with one, it compares exactly.
    """
    vals: list[Any] = [None] * len(_SLOTS)
    vals[SLOT["mark"]], vals[SLOT["mark_mask"]] = mark, 0xFFFFFFFF
    attrs = _encode(_plan(socket.AF_UNSPEC, 0, _DUMP_TOPS), vals) or b""
    return _message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, socket.AF_UNSPEC, attrs)


def get_request(e: Entry, seq: int) -> bytes:
    """A CT_GET of the one entry whose original tuple (and zone) is ``e``'s."""
    vals = [*_entry_values(e), *_NO_REQUEST_ONLY]
    attrs = _encode(_plan(e.family, e.proto, _GET_TOPS), vals) or b""
    return _message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST, seq, e.family, attrs)


# ---------------------------------------------------------------- create requests


def tcp_flags(e: Entry) -> tuple[int, int]:
    """The (original, reply) TCP flags a create request sets for ``e`` (which has a state).

    The entry's own when it has both (a dump carries them); otherwise what
    conntrack(8) sets: BE_LIBERAL and SACK_PERM, plus CLOSE_INIT from
    TIME_WAIT on.
    """
    if e.tcp_flags_orig is not None and e.tcp_flags_reply is not None:
        return e.tcp_flags_orig, e.tcp_flags_reply
    fo = TCP_FLAG_BE_LIBERAL | TCP_FLAG_SACK_PERM
    if e.state is not None and e.state >= TCP_STATE_TIME_WAIT:
        fo |= TCP_FLAG_CLOSE_INIT
    return fo, fo


_REPLY_SRC, _REPLY_DST = SLOT["reply_src"], SLOT["reply_dst"]
_REPLY_SPORT, _REPLY_DPORT = SLOT["reply_sport"], SLOT["reply_dport"]
_STATUS, _MARK, _LABELS = SLOT["status"], SLOT["mark"], SLOT["labels"]
_FLAGS_ORIG, _FLAGS_REPLY = SLOT["tcp_flags_orig"], SLOT["tcp_flags_reply"]
_SNAT_IP, _SNAT_PORT, _DNAT_IP, _DNAT_PORT = SLOT["snat_ip"], SLOT["snat_port"], SLOT["dnat_ip"], SLOT["dnat_port"]


def _create_values(e: Entry, mark: int) -> list[Any]:
    """What a create request for ``e`` carries, by slot: ``e`` as the kernel must be told it.

    Like conntrack(8): IPS_CONFIRMED added to the status bits the text
    keeps, the TCP flags of :func:`tcp_flags`, labels only when some bit is
    set, and NAT derived from the reply tuple.
    """
    vals = [*_entry_values(e), *_NO_REQUEST_ONLY]
    zero = b"\0" * len(e.orig_src)
    snat, dnat = e.is_snat(), e.is_dnat()
    # With the kernel's own NAT bits (from a dump, carried by the compact
    # payload) the translated port is known too, also when only the port was
    # translated, which the save text cannot express.
    st = e.status or 0
    known = e.sport is not None and e.reply_sport is not None and e.reply_dport is not None
    snat_port = e.reply_dport if known and st & IPS_SRC_NAT_DONE and e.reply_dport != e.sport else None
    dnat_port = e.reply_sport if known and st & IPS_DST_NAT_DONE and e.reply_sport != e.dport else None
    # A NAT side goes as the zero address (and, with a NAT port, the untranslated
    # port); the kernel's NAT setup computes the real reply tuple from CTA_NAT_*
    # (how conntrack -n/-g restores NAT). Given the translated values instead,
    # it would see nothing to translate and leave the NAT undone.
    if dnat:
        vals[_REPLY_SRC] = zero
    if snat:
        vals[_REPLY_DST] = zero
    if snat_port is not None or dnat_port is not None:
        vals[_REPLY_SPORT] = e.dport if dnat_port is not None else e.reply_sport
        vals[_REPLY_DPORT] = e.sport if snat_port is not None else e.reply_dport
    if snat or snat_port is not None:
        vals[_SNAT_IP], vals[_SNAT_PORT] = e.reply_dst, snat_port
    if dnat or dnat_port is not None:
        vals[_DNAT_IP], vals[_DNAT_PORT] = e.reply_src, dnat_port
    if e.status is not None:
        vals[_STATUS] = (e.status & STATUS_TEXT_MASK) | IPS_CONFIRMED
    vals[_MARK] = mark
    if e.proto == PROTO_TCP and e.state is not None:
        vals[_FLAGS_ORIG], vals[_FLAGS_REPLY] = tcp_flags(e)
    if not (e.labels and any(e.labels)):
        vals[_LABELS] = None
    return vals


_CREATE_FLAGS = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL


#: Create plans by (family, protocol) as entries have them (at most 2 x 256).
_CREATE_PLANS: dict[tuple[int, int], tuple[_PlanItem, ...]] = {}


def _general_body(e: Entry, mark: int) -> bytes:
    plan = _CREATE_PLANS.get((e.family, e.proto))
    if plan is None:
        plan = _plan(e.family, e.proto)
        if e.family in (AF_INET, AF_INET6) and 0 <= e.proto <= 255:
            _CREATE_PLANS[(e.family, e.proto)] = plan
    return bytes((e.family, 0, 0, 0)) + (_encode(plan, _create_values(e, mark)) or b"")


def create_header(body_size: int, seq: int, ack: bool = False) -> bytes:
    """The netlink header of a create request whose body is ``body_size`` bytes."""
    return _NLMSGHDR.pack(16 + body_size, IPCTNL_MSG_CT_NEW, _CREATE_FLAGS | NLM_F_ACK if ack else _CREATE_FLAGS,
                          seq, 0)


def create_request_general(e: Entry, mark: int, seq: int, ack: bool) -> bytes:
    """create_request() for any entry, attribute by attribute (the reference)."""
    body = _general_body(e, mark)
    return create_header(len(body), seq, ack) + body


# ------------------------------------ create requests of the common shape
#
# Most entries a VM has are TCP or UDP without NAT, zones or labels, and every
# such request has the same attributes at the same offsets for a given family,
# protocol and window-scale presence. One precompiled struct per shape packs
# the whole body, with the attribute headers as constants, instead of ~20
# small byte strings joined: about a third of the general path's cost. The
# struct is derived from the table for the values such an entry has;
# create_request() takes the general path for everything else, and tests hold
# both to the same bytes.


@dataclass(frozen=True, slots=True)
class _Shape:
    pack: Callable[..., bytes]
    pick: Callable[[tuple[Any, ...]], tuple[Any, ...]]
    consts: tuple[int, ...]
    size: int


# A shape part: (struct code, byte size, header constant, or None for a value, slot of the value).
_Part = tuple[str, int, int | None, int]


def _shape_parts(nodes: tuple[Node, ...], family: int, proto: int, present: frozenset[str],
                 alen: int) -> list[_Part] | None:
    """The parts of the attributes of ``nodes`` carrying ``present``; None when a required one is not."""
    parts: list[_Part] = []
    for node in nodes:
        if not _sent(node, family, proto):
            continue
        if isinstance(node, Leaf):
            if node.field not in present:
                if node.required:
                    return None
                continue
            slot, write = SLOT[node.field], node.kind.write
            if write is None:
                if node.kind is not ADDR:
                    raise ValueError("%s has no fixed size for a shape" % node.name)
                values = [("%ds" % alen, alen)]
            else:
                values = [(code, struct.calcsize(">" + code)) for code in write]
            size = sum(n for _c, n in values)
            pad = -size & 3
            if pad:
                values[-1] = ("%s%dx" % (values[-1][0], pad), values[-1][1] + pad)
            parts.append(("I", 4, _header_word(4 + size, node.type), -1))
            parts += [(code, n, None, slot) for code, n in values]
        else:
            inner = _shape_parts(node.children, family, proto, present, alen)
            if inner:
                body = sum(n for _c, n, _k, _s in inner)
                parts.append(("I", 4, _header_word(4 + body, node.type | NLA_F_NESTED), -1))
                parts += inner
    return parts


#: The values _common_body() hands a shape's struct, in this order. A
#: common entry's reply tuple is its original tuple mirrored (it checks that),
#: so the reply attributes take the original values: _MIRROR.
_COMMON_SOURCE = ("orig_src", "orig_dst", "proto", "sport", "dport", "timeout", "status", "mark",
                  "state", "tcp_wscale_orig", "tcp_wscale_reply", "tcp_flags_orig", "tcp_flags_reply")
_MIRROR = {"reply_src": "orig_dst", "reply_dst": "orig_src", "reply_sport": "dport", "reply_dport": "sport"}


def body_layout(family: int, proto: int, present: frozenset[str]) -> tuple[tuple[str, str | int], ...]:
    """How the body of a create request (nfgenmsg and attributes, no netlink
    header) is laid out when it carries exactly the values ``present``.

    Each place of the body in order, as (big-endian struct code, what goes
    there): a value's name (an Entry field or a request-only value) or an int
    constant (nfgenmsg, attribute headers). Derived from the table as
    :func:`create_request_general` sends it: a value's attribute only where
    it is present, a nest only when it holds something and its required
    value is present.

    :param family: AF_INET or AF_INET6 (the address length follows)
    :param proto: the IP protocol number
    :param present: the values that are not None in the request
    :raises ValueError: when ``present`` holds a value of no fixed size (labels)
    """
    fam, kind = _plan_key(family, proto)
    parts = _shape_parts(TABLE, fam, kind, present, 4 if fam == AF_INET else 16) or []
    parts.insert(0, ("I", 4, family << 24, -1))  # nfgenmsg: family, version 0, res_id 0
    return tuple((code, _SLOTS[slot] if const is None else const) for code, _n, const, slot in parts)


def _build_shape(family: int, proto: int, present: frozenset[str]) -> _Shape:
    layout = body_layout(family, proto, present)
    codec = struct.Struct(">" + "".join(code for code, _p in layout))
    places = [place for _c, place in layout]
    # The struct's values: picked from (_COMMON_SOURCE values, header constants).
    consts = tuple(p for p in places if isinstance(p, int))
    picks, k = [], len(_COMMON_SOURCE)
    for place in places:
        if isinstance(place, str):
            picks.append(_COMMON_SOURCE.index(_MIRROR.get(place, place)))
        else:
            picks.append(k)
            k += 1
    return _Shape(codec.pack, operator.itemgetter(*picks), consts, 16 + codec.size)


_UDP_VALUES = frozenset({"orig_src", "orig_dst", "proto", "sport", "dport", "reply_src", "reply_dst",
                         "reply_sport", "reply_dport", "status", "timeout", "mark"})
_TCP_VALUES = _UDP_VALUES | {"state", "tcp_flags_orig", "tcp_flags_reply"}
_WSCALE = frozenset({"tcp_wscale_orig", "tcp_wscale_reply"})
_SHAPES: dict[tuple[int, int, bool], _Shape] = {
    (family, proto, wscale): _build_shape(family, proto, (_TCP_VALUES | (_WSCALE if wscale else frozenset()))
                                          if proto == PROTO_TCP else _UDP_VALUES)
    for family in (AF_INET, AF_INET6) for proto in (PROTO_TCP, PROTO_UDP) for wscale in (False, True)
    if proto == PROTO_TCP or not wscale
}


def _common_body(e: Entry, mark: int) -> bytes | None:
    """create_body() for the common shape, or None when ``e`` is not of it."""
    proto, sport, dport, osrc, odst = e.proto, e.sport, e.dport, e.orig_src, e.orig_dst
    if (e.reply_src != odst or e.reply_dst != osrc or sport is None or dport is None
            or e.reply_sport != dport or e.reply_dport != sport or e.status is None or e.timeout is None
            or e.zone is not None or e.orig_zone is not None or e.reply_zone is not None or e.labels):
        return None
    if proto == PROTO_UDP:
        shape = _SHAPES.get((e.family, proto, False))
        if shape is None:
            return None
        state = wso = wsr = fo = fr = None
    elif proto == PROTO_TCP:
        state, wso, wsr = e.state, e.tcp_wscale_orig, e.tcp_wscale_reply
        wscale = wso is not None
        if state is None or wscale != (wsr is not None):
            return None
        shape = _SHAPES.get((e.family, proto, wscale))
        if shape is None:
            return None
        fo, fr = tcp_flags(e)
    else:
        return None
    if len(osrc) != (4 if e.family == AF_INET else 16) or len(odst) != len(osrc):
        return None
    status = (e.status & STATUS_TEXT_MASK) | IPS_CONFIRMED
    # In the order of _COMMON_SOURCE.
    values = (osrc, odst, proto, sport, dport, e.timeout, status, mark, state, wso, wsr, fo, fr)
    return shape.pack(*shape.pick((*values, *shape.consts)))


def create_body(e: Entry, mark: int) -> bytes:
    """The body of :func:`create_request` (everything after the netlink header).

    It depends neither on the sequence number nor on the ACK flag, so a
    batch of bodies can be built before the adapter numbers them
    (:func:`create_header`).
    """
    body = _common_body(e, mark)
    return body if body is not None else _general_body(e, mark)


def create_request(e: Entry, mark: int, seq: int, ack: bool) -> bytes:
    """A CT_NEW request that creates ``e`` with ``mark``, never touching an existing entry.

    NLM_F_EXCL makes an existing entry an EEXIST error instead of an update,
    so Load can only ever add entries. Like conntrack(8) it adds
    IPS_CONFIRMED, derives NAT from the reply tuple, and sets the TCP flags a
    restored entry needs (:func:`_create_values`).

    :param e: the entry
    :param mark: the CTA_MARK to set (the VM's mark)
    :param seq: sequence number that identifies this request's error reply
    :param ack: ask for an acknowledgement even on success
    """
    body = create_body(e, mark)
    return create_header(len(body), seq, ack) + body


#: A create request's netlink flags when it asks for an ACK, and where they sit in its header.
CREATE_ACK_FLAGS = struct.pack("=H", _CREATE_FLAGS | NLM_F_ACK)
FLAGS_OFFSET = 6


def create_batch(entries: Iterable[Entry], mark: int) -> CreateBatch:
    """A :class:`~pvevmstate.model.CreateBatch` of ``entries`` with ``mark`` (each entry kept with its body)."""
    batch = CreateBatch(mark)
    bodies, kept = batch.bodies, batch.entries
    for e in entries:
        kept[len(bodies)] = e
        bodies.append(create_body(e, mark))
    return batch
