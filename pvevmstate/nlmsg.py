"""Pure encoding and decoding of ctnetlink messages (no sockets).

pyroute2's generic attribute machinery costs 100+ µs per entry (NETLINK.md);
this module parses and builds exactly the attributes conntrack entries use,
with ``struct`` on flat buffers. Attribute numbers: SAVE_FORMAT.md §9 and
``include/uapi/linux/netfilter/nfnetlink_conntrack.h``.
"""

from __future__ import annotations

import dataclasses
import operator
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .entry import (
    AF_INET,
    AF_INET6,
    IPS_CONFIRMED,
    IPS_DST_NAT_DONE,
    IPS_SRC_NAT_DONE,
    PROTO_DCCP,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    STATUS_TEXT_MASK,
    TCP_STATE_TIME_WAIT,
    Entry,
)
from .errors import ConntrackError

NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x001
NLM_F_MULTI = 0x002
NLM_F_ACK = 0x004
NLM_F_DUMP_INTR = 0x010
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

IPCTNL_MSG_CT_NEW = 0x0100  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW
IPCTNL_MSG_CT_GET = 0x0101
IPCTNL_MSG_CT_GET_STATS = 0x0105

CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_NAT_SRC = 6
CTA_TIMEOUT = 7
CTA_MARK = 8
CTA_NAT_DST = 13
CTA_ZONE = 18
CTA_MARK_MASK = 21
CTA_LABELS = 22
CTA_NAT_PROTO = 3
# enum ctattr_stats_global: the namespace's entry count, and nf_conntrack_max.
CTA_STATS_GLOBAL_ENTRIES = 1
CTA_STATS_GLOBAL_MAX_ENTRIES = 2
CTA_PROTONAT_PORT_MIN = 1

CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_TUPLE_ZONE = 3
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
CTA_PROTO_ICMP_ID = 4
CTA_PROTO_ICMP_TYPE = 5
CTA_PROTO_ICMP_CODE = 6
CTA_PROTO_ICMPV6_ID = 7
CTA_PROTO_ICMPV6_TYPE = 8
CTA_PROTO_ICMPV6_CODE = 9
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_DCCP = 2
CTA_PROTOINFO_SCTP = 3
CTA_PROTOINFO_TCP_STATE = 1
CTA_PROTOINFO_TCP_WSCALE_ORIGINAL = 2
CTA_PROTOINFO_TCP_WSCALE_REPLY = 3
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL = 4
CTA_PROTOINFO_TCP_FLAGS_REPLY = 5
CTA_PROTOINFO_DCCP_STATE = 1
CTA_PROTOINFO_DCCP_ROLE = 2
CTA_PROTOINFO_SCTP_STATE = 1
CTA_PROTOINFO_SCTP_VTAG_ORIGINAL = 2
CTA_PROTOINFO_SCTP_VTAG_REPLY = 3
CTA_NAT_V4_MINIP = 1
CTA_NAT_V6_MINIP = 4

# TCP flag bits conntrack(8) sends with every restored TCP entry (SAVE_FORMAT.md
# §8.5): BE_LIBERAL switches off window tracking, whose data the text lacks.
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
_u16_from = _U16BE.unpack_from
_u32_from = _U32BE.unpack_from


# ---------------------------------------------------------------- decoding


def _decode_tuple(buf: bytes, off: int, end: int, e: Entry, reply: bool) -> None:
    src = dst = b""
    while off + 4 <= end:
        alen, atype = _nla_from(buf, off)
        if alen < 4:
            raise ConntrackError("malformed tuple attribute from the kernel")
        aend = off + alen
        atype &= NLA_TYPE_MASK
        if atype == CTA_TUPLE_IP:
            p = off + 4
            while p + 4 <= aend:
                ln, t = _nla_from(buf, p)
                if ln < 4:
                    raise ConntrackError("malformed address attribute from the kernel")
                t &= NLA_TYPE_MASK
                if t in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    src = buf[p + 4:p + ln]
                elif t in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    dst = buf[p + 4:p + ln]
                p += (ln + 3) & ~3
        elif atype == CTA_TUPLE_PROTO:
            p = off + 4
            while p + 4 <= aend:
                ln, t = _nla_from(buf, p)
                if ln < 4:
                    raise ConntrackError("malformed protocol attribute from the kernel")
                t &= NLA_TYPE_MASK
                v = p + 4
                if t == CTA_PROTO_NUM:
                    e.proto = buf[v]
                elif t == CTA_PROTO_SRC_PORT:
                    if reply:
                        e.reply_sport = _u16_from(buf, v)[0]
                    else:
                        e.sport = _u16_from(buf, v)[0]
                elif t == CTA_PROTO_DST_PORT:
                    if reply:
                        e.reply_dport = _u16_from(buf, v)[0]
                    else:
                        e.dport = _u16_from(buf, v)[0]
                elif t in (CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMPV6_TYPE):
                    if reply:
                        e.reply_icmp_type = buf[v]
                    else:
                        e.icmp_type = buf[v]
                elif t in (CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMPV6_CODE):
                    if reply:
                        e.reply_icmp_code = buf[v]
                    else:
                        e.icmp_code = buf[v]
                elif t in (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMPV6_ID):
                    if reply:
                        e.reply_icmp_id = _u16_from(buf, v)[0]
                    else:
                        e.icmp_id = _u16_from(buf, v)[0]
                p += (ln + 3) & ~3
        elif atype == CTA_TUPLE_ZONE:
            if reply:
                e.reply_zone = _u16_from(buf, off + 4)[0]
            else:
                e.orig_zone = _u16_from(buf, off + 4)[0]
        off += (alen + 3) & ~3
    if reply:
        e.reply_src, e.reply_dst = src, dst
    else:
        e.orig_src, e.orig_dst = src, dst


