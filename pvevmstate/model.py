"""The model: the conntrack entry as this package carries it, the kernel's
numbers, what creating entries takes and reports, and the table's fill.

One flat, slotted record per entry: the netlink decoder fills it, the save-text
codec prints and parses it, the netlink encoder turns it into a create request.
Flat fields (no nested tuple objects) keep decoding cheap: it runs once per
entry inside the VM's migration downtime.
"""

from __future__ import annotations

import itertools
import socket
from collections import Counter
from dataclasses import dataclass, field

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6

# IP protocol numbers conntrack-tools has an extension for.
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_DCCP = 33
PROTO_GRE = 47
PROTO_ICMPV6 = 58
PROTO_SCTP = 132
PROTO_UDPLITE = 136

PROTO_NAMES: dict[int, str] = {
    PROTO_TCP: "tcp",
    PROTO_UDP: "udp",
    PROTO_UDPLITE: "udplite",
    PROTO_SCTP: "sctp",
    PROTO_DCCP: "dccp",
    PROTO_ICMP: "icmp",
    PROTO_ICMPV6: "icmpv6",
    PROTO_GRE: "gre",
}
PROTO_BY_NAME: dict[str, int] = {v: k for k, v in PROTO_NAMES.items()}

# IPS_* status bits (include/uapi/linux/netfilter/nf_conntrack_common.h).
IPS_EXPECTED = 0x0001
IPS_SEEN_REPLY = 0x0002
IPS_ASSURED = 0x0004
IPS_CONFIRMED = 0x0008
IPS_SRC_NAT = 0x0010
IPS_DST_NAT = 0x0020
IPS_SRC_NAT_DONE = 0x0080
IPS_DST_NAT_DONE = 0x0100
IPS_FIXED_TIMEOUT = 0x0400

# The only bits the save text prints, in the order it prints them.
STATUS_TEXT_BITS: tuple[tuple[int, str], ...] = (
    (IPS_EXPECTED, "EXPECTED"),
    (IPS_SEEN_REPLY, "SEEN_REPLY"),
    (IPS_ASSURED, "ASSURED"),
    (IPS_FIXED_TIMEOUT, "FIXED_TIMEOUT"),
)
STATUS_TEXT_MASK = IPS_EXPECTED | IPS_SEEN_REPLY | IPS_ASSURED | IPS_FIXED_TIMEOUT

TCP_STATES: tuple[str, ...] = (
    "NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT",
    "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2",
)
TCP_STATE_ESTABLISHED = 3
TCP_STATE_TIME_WAIT = 7
# conntrack-tools has names for SCTP states 0..7 only; 8 and 9 print as "(null)".
SCTP_STATES: tuple[str, ...] = (
    "NONE", "CLOSED", "COOKIE_WAIT", "COOKIE_ECHOED", "ESTABLISHED",
    "SHUTDOWN_SENT", "SHUTDOWN_RECD", "SHUTDOWN_ACK_SENT",
)
DCCP_STATES: tuple[str, ...] = (
    "NONE", "REQUEST", "RESPOND", "PARTOPEN", "OPEN",
    "CLOSEREQ", "CLOSING", "TIMEWAIT", "IGNORE", "INVALID",
)
DCCP_ROLES: tuple[str, ...] = ("client", "server")
NULL_NAME = "(null)"

# ICMP reply types the kernel accepts for an explicit create (and their inverse).
ICMP_REPLY_TYPE: dict[int, int] = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 17: 18, 18: 17}
ICMPV6_REPLY_TYPE: dict[int, int] = {128: 129, 129: 128, 139: 140, 140: 139}


