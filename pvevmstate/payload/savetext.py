"""Pure conversion between conntrack entries and the Save/Load payload.

The payload is the one the Perl helper in qemu-server sends and reads:
conntrack-tools ``save`` lines (``conntrack -L -o save``; the README's
"Payload formats" says which options they carry) with `` --mark VMID`` appended, each ending in
``\\n``; a single ``\\x00`` byte means "no entries" because QEMU rejects an
empty array. No I/O happens here.

The parser is deliberately stricter than conntrack's getopt loop: it accepts
the create lines a save dump consists of and refuses, with a reason, anything
else (other commands, unknown or repeated options, foreign marks, values out of
range), line by line, so one bad line never costs the others.
"""

from __future__ import annotations

import operator
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat

from ..errors import CodecError
from ..memo import Memo
from ..model import (
    AF_INET,
    AF_INET6,
    DCCP_ROLES,
    DCCP_STATES,
    ICMP_REPLY_TYPE,
    ICMPV6_REPLY_TYPE,
    IPS_DST_NAT,
    IPS_DST_NAT_DONE,
    IPS_EXPECTED,
    IPS_SRC_NAT,
    IPS_SRC_NAT_DONE,
    NULL_NAME,
    PROTO_BY_NAME,
    PROTO_DCCP,
    PROTO_GRE,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_NAMES,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    PROTO_UDPLITE,
    SCTP_STATES,
    STATUS_TEXT_BITS,
    STATUS_TEXT_MASK,
    TCP_STATES,
    Entry,
)
from .base import MAX_PAYLOAD, NO_STATE, Decoded

#: A real save line is at most ~350 bytes; longer ones are refused unparsed.
MAX_LINE = 4096

_inet_ntop = socket.inet_ntop
_inet_pton = socket.inet_pton
_LITTLE = sys.byteorder == "little"


def vtag_text(value: int) -> int:
    """Convert an SCTP vtag between the kernel's be32 value and conntrack's text.

    conntrack-tools swaps the bytes twice on the way, so on a little-endian host
    the number in the text is the byte-swapped attribute value (conntrack-tools
    1.4.7 and 1.4.8, checked against the kernel's attribute in the tests). The
    conversion is its own inverse.
    """
    if not _LITTLE:
        return value
    return int.from_bytes(value.to_bytes(4, "big"), "little")


def status_text(status: int) -> str:
    """Render ``-u``: the printable IPS_* bits in conntrack's order, or ``UNSET``."""
    names = [name for bit, name in STATUS_TEXT_BITS if status & bit]
    return ",".join(names) if names else "UNSET"


def _name(table: tuple[str, ...], value: int) -> str:
    return table[value] if 0 <= value < len(table) else NULL_NAME


#: Status words spelt out (``-u``): a handful per table.
_STATUS_TEXT: Memo[int, str] = Memo(256)
_PORT_KEYS = ("--sport", "--dport", "--reply-port-src", "--reply-port-dst")
_GRE_KEYS = ("--srckey", "--dstkey", "--reply-key-src", "--reply-key-dst")
_STATE_NAMES = {PROTO_TCP: TCP_STATES, PROTO_SCTP: SCTP_STATES, PROTO_DCCP: DCCP_STATES}
#: DCCP states a DCCP tracker accepts in a create request (below IGNORE).
_DCCP_CREATABLE = 8
#: Addresses already printed: a VM's entries share few addresses (its own ones
#: above all), and inet_ntop costs more than a lookup. Bounded, cleared when full.
_NTOP_CACHE: Memo[tuple[int, bytes], str] = Memo(1 << 16)


def _ntop(family: int, addr: bytes) -> str:
    key = (family, addr)
    text = _NTOP_CACHE.get(key)
    if text is None:
        text = _NTOP_CACHE.add(key, _inet_ntop(family, addr))
    return text


