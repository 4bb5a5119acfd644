"""Save's cache key: the bytes it leaves out never change what Save sends.

Every byte of every message of the golden file (real kernel dump datagrams,
and create requests for several hundred kinds of entry re-typed as dump
replies) is flipped in turn. A flip the key does not see must leave the
decoded entry as it was, or change only its timeout, which Save reads fresh
from the message at the layout's offset.
"""

from __future__ import annotations

import dataclasses
import struct

import pytest

from pvevmstate import netlink, payload, savecache
from pvevmstate.errors import ConntrackError
from pvevmstate.model import PROTO_TCP, Entry
from pvevmstate.payload import compact, savetext
from pvevmstate.payload.sendable import EntryList
from tests.corpus import _as_dump_message, _golden, _messages
from tests.support import realistic_lines


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


def _datagram(entries: list[Entry], seq: int = 1) -> bytes:
    """Dump replies of ``entries`` (as the kernel sends them, mark 100), end to end."""
    out = b""
    for body in netlink.create_batch(entries, 100).bodies:
        msg = struct.pack("=IHHII", 16 + len(body), netlink.IPCTNL_MSG_CT_NEW, netlink.NLM_F_MULTI, seq, 0) + body
        out += msg + bytes(-len(msg) % 4)
    return out


@pytest.mark.parametrize("cached", [True, False])
def test_save_lines_leave_out_what_conntrack_cannot_load(cached: bool) -> None:
    # An entry conntrack(8) refuses (here: TCP without a state) is left out
    # of the save lines whether its rest came from the cache (the table
    # unchanged) or was made by Save's scan (a new entry, a miss).
    ok = [savetext.parse_line(ln, 100) for ln in realistic_lines(60, seed=3, min_timeout=900)]
    bad = dataclasses.replace(next(e for e in ok if e.proto == PROTO_TCP), state=None)
    assert savetext.text_problem(bad)
    after = [*ok[:30], bad, *ok[30:]]
    before = after if cached else ok
    layouts = netlink.LayoutCache()
    background = savecache.Scan(savecache.EMPTY, layouts, collect=True)
    buf = _datagram(before)
    background.feed(buf, len(buf), 1)
    pieces = background.pieces()
    assert pieces.records.unloadable == cached
    save = savecache.Scan(pieces, layouts)
    buf = _datagram(after)
    save.feed(buf, len(buf), 1)
    assert save.hits == len(after) - (not cached)
    decoded = [netlink.decode_entry(buf, off + 20, off + mlen, buf[off + 16]) for off, mlen in _messages(buf)]
    positions = list(range(len(save)))[::-1]
    assert save.lines(positions, 100) == EntryList(decoded).lines(positions, 100)
    assert save.lines(positions, 100).count == len(after) - 1


@pytest.mark.parametrize("ahead", [True, False])
@pytest.mark.parametrize("change", ["none", "gone", "swapped"])
def test_entries_out_of_their_slots_are_sent_as_found(change: str, ahead: bool) -> None:
    # Save takes the cache's compressed columns and its save line rests by
    # position only while every entry is in the slot of its own place. An
    # entry gone or two swapped within a datagram move the others out of
    # place without a miss: the payload must still be what the dump holds.
    entries = [savetext.parse_line(ln, 100) for ln in realistic_lines(300, seed=17, min_timeout=900)]
    layouts = netlink.LayoutCache()
    background = savecache.Scan(savecache.EMPTY, layouts, collect=True)
    buf = _datagram(entries)
    background.feed(buf, len(buf), 1)
    pieces = background.pieces()
    after = list(entries)
    if change == "gone":
        del after[250]
    elif change == "swapped":
        after[220], after[221] = after[221], after[220]
    save = savecache.Scan(pieces, layouts, ahead=ahead)
    decoded = []
    for at in range(0, len(after), 100):  # three datagrams, the last one changed
        buf = _datagram(after[at:at + 100])
        save.feed(buf, len(buf), 1)
        decoded += [netlink.decode_entry(buf, off + 20, off + mlen, buf[off + 16]) for off, mlen in _messages(buf)]
    assert save.hits == len(after)
    assert (save.ready_segments() is pieces.segments) == (change == "none")
    for limit in (payload.MAX_PAYLOAD, 20_000):
        assert payload.encode_sendable(save, 100, limit).data == payload.encode(decoded, 100, limit).data


def test_no_priority_keys_are_made_past_what_a_compact_section_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    # Past MAX_RECORDS the save lines follow the section's own order: Save's
    # scan stops making keys during the dump, and the payload is the same.
    monkeypatch.setattr(compact, "MAX_RECORDS", 150)
    entries = [savetext.parse_line(ln, 100) for ln in realistic_lines(300, seed=19, min_timeout=900)]
    layouts = netlink.LayoutCache()
    background = savecache.Scan(savecache.EMPTY, layouts, collect=True)
    buf = _datagram(entries)
    background.feed(buf, len(buf), 1)
    save = savecache.Scan(background.pieces(), layouts, ahead=True)
    decoded = []
    for at in range(0, 300, 100):
        buf = _datagram(entries[at:at + 100])
        save.feed(buf, len(buf), 1)
        decoded += [netlink.decode_entry(buf, off + 20, off + mlen, buf[off + 16]) for off, mlen in _messages(buf)]
    assert save._keys_made is None
    assert payload.encode_sendable(save, 100).data == payload.encode(decoded, 100).data
