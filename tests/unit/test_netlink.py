"""ctnetlink message codec: requests decode back to the entries they encode."""

from __future__ import annotations

import dataclasses
import struct
import threading

import pytest

from pvevmstate import netlink
from pvevmstate.errors import ConntrackError
from pvevmstate.model import IPS_CONFIRMED, Entry
from pvevmstate.netlink import codec as codec_module
from pvevmstate.netlink.codec import _common_body
from pvevmstate.payload import savetext as codec
from tests.corpus import _variants
from tests.support import example_lines


def _decode_request(req: bytes) -> Entry:
    mlen, mtype, flags, _seq, _pid = struct.unpack_from("=IHHII", req)
    assert mlen == len(req) and mtype == netlink.IPCTNL_MSG_CT_NEW
    assert flags & netlink.NLM_F_CREATE and flags & netlink.NLM_F_EXCL
    return netlink.decode_entry(req, 20, mlen, req[16])


@pytest.mark.parametrize("line", [ln for ln in example_lines() if " -n " not in ln and " -g " not in ln])
def test_create_request_carries_the_line(line: str) -> None:
    e = codec.parse_line(line)
    got = _decode_request(netlink.create_request(e, 100, 7, ack=False))
    assert got.mark == 100
    assert got.status is None or got.status & IPS_CONFIRMED
    assert codec.render_line(got) == line


@pytest.mark.parametrize("line", [ln for ln in example_lines() if " -n " in ln or " -g " in ln])
def test_nat_side_goes_as_zero_address_plus_nat_attribute(line: str) -> None:
    e = codec.parse_line(line)
    req = netlink.create_request(e, 100, 7, ack=True)
    got = _decode_request(req)
    zero = b"\0" * len(e.orig_src)
    if e.is_snat():
        assert got.reply_dst == zero and e.reply_dst in req
    if e.is_dnat():
        assert got.reply_src == zero and e.reply_src in req


def test_tcp_flags_like_conntrack() -> None:
    est = codec.parse_line(example_lines()[0])
    req = netlink.create_request(est, 1, 1, ack=False)
    assert bytes((0x0A, 0x0A)) in req
    tw = codec.parse_line(next(ln for ln in example_lines() if "TIME_WAIT" in ln))
    assert bytes((0x0E, 0x0E)) in netlink.create_request(tw, 1, 1, ack=False)


def _msg(mtype: int, flags: int, seq: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), mtype, flags, seq, 0) + body


def test_decode_dump_done_error_and_interrupt() -> None:
    e = codec.parse_line(example_lines()[0])
    entry_msg = netlink.create_request(e, 100, 5, ack=False)
    # Re-type the create request as a dump reply in the middle of a dump.
    reply = struct.pack("=IHHII", len(entry_msg), netlink.IPCTNL_MSG_CT_NEW,
                        netlink.NLM_F_MULTI | netlink.NLM_F_DUMP_INTR, 5, 0) + entry_msg[16:]
    other_seq = struct.pack("=IHHII", len(entry_msg), netlink.IPCTNL_MSG_CT_NEW, 0, 99, 0) + entry_msg[16:]
    done = _msg(netlink.NLMSG_DONE, netlink.NLM_F_MULTI, 5, b"\0\0\0\0")
    out: list[Entry] = []
    buf = reply + other_seq + done
    chunk = netlink.decode_dump(buf, len(buf), 5, out)
    assert chunk.done and chunk.interrupted and len(out) == 1
    assert out[0].mark == 100

    err = _msg(netlink.NLMSG_ERROR, 0, 5, struct.pack("=i", -1) + b"\0" * 16)
    with pytest.raises(ConntrackError, match="EPERM"):
        netlink.decode_dump(err, len(err), 5, [])


def test_truncated_message_is_an_error() -> None:
    bad = struct.pack("=IHHII", 400, netlink.IPCTNL_MSG_CT_NEW, 0, 5, 0) + b"\0" * 8
    with pytest.raises(ConntrackError, match="truncated"):
        netlink.decode_dump(bad, len(bad), 5, [])


def test_iter_acks() -> None:
    buf = (_msg(netlink.NLMSG_ERROR, 0, 3, struct.pack("=i", -17) + b"\0" * 16)
           + _msg(netlink.NLMSG_ERROR, 0, 4, struct.pack("=i", 0) + b"\0" * 16))
    assert list(netlink.iter_acks(buf, len(buf))) == [(3, 17), (4, 0)]


def test_dump_request_always_sends_mark_with_full_mask() -> None:
    req = netlink.dump_request(9, 0)
    assert struct.pack("!I", 0) in req and struct.pack("!I", 0xFFFFFFFF) in req
    assert req[16] == 0  # AF_UNSPEC: IPv4 and IPv6


# ------------------------------------------- learned layouts, common shapes

