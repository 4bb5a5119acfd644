"""Load's create requests straight from compact records: the same bytes as through entries."""

from __future__ import annotations

import dataclasses
import random
import re
import struct
from collections.abc import Iterator

import pytest

from pvevmstate import netlink, payload
from pvevmstate.model import (
    AF_INET,
    AF_INET6,
    IPS_ASSURED,
    IPS_DST_NAT_DONE,
    IPS_EXPECTED,
    IPS_SEEN_REPLY,
    IPS_SRC_NAT_DONE,
    PROTO_TCP,
    CreateBatch,
    Entry,
)
from pvevmstate.payload import compact, creates
from pvevmstate.payload import savetext as codec
from tests.corpus import _entry_from_json, _golden, _variants, entry_kinds, raw_record, records
from tests.support import example_lines, realistic_lines

MARK = 100


@pytest.fixture(autouse=True)
def no_shapes() -> Iterator[None]:
    # Start from no plans: what earlier tests made must not hide a shape's first use.
    creates.forget()
    yield
    creates.forget()


def corpus() -> list[Entry]:
    """Every kind of entry the other codec tests use, and then some a record carries differently."""
    entries = [codec.parse_line(ln) for ln in example_lines() + realistic_lines(2000, seed=11)]
    entries += _variants() + entry_kinds()
    entries += [_entry_from_json(c["entry"]) for c in _golden()["requests"]]
    r = dataclasses.replace
    for i, e in enumerate(list(entries)):
        if i % 13 == 0:
            entries.append(r(e, status=(e.status or 0) | IPS_EXPECTED))  # refused, from a fast shape too
        if i % 17 == 0 and e.sport is not None and e.dport is not None:
            # NAT of addresses and ports, as a dump has them.
            entries.append(r(e, reply_src=e.orig_src, reply_dst=e.orig_dst, reply_sport=e.sport,
                             reply_dport=(e.dport + 1) & 0xFFFF,
                             status=(e.status or 0) | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE))
        if i % 19 == 0:
            entries.append(r(e, tcp_flags_orig=0x23, tcp_flags_reply=0x2B, tcp_wscale_orig=7))
        if i % 23 == 0 and e.status is None:
            entries.append(r(e, state=8))
    return entries


def reply_differs(e: Entry) -> bool:
    return (e.reply_src != e.orig_dst or e.reply_dst != e.orig_src
            or e.reply_sport != e.dport or e.reply_dport != e.sport)


def check(data: bytes, positions: list[int] | None = None) -> CreateBatch:
    """The batch of ``data``'s records holds create_request() of each of their
    entries, in any order, numbered; refusals included."""
    by_entry = payload.Incoming(data, MARK)
    direct = payload.Incoming(data, MARK)
    assert by_entry.format in (payload.Format.COMPACT, payload.Format.HYBRID)
    order = list(range(direct.size)) if positions is None else positions
    batch = direct.batch(order, lambda n: 1000)
    entries = by_entry.entries(order)
    assert (direct.refusals.refused, direct.refusals.samples) == (by_entry.refusals.refused, by_entry.refusals.samples)
    assert len(batch) == len(entries) and batch.mark == MARK and batch.first_seq == 1000
    got = batch.requests()
    # Numbered in the batch's order; none asks for an ACK yet (the adapter decides as it sends).
    headers = [struct.unpack_from("=IHHII", r) for r in got]
    assert [h[3] for h in headers] == list(range(1000, 1000 + len(got)))
    unacked = netlink.create_request(Entry(AF_INET, 0, b"", b"", b"", b""), 0, 0, False)
    type_and_flags = struct.unpack_from("=HH", unacked, 4)
    assert all(h[0] == len(r) and h[1:3] == type_and_flags and h[4] == 0 for h, r in zip(headers, got, strict=True))
    # The requests of the entries, each once: byte for byte, in any order.
    bodies = [netlink.create_request(e, MARK, 0, False)[16:] for e in entries]
    assert sorted(r[16:] for r in got) == sorted(bodies)
    # Every entry a create looks at again is kept, by its request's index.
    for k, e in batch.entries.items():
        assert got[k][16:] == netlink.create_request(e, MARK, 0, False)[16:], (k, e)
    kept = list(batch.entries.values())
    for e in entries:
        if e.labels or reply_differs(e):
            kept.remove(e)  # (raises if it is not kept)
    return batch


def test_records_become_the_requests_of_their_entries() -> None:
    entries = corpus()
    assert len(entries) > 4000
    data = compact.encode(entries)
    batch = check(data)
    # Most go without an entry, and the fast shapes are more than TCP/UDP.
    assert len(batch) - len(batch.entries) > 0.7 * len(batch)
    planned = [k for k, v in creates.plans().items() if v is not None]
    assert {k[0] >> 8 for k in planned} >= {1, 6, 17, 33, 47, 58, 132}


