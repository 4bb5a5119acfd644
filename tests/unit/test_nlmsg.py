"""ctnetlink message codec: requests decode back to the entries they encode."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from pvevmstate import nlmsg
from pvevmstate.entry import IPS_CONFIRMED, Entry
from pvevmstate.errors import ConntrackError
from pvevmstate.payload import savetext as codec
from tests.support import example_lines, realistic_lines


def _decode_request(req: bytes) -> Entry:
    mlen, mtype, flags, _seq, _pid = struct.unpack_from("=IHHII", req)
    assert mlen == len(req) and mtype == nlmsg.IPCTNL_MSG_CT_NEW
    assert flags & nlmsg.NLM_F_CREATE and flags & nlmsg.NLM_F_EXCL
    return nlmsg.decode_entry(req, 20, mlen, req[16])


@pytest.mark.parametrize("line", [ln for ln in example_lines() if " -n " not in ln and " -g " not in ln])
def test_create_request_carries_the_line(line: str) -> None:
    e = codec.parse_line(line)
    got = _decode_request(nlmsg.create_request(e, 100, 7, ack=False))
    assert got.mark == 100
    assert got.status is None or got.status & IPS_CONFIRMED
    assert codec.render_line(got) == line


@pytest.mark.parametrize("line", [ln for ln in example_lines() if " -n " in ln or " -g " in ln])
def test_nat_side_goes_as_zero_address_plus_nat_attribute(line: str) -> None:
    e = codec.parse_line(line)
    req = nlmsg.create_request(e, 100, 7, ack=True)
    got = _decode_request(req)
    zero = b"\0" * len(e.orig_src)
    if e.is_snat():
        assert got.reply_dst == zero and e.reply_dst in req
    if e.is_dnat():
        assert got.reply_src == zero and e.reply_src in req


def test_tcp_flags_like_conntrack() -> None:
    est = codec.parse_line(example_lines()[0])
    req = nlmsg.create_request(est, 1, 1, ack=False)
    assert bytes((0x0A, 0x0A)) in req
    tw = codec.parse_line(next(ln for ln in example_lines() if "TIME_WAIT" in ln))
    assert bytes((0x0E, 0x0E)) in nlmsg.create_request(tw, 1, 1, ack=False)


def _msg(mtype: int, flags: int, seq: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), mtype, flags, seq, 0) + body


def test_decode_dump_done_error_and_interrupt() -> None:
    e = codec.parse_line(example_lines()[0])
    entry_msg = nlmsg.create_request(e, 100, 5, ack=False)
    # Re-type the create request as a dump reply in the middle of a dump.
    reply = struct.pack("=IHHII", len(entry_msg), nlmsg.IPCTNL_MSG_CT_NEW, nlmsg.NLM_F_MULTI | nlmsg.NLM_F_DUMP_INTR,
                        5, 0) + entry_msg[16:]
    other_seq = struct.pack("=IHHII", len(entry_msg), nlmsg.IPCTNL_MSG_CT_NEW, 0, 99, 0) + entry_msg[16:]
    done = _msg(nlmsg.NLMSG_DONE, nlmsg.NLM_F_MULTI, 5, b"\0\0\0\0")
    out: list[Entry] = []
    buf = reply + other_seq + done
    chunk = nlmsg.decode_dump(buf, len(buf), 5, out)
    assert chunk.done and chunk.interrupted and len(out) == 1
    assert out[0].mark == 100

    err = _msg(nlmsg.NLMSG_ERROR, 0, 5, struct.pack("=i", -1) + b"\0" * 16)
    with pytest.raises(ConntrackError, match="EPERM"):
        nlmsg.decode_dump(err, len(err), 5, [])


def test_truncated_message_is_an_error() -> None:
    bad = struct.pack("=IHHII", 400, nlmsg.IPCTNL_MSG_CT_NEW, 0, 5, 0) + b"\0" * 8
    with pytest.raises(ConntrackError, match="truncated"):
        nlmsg.decode_dump(bad, len(bad), 5, [])


def test_iter_acks() -> None:
    buf = (_msg(nlmsg.NLMSG_ERROR, 0, 3, struct.pack("=i", -17) + b"\0" * 16)
           + _msg(nlmsg.NLMSG_ERROR, 0, 4, struct.pack("=i", 0) + b"\0" * 16))
    assert list(nlmsg.iter_acks(buf, len(buf))) == [(3, 17), (4, 0)]


def test_dump_request_always_sends_mark_with_full_mask() -> None:
    req = nlmsg.dump_request(9, 0)
    assert struct.pack("!I", 0) in req and struct.pack("!I", 0xFFFFFFFF) in req
    assert req[16] == 0  # AF_UNSPEC: IPv4 and IPv6


# ------------------------------------------- learned layouts, common shapes

def _as_dump_message(e: Entry, seq: int = 1) -> bytes:
    """A create request re-typed as a dump reply: the layout a kernel dump uses for it."""
    req = nlmsg.create_request_general(e, e.mark or 100, seq, ack=False)
    return struct.pack("=IHHII", len(req), nlmsg.IPCTNL_MSG_CT_NEW, nlmsg.NLM_F_MULTI, seq, 0) + req[16:]


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


def test_learned_layout_decodes_like_the_attribute_walk() -> None:
    nlmsg._layouts.clear()
    for e in _variants():
        msg = _as_dump_message(e)
        walked = nlmsg.decode_entry(msg, 20, len(msg), msg[16])
        assert nlmsg.decode_message(msg, 0, len(msg)) == walked  # learns
        assert nlmsg.decode_message(msg, 0, len(msg)) == walked  # by the layout
    assert nlmsg._layouts, "no layout was learned"


def test_same_length_other_layout_is_not_misread() -> None:
    # Two messages of one length and family whose attributes differ: the second
    # must not be read with the first one's layout.
    nlmsg._layouts.clear()
    tcp = codec.parse_line(example_lines()[0])
    a = _as_dump_message(dataclasses.replace(tcp, zone=None, timeout=100, mark=100))
    body = bytearray(a)
    # Swap the CTA_TIMEOUT and CTA_MARK attributes: same sizes, other order.
    t_at = body.index(struct.pack("=HH", 8, nlmsg.CTA_TIMEOUT) + struct.pack("!I", 100))
    m_at = body.index(struct.pack("=HH", 8, nlmsg.CTA_MARK) + struct.pack("!I", 100))
    body[t_at:t_at + 8], body[m_at:m_at + 8] = body[m_at:m_at + 8], body[t_at:t_at + 8]
    body[t_at + 4:t_at + 8] = struct.pack("!I", 200)  # now the mark, and a different one
    b = bytes(body)
    assert len(a) == len(b)
    nlmsg.decode_message(a, 0, len(a))
    got = nlmsg.decode_message(b, 0, len(b))
    assert got == nlmsg.decode_entry(b, 20, len(b), b[16])
    assert got.mark == 200 and got.timeout == 100


def test_layouts_stay_bounded() -> None:
    nlmsg._layouts.clear()
    e = codec.parse_line(example_lines()[0])
    for length in range(nlmsg.MAX_LAYOUTS + 50):
        msg = _as_dump_message(dataclasses.replace(e, labels=bytes(4 * (length % 40 + 1))))
        pad = struct.pack("=HH", 4 + 4 * (length // 40 + 1), 30) + bytes(4 * (length // 40 + 1))
        msg = struct.pack("=I", len(msg) + len(pad)) + msg[4:] + pad
        nlmsg.decode_message(msg, 0, len(msg))
    assert len(nlmsg._layouts) <= nlmsg.MAX_LAYOUTS
    assert all(len(v) <= nlmsg.MAX_LAYOUTS_PER_KEY for v in nlmsg._layouts.values())


def test_common_shape_builds_the_same_bytes_as_the_general_path() -> None:
    fast = 0
    for i, e in enumerate(_variants()):
        for ack in (False, True):
            assert nlmsg.create_request(e, 100, i, ack) == nlmsg.create_request_general(e, 100, i, ack), e
        fast += nlmsg._create_common(e, 100, i, False) is not None
    assert fast > 200  # the common shape is the common case