def _as_dump_message(e: Entry, seq: int = 1) -> bytes:
    """A create request re-typed as a dump reply: the layout a kernel dump uses for it."""
    req = netlink.create_request_general(e, e.mark or 100, seq, ack=False)
    return struct.pack("=IHHII", len(req), netlink.IPCTNL_MSG_CT_NEW, netlink.NLM_F_MULTI, seq, 0) + req[16:]




def test_learned_layout_decodes_like_the_attribute_walk() -> None:
    layouts = netlink.LayoutCache()
    for e in _variants():
        msg = _as_dump_message(e)
        walked = netlink.decode_entry(msg, 20, len(msg), msg[16])
        assert layouts.decode_message(msg, 0, len(msg)) == walked  # learns
        assert layouts.decode_message(msg, 0, len(msg)) == walked  # by the layout
    assert layouts.snapshot(), "no layout was learned"


def test_same_length_other_layout_is_not_misread() -> None:
    # Two messages of one length and family whose attributes differ: the second
    # must not be read with the first one's layout.
    layouts = netlink.LayoutCache()
    tcp = codec.parse_line(example_lines()[0])
    a = _as_dump_message(dataclasses.replace(tcp, zone=None, timeout=100, mark=100))
    body = bytearray(a)
    # Swap the CTA_TIMEOUT and CTA_MARK attributes: same sizes, other order.
    t_at = body.index(struct.pack("=HH", 8, netlink.CTA_TIMEOUT) + struct.pack("!I", 100))
    m_at = body.index(struct.pack("=HH", 8, netlink.CTA_MARK) + struct.pack("!I", 100))
    body[t_at:t_at + 8], body[m_at:m_at + 8] = body[m_at:m_at + 8], body[t_at:t_at + 8]
    body[t_at + 4:t_at + 8] = struct.pack("!I", 200)  # now the mark, and a different one
    b = bytes(body)
    assert len(a) == len(b)
    layouts.decode_message(a, 0, len(a))
    got = layouts.decode_message(b, 0, len(b))
    assert got == netlink.decode_entry(b, 20, len(b), b[16])
    assert got.mark == 200 and got.timeout == 100


def test_layouts_stay_bounded() -> None:
    # Messages of more lengths than MAX_LAYOUTS, and at each length more header
    # layouts (an unknown attribute of another type) than MAX_LAYOUTS_PER_KEY.
    layouts = netlink.LayoutCache()
    base = _as_dump_message(codec.parse_line(example_lines()[0]))
    for n in range(netlink.MAX_LAYOUTS + 50):
        for atype in range(30, 30 + netlink.MAX_LAYOUTS_PER_KEY + 2):
            pad = struct.pack("=HH", 4 + 4 * n, atype) + bytes(4 * n)
            msg = struct.pack("=I", len(base) + len(pad)) + base[4:] + pad
            assert layouts.decode_message(msg, 0, len(msg)) == netlink.decode_entry(msg, 20, len(msg), msg[16])
    learned = layouts.snapshot()
    assert len(learned) == netlink.MAX_LAYOUTS
    assert max(len(v) for v in learned.values()) == netlink.MAX_LAYOUTS_PER_KEY


def test_common_shape_builds_the_same_bytes_as_the_general_path() -> None:
    fast = 0
    for i, e in enumerate(_variants()):
        for ack in (False, True):
            assert netlink.create_request(e, 100, i, ack) == netlink.create_request_general(e, 100, i, ack), e
        fast += _common_body(e, 100) is not None
    assert fast > 200  # the common shape is the common case


def _attr_offsets(msg: bytes, off: int, end: int, path: tuple[int, ...] = ()) -> dict[tuple[int, ...], int]:
    """Offset of the first attribute at each path of types (nested ones by their flag)."""
    found: dict[tuple[int, ...], int] = {}
    while off + 4 <= end:
        alen, atype = struct.unpack_from("=HH", msg, off)
        sub = (*path, atype & netlink.NLA_TYPE_MASK)
        found.setdefault(sub, off)
        if atype & netlink.NLA_F_NESTED:
            for k, v in _attr_offsets(msg, off + 4, off + alen, sub).items():
                found.setdefault(k, v)
        off += (alen + 3) & ~3
    return found