def _decode_protoinfo(buf: bytes, off: int, end: int, e: Entry) -> None:
    while off + 4 <= end:
        alen, atype = _nla_from(buf, off)
        if alen < 4:
            raise ConntrackError("malformed protoinfo attribute from the kernel")
        atype &= NLA_TYPE_MASK
        p, aend = off + 4, off + alen
        while p + 4 <= aend:
            ln, t = _nla_from(buf, p)
            if ln < 4:
                raise ConntrackError("malformed protoinfo attribute from the kernel")
            t &= NLA_TYPE_MASK
            v = p + 4
            if atype == CTA_PROTOINFO_TCP:
                if t == CTA_PROTOINFO_TCP_STATE:
                    e.state = buf[v]
                elif t == CTA_PROTOINFO_TCP_WSCALE_ORIGINAL:
                    e.tcp_wscale_orig = buf[v]
                elif t == CTA_PROTOINFO_TCP_WSCALE_REPLY:
                    e.tcp_wscale_reply = buf[v]
                elif t == CTA_PROTOINFO_TCP_FLAGS_ORIGINAL:
                    e.tcp_flags_orig = buf[v]
                elif t == CTA_PROTOINFO_TCP_FLAGS_REPLY:
                    e.tcp_flags_reply = buf[v]
            elif atype == CTA_PROTOINFO_SCTP:
                if t == CTA_PROTOINFO_SCTP_STATE:
                    e.state = buf[v]
                elif t == CTA_PROTOINFO_SCTP_VTAG_ORIGINAL:
                    e.vtag_orig = _u32_from(buf, v)[0]
                elif t == CTA_PROTOINFO_SCTP_VTAG_REPLY:
                    e.vtag_reply = _u32_from(buf, v)[0]
            elif atype == CTA_PROTOINFO_DCCP:
                if t == CTA_PROTOINFO_DCCP_STATE:
                    e.state = buf[v]
                elif t == CTA_PROTOINFO_DCCP_ROLE:
                    e.dccp_role = buf[v]
            p += (ln + 3) & ~3
        off += (alen + 3) & ~3


def decode_entry(buf: bytes, off: int, end: int, family: int) -> Entry:
    """Decode the attributes of one IPCTNL_MSG_CT_NEW message body.

    :param buf: the received datagram
    :param off: offset of the first attribute (after nlmsghdr and nfgenmsg)
    :param end: end of this message
    :param family: ``nfgen_family`` of the message
    :raises ConntrackError: on a malformed attribute
    """
    e = Entry(family, 0, b"", b"", b"", b"")
    while off + 4 <= end:
        alen, atype = _nla_from(buf, off)
        if alen < 4:
            raise ConntrackError("malformed attribute from the kernel")
        atype &= NLA_TYPE_MASK
        v = off + 4
        if atype == CTA_TUPLE_ORIG:
            _decode_tuple(buf, v, off + alen, e, False)
        elif atype == CTA_TUPLE_REPLY:
            _decode_tuple(buf, v, off + alen, e, True)
        elif atype == CTA_STATUS:
            e.status = _u32_from(buf, v)[0]
        elif atype == CTA_TIMEOUT:
            e.timeout = _u32_from(buf, v)[0]
        elif atype == CTA_MARK:
            e.mark = _u32_from(buf, v)[0]
        elif atype == CTA_PROTOINFO:
            _decode_protoinfo(buf, v, off + alen, e)
        elif atype == CTA_ZONE:
            e.zone = _u16_from(buf, v)[0]
        elif atype == CTA_LABELS:
            e.labels = buf[v:off + alen]
        off += (alen + 3) & ~3
    return e