#: What follows ``-p dccp`` for a DCCP entry without ports. Linux >= 6.16 has no DCCP
#: tracker: the generic one keeps DCCP flows as protocol 33 without ports or
#: state, and conntrack(8) prints that as a bare ``-p dccp``, which its own
#: --load-file refuses as a whole file ("You need to supply the `--state'
#: option", exit 2); ``-p 33`` is the same extension, and ``-p 033`` is read
#: as octal (27). conntrack 1.4.7 does load this form (tried on 6.18), and
#: the generic tracker ignores ports and state, so the entry comes back
#: exactly as it was; all four ports are needed (without the reply pair the
#: kernel answers EINVAL). A destination that does have a DCCP tracker
#: creates a harmless entry with ports 0 that no packet matches.
DCCP_PORTLESS = " --sport 0 --dport 0 --reply-port-src 0 --reply-port-dst 0 --state NONE --role client"


def text_problem(e: Entry) -> str | None:
    """Why ``conntrack --load-file`` (1.4.7) would refuse or stop on this entry's line, or None.

    The Perl helper's Load pipes the save text into conntrack(8), which
    rejects a whole file for one line it cannot parse (exit 2, nothing
    created) and stops at the first line the kernel refuses (exit 1, the
    rest not created). So Save leaves such entries out of the text; these
    are the cases conntrack 1.4.7 on Linux 6.18 refuses, found by trying
    each (the reasons are what the journal counts):

    * ``-u EXPECTED``: the kernel refuses to create it (EBUSY), always;
    * no ``-t`` (offloaded flows): "You need to supply the `--timeout' option";
    * TCP, UDP, UDP-Lite, SCTP without ports, GRE without keys: "you have
      to specify `--sport' and `--dport'"; TCP/SCTP/DCCP without a state;
      SCTP without both vtags;
    * a state conntrack has no name for (SCTP 8 HEARTBEAT_SENT prints as
      ``(null)``, on which conntrack crashes), DCCP IGNORE/INVALID (EINVAL);
    * ICMP types without a reply type (3, 11, ...: EINVAL), ICMP with IPv6
      addresses or ICMPv6 with IPv4 ones (EINVAL).

    Entries of other protocols (``-p 0``, ``-p 50``, ``-p 255``) and port-less
    DCCP (:data:`DCCP_PORTLESS`) load fine.
    """
    st = e.status
    if st is not None and st & IPS_EXPECTED:
        return "expected"
    if e.timeout is None:
        return "no timeout (offloaded)"
    if (e.zone, e.orig_zone, e.reply_zone).count(None) < 2:
        return "two zones"  # the kernel keeps one zone: EINVAL
    proto = e.proto
    if proto in (PROTO_ICMP, PROTO_ICMPV6):
        v6 = proto == PROTO_ICMPV6
        if e.family != (AF_INET6 if v6 else AF_INET):
            return "ICMP of the other address family"
        if e.icmp_type not in (ICMPV6_REPLY_TYPE if v6 else ICMP_REPLY_TYPE) or e.icmp_code is None:
            return "ICMP type that cannot be created"
        return None
    if proto not in _PROTO_KEYS:
        return None
    if e.sport is None and e.dport is None and e.state is None and proto == PROTO_DCCP:
        return None  # the generic tracker's DCCP: written as DCCP_PORTLESS
    if e.sport is None or e.dport is None or e.reply_sport is None or e.reply_dport is None:
        return "without ports"
    states = _STATE_NAMES.get(proto)
    if states is not None:
        if e.state is None:
            return "without protocol state"
        if not 0 <= e.state < (_DCCP_CREATABLE if proto == PROTO_DCCP else len(states)):
            return "state conntrack cannot load"
    if proto == PROTO_SCTP and (e.vtag_orig is None or e.vtag_reply is None):
        return "SCTP without vtags"
    if proto == PROTO_DCCP and (e.dccp_role is None or not 0 <= e.dccp_role < len(DCCP_ROLES)):
        return "DCCP without role"
    return None


