"""The ctnetlink attributes a conntrack entry travels in, as one table.

Numbers are the kernel's (``include/uapi/linux/netfilter/nfnetlink_conntrack.h``
and ``include/uapi/linux/netlink.h``). :data:`TABLE` says, once, for every
attribute an entry message carries: its number, how its value is laid out,
what it nests, its kernel name, and the :class:`~pvevmstate.model.Entry` field
(or request-only value) it carries, the tuples once per direction. Everything
that reads or writes entry messages is derived from it in :mod:`.codec`: the
attribute walker, the learned-layout decoder's leaf map, the general request
encoder and the structs of the fast create path. A new attribute is one line
here (and, if it needs one, an Entry field).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model import AF_INET, AF_INET6, PROTO_DCCP, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP

# ------------------------------------------------------------ netlink, nfnetlink

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

# ------------------------------------------------------------ enum ctattr_type

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
# enum ctattr_tuple, ctattr_ip, ctattr_l4proto
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
# enum ctattr_protoinfo and its per-protocol enums
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
# enum ctattr_nat, ctattr_protonat
CTA_NAT_V4_MINIP = 1
CTA_NAT_V6_MINIP = 4
CTA_NAT_PROTO = 3
CTA_PROTONAT_PORT_MIN = 1
# enum ctattr_stats_global: the namespace's entry count, and nf_conntrack_max.
CTA_STATS_GLOBAL_ENTRIES = 1
CTA_STATS_GLOBAL_MAX_ENTRIES = 2


# ------------------------------------------------------------ value layouts


@dataclass(frozen=True, slots=True)
class Kind:
    """How an attribute's value is laid out.

    ``read`` is the big-endian struct code the decoders read the value with
    ("s": the whole payload as bytes). ``write`` is the struct code of the
    payload a request carries, one letter per copy of the value (None: the
    bytes as they are); the payload is padded to 4 bytes.
    """

    name: str
    read: str
    write: str | None


U8 = Kind("u8", "B", "B")
BE16 = Kind("be16", "H", "H")
BE32 = Kind("be32", "I", "I")
#: Network-order address bytes: 4 or 16 of them.
ADDR = Kind("address", "s", None)
BYTES = Kind("bytes", "s", None)
#: struct nf_ct_tcp_flags {flags, mask}: read the flags; a request sends the
#: value as both, so the mask sets exactly the bits it carries.
TCP_FLAGS = Kind("nf_ct_tcp_flags", "B", "BB")


# ------------------------------------------------------------ attribute nodes


@dataclass(frozen=True, slots=True)
class Leaf:
    """An attribute that carries one value.

    :param field: the Entry field it carries; a name that is not an Entry
        field is a request-only value (see :data:`REQUEST_ONLY`)
    :param family: sent only for this address family (decoded for any)
    :param protos: sent only for these IP protocols (decoded for any)
    :param exclude: never sent for these IP protocols
    :param required: its nest is sent only when this value is present
    """

    type: int
    name: str
    field: str
    kind: Kind
    family: int | None = None
    protos: frozenset[int] | None = None
    exclude: frozenset[int] = frozenset()
    required: bool = False


@dataclass(frozen=True, slots=True)
class Nest:
    """An attribute that holds attributes (sent with NLA_F_NESTED).

    :param what: the noun of the decoder's error for a malformed child
    :param protos: sent only for these IP protocols (decoded for any)
    :param walk_others: the decoder checks the headers of unknown children
        as nests too (it always has for CTA_PROTOINFO's)
    """

    type: int
    name: str
    what: str
    children: tuple[Leaf | Nest, ...]
    protos: frozenset[int] | None = None
    walk_others: bool = False


Node = Leaf | Nest

_ICMP = frozenset({PROTO_ICMP})
_ICMPV6 = frozenset({PROTO_ICMPV6})
_ICMPS = _ICMP | _ICMPV6


def _tuple(atype: int, name: str, side: str) -> Nest:
    """CTA_TUPLE_ORIG or CTA_TUPLE_REPLY: the same attributes, the fields of one direction."""
    src, dst, zone = ("orig_src", "orig_dst", "orig_zone") if not side else ("reply_src", "reply_dst", "reply_zone")
    return Nest(atype, name, "tuple", (
        Nest(CTA_TUPLE_IP, "CTA_TUPLE_IP", "address", (
            Leaf(CTA_IP_V4_SRC, "CTA_IP_V4_SRC", src, ADDR, family=AF_INET),
            Leaf(CTA_IP_V4_DST, "CTA_IP_V4_DST", dst, ADDR, family=AF_INET),
            Leaf(CTA_IP_V6_SRC, "CTA_IP_V6_SRC", src, ADDR, family=AF_INET6),
            Leaf(CTA_IP_V6_DST, "CTA_IP_V6_DST", dst, ADDR, family=AF_INET6),
        )),
        Nest(CTA_TUPLE_PROTO, "CTA_TUPLE_PROTO", "protocol", (
            Leaf(CTA_PROTO_NUM, "CTA_PROTO_NUM", "proto", U8),
            # Ports, or GRE keys: every protocol but ICMP has them in these two.
            Leaf(CTA_PROTO_SRC_PORT, "CTA_PROTO_SRC_PORT", side + "sport", BE16, exclude=_ICMPS),
            Leaf(CTA_PROTO_DST_PORT, "CTA_PROTO_DST_PORT", side + "dport", BE16, exclude=_ICMPS),
            Leaf(CTA_PROTO_ICMP_ID, "CTA_PROTO_ICMP_ID", side + "icmp_id", BE16, protos=_ICMP),
            Leaf(CTA_PROTO_ICMP_TYPE, "CTA_PROTO_ICMP_TYPE", side + "icmp_type", U8, protos=_ICMP),
            Leaf(CTA_PROTO_ICMP_CODE, "CTA_PROTO_ICMP_CODE", side + "icmp_code", U8, protos=_ICMP),
            Leaf(CTA_PROTO_ICMPV6_ID, "CTA_PROTO_ICMPV6_ID", side + "icmp_id", BE16, protos=_ICMPV6),
            Leaf(CTA_PROTO_ICMPV6_TYPE, "CTA_PROTO_ICMPV6_TYPE", side + "icmp_type", U8, protos=_ICMPV6),
            Leaf(CTA_PROTO_ICMPV6_CODE, "CTA_PROTO_ICMPV6_CODE", side + "icmp_code", U8, protos=_ICMPV6),
        )),
        Leaf(CTA_TUPLE_ZONE, "CTA_TUPLE_ZONE", zone, BE16),
    ))


def _nat(atype: int, name: str, ip: str, port: str) -> Nest:
    """CTA_NAT_SRC or CTA_NAT_DST: the address (and port) a create request maps to."""
    return Nest(atype, name, "nat", (
        Leaf(CTA_NAT_V4_MINIP, "CTA_NAT_V4_MINIP", ip, ADDR, family=AF_INET, required=True),
        Leaf(CTA_NAT_V6_MINIP, "CTA_NAT_V6_MINIP", ip, ADDR, family=AF_INET6, required=True),
        Nest(CTA_NAT_PROTO, "CTA_NAT_PROTO", "nat", (
            Leaf(CTA_PROTONAT_PORT_MIN, "CTA_PROTONAT_PORT_MIN", port, BE16),
        )),
    ))


#: Every attribute of an entry message, in the order requests carry them.
TABLE: tuple[Node, ...] = (
    _tuple(CTA_TUPLE_ORIG, "CTA_TUPLE_ORIG", ""),
    _tuple(CTA_TUPLE_REPLY, "CTA_TUPLE_REPLY", "reply_"),
    Leaf(CTA_STATUS, "CTA_STATUS", "status", BE32),
    Leaf(CTA_TIMEOUT, "CTA_TIMEOUT", "timeout", BE32),
    Leaf(CTA_MARK, "CTA_MARK", "mark", BE32),
    Leaf(CTA_MARK_MASK, "CTA_MARK_MASK", "mark_mask", BE32),
    Nest(CTA_PROTOINFO, "CTA_PROTOINFO", "protoinfo", (
        Nest(CTA_PROTOINFO_TCP, "CTA_PROTOINFO_TCP", "protoinfo", (
            Leaf(CTA_PROTOINFO_TCP_STATE, "CTA_PROTOINFO_TCP_STATE", "state", U8, required=True),
            Leaf(CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, "CTA_PROTOINFO_TCP_WSCALE_ORIGINAL", "tcp_wscale_orig", U8),
            Leaf(CTA_PROTOINFO_TCP_WSCALE_REPLY, "CTA_PROTOINFO_TCP_WSCALE_REPLY", "tcp_wscale_reply", U8),
            Leaf(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, "CTA_PROTOINFO_TCP_FLAGS_ORIGINAL", "tcp_flags_orig", TCP_FLAGS),
            Leaf(CTA_PROTOINFO_TCP_FLAGS_REPLY, "CTA_PROTOINFO_TCP_FLAGS_REPLY", "tcp_flags_reply", TCP_FLAGS),
        ), protos=frozenset({PROTO_TCP})),
        Nest(CTA_PROTOINFO_DCCP, "CTA_PROTOINFO_DCCP", "protoinfo", (
            Leaf(CTA_PROTOINFO_DCCP_STATE, "CTA_PROTOINFO_DCCP_STATE", "state", U8, required=True),
            Leaf(CTA_PROTOINFO_DCCP_ROLE, "CTA_PROTOINFO_DCCP_ROLE", "dccp_role", U8),
        ), protos=frozenset({PROTO_DCCP})),
        Nest(CTA_PROTOINFO_SCTP, "CTA_PROTOINFO_SCTP", "protoinfo", (
            Leaf(CTA_PROTOINFO_SCTP_STATE, "CTA_PROTOINFO_SCTP_STATE", "state", U8, required=True),
            Leaf(CTA_PROTOINFO_SCTP_VTAG_ORIGINAL, "CTA_PROTOINFO_SCTP_VTAG_ORIGINAL", "vtag_orig", BE32),
            Leaf(CTA_PROTOINFO_SCTP_VTAG_REPLY, "CTA_PROTOINFO_SCTP_VTAG_REPLY", "vtag_reply", BE32),
        ), protos=frozenset({PROTO_SCTP})),
    ), walk_others=True),
    _nat(CTA_NAT_SRC, "CTA_NAT_SRC", "snat_ip", "snat_port"),
    _nat(CTA_NAT_DST, "CTA_NAT_DST", "dnat_ip", "dnat_port"),
    Leaf(CTA_LABELS, "CTA_LABELS", "labels", BYTES),
    Leaf(CTA_ZONE, "CTA_ZONE", "zone", BE16),
)

#: Values only requests carry (no Entry field): the dump's mark mask and the
#: NAT mapping a create request asks for. Decoders skip their attributes (and
#: nests that hold nothing else). Listed so that a misspelt field in the
#: table is an error, not a new value nobody sets.
REQUEST_ONLY: tuple[str, ...] = ("mark_mask", "snat_ip", "snat_port", "dnat_ip", "dnat_port")