@dataclass(slots=True)
class Entry:
    """One conntrack entry.

    Addresses are raw network-order bytes (4 or 16). ``None`` means "the kernel
    message did not carry this attribute", which the save text preserves.
    ``sport``/``dport`` hold ports, or GRE keys for ``gre``. SCTP verification
    tags are the be32 values as the kernel holds them.
    """

    family: int
    proto: int
    orig_src: bytes
    orig_dst: bytes
    reply_src: bytes
    reply_dst: bytes
    sport: int | None = None
    dport: int | None = None
    reply_sport: int | None = None
    reply_dport: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    icmp_id: int | None = None
    reply_icmp_type: int | None = None
    reply_icmp_code: int | None = None
    reply_icmp_id: int | None = None
    timeout: int | None = None
    status: int | None = None
    mark: int | None = None
    zone: int | None = None
    orig_zone: int | None = None
    reply_zone: int | None = None
    state: int | None = None
    dccp_role: int | None = None
    vtag_orig: int | None = None
    vtag_reply: int | None = None
    tcp_wscale_orig: int | None = None
    tcp_wscale_reply: int | None = None
    tcp_flags_orig: int | None = None
    tcp_flags_reply: int | None = None
    labels: bytes | None = None

    def is_snat(self) -> bool:
        """True when the save text shows the reply destination as ``-n`` (source NAT)."""
        st = self.status
        return (st is None or bool(st & IPS_SRC_NAT_DONE)) and self.reply_dst != self.orig_src

    def is_dnat(self) -> bool:
        """True when the save text shows the reply source as ``-g`` (destination NAT)."""
        st = self.status
        return (st is None or bool(st & IPS_DST_NAT_DONE)) and self.reply_src != self.orig_dst


@dataclass(slots=True)
class CreateBatch:
    """Entries to create with one mark, as their CT_NEW requests.

    A batch is made either of bodies (nfgenmsg and attributes, from
    :class:`Entry` objects), which the adapter that sends it numbers
    (:meth:`pvevmstate.netlink.conntrack.Conntrack.number`), or numbered
    already: Load makes the requests of compact records a shape at a time,
    headers and sequence numbers included (:mod:`pvevmstate.payload.creates`),
    and no Entry for most of them. Which request asks for an ACK is decided
    when the batch is sent.
    """

    mark: int
    #: Each request's nfgenmsg and attributes, in the order they are created (unnumbered batches).
    bodies: list[bytes] = field(default_factory=list)
    #: By request index: the entry of every request a create may look at
    #: again, at least of each that carries labels (created again without
    #: them where the host has none) or a reply tuple other than its original
    #: one mirrored (NAT, read back once created). May hold others too.
    entries: dict[int, Entry] = field(default_factory=dict)
    #: Once numbered: the requests back to back, netlink headers included,
    #: with the sequence numbers ``first_seq``, ``first_seq + 1``, ...
    wire: bytearray | None = None
    #: Where each request of ``wire`` starts, then where the last one ends.
    starts: list[int] = field(default_factory=list)
    first_seq: int = 0

    def __len__(self) -> int:
        return max(len(self.starts) - 1, 0) if self.wire is not None else len(self.bodies)

    def requests(self) -> list[bytes]:
        """Each numbered request, header included (for reading; the adapter sends ``wire``)."""
        assert self.wire is not None, "not numbered"
        wire, starts = self.wire, self.starts
        return [bytes(wire[a:b]) for a, b in itertools.pairwise(starts)]


@dataclass(slots=True)
class CreateResult:
    """Outcome of creating a batch of entries."""

    created: int = 0
    failed: Counter[int] = field(default_factory=Counter)
    # Replies the kernel dropped (ENOBUFS): those entries' fate is unknown.
    unknown: int = 0
    #: Of ``created``: NAT entries the kernel gave another mapping, because
    #: the one they carried is held by another entry on this host.
    remapped: int = 0

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def add(self, other: CreateResult) -> None:
        """Count ``other``'s outcome into this one."""
        self.created += other.created
        self.failed.update(other.failed)
        self.unknown += other.unknown
        self.remapped += other.remapped


@dataclass(frozen=True, slots=True)
class TableStats:
    """How full the conntrack table of the socket's namespace is."""

    count: int
    maximum: int