def render_line(e: Entry) -> str:
    """Render one entry as conntrack 1.4.7 ``-o save`` prints it (no newline, no mark)."""
    if e.timeout is None:
        return "-A" + render_rest(e)
    return "-A -t %d%s" % (e.timeout, render_rest(e))


def render_rest(e: Entry) -> str:
    """The save line of ``e`` after its command and timeout (``-A -t N``).

    Apart because the timeout is the one part that changes while an entry
    sits idle: Save's cache keeps this rest and prints a fresh timeout before it.
    """
    # Runs once per entry inside the downtime: string concatenation and cached
    # pieces, in the order conntrack prints them.
    fam = e.family
    line = ""
    st = e.status
    if st is not None:
        text = _STATUS_TEXT.get(st & STATUS_TEXT_MASK)
        if text is None:
            text = _STATUS_TEXT.add(st & STATUS_TEXT_MASK, status_text(st))
        line += " -u " + text
    if e.zone is not None:
        line += " -w %d" % e.zone
    if e.orig_zone is not None:
        line += " --orig-zone %d" % e.orig_zone
    if e.reply_zone is not None:
        line += " --reply-zone %d" % e.reply_zone
    line += " -s %s -d %s %s %s %s %s" % (
        _ntop(fam, e.orig_src), _ntop(fam, e.orig_dst),
        "-g" if e.is_dnat() else "-r", _ntop(fam, e.reply_src),
        "-n" if e.is_snat() else "-q", _ntop(fam, e.reply_dst))
    proto = e.proto
    name = PROTO_NAMES.get(proto)
    if name is None:
        return line + " -p %d" % proto
    line += " -p " + name
    if proto in (PROTO_ICMP, PROTO_ICMPV6):
        pre = " --icmp-" if proto == PROTO_ICMP else " --icmpv6-"
        if e.icmp_type is not None:
            line += "%stype %d" % (pre, e.icmp_type)
        if e.icmp_code is not None:
            line += "%scode %d" % (pre, e.icmp_code)
        if e.icmp_id is not None:
            line += "%sid %d" % (pre, e.icmp_id)
        return line
    if proto == PROTO_DCCP and e.sport is None and e.dport is None and e.state is None:
        return line + DCCP_PORTLESS
    ports = (e.sport, e.dport, e.reply_sport, e.reply_dport)
    keys = _GRE_KEYS if proto == PROTO_GRE else _PORT_KEYS
    sport, dport, rsport, rdport = ports
    if sport is not None and dport is not None and rsport is not None and rdport is not None:
        line += " %s %d %s %d %s %d %s %d" % (keys[0], sport, keys[1], dport, keys[2], rsport, keys[3], rdport)
    else:
        for opt, val in zip(keys, ports, strict=True):
            if val is not None:
                line += " %s %d" % (opt, val)
    state = e.state
    if state is not None:
        names = _STATE_NAMES.get(proto)
        if names is not None:
            line += " --state " + _name(names, state)
    if proto == PROTO_SCTP:
        if e.vtag_orig is not None:
            line += " --orig-vtag %d" % vtag_text(e.vtag_orig)
        if e.vtag_reply is not None:
            line += " --reply-vtag %d" % vtag_text(e.vtag_reply)
    elif proto == PROTO_DCCP and e.dccp_role is not None:
        line += " --role " + _name(DCCP_ROLES, e.dccp_role)
    return line


# ---------------------------------------------------------------- parsing

_CREATE_COMMANDS = frozenset(("-A", "-I"))
_OTHER_COMMANDS = frozenset((
    "-D", "-U", "-F", "-L", "-G", "-E", "-C", "-S", "-R", "-V", "-h",
    "--delete", "--update", "--flush", "--dump", "--get", "--event", "--count",
    "--stats", "--load-file", "--add", "--create",
))