# ------------------------------------------------- decoding by learned layout
#
# ctnetlink lays out every entry of a kind the same way: the same attributes,
# nested the same, in the same order, at the same offsets (an established IPv4
# TCP entry always looks alike; only the values differ). Walking the attributes
# in Python costs ~9 µs an entry; so the first message of each layout is
# walked once to learn it, and every later message of that length and family
# is checked against it (all attribute headers, nested ones too, compared in
# one go) and read with one precompiled ``struct`` unpack: ~3 µs. A message
# whose headers differ from every learned layout is walked as before.

#: (path of attribute types) -> (Entry field, struct code); absent paths are skipped.
_LEAVES: dict[tuple[int, ...], tuple[str, str]] = {}
for _t, _side in ((CTA_TUPLE_ORIG, ""), (CTA_TUPLE_REPLY, "reply_")):
    _leaf_sides = {
        (CTA_TUPLE_IP, CTA_IP_V4_SRC): ("orig_src" if not _side else "reply_src", "s"),
        (CTA_TUPLE_IP, CTA_IP_V6_SRC): ("orig_src" if not _side else "reply_src", "s"),
        (CTA_TUPLE_IP, CTA_IP_V4_DST): ("orig_dst" if not _side else "reply_dst", "s"),
        (CTA_TUPLE_IP, CTA_IP_V6_DST): ("orig_dst" if not _side else "reply_dst", "s"),
        (CTA_TUPLE_PROTO, CTA_PROTO_NUM): ("proto", "B"),
        (CTA_TUPLE_PROTO, CTA_PROTO_SRC_PORT): (_side + "sport", "H"),
        (CTA_TUPLE_PROTO, CTA_PROTO_DST_PORT): (_side + "dport", "H"),
        (CTA_TUPLE_PROTO, CTA_PROTO_ICMP_ID): (_side + "icmp_id", "H"),
        (CTA_TUPLE_PROTO, CTA_PROTO_ICMPV6_ID): (_side + "icmp_id", "H"),
        (CTA_TUPLE_PROTO, CTA_PROTO_ICMP_TYPE): (_side + "icmp_type", "B"),
        (CTA_TUPLE_PROTO, CTA_PROTO_ICMPV6_TYPE): (_side + "icmp_type", "B"),
        (CTA_TUPLE_PROTO, CTA_PROTO_ICMP_CODE): (_side + "icmp_code", "B"),
        (CTA_TUPLE_PROTO, CTA_PROTO_ICMPV6_CODE): (_side + "icmp_code", "B"),
        (CTA_TUPLE_ZONE,): ("orig_zone" if not _side else "reply_zone", "H"),
    }
    for _path, _leaf in _leaf_sides.items():
        _LEAVES[(_t, *_path)] = _leaf
_LEAVES.update({
    (CTA_STATUS,): ("status", "I"),
    (CTA_TIMEOUT,): ("timeout", "I"),
    (CTA_MARK,): ("mark", "I"),
    (CTA_ZONE,): ("zone", "H"),
    (CTA_LABELS,): ("labels", "s"),
    (CTA_PROTOINFO, CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE): ("state", "B"),
    (CTA_PROTOINFO, CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_WSCALE_ORIGINAL): ("tcp_wscale_orig", "B"),
    (CTA_PROTOINFO, CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_WSCALE_REPLY): ("tcp_wscale_reply", "B"),
    (CTA_PROTOINFO, CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_FLAGS_ORIGINAL): ("tcp_flags_orig", "B"),
    (CTA_PROTOINFO, CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_FLAGS_REPLY): ("tcp_flags_reply", "B"),
    (CTA_PROTOINFO, CTA_PROTOINFO_SCTP, CTA_PROTOINFO_SCTP_STATE): ("state", "B"),
    (CTA_PROTOINFO, CTA_PROTOINFO_SCTP, CTA_PROTOINFO_SCTP_VTAG_ORIGINAL): ("vtag_orig", "I"),
    (CTA_PROTOINFO, CTA_PROTOINFO_SCTP, CTA_PROTOINFO_SCTP_VTAG_REPLY): ("vtag_reply", "I"),
    (CTA_PROTOINFO, CTA_PROTOINFO_DCCP, CTA_PROTOINFO_DCCP_STATE): ("state", "B"),
    (CTA_PROTOINFO, CTA_PROTOINFO_DCCP, CTA_PROTOINFO_DCCP_ROLE): ("dccp_role", "B"),
})
#: Attribute paths the decoder descends into (every other attribute is a leaf).
_NESTS = frozenset(path[:i] for path in _LEAVES for i in range(1, len(path)))
_SIZES = {"B": 1, "H": 2, "I": 4}
_ENTRY_FIELDS = tuple(f.name for f in dataclasses.fields(Entry))
#: Values of fields a layout does not carry: what :func:`decode_entry` leaves there.
_ABSENT: dict[str, Any] = {"proto": 0, "orig_src": b"", "orig_dst": b"", "reply_src": b"", "reply_dst": b""}
#: Bounds on what is learned, whatever the kernel sends.
MAX_LAYOUTS = 256
MAX_LAYOUTS_PER_KEY = 4


