"""The hybrid payload (what ``auto`` sends): compact records in comment lines,
then save lines; what each kind of destination can read of it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pvevmstate import payload
from pvevmstate.errors import CodecError
from pvevmstate.model import Entry
from pvevmstate.payload import hybrid, priority, savetext
from tests.support import realistic_lines

MARK = 100


def table(n: int, seed: int = 5) -> list[Entry]:
    return [savetext.parse_line(ln) for ln in realistic_lines(n, seed=seed, min_timeout=900)]


def sections(data: bytes) -> tuple[list[bytes], list[str]]:
    lines = data.split(b"\n")
    assert lines[-1] == b""
    comments = [ln for ln in lines[:-1] if ln.startswith(b"#")]
    text = [ln.decode("ascii") for ln in lines[:-1] if not ln.startswith(b"#")]
    return comments, text


@pytest.mark.parametrize("n", [1, 1000, 6000, 50_000])
def test_every_destination_can_read_it(n: int) -> None:
    entries = table(n)
    out = payload.encode(entries, MARK)
    assert out.format == payload.Format.HYBRID and 1 <= len(out.data) <= payload.MAX_PAYLOAD
    # A Perl destination: 7-bit bytes only (its pack('c*') warns for each one
    # above 127), comment lines far below conntrack's ~8 KiB, then save lines.
    assert max(out.data) < 128
    comments, text = sections(out.data)
    assert comments[0].startswith(b"#PVCT-HYBRID 1 %d " % out.sent)
    assert max(map(len, comments)) <= hybrid.LINE + 1
    assert out.data.index(b"\n-A ") > out.data.rindex(b"\n#") if text else True
    assert len(text) == out.text_sent
    parsed = [savetext.parse_line(ln, MARK) for ln in text]
    assert all(ln.endswith(" --mark %d" % MARK) for ln in text)
    # This helper: the compact section, every field of every entry sent.
    decoded = payload.decode(out.data, MARK)
    assert decoded.refused == 0 and decoded.entries == entries[:out.sent] == entries
    # The save lines are the most important entries.
    ordered = priority.by_priority(entries)
    assert [savetext.render_line(e) for e in parsed] == [savetext.render_line(e) for e in ordered[:len(text)]]


def test_capacity_for_both_kinds_of_destination() -> None:
    out = payload.encode(table(6000), MARK)
    assert out.sent == 6000 and out.text_sent >= 4500
    out = payload.encode(table(50_000), MARK)
    assert out.sent == 50_000 and out.text_sent > 0


def test_above_capacity_the_most_important_are_carried() -> None:
    entries = table(90_000, seed=6)
    out = payload.encode(entries, MARK)
    assert 0 < out.sent < 90_000 and len(out.data) <= payload.MAX_PAYLOAD
    assert sum(out.left_out.values()) == 90_000 - out.sent
    got = payload.decode(out.data, MARK).entries
    assert got == priority.by_priority(entries)[:out.sent]


def test_a_corrupt_compact_section_falls_back_to_the_save_lines() -> None:
    entries = table(300)
    data = bytearray(payload.encode(entries, MARK).data)
    at = data.index(b"\n#") + 10
    data[at] = ord("A") if data[at] != ord("A") else ord("B")
    decoded = payload.decode(bytes(data), MARK)
    assert decoded.refused == 1 and "checksum" in decoded.samples[0].reason
    assert "reading its save lines instead" in decoded.samples[0].reason
    assert len(decoded.entries) == 300  # every entry was also a save line


@pytest.mark.parametrize("damage", [
    lambda d: d.replace(b"#PVCT-HYBRID 1 ", b"#PVCT-HYBRID 9 ", 1),
    lambda d: d[:d.index(b"\n#") + 500],
    lambda d: d.replace(b"\n#", b"\n", 2),
])
def test_unarmor_refuses_damage(damage: Callable[[bytes], bytes]) -> None:
    data = payload.encode(table(2000), MARK).data
    with pytest.raises(CodecError):
        hybrid.unarmor(damage(data))


def test_armored_size_is_exact_and_budget_fits() -> None:
    for size in (0, 1, 2, 3, 764, 765, 766, 10_000, 700_000):
        blob = bytes(range(256)) * (size // 256) + bytes(size % 256)
        section = hybrid.armor(blob, 7)
        assert len(section) <= hybrid.armored_size(size) <= len(section) + hybrid.MAX_HEADER
        assert hybrid.unarmor(section + b"-A rest\n") == blob
    for limit in (100, 5000, payload.MAX_PAYLOAD):
        budget = hybrid.binary_budget(limit)
        assert hybrid.armored_size(budget) <= limit < hybrid.armored_size(budget + 1)


def test_text_and_compact_choices_are_unchanged() -> None:
    entries = table(500)
    text = payload.encode(entries, MARK, fmt=payload.Choice.TEXT)
    assert text.format == payload.Format.TEXT and not text.data.startswith(b"#")
    assert len(sections(text.data)[1]) == 500
    binary = payload.encode(entries, MARK, fmt=payload.Choice.COMPACT)
    assert binary.format == payload.Format.COMPACT and binary.data.startswith(b"PVCT")


@pytest.mark.parametrize("k", [0, 1, 17, 4096, 6000, 7000])
def test_first_k_is_the_head_of_the_priority_order(k: int) -> None:
    entries = table(6000, seed=9)
    assert priority.first(entries, k) == priority.by_priority(entries)[:k]


def test_save_lines_fill_the_room_when_the_most_important_cannot_be_lines() -> None:
    # The most important entries carry two zones, which no save line can
    # express (conntrack(8) refuses it): the save lines must come from the
    # others and still fill what the compact section leaves.
    import dataclasses

    # More of them than lines could ever fit, so the first candidates are all
    # of them and the others must be found beyond.
    top = [dataclasses.replace(e, orig_zone=1, reply_zone=2, timeout=(e.timeout or 0) + 10**6)
           for e in table(10_000, seed=10)]
    assert savetext.text_problem(top[0]) is not None
    entries = top + table(6000, seed=11)
    out = payload.encode(entries, MARK)
    assert out.sent == len(entries)
    lines = sections(out.data)[1]
    assert len(lines) == out.text_sent > 3000  # the room is full of the others' lines
    assert len(out.data) + 400 > payload.MAX_PAYLOAD
