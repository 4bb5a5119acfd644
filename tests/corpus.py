"""Entries and netlink messages several test modules share: the golden file,
entries of every kind, and hand-made compact records (no test module imports
another; they all take these from here)."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import socket
import struct
import zlib
from pathlib import Path
from socket import AF_INET, AF_INET6
from typing import Any

from pvevmstate import netlink
from pvevmstate.model import (
    IPS_ASSURED,
    IPS_EXPECTED,
    IPS_SEEN_REPLY,
    IPS_SRC_NAT,
    IPS_SRC_NAT_DONE,
    PROTO_DCCP,
    PROTO_GRE,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    PROTO_UDPLITE,
    Entry,
)
from pvevmstate.payload import compact
from pvevmstate.payload import savetext as codec
from tests.support import example_lines, realistic_lines

V4A, V4B = bytes((10, 0, 0, 1)), bytes((192, 0, 2, 1))


def header(count: int, version: int = 1, size: int = 130, compression: int = 1) -> bytes:
    """A compact payload's header."""
    return compact.HEADER.pack(compact.MAGIC, version, compression, size, count)


# ---- from tests/unit/test_payload.py

def records(*entries_raw: bytes) -> bytes:
    raw = b"".join(entries_raw)
    size = compact.RECORD.size
    return header(len(entries_raw)) + zlib.compress(b"".join(raw[i::size] for i in range(size)))


def raw_record(family: int = AF_INET, proto: int = PROTO_TCP, present: int = 0, status: int = 0) -> bytes:
    values: list[int | bytes] = [family, proto, present | (1 << 11), V4A.ljust(16, b"\0"), V4B.ljust(16, b"\0"),
                                 V4B.ljust(16, b"\0"), V4A.ljust(16, b"\0")]
    values += [0] * 10 + [0, status] + [0] * 11 + [bytes(16)]
    return compact.RECORD.pack(*values)




# ---- from tests/unit/test_netlink.py

def _variants() -> list[Entry]:
    """Example and realistic entries, plus TCP details only a dump has."""
    entries = [codec.parse_line(ln) for ln in example_lines() + realistic_lines(300, seed=3)]
    for i, e in enumerate(list(entries)):
        if e.proto == 6 and e.state is not None and i % 3 == 0:
            entries.append(dataclasses.replace(e, tcp_wscale_orig=7, tcp_wscale_reply=9,
                                               tcp_flags_orig=0x23, tcp_flags_reply=0x2B))
        if i % 7 == 0:
            entries.append(dataclasses.replace(e, labels=bytes(range(16))))
        if i % 11 == 0:
            entries.append(dataclasses.replace(e, zone=3))
    return entries




# ---- from tests/integration/test_text_payloads.py