@dataclass(frozen=True, slots=True)
class _Layout:
    unpack: Callable[[bytes, int], tuple[Any, ...]]
    heads_of: Callable[[tuple[Any, ...]], tuple[Any, ...]]
    heads: tuple[Any, ...]
    pick: Callable[[tuple[Any, ...]], tuple[Any, ...]]
    tail: tuple[Any, ...]


#: (message length, family) -> layouts learned for it.
_layouts: dict[tuple[int, int], list[_Layout]] = {}


def _walk(buf: bytes, off: int, end: int, path: tuple[int, ...], *,
          heads: list[int], leaves: list[tuple[int, int, tuple[int, ...]]]) -> bool:
    """Collect header offsets and leaves; False when an attribute overruns its parent."""
    while off + 4 <= end:
        alen, atype = _nla_from(buf, off)
        if alen < 4 or off + alen > end:
            return False
        heads.append(off)
        sub = (*path, atype & NLA_TYPE_MASK)
        if sub in _NESTS:
            if not _walk(buf, off + 4, off + alen, sub, heads=heads, leaves=leaves):
                return False
        else:
            leaves.append((off + 4, alen - 4, sub))
        off += (alen + 3) & ~3
    return True


def _learn(buf: bytes, start: int, end: int, family: int) -> _Layout | None:
    """The layout of the message body ``buf[start:end]``, or None when it is irregular."""
    heads: list[int] = []
    leaves: list[tuple[int, int, tuple[int, ...]]] = []
    if not _walk(buf, start, end, (), heads=heads, leaves=leaves):
        return None
    # (offset, struct code, Entry field or None for a header word to compare)
    items: list[tuple[int, str, str | None]] = [(o, "I", None) for o in heads]
    for o, ln, path in leaves:
        leaf = _LEAVES.get(path)
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
    for fname in _ENTRY_FIELDS:
        if fname in slots:
            picks.append(slots[fname])
        else:
            picks.append(len(order) + len(tail))
            tail.append(family if fname == "family" else _ABSENT.get(fname))
    return _Layout(unpack, heads_pick, heads_pick(unpack(buf, start)),
                   operator.itemgetter(*picks), tuple(tail))


def decode_message(buf: bytes, off: int, mlen: int) -> Entry:
    """Decode the IPCTNL_MSG_CT_NEW message at ``buf[off:off+mlen]`` into an entry.

    Same result as :func:`decode_entry`, by a learned layout when one fits.

    :raises ConntrackError: on a malformed attribute
    """
    family = buf[off + 16]
    key = (mlen, family)
    known = _layouts.get(key)
    if known is not None:
        for lay in known:
            vals = lay.unpack(buf, off + 20)
            if lay.heads_of(vals) == lay.heads:
                return Entry(*lay.pick((*vals, *lay.tail)))
    e = decode_entry(buf, off + 20, off + mlen, family)
    if (known is None and len(_layouts) < MAX_LAYOUTS) or (known is not None and len(known) < MAX_LAYOUTS_PER_KEY):
        learned = _learn(buf, off + 20, off + mlen, family)
        if learned is not None:
            _layouts.setdefault(key, []).append(learned)
    return e


@dataclass(slots=True)
class DumpChunk:
    """What one received datagram of a dump held."""

    done: bool = False
    interrupted: bool = False


