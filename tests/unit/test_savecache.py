"""Save's cache key: the bytes it leaves out never change what Save sends.

Every byte of every message of the golden file (real kernel dump datagrams,
and create requests for several hundred kinds of entry re-typed as dump
replies) is flipped in turn. A flip the key does not see must leave the
decoded entry as it was, or change only its timeout, which Save reads fresh
from the message at the layout's offset.
"""

from __future__ import annotations

import dataclasses

from pvevmstate import netlink, savecache
from pvevmstate.errors import ConntrackError
from pvevmstate.model import Entry
from tests.corpus import _as_dump_message, _golden, _messages


def _all_messages() -> list[bytes]:
    out = []
    for d in _golden()["dumps"]:
        buf = bytes.fromhex(d["datagram"])
        out += [buf[off:off + mlen] for off, mlen in _messages(buf)]
    out += [_as_dump_message(bytes.fromhex(c["bytes"])) for c in _golden()["requests"][::3]]
    return [m for m in out if len(m) > 20 and int.from_bytes(m[4:6], "little") == netlink.IPCTNL_MSG_CT_NEW]


def _decoded(msg: bytes) -> Entry | None:
    try:
        return netlink.decode_entry(msg, 20, len(msg), msg[16])
    except ConntrackError:
        return None


def test_bytes_the_key_leaves_out_change_nothing_but_the_timeout() -> None:
    layouts = netlink.LayoutCache()
    messages = _all_messages()
    assert len(messages) > 300
    unseen = checked = 0
    for msg in messages:
        layouts.decode_message(msg, 0, len(msg))
        lay = layouts.layout_of(msg, 0, len(msg))
        if lay is None:
            continue  # irregular: no layout, no key, never cached (Scan gives it a key no cache holds)
        checked += 1
        key = savecache.key_of(lay.stable(msg, 0))
        entry = _decoded(msg)
        assert entry is not None
        if lay.timeout_at >= 0:
            assert int.from_bytes(msg[lay.timeout_at:lay.timeout_at + 4], "big") == entry.timeout
        for pos in range(16, len(msg)):
            flipped = bytearray(msg)
            flipped[pos] ^= 0x5A
            if savecache.key_of(lay.stable(bytes(flipped), 0)) != key:
                continue
            unseen += 1
            got = _decoded(bytes(flipped))
            assert got is not None, (pos, msg.hex())
            if lay.timeout_at <= pos < lay.timeout_at + 4:
                assert got.timeout != entry.timeout
                assert dataclasses.replace(got, timeout=entry.timeout) == entry
            else:
                assert got == entry, (pos, msg.hex())
    assert checked > 300
    assert unseen > checked * 4  # at least the timeouts were left out


def test_a_generation_holds_what_its_dump_found() -> None:
    for d in _golden()["dumps"]:
        buf = bytes.fromhex(d["datagram"])
        layouts = netlink.LayoutCache()
        first = savecache.Scan(savecache.EMPTY, layouts, collect=True)
        first.feed(buf, len(buf), d["seq"])
        pieces = first.pieces()
        again = savecache.Scan(pieces, layouts)
        again.feed(buf, len(buf), d["seq"])
        assert again.hits == len(again) + again.expected == len(pieces) > 0
        assert again.raw() == first.raw()
        assert again.lines(range(len(again)), 100) == first.lines(range(len(first)), 100)