@pytest.mark.parametrize(("path", "what"), [
    ((netlink.CTA_STATUS,), "malformed attribute"),
    ((netlink.CTA_TUPLE_REPLY, netlink.CTA_TUPLE_PROTO), "malformed tuple attribute"),
    ((netlink.CTA_TUPLE_ORIG, netlink.CTA_TUPLE_IP, netlink.CTA_IP_V4_DST), "malformed address attribute"),
    ((netlink.CTA_TUPLE_ORIG, netlink.CTA_TUPLE_PROTO, netlink.CTA_PROTO_NUM), "malformed protocol attribute"),
    ((netlink.CTA_PROTOINFO, netlink.CTA_PROTOINFO_TCP), "malformed protoinfo attribute"),
    ((netlink.CTA_PROTOINFO, netlink.CTA_PROTOINFO_TCP, netlink.CTA_PROTOINFO_TCP_STATE),
     "malformed protoinfo attribute"),
])
def test_a_malformed_attribute_is_named_by_where_it_is(path: tuple[int, ...], what: str) -> None:
    msg = bytearray(_as_dump_message(codec.parse_line(example_lines()[0])))
    at = _attr_offsets(bytes(msg), 20, len(msg))[path]
    msg[at:at + 2] = struct.pack("=H", 2)  # shorter than its own header
    with pytest.raises(ConntrackError, match=what):
        netlink.decode_entry(bytes(msg), 20, len(msg), msg[16])
    with pytest.raises(ConntrackError, match=what):
        netlink.LayoutCache().decode_message(bytes(msg), 0, len(msg))


def test_protoinfo_checks_the_headers_of_unknown_protocols_too() -> None:
    # An unknown CTA_PROTOINFO_* child whose own child is malformed: refused, as always.
    msg = _as_dump_message(codec.parse_line(example_lines()[0]))
    bad = struct.pack("=HH", 12, 9 | netlink.NLA_F_NESTED) + struct.pack("=HH", 2, 1) + bytes(4)
    body = struct.pack("=HH", 4 + len(bad), netlink.CTA_PROTOINFO | netlink.NLA_F_NESTED) + bad
    msg = struct.pack("=I", len(msg) + len(body)) + msg[4:] + body
    with pytest.raises(ConntrackError, match="malformed protoinfo attribute"):
        netlink.decode_entry(msg, 20, len(msg), msg[16])


def test_one_layout_cache_shared_by_threads() -> None:
    # Two threads decode the same mix through one cache: every entry as walked,
    # the bounds held, and each layout learned once.
    layouts = netlink.LayoutCache()
    msgs = [_as_dump_message(e) for e in _variants()]
    want = [netlink.decode_entry(m, 20, len(m), m[16]) for m in msgs]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(3):
                assert [layouts.decode_message(m, 0, len(m)) for m in msgs] == want
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    learned = layouts.snapshot()
    assert learned and all(len(v) <= netlink.MAX_LAYOUTS_PER_KEY for v in learned.values())
    for lays in learned.values():
        heads = [lay.heads for lay in lays]
        assert len(heads) == len(set(heads))


def test_a_layout_two_threads_walked_is_learned_once() -> None:
    # What two threads do that both missed the cache for one message and
    # walked it: each then learns it. The second must not add it again.
    layouts = netlink.LayoutCache()
    msg = _as_dump_message(codec.parse_line(example_lines()[0]))
    key = (len(msg), msg[16])
    layouts._learn(msg, 0, len(msg), key)
    layouts._learn(msg, 0, len(msg), key)
    assert len(layouts.snapshot()[key]) == 1


def test_the_walker_is_written_from_the_table() -> None:
    # Every attribute an Entry field comes from has its branch in the generated walker.
    src = codec_module.WALKER_SOURCE
    for path, (field, _code) in codec_module.LEAVES.items():
        assert "f_%s = " % field in src, path
    for node in netlink.TABLE:
        if isinstance(node, netlink.Nest) and node.type not in (netlink.CTA_NAT_SRC, netlink.CTA_NAT_DST):
            assert "# " + node.name in src


def _stats_reply(seq: int, count: int, maximum: int | None) -> bytes:
    attrs = struct.pack("=HH", 8, netlink.CTA_STATS_GLOBAL_ENTRIES) + struct.pack("!I", count)
    if maximum is not None:
        attrs += struct.pack("=HH", 8, netlink.CTA_STATS_GLOBAL_MAX_ENTRIES) + struct.pack("!I", maximum)
    body = b"\x00\x00\x00\x00" + attrs
    return struct.pack("=IHHII", 16 + len(body), netlink.IPCTNL_MSG_CT_GET_STATS, 0, seq, 0) + body


def test_decode_stats_reads_the_count_and_the_maximum() -> None:
    reply = _stats_reply(7, 1234, 262144)
    assert netlink.decode_stats(reply, len(reply), 7) == (1234, 262144)
    assert netlink.decode_stats(reply, len(reply), 8) is None  # another request's answer
    old = _stats_reply(7, 5, None)
    assert netlink.decode_stats(old, len(old), 7) == (5, None)
    with pytest.raises(ConntrackError, match="truncated"):
        netlink.decode_stats(reply, len(reply) - 1, 7)
    refused = struct.pack("=IHHII", 20, netlink.NLMSG_ERROR, 0, 7, 0) + struct.pack("=i", -1)
    with pytest.raises(ConntrackError, match="refused"):
        netlink.decode_stats(refused, len(refused), 7)