# option token -> canonical key; only what a save line (plus --mark) contains.
_OPTIONS: dict[str, str] = {
    "-t": "t", "-u": "u", "-w": "w", "--orig-zone": "orig-zone", "--reply-zone": "reply-zone",
    "-s": "s", "-d": "d", "-r": "r", "-q": "q", "-g": "g", "-n": "n", "-p": "p",
    "--sport": "sport", "--dport": "dport",
    "--reply-port-src": "reply-sport", "--reply-port-dst": "reply-dport",
    "--srckey": "sport", "--dstkey": "dport",
    "--reply-key-src": "reply-sport", "--reply-key-dst": "reply-dport",
    "--state": "state", "--orig-vtag": "orig-vtag", "--reply-vtag": "reply-vtag",
    "--role": "role",
    "--icmp-type": "icmp-type", "--icmp-code": "icmp-code", "--icmp-id": "icmp-id",
    "--icmpv6-type": "icmpv6-type", "--icmpv6-code": "icmpv6-code", "--icmpv6-id": "icmpv6-id",
    "--mark": "mark", "-m": "mark",
}
_COMMON_KEYS = frozenset((
    "t", "u", "w", "orig-zone", "reply-zone", "s", "d", "r", "q", "g", "n", "p", "mark",
))
_PORTS = frozenset(("sport", "dport", "reply-sport", "reply-dport"))
_PROTO_KEYS: dict[int, frozenset[str]] = {
    PROTO_TCP: _PORTS | {"state"},
    PROTO_UDP: _PORTS,
    PROTO_UDPLITE: _PORTS,
    PROTO_GRE: _PORTS,
    PROTO_SCTP: _PORTS | {"state", "orig-vtag", "reply-vtag"},
    PROTO_DCCP: _PORTS | {"state", "role"},
    PROTO_ICMP: frozenset(("icmp-type", "icmp-code", "icmp-id")),
    PROTO_ICMPV6: frozenset(("icmpv6-type", "icmpv6-code", "icmpv6-id")),
}
_NO_KEYS: frozenset[str] = frozenset()
_DCCP_ONLY = _PROTO_KEYS[PROTO_DCCP]
_STATUS_BY_NAME = {name: bit for bit, name in STATUS_TEXT_BITS}
_TCP_STATE_BY_NAME = {name: i for i, name in enumerate(TCP_STATES)}
_TCP_STATE_BY_NAME["LISTEN"] = 9  # conntrack's input alias for SYN_SENT2
_SCTP_STATE_BY_NAME = {name: i for i, name in enumerate(SCTP_STATES)}
_DCCP_STATE_BY_NAME = {name: i for i, name in enumerate(DCCP_STATES)}
_DCCP_ROLE_BY_NAME = {name: i for i, name in enumerate(DCCP_ROLES)}


def _uint(opts: dict[str, str], key: str, maximum: int) -> int | None:
    tok = opts.get(key)
    if tok is None:
        return None
    # isdecimal() alone admits non-ASCII digits; the length cap keeps int() cheap.
    if not (tok.isascii() and tok.isdecimal()) or len(tok) > 10:
        raise CodecError("--%s: %r is not a decimal number" % (key, tok))
    value = int(tok)
    if value > maximum:
        raise CodecError("--%s: %d is out of range (0..%d)" % (key, value, maximum))
    return value


def _need(opts: dict[str, str], key: str, maximum: int, proto: str) -> int:
    value = _uint(opts, key, maximum)
    if value is None:
        raise CodecError("-p %s needs --%s" % (proto, key))
    return value


def _addr(opts: dict[str, str], keys: tuple[str, ...]) -> tuple[int, bytes, str]:
    for key in keys:
        tok = opts.get(key)
        if tok is None:
            continue
        for fam in (AF_INET, AF_INET6):
            try:
                return fam, _inet_pton(fam, tok), key
            except OSError:
                continue
        raise CodecError("-%s: %r is not an IPv4 or IPv6 address" % (key, tok))
    raise CodecError("missing -%s" % "/-".join(keys))


