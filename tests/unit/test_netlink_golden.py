"""The ctnetlink codec against golden bytes and entries recorded from an earlier codec.

``tests/data/ctnetlink-golden.json.gz`` was written once by the hand-written
codec that preceded the schema table (``python -m tests.unit.test_netlink_golden``,
as root): create requests for several hundred entries (every loadable line of
examples.save, realistic and synthetic lines, entries decoded from a real
kernel dump, and variants of them with NAT ports, zones, labels, window
scales, SCTP tags, DCCP roles, ICMP/ICMPv6, GRE), what that codec decoded each
request back into, and real dump datagrams from a kernel table with the
entries it decoded from them. The inputs are stored with the outputs, so the
file does not depend on the line generators in tests.support staying as they
are. Regenerating it re-locks today's behaviour: do so only when a change of
bytes is intended, and say so in the commit.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import socket
import sys

from pvevmstate import netlink
from pvevmstate.model import (
    IPS_DST_NAT_DONE,
    IPS_SRC_NAT_DONE,
    PROTO_DCCP,
    PROTO_SCTP,
    PROTO_TCP,
    Entry,
)
from tests.corpus import GOLDEN, _as_dump_message, _entry_from_json, _entry_to_json, _golden, _messages

# ---------------------------------------------------------------- the tests


def test_the_golden_file_covers_what_it_says() -> None:
    cases = _golden()["requests"]
    entries = [_entry_from_json(c["entry"]) for c in cases]
    protos = {e.proto for e in entries}
    assert {1, 6, 17, 33, 47, 58, 132} <= protos
    assert any(e.is_snat() for e in entries) and any(e.is_dnat() for e in entries)
    assert any(e.zone is not None for e in entries) and any(e.reply_zone is not None for e in entries)
    assert any(e.labels and any(e.labels) for e in entries) and any(e.labels and not any(e.labels) for e in entries)
    assert any(e.tcp_wscale_orig is not None for e in entries)
    assert any(e.vtag_orig is not None for e in entries) and any(e.dccp_role is not None for e in entries)
    assert any(e.family == socket.AF_INET6 for e in entries)
    assert len(cases) > 500 and sum(len(_messages(bytes.fromhex(d["datagram"]))) for d in _golden()["dumps"]) > 150


def test_create_requests_are_the_golden_bytes() -> None:
    for i, c in enumerate(_golden()["requests"]):
        e = _entry_from_json(c["entry"])
        want = bytes.fromhex(c["bytes"])
        args = (e, c["mark"], c["seq"], c["ack"])
        assert netlink.create_request_general(*args) == want, (i, e)
        assert netlink.create_request(*args) == want, (i, e)


def test_requests_decode_to_the_golden_entries() -> None:
    layouts = netlink.LayoutCache()
    for i, c in enumerate(_golden()["requests"]):
        req = bytes.fromhex(c["bytes"])
        want = _entry_from_json(c["decoded"])
        assert netlink.decode_entry(req, 20, len(req), req[16]) == want, i
        msg = _as_dump_message(req)
        assert layouts.decode_message(msg, 0, len(msg)) == want, i  # learns, or reads by a layout
        assert layouts.decode_message(msg, 0, len(msg)) == want, i


def test_kernel_dumps_decode_to_the_golden_entries() -> None:
    for d in _golden()["dumps"]:
        buf = bytes.fromhex(d["datagram"])
        want = [_entry_from_json(x) for x in d["entries"]]
        assert [netlink.decode_entry(buf, off + 20, off + mlen, buf[off + 16]) for off, mlen in _messages(buf)] == want
        layouts = netlink.LayoutCache()
        for _ in range(2):  # learning, then by the learned layouts
            out: list[Entry] = []
            netlink.decode_dump(buf, len(buf), d["seq"], out, layouts)
            assert out == want
        assert layouts.snapshot()


# ---------------------------------------------------------------- regenerating


def _variants(base: list[Entry]) -> list[Entry]:
    """``base`` plus details a save line cannot carry, chosen by index so the set is reproducible."""
    out: list[Entry] = []
    for i, e in enumerate(base):
        out.append(e)
        r = dataclasses.replace
        ports = e.sport is not None and e.dport is not None
        if e.proto == PROTO_TCP and e.state is not None:
            if i % 3 == 0:
                out.append(r(e, tcp_wscale_orig=7, tcp_wscale_reply=9, tcp_flags_orig=0x23, tcp_flags_reply=0x2B))
            if i % 4 == 1:
                out.append(r(e, tcp_wscale_orig=14, tcp_wscale_reply=None))  # one side only: not the common shape
            if i % 5 == 2:
                out.append(r(e, tcp_flags_orig=0x01, tcp_flags_reply=None))  # one side only: the defaults
            if i % 9 == 3:
                out.append(r(e, state=None))
        if e.proto == PROTO_SCTP:
            out.append(r(e, vtag_orig=0x01020304, vtag_reply=0xA0B0C0D0))
            out.append(r(e, vtag_orig=5))
        if i % 5 == 0:
            out.append(r(e, labels=bytes(range(16))))
        elif i % 5 == 1:
            out.append(r(e, labels=bytes(16)))  # all zero: not sent
        if i % 6 == 0:
            out.append(r(e, zone=3))
        elif i % 6 == 1:
            out.append(r(e, orig_zone=4, reply_zone=5))
        if i % 7 == 0:
            out.append(r(e, status=None))
        elif i % 7 == 1:
            out.append(r(e, timeout=None))
        if ports and i % 4 == 0 and e.sport is not None:
            st = (e.status or 0) | IPS_SRC_NAT_DONE
            out.append(r(e, status=st, reply_dport=(e.sport + 1) & 0xFFFF))  # source NAT of the port only
        if ports and i % 4 == 2 and e.dport is not None:
            st = (e.status or 0) | IPS_DST_NAT_DONE
            out.append(r(e, status=st, reply_sport=(e.dport + 7) & 0xFFFF))  # destination NAT of the port only
    return out


def _extra() -> list[Entry]:
    """Entries no loadable example line has: DCCP, odd address lengths, an unknown protocol."""
    a, b = socket.inet_aton("192.0.2.1"), socket.inet_aton("192.0.2.2")
    a6, b6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1"), socket.inet_pton(socket.AF_INET6, "2001:db8::2")
    return [
        Entry(socket.AF_INET, PROTO_DCCP, a, b, b, a, 5000, 6000, 6000, 5000, timeout=300, status=6, state=4,
              dccp_role=0),
        Entry(socket.AF_INET6, PROTO_DCCP, a6, b6, b6, a6, 5000, 6000, 6000, 5000, timeout=300, status=0, state=1),
        Entry(socket.AF_INET6, PROTO_TCP, a, b, b, a, 1, 2, 2, 1, timeout=10, status=6, state=3),
        Entry(socket.AF_INET, 250, a, b, b, a, timeout=10, status=0),
        Entry(socket.AF_INET6, 17, a6, b6, b6, a6, 1, 2, 2, 1, timeout=10, status=0, mark=9, zone=0),
    ]


def _dump_in_namespace(lines: list[str], mark: int) -> list[bytes]:
    """Datagrams of a mark-filtered dump of a fresh namespace holding ``lines``."""
    import os

    from pyroute2 import netns

    from pvevmstate.netlink.conntrack import open_netlink_socket
    from tests.support import Netns

    name = "pvevmstate-golden-%d" % os.getpid()
    netns.create(name)
    try:
        Netns(name).load(lines, mark=mark)
        netns.pushns(name)
        try:
            sock = open_netlink_socket()
        finally:
            netns.popns()
        grams: list[bytes] = []
        sock.send(netlink.dump_request(1, mark))
        buf = bytearray(1 << 20)
        while True:
            n = sock.recv_into(buf)
            grams.append(bytes(buf[:n]))
            if netlink.decode_dump(grams[-1], n, 1, []).done:
                break
        sock.close()
        return grams
    finally:
        netns.remove(name)


def regenerate() -> None:
    from pvevmstate.payload import savetext as codec
    from tests.support import example_lines, realistic_lines, synthetic_lines

    examples = example_lines()
    grams = _dump_in_namespace(examples + realistic_lines(160, seed=21, min_timeout=3600), 7)
    dumps = []
    kernel: list[Entry] = []
    for g in grams:
        entries = [netlink.decode_entry(g, off + 20, off + mlen, g[off + 16]) for off, mlen in _messages(g)]
        if entries:
            dumps.append({"seq": 1, "datagram": g.hex(), "entries": [_entry_to_json(e) for e in entries]})
            kernel += entries
    base = ([codec.parse_line(ln) for ln in examples + realistic_lines(60, seed=12) + synthetic_lines(40, seed=4)]
            + kernel[:: max(1, len(kernel) // 80)] + _extra())
    requests = []
    for i, e in enumerate(_variants(base)):
        mark, seq, ack = 100 + i % 3, i + 1, i % 2 == 1
        req = netlink.create_request_general(e, mark, seq, ack)
        requests.append({"entry": _entry_to_json(e), "mark": mark, "seq": seq, "ack": ack, "bytes": req.hex(),
                         "decoded": _entry_to_json(netlink.decode_entry(req, 20, len(req), req[16]))})
    text = json.dumps({"requests": requests, "dumps": dumps}, separators=(",", ":"))
    GOLDEN.write_bytes(gzip.compress(text.encode("ascii"), 9, mtime=0))
    print("%d requests, %d datagrams -> %s (%d bytes)" % (len(requests), len(dumps), GOLDEN, GOLDEN.stat().st_size),
          file=sys.stderr)


if __name__ == "__main__":
    regenerate()