def _addr(family: int, i: int, side: int) -> bytes:
    if family == AF_INET:
        return bytes((10, side, i // 256, i % 256))
    return socket.inet_pton(AF_INET6, "fd00:%x::%x" % (side, i + 1))


def entry_kinds() -> list[Entry]:
    """Entries of every kind a dump can hold, and some only a netlink create can make."""
    kinds: list[dict[str, Any]] = []
    ports = {"sport": 1000, "dport": 2000, "reply_sport": 2000, "reply_dport": 1000}
    for proto in (PROTO_TCP, PROTO_UDP, PROTO_UDPLITE, PROTO_SCTP, PROTO_DCCP, PROTO_GRE):
        kinds.append({"proto": proto})  # no ports at all
        kinds.append({"proto": proto, "sport": 1000, "dport": 2000})  # no reply ports
    for state in range(12):
        kinds.append({"proto": PROTO_TCP, "state": state, **ports})
        kinds.append({"proto": PROTO_SCTP, "state": state, "vtag_orig": 7, "vtag_reply": 9, **ports})
        kinds.append({"proto": PROTO_DCCP, "state": state, "dccp_role": 0, **ports})
    kinds += [
        {"proto": PROTO_TCP, **ports},  # no state (an offloaded flow)
        {"proto": PROTO_TCP, "state": 3, "timeout": None, **ports},  # no timeout (offloaded)
        {"proto": PROTO_SCTP, "state": 4, **ports},  # no vtags
        {"proto": PROTO_DCCP, "state": 4, **ports},  # no role
        {"proto": PROTO_DCCP, "state": 4, "dccp_role": 1, **ports},
        {"proto": PROTO_UDP, **ports},
        {"proto": PROTO_UDPLITE, **ports},
        {"proto": PROTO_GRE, **ports},
        {"proto": PROTO_UDP, "status": IPS_EXPECTED | IPS_SEEN_REPLY, **ports},
        {"proto": PROTO_UDP, "status": IPS_SEEN_REPLY | IPS_ASSURED, "zone": 3, **ports},
        {"proto": PROTO_UDP, "orig_zone": 3, **ports},
        {"proto": PROTO_UDP, "zone": 3, "orig_zone": 4, **ports},
        {"proto": PROTO_UDP, "orig_zone": 3, "reply_zone": 4, **ports},
        {"proto": PROTO_UDP, "status": IPS_SRC_NAT | IPS_SRC_NAT_DONE, "nat": True, **ports},
    ]
    kinds += [{"proto": p} for p in (0, 2, 41, 50, 89, 255)]
    for t in range(0, 20):
        kinds.append({"proto": PROTO_ICMP, "icmp_type": t, "icmp_code": 0, "icmp_id": 5})
    for t in (1, 128, 129, 130, 135, 139, 140):
        kinds.append({"proto": PROTO_ICMPV6, "icmp_type": t, "icmp_code": 0, "icmp_id": 5, "family": AF_INET6})
    kinds.append({"proto": PROTO_ICMP, "icmp_type": 8, "icmp_code": 0, "icmp_id": 5, "family": AF_INET6})
    kinds.append({"proto": PROTO_ICMPV6, "icmp_type": 128, "icmp_code": 0, "icmp_id": 5, "family": AF_INET})
    kinds.append({"proto": PROTO_ICMP, "icmp_type": 8, "icmp_id": 5})  # no code
    out = []
    for i, given in enumerate(kinds):
        kind = dict(given)
        family = kind.pop("family", AF_INET)
        nat = kind.pop("nat", False)
        src, dst = _addr(family, i, 1), _addr(family, i, 2)
        kind.setdefault("timeout", 600)
        kind.setdefault("status", IPS_SEEN_REPLY)
        out.append(Entry(family, kind.pop("proto"), src, dst, dst, _addr(family, i, 3) if nat else src, **kind))
    return out




# ---- from tests/unit/test_netlink_golden.py

GOLDEN = Path(__file__).resolve().parent / "data" / "ctnetlink-golden.json.gz"


_FIELDS = tuple(f.name for f in dataclasses.fields(Entry))


_BYTES = frozenset({"orig_src", "orig_dst", "reply_src", "reply_dst", "labels"})


def _entry_to_json(e: Entry) -> dict[str, Any]:
    return {f: (v.hex() if f in _BYTES and v is not None else v)
            for f in _FIELDS if (v := getattr(e, f)) is not None or f in _BYTES}


def _entry_from_json(d: dict[str, Any]) -> Entry:
    fields: dict[str, Any] = {f: (bytes.fromhex(v) if f in _BYTES and v is not None else v) for f, v in d.items()}
    return Entry(**fields)


@functools.cache
def _golden() -> dict[str, Any]:
    with gzip.open(GOLDEN, "rt", encoding="ascii") as f:
        data: dict[str, Any] = json.load(f)
    return data


def _messages(buf: bytes) -> list[tuple[int, int]]:
    """(offset, length) of each CT_NEW message in a datagram."""
    out, off = [], 0
    while off + 16 <= len(buf):
        mlen, mtype = struct.unpack_from("=IH", buf, off)
        if mtype == netlink.IPCTNL_MSG_CT_NEW:
            out.append((off, mlen))
        off += (mlen + 3) & ~3
    return out


def _as_dump_message(req: bytes) -> bytes:
    """A create request re-typed as a dump reply."""
    return struct.pack("=IHHII", len(req), netlink.IPCTNL_MSG_CT_NEW, netlink.NLM_F_MULTI, 1, 0) + req[16:]