def decode_dump(buf: bytes, size: int, seq: int, out: list[Entry]) -> DumpChunk:
    """Decode the messages of one dump datagram, appending entries to ``out``.

    :param buf: the datagram
    :param size: its length
    :param seq: the dump request's sequence number (others are skipped)
    :param out: where decoded entries go
    :raises ConntrackError: when the kernel answered the dump with an error
    """
    chunk = DumpChunk()
    off = 0
    while off + 16 <= size:
        mlen, mtype, mflags, mseq, _pid = _hdr_from(buf, off)
        if mlen < 16 or off + mlen > size:
            raise ConntrackError("truncated netlink message from the kernel")
        if mseq == seq:
            if mflags & NLM_F_DUMP_INTR:
                chunk.interrupted = True
            if mtype == IPCTNL_MSG_CT_NEW and mlen >= 20:
                out.append(decode_message(buf, off, mlen))
            elif mtype == NLMSG_DONE:
                chunk.done = True
                return chunk
            elif mtype == NLMSG_ERROR:
                code = -_ERRCODE.unpack_from(buf, off + 16)[0]
                if code:
                    raise ConntrackError("conntrack dump refused", code)
                chunk.done = True
                return chunk
        off += (mlen + 3) & ~3
    return chunk


def iter_acks(buf: bytes, size: int) -> Iterator[tuple[int, int]]:
    """Yield ``(seq, errno)`` for each NLMSG_ERROR (0 = ACK) in a datagram."""
    off = 0
    while off + 16 <= size:
        mlen, mtype, _flags, mseq, _pid = _hdr_from(buf, off)
        if mlen < 16 or off + mlen > size:
            return
        if mtype == NLMSG_ERROR and mlen >= 20:
            yield mseq, -_ERRCODE.unpack_from(buf, off + 16)[0]
        off += (mlen + 3) & ~3


def iter_get_replies(buf: bytes, size: int) -> Iterator[tuple[int, Entry | None, int]]:
    """Yield ``(seq, entry, errno)`` for each answer to a :func:`get_request` in a datagram.

    A found entry comes as ``(seq, entry, 0)``, a refusal as ``(seq, None, errno)``.
    """
    off = 0
    while off + 16 <= size:
        mlen, mtype, _flags, mseq, _pid = _hdr_from(buf, off)
        if mlen < 16 or off + mlen > size:
            return
        if mtype == IPCTNL_MSG_CT_NEW and mlen >= 20:
            yield mseq, decode_message(buf, off, mlen), 0
        elif mtype == NLMSG_ERROR and mlen >= 20:
            code = -_ERRCODE.unpack_from(buf, off + 16)[0]
            if code:
                yield mseq, None, code
        off += (mlen + 3) & ~3


def stats_request(seq: int) -> bytes:
    """An IPCTNL_MSG_CT_GET_STATS request: how full is this namespace's table."""
    return _message(IPCTNL_MSG_CT_GET_STATS, NLM_F_REQUEST, seq, socket.AF_UNSPEC, b"")


def decode_stats(buf: bytes, size: int, seq: int) -> tuple[int, int | None] | None:
    """``(entries, nf_conntrack_max)`` from the answer to :func:`stats_request`.

    The maximum is None where the kernel does not report it. None when the
    datagram holds no answer to ``seq``.

    :raises ConntrackError: when the kernel refused the request
    """
    off = 0
    while off + 16 <= size:
        mlen, mtype, _flags, mseq, _pid = _hdr_from(buf, off)
        if mlen < 16 or off + mlen > size:
            raise ConntrackError("truncated netlink message from the kernel")
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
        off += (mlen + 3) & ~3
    return None


# ---------------------------------------------------------------- encoding


def _attr(atype: int, payload: bytes) -> bytes:
    alen = 4 + len(payload)
    return _NLA.pack(alen, atype) + payload + b"\0" * (-alen & 3)


def _nest(atype: int, *children: bytes) -> bytes:
    body = b"".join(children)
    return _NLA.pack(4 + len(body), atype | NLA_F_NESTED) + body


def _u8(atype: int, value: int) -> bytes:
    return _NLA.pack(5, atype) + bytes((value, 0, 0, 0))


def _be16(atype: int, value: int) -> bytes:
    return _NLA.pack(6, atype) + _U16BE.pack(value) + b"\0\0"


def _be32(atype: int, value: int) -> bytes:
    return _NLA.pack(8, atype) + _U32BE.pack(value)


def _message(mtype: int, flags: int, seq: int, family: int, attrs: bytes) -> bytes:
    return _NLMSGHDR.pack(20 + len(attrs), mtype, flags, seq, 0) + bytes((family, 0, 0, 0)) + attrs


def dump_request(seq: int, mark: int) -> bytes:
    """A CT_GET dump of every family, filtered in the kernel by ``mark``.

    The mark always travels with a full mask: pyroute2's own dump drops a mark
    of 0 (NETLINK.md), and a mask makes the kernel compare exactly.
    """
    attrs = _be32(CTA_MARK, mark) + _be32(CTA_MARK_MASK, 0xFFFFFFFF)
    return _message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, socket.AF_UNSPEC, attrs)