def _status(tok: str) -> int:
    if tok == "UNSET":
        return 0
    status = 0
    for word in tok.split(","):
        bit = _STATUS_BY_NAME.get(word)
        if bit is None:
            raise CodecError("-u: unknown status %r" % word)
        status |= bit
    return status


def _lookup(table: dict[str, int], tok: str | None, what: str) -> int:
    if tok is None:
        raise CodecError("missing --%s" % what)
    value = table.get(tok)
    if value is None:
        raise CodecError("--%s: unknown value %r" % (what, tok))
    return value


def _tokens(line: str) -> dict[str, str]:
    toks = line.split()
    cmd = toks[0]
    if cmd not in _CREATE_COMMANDS:
        if cmd in _OTHER_COMMANDS:
            raise CodecError("only create lines (-A) are accepted, not %s" % cmd)
        raise CodecError("line does not start with -A")
    opts: dict[str, str] = {}
    i, n = 1, len(toks)
    while i < n:
        tok = toks[i]
        key = _OPTIONS.get(tok)
        if key is None:
            if tok in _OTHER_COMMANDS or tok in _CREATE_COMMANDS:
                raise CodecError("a second command %s on one line" % tok)
            raise CodecError("unknown option %r" % tok[:40])
        if i + 1 >= n:
            raise CodecError("%s needs a value" % tok)
        if key in opts:
            raise CodecError("%s given twice" % tok)
        opts[key] = toks[i + 1]
        i += 2
    return opts