def test_in_priority_order_and_from_a_hybrid_payload() -> None:
    entries = [codec.parse_line(ln) for ln in realistic_lines(3000, seed=5)]
    out = payload.encode(entries, MARK)
    assert out.format == payload.Format.HYBRID
    incoming = payload.Incoming(out.data, MARK)
    batch = check(out.data, incoming.by_priority())
    assert not batch.entries  # a typical table: every record straight to its request


def test_refused_records_are_refused_with_the_same_reasons() -> None:
    good = raw_record()
    expected_tcp = compact.RECORD.pack(*compact.RECORD.unpack(
        compact.records([codec.parse_line(example_lines()[0])])[0])[:18], IPS_EXPECTED | IPS_ASSURED,
        *compact.RECORD.unpack(compact.records([codec.parse_line(example_lines()[0])])[0])[19:])
    data = records(good, raw_record(family=7), good, raw_record(present=1 << 27), raw_record(status=IPS_EXPECTED),
                   expected_tcp, good)
    incoming = payload.Incoming(data, MARK)
    batch = incoming.batch(range(incoming.size), lambda n: 1)
    assert len(batch) == 3
    assert [(s.line_no, s.reason.split(" ")[0]) for s in incoming.refusals.samples] == [
        (2, "unknown"), (4, "unknown"), (5, "EXPECTED"), (6, "EXPECTED")]
    # Shapes no kernel takes are not remembered: they leave the room (MAX_SHAPES) to real ones.
    assert creates.plans() and all(k[0] & 0xFF in (AF_INET, AF_INET6) and not k[1] & ~compact.KNOWN
                                   for k in creates.plans())
    check(data)


def test_many_shapes_past_the_bound_still_build_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(creates, "MAX_SHAPES", 3)
    entries = corpus()[:3000]
    check(compact.encode(entries))
    assert len(creates.plans()) == 3


def test_a_shape_is_built_from_the_table_not_by_hand() -> None:
    base = Entry(AF_INET, PROTO_TCP, bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2)), bytes((10, 0, 0, 2)),
                 bytes((10, 0, 0, 1)), 1000, 443, 443, 1000, timeout=600, status=IPS_SEEN_REPLY, state=3)
    (record,) = compact.records([base])
    present = compact.RECORD.unpack(record)[2]
    plan = creates.plan_of(AF_INET, PROTO_TCP, present)
    assert plan is not None and plan.expected_at is not None
    assert plan.size == len(plan.template) == len(netlink.create_request(base, MARK, 0, False))
    # Addresses and ports copied, the status and the TCP flags (from the state) through tables.
    assert len(plan.copies) >= 4 * 4 + 4 * 2 and len(plan.mapped) >= 2
    # A shape that may carry NAT has no plan: its Entry decides.
    nat = dataclasses.replace(base, reply_dport=2000, status=IPS_SEEN_REPLY | IPS_SRC_NAT_DONE)
    present = compact.RECORD.unpack(compact.records([nat])[0])[2]
    assert creates.plan_of(AF_INET, PROTO_TCP, present) is None


def test_random_records_never_differ() -> None:
    # Arbitrary field values within each record's shape, and arbitrary present bits.
    rnd = random.Random(13)
    entries = corpus()
    recs = []
    # Each field's width: numbers take any value of it (the status' upper bytes included).
    widths = [struct.calcsize("<" + m.group(0)) for m in re.finditer(r"\d*[a-zA-Z]", compact.RECORD.format[1:])]
    for rec in compact.records(rnd.sample(entries, 1500)):
        values = list(compact.RECORD.unpack(rec))
        for n in rnd.sample(range(7, compact.RECORD_FIELDS - 1), 4):
            values[n] = rnd.randrange(1 << 8 * widths[n]) if isinstance(values[n], int) else values[n]
        if rnd.random() < 0.2:
            values[2] ^= 1 << rnd.randrange(32)
        recs.append(compact.RECORD.pack(*values))
    data = records(*recs)
    batch = check(data)
    assert 0 < len(recs) - len(batch) < len(recs) // 2  # some are refused, which check() compares too


def test_a_text_payload_batch_is_its_entries() -> None:
    lines = realistic_lines(200, seed=2)
    data = "".join("%s --mark %d\n" % (ln, MARK) for ln in lines).encode()
    incoming = payload.Incoming(data, MARK)
    batch = incoming.batch(range(incoming.size), lambda n: 1)
    entries = [codec.parse_line(ln) for ln in lines]
    assert batch.bodies == [netlink.create_request(e, MARK, 0, False)[16:] for e in entries]