def get_request(e: Entry, seq: int) -> bytes:
    """A CT_GET of the one entry whose original tuple (and zone) is ``e``'s."""
    attrs = _tuple(e, False, e.orig_src, e.orig_dst)
    if e.zone is not None:
        attrs += _be16(CTA_ZONE, e.zone)
    return _message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST, seq, e.family, attrs)


def _tuple(e: Entry, reply: bool, src: bytes, dst: bytes, ports: tuple[int | None, int | None] | None = None) -> bytes:
    v4 = e.family == AF_INET
    ip = _nest(CTA_TUPLE_IP,
               _attr(CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC, src),
               _attr(CTA_IP_V4_DST if v4 else CTA_IP_V6_DST, dst))
    proto = e.proto
    parts = [_u8(CTA_PROTO_NUM, proto)]
    if proto in (PROTO_ICMP, PROTO_ICMPV6):
        t, c, i = ((e.reply_icmp_type, e.reply_icmp_code, e.reply_icmp_id) if reply
                   else (e.icmp_type, e.icmp_code, e.icmp_id))
        base = 0 if proto == PROTO_ICMP else 3  # ICMPV6_* attributes are ICMP_* + 3
        if i is not None:
            parts.append(_be16(CTA_PROTO_ICMP_ID + base, i))
        if t is not None:
            parts.append(_u8(CTA_PROTO_ICMP_TYPE + base, t))
        if c is not None:
            parts.append(_u8(CTA_PROTO_ICMP_CODE + base, c))
    else:
        sp, dp = ports or ((e.reply_sport, e.reply_dport) if reply else (e.sport, e.dport))
        if sp is not None:
            parts.append(_be16(CTA_PROTO_SRC_PORT, sp))
        if dp is not None:
            parts.append(_be16(CTA_PROTO_DST_PORT, dp))
    children = [ip, _nest(CTA_TUPLE_PROTO, *parts)]
    zone = e.reply_zone if reply else e.orig_zone
    if zone is not None:
        children.append(_be16(CTA_TUPLE_ZONE, zone))
    return _nest(CTA_TUPLE_REPLY if reply else CTA_TUPLE_ORIG, *children)


def _nat_port(port: int | None) -> tuple[bytes, ...]:
    if port is None:
        return ()
    return (_nest(CTA_NAT_PROTO, _be16(CTA_PROTONAT_PORT_MIN, port)),)


# ------------------------------------ create requests of the common shape
#
# Most entries a VM has are TCP or UDP without NAT, zones or labels, and every
# such request has the same attributes at the same offsets for a given family,
# protocol and window-scale presence. One precompiled struct per shape packs
# the whole body, with the attribute headers as constants, instead of ~20
# small byte strings joined: ~2 µs an entry instead of ~7. Everything else
# goes through create_request()'s general path; tests hold both to the same
# bytes.


def _header_word(length: int, atype: int) -> int:
    """An attribute header (host order) as the big-endian word the shape's struct packs."""
    return int.from_bytes(_NLA.pack(length, atype), "big")


@dataclass(frozen=True, slots=True)
class _Shape:
    pack: Callable[..., bytes]
    pick: Callable[[tuple[Any, ...]], tuple[Any, ...]]
    consts: tuple[int, ...]
    size: int