def parse_line(line: str, mark: int | None = None) -> Entry:
    """Parse one ``-A`` save line into an :class:`Entry`.

    :param line: one line, without its newline
    :param mark: when given, a ``--mark`` on the line must equal it
    :raises CodecError: with the reason the line is refused
    """
    if len(line) > MAX_LINE:
        raise CodecError("line longer than %d characters" % MAX_LINE)
    opts = _tokens(line)

    ptok = opts.get("p")
    if ptok is None:
        raise CodecError("missing -p")
    if ptok in PROTO_BY_NAME:
        proto = PROTO_BY_NAME[ptok]
    else:
        proto = _need(opts, "p", 255, "")
    pname = PROTO_NAMES.get(proto, str(proto))
    allowed = _PROTO_KEYS.get(proto, _NO_KEYS)
    for key in opts:
        if key not in _COMMON_KEYS and key not in allowed:
            raise CodecError("--%s is not valid with -p %s" % (key, pname))

    timeout = _uint(opts, "t", 0xFFFFFFFF)
    if timeout is None:
        raise CodecError("missing -t")
    line_mark = _uint(opts, "mark", 0xFFFFFFFF)
    if mark is not None and line_mark is not None and line_mark != mark:
        raise CodecError("--mark %d is not this VM's mark %d" % (line_mark, mark))
    if "r" in opts and "g" in opts:
        raise CodecError("-r and -g on one line")
    if "q" in opts and "n" in opts:
        raise CodecError("-q and -n on one line")
    f1, osrc, _ = _addr(opts, ("s",))
    f2, odst, _ = _addr(opts, ("d",))
    f3, rsrc, rsrc_key = _addr(opts, ("r", "g"))
    f4, rdst, rdst_key = _addr(opts, ("q", "n"))
    if not f1 == f2 == f3 == f4:
        raise CodecError("addresses of both IPv4 and IPv6 on one line")
    family = f1

    status: int | None = None
    if "u" in opts:
        status = _status(opts["u"])
    if rdst_key == "n" or rsrc_key == "g":
        # The text carries NAT as -n/-g only; record it the way a kernel dump
        # does so that printing and the create request agree.
        status = status or 0
        if rdst_key == "n":
            status |= IPS_SRC_NAT | IPS_SRC_NAT_DONE
        if rsrc_key == "g":
            status |= IPS_DST_NAT | IPS_DST_NAT_DONE

    zone = _uint(opts, "w", 0xFFFF)
    orig_zone = _uint(opts, "orig-zone", 0xFFFF)
    reply_zone = _uint(opts, "reply-zone", 0xFFFF)
    if zone is not None and (orig_zone is not None or reply_zone is not None):
        raise CodecError("-w together with a directional zone")
    if orig_zone is not None and reply_zone is not None:
        raise CodecError("--orig-zone together with --reply-zone")

    e = Entry(family, proto, osrc, odst, rsrc, rdst,
              timeout=timeout, status=status, mark=line_mark,
              zone=zone, orig_zone=orig_zone, reply_zone=reply_zone)

    if proto == PROTO_DCCP and opts.keys().isdisjoint(_DCCP_ONLY):
        # A bare "-p dccp": what conntrack(8) prints for the generic tracker's
        # DCCP entries (Linux >= 6.16). The kernel creates them without ports,
        # so they are accepted (a kernel with a DCCP tracker refuses them).
        pass
    elif proto in _PROTO_KEYS and proto not in (PROTO_ICMP, PROTO_ICMPV6):
        e.sport = _need(opts, "sport", 0xFFFF, pname)
        e.dport = _need(opts, "dport", 0xFFFF, pname)
        rs = _uint(opts, "reply-sport", 0xFFFF)
        rd = _uint(opts, "reply-dport", 0xFFFF)
        # conntrack inverts the original pair when the reply pair is missing.
        e.reply_sport = e.dport if rs is None else rs
        e.reply_dport = e.sport if rd is None else rd
        if proto == PROTO_TCP:
            e.state = _lookup(_TCP_STATE_BY_NAME, opts.get("state"), "state")
        elif proto == PROTO_SCTP:
            e.state = _lookup(_SCTP_STATE_BY_NAME, opts.get("state"), "state")
            e.vtag_orig = vtag_text(_need(opts, "orig-vtag", 0xFFFFFFFF, pname))
            e.vtag_reply = vtag_text(_need(opts, "reply-vtag", 0xFFFFFFFF, pname))
        elif proto == PROTO_DCCP:
            e.state = _lookup(_DCCP_STATE_BY_NAME, opts.get("state"), "state")
            e.dccp_role = _lookup(_DCCP_ROLE_BY_NAME, opts.get("role"), "role")
    elif proto in (PROTO_ICMP, PROTO_ICMPV6):
        v6 = proto == PROTO_ICMPV6
        if family != (AF_INET6 if v6 else AF_INET):
            raise CodecError("-p %s with %s addresses" % (pname, "IPv4" if v6 else "IPv6"))
        pre = "icmpv6-" if v6 else "icmp-"
        itype = _need(opts, pre + "type", 255, pname)
        replies = ICMPV6_REPLY_TYPE if v6 else ICMP_REPLY_TYPE
        if itype not in replies:
            # The kernel only creates entries for invertible types (EINVAL otherwise).
            raise CodecError("--%stype %d cannot be created (not a query type)" % (pre, itype))
        e.icmp_type = itype
        e.icmp_code = _need(opts, pre + "code", 255, pname)
        icmp_id = _uint(opts, pre + "id", 0xFFFF)
        e.icmp_id = 0 if icmp_id is None else icmp_id
        e.reply_icmp_type = replies[itype]
        e.reply_icmp_code = e.icmp_code
        e.reply_icmp_id = e.icmp_id
    return e


# ---------------------------------------------------------------- payloads


@dataclass(slots=True)
class TextPayload:
    """What Save hands to QEMU, and what it left out to stay within the limit."""

    data: bytes
    sent: int
    left_out: int


def encode_text(entries: Iterable[Entry], mark: int, limit: int = MAX_PAYLOAD) -> TextPayload:
    """Build the Perl-compatible text payload, never longer than ``limit`` bytes.

    Entries that do not fit are counted in ``left_out``; the caller decides the
    order (the first ones win). Without entries the payload is :data:`NO_STATE`.

    :param entries: entries to send, most important first
    :param mark: the VM's mark, appended to every line as `` --mark MARK``
    :param limit: byte budget, at least 1
    """
    return pack_lines(map(render_line, entries), mark, limit)