def _build_shape(family: int, proto: int, wscale: bool) -> _Shape:
    alen = 4 if family == AF_INET else 16
    src_t, dst_t = (CTA_IP_V4_SRC, CTA_IP_V4_DST) if family == AF_INET else (CTA_IP_V6_SRC, CTA_IP_V6_DST)
    # (struct code, constant or None for the next value); "B3x"/"H2x" carry their padding.
    parts: list[tuple[str, int | None]] = [("I", family << 24)]  # nfgenmsg: family, version 0, res_id 0

    def hdr(length: int, atype: int) -> None:
        parts.append(("I", _header_word(length, atype)))

    ip_len, proto_len = 4 + 2 * (4 + alen), 4 + 3 * 8
    for side in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY):
        hdr(4 + ip_len + proto_len, side | NLA_F_NESTED)
        hdr(ip_len, CTA_TUPLE_IP | NLA_F_NESTED)
        hdr(4 + alen, src_t)
        parts.append(("%ds" % alen, None))
        hdr(4 + alen, dst_t)
        parts.append(("%ds" % alen, None))
        hdr(proto_len, CTA_TUPLE_PROTO | NLA_F_NESTED)
        hdr(5, CTA_PROTO_NUM)
        parts.append(("B3x", None))
        hdr(6, CTA_PROTO_SRC_PORT)
        parts.append(("H2x", None))
        hdr(6, CTA_PROTO_DST_PORT)
        parts.append(("H2x", None))
    for atype in (CTA_STATUS, CTA_TIMEOUT, CTA_MARK):
        hdr(8, atype)
        parts.append(("I", None))
    if proto == PROTO_TCP:
        tcp_len = 4 + 8 + (16 if wscale else 0) + 16
        hdr(4 + tcp_len, CTA_PROTOINFO | NLA_F_NESTED)
        hdr(tcp_len, CTA_PROTOINFO_TCP | NLA_F_NESTED)
        hdr(5, CTA_PROTOINFO_TCP_STATE)
        parts.append(("B3x", None))
        if wscale:
            for atype in (CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, CTA_PROTOINFO_TCP_WSCALE_REPLY):
                hdr(5, atype)
                parts.append(("B3x", None))
        for atype in (CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, CTA_PROTOINFO_TCP_FLAGS_REPLY):
            hdr(6, atype)
            parts.append(("B", None))  # flags
            parts.append(("B2x", None))  # mask
    codec = struct.Struct(">" + "".join(code for code, _ in parts))
    consts = tuple(c for _, c in parts if c is not None)
    nvalues = sum(1 for _, c in parts if c is None)
    picks, v, k = [], 0, nvalues
    for _, c in parts:
        if c is None:
            picks.append(v)
            v += 1
        else:
            picks.append(k)
            k += 1
    return _Shape(codec.pack, operator.itemgetter(*picks), consts, 16 + codec.size)


_SHAPES: dict[tuple[int, int, bool], _Shape] = {
    (family, proto, wscale): _build_shape(family, proto, wscale)
    for family in (AF_INET, AF_INET6) for proto in (PROTO_TCP, PROTO_UDP) for wscale in (False, True)
    if proto == PROTO_TCP or not wscale
}
_CREATE_FLAGS = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL


def _create_common(e: Entry, mark: int, seq: int, ack: bool) -> bytes | None:
    """create_request() for the common shape, or None when ``e`` is not of it."""
    proto, sport, dport, osrc, odst = e.proto, e.sport, e.dport, e.orig_src, e.orig_dst
    if (e.reply_src != odst or e.reply_dst != osrc or sport is None or dport is None
            or e.reply_sport != dport or e.reply_dport != sport or e.status is None or e.timeout is None
            or e.zone is not None or e.orig_zone is not None or e.reply_zone is not None or e.labels):
        return None
    status = (e.status & STATUS_TEXT_MASK) | IPS_CONFIRMED
    if proto == PROTO_UDP:
        shape = _SHAPES.get((e.family, proto, False))
        if shape is None:
            return None
        values: tuple[Any, ...] = (osrc, odst, proto, sport, dport, odst, osrc, proto, dport, sport,
                                   status, e.timeout, mark)
    elif proto == PROTO_TCP:
        state, wso, wsr = e.state, e.tcp_wscale_orig, e.tcp_wscale_reply
        wscale = wso is not None
        if state is None or wscale != (wsr is not None):
            return None
        shape = _SHAPES.get((e.family, proto, wscale))
        if shape is None:
            return None
        if e.tcp_flags_orig is not None and e.tcp_flags_reply is not None:
            fo, fr = e.tcp_flags_orig, e.tcp_flags_reply
        else:
            fo = TCP_FLAG_BE_LIBERAL | TCP_FLAG_SACK_PERM
            if state >= TCP_STATE_TIME_WAIT:
                fo |= TCP_FLAG_CLOSE_INIT
            fr = fo
        values = (osrc, odst, proto, sport, dport, odst, osrc, proto, dport, sport, status, e.timeout, mark,
                  state, *((wso, wsr) if wscale else ()), fo, fo, fr, fr)
    else:
        return None
    if len(osrc) != (4 if e.family == AF_INET else 16) or len(odst) != len(osrc):
        return None
    flags = _CREATE_FLAGS | NLM_F_ACK if ack else _CREATE_FLAGS
    return (_NLMSGHDR.pack(shape.size, IPCTNL_MSG_CT_NEW, flags, seq, 0)
            + shape.pack(*shape.pick((*values, *shape.consts))))


def create_request(e: Entry, mark: int, seq: int, ack: bool) -> bytes:
    """A CT_NEW request that creates ``e`` with ``mark``, never touching an existing entry.

    NLM_F_EXCL makes an existing entry an EEXIST error instead of an update,
    so Load can only ever add entries. Like conntrack(8) (SAVE_FORMAT.md §8.5)
    it adds IPS_CONFIRMED, derives NAT from the reply tuple, and sets the TCP
    flags a restored entry needs.

    :param e: the entry
    :param mark: the CTA_MARK to set (the VM's mark)
    :param seq: sequence number that identifies this request's error reply
    :param ack: ask for an acknowledgement even on success
    """
    common = _create_common(e, mark, seq, ack)
    if common is not None:
        return common
    return create_request_general(e, mark, seq, ack)


def create_request_general(e: Entry, mark: int, seq: int, ack: bool) -> bytes:
    """create_request() for any entry, attribute by attribute (the reference)."""
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
    reply_ports = None
    if snat_port is not None or dnat_port is not None:
        reply_ports = (e.dport if dnat_port is not None else e.reply_sport,
                       e.sport if snat_port is not None else e.reply_dport)
    attrs = [
        _tuple(e, False, e.orig_src, e.orig_dst),
        _tuple(e, True, zero if dnat else e.reply_src, zero if snat else e.reply_dst, reply_ports),
    ]
    if e.status is not None:
        attrs.append(_be32(CTA_STATUS, (e.status & STATUS_TEXT_MASK) | IPS_CONFIRMED))
    if e.timeout is not None:
        attrs.append(_be32(CTA_TIMEOUT, e.timeout))
    attrs.append(_be32(CTA_MARK, mark))
    proto = e.proto
    if proto == PROTO_TCP and e.state is not None:
        if e.tcp_flags_orig is not None and e.tcp_flags_reply is not None:
            fo, fr = e.tcp_flags_orig, e.tcp_flags_reply
        else:
            fo = TCP_FLAG_BE_LIBERAL | TCP_FLAG_SACK_PERM
            if e.state >= TCP_STATE_TIME_WAIT:
                fo |= TCP_FLAG_CLOSE_INIT
            fr = fo
        tcp = [_u8(CTA_PROTOINFO_TCP_STATE, e.state)]
        if e.tcp_wscale_orig is not None:
            tcp.append(_u8(CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, e.tcp_wscale_orig))
        if e.tcp_wscale_reply is not None:
            tcp.append(_u8(CTA_PROTOINFO_TCP_WSCALE_REPLY, e.tcp_wscale_reply))
        # {flags, mask}: the mask says which bits to set.
        tcp.append(_attr(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, bytes((fo, fo))))
        tcp.append(_attr(CTA_PROTOINFO_TCP_FLAGS_REPLY, bytes((fr, fr))))
        attrs.append(_nest(CTA_PROTOINFO, _nest(CTA_PROTOINFO_TCP, *tcp)))
    elif proto == PROTO_SCTP and e.state is not None:
        sctp = [_u8(CTA_PROTOINFO_SCTP_STATE, e.state)]
        if e.vtag_orig is not None:
            sctp.append(_be32(CTA_PROTOINFO_SCTP_VTAG_ORIGINAL, e.vtag_orig))
        if e.vtag_reply is not None:
            sctp.append(_be32(CTA_PROTOINFO_SCTP_VTAG_REPLY, e.vtag_reply))
        attrs.append(_nest(CTA_PROTOINFO, _nest(CTA_PROTOINFO_SCTP, *sctp)))
    elif proto == PROTO_DCCP and e.state is not None:
        dccp = [_u8(CTA_PROTOINFO_DCCP_STATE, e.state)]
        if e.dccp_role is not None:
            dccp.append(_u8(CTA_PROTOINFO_DCCP_ROLE, e.dccp_role))
        attrs.append(_nest(CTA_PROTOINFO, _nest(CTA_PROTOINFO_DCCP, *dccp)))
    minip = CTA_NAT_V4_MINIP if e.family == AF_INET else CTA_NAT_V6_MINIP
    if snat or snat_port is not None:
        attrs.append(_nest(CTA_NAT_SRC, _attr(minip, e.reply_dst), *_nat_port(snat_port)))
    if dnat or dnat_port is not None:
        attrs.append(_nest(CTA_NAT_DST, _attr(minip, e.reply_src), *_nat_port(dnat_port)))
    if e.labels and any(e.labels):
        attrs.append(_attr(CTA_LABELS, e.labels))
    if e.zone is not None:
        attrs.append(_be16(CTA_ZONE, e.zone))
    flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | (NLM_F_ACK if ack else 0)
    return _message(IPCTNL_MSG_CT_NEW, flags, seq, e.family, b"".join(attrs))