def pack_lines(lines: Iterable[str], mark: int, limit: int = MAX_PAYLOAD) -> TextPayload:
    """:func:`encode_text` of save lines already rendered (:func:`render_line`).

    The lines that fit are the longest prefix whose total stays within ``limit``.
    """
    return cut(join_lines(lines, mark), limit)


@dataclass(frozen=True, slots=True)
class Lines:
    """Save lines end to end, each ending in a newline, and how many there are."""

    data: bytes
    count: int


def join_lines(lines: Iterable[str], mark: int) -> Lines:
    """Save lines already rendered (:func:`render_line`), each with
    `` --mark MARK`` and a newline, end to end."""
    suffix = " --mark %d\n" % mark
    full = list(map(operator.add, lines, repeat(suffix)))
    # Save lines are ASCII, so characters == bytes.
    return Lines("".join(full).encode("ascii"), len(full))


def join_rests(timeouts: Sequence[int], rests: Sequence[bytes], mark: int) -> Lines:
    """:func:`join_lines` of lines given as their timeouts and the rest of each
    (:func:`render_rest`, ASCII bytes): the same bytes, made by one format
    call over all the lines, without a string per line."""
    suffix = b" --mark %d\n" % mark
    # The format's arguments interleaved by two slice assignments (C copies;
    # unequal lengths raise ValueError), ~6 times faster than zipped pairs chained.
    args: list[int | bytes] = [0] * (2 * len(rests))
    args[0::2] = timeouts
    args[1::2] = rests
    data = (b"-A -t %d%s" + suffix) * len(rests) % tuple(args)
    return Lines(data, len(rests))


def fit(lines: Lines, limit: int) -> tuple[int, int]:
    """How many bytes and how many lines from the start of ``lines`` fit in
    ``limit`` bytes (whole lines only).

    Found by C searches over the bytes (the last newline within the limit,
    the newlines after it), not by a running total of line lengths: Save's
    hybrid payload packs thousands of lines inside the VM's downtime.
    """
    data = lines.data
    if len(data) <= limit:
        return len(data), lines.count
    end = data.rfind(b"\n", 0, max(limit, 0)) + 1
    return end, lines.count - data.count(b"\n", end)


def cut(lines: Lines, limit: int) -> TextPayload:
    """The lines of :func:`fit`, as a payload."""
    end, n = fit(lines, limit)
    if not n:
        return TextPayload(NO_STATE, 0, lines.count)
    return TextPayload(lines.data if end == len(lines.data) else lines.data[:end], n, lines.count - n)


def decode_payload(data: bytes, mark: int) -> Decoded:
    """Parse a Load payload: ours or the Perl helper's (same text format).

    A payload of at most one byte means "nothing to do". Blank lines and ``#``
    comments are skipped; every other line either becomes an entry or is
    refused with a reason. Never raises for bad input.

    :param data: the bytes QEMU passed to Load
    :param mark: the VM's mark; lines carrying another ``--mark`` are refused
    """
    result = Decoded()
    if len(data) <= 1:
        return result
    for no, chunk in enumerate(data.split(b"\n"), 1):
        raw = chunk.strip()
        if not raw or raw.startswith(b"#"):
            continue
        if len(raw) > MAX_LINE:
            result.refuse(no, "line longer than %d characters" % MAX_LINE)
            continue
        try:
            line = raw.decode("ascii")
        except UnicodeDecodeError:
            result.refuse(no, "line is not ASCII text")
            continue
        if not line.isprintable():
            result.refuse(no, "line holds control characters")
            continue
        try:
            result.entries.append(parse_line(line, mark))
        except CodecError as err:
            result.refuse(no, str(err))
    return result
