"""The save-text codec: every example line round-trips, bad lines are refused."""

from __future__ import annotations

import bisect
import itertools
import random

import pytest

from pvevmstate.errors import CodecError
from pvevmstate.model import IPS_SRC_NAT_DONE, PROTO_DCCP, PROTO_ICMP, Entry
from pvevmstate.payload import MAX_PAYLOAD, NO_STATE
from pvevmstate.payload import savetext as codec
from tests.support import example_lines


def test_examples_present() -> None:
    assert len(example_lines()) == 38


@pytest.mark.parametrize("line", example_lines())
def test_example_round_trip(line: str) -> None:
    assert codec.render_line(codec.parse_line(line)) == line


def test_perl_suffix_and_mark() -> None:
    line = example_lines()[0] + " --mark 100"
    e = codec.parse_line(line, mark=100)
    assert e.mark == 100
    with pytest.raises(CodecError, match="not this VM's mark"):
        codec.parse_line(line, mark=101)


def test_icmp_reply_type_derived() -> None:
    e = codec.parse_line("-A -t 1 -s 10.0.0.1 -d 10.0.0.2 -r 10.0.0.2 -q 10.0.0.1 "
                         "-p icmp --icmp-type 13 --icmp-code 0 --icmp-id 7")
    assert (e.proto, e.reply_icmp_type, e.reply_icmp_code, e.reply_icmp_id) == (PROTO_ICMP, 14, 0, 7)


def test_snat_line_sets_nat_status() -> None:
    e = codec.parse_line("-A -t 5 -u ASSURED -s 192.168.10.2 -d 192.0.2.1 -r 192.0.2.1 "
                         "-n 203.0.113.5 -p udp --sport 1 --dport 2")
    assert e.status is not None and e.status & IPS_SRC_NAT_DONE
    assert (e.reply_sport, e.reply_dport) == (2, 1)  # inverted, as conntrack does


def test_sctp_vtag_is_byte_swapped() -> None:
    # conntrack(8) prints the vtag byte-swapped: text 12345 is the be32 attribute value 0x39300000.
    line = next(ln for ln in example_lines() if "--orig-vtag 12345" in ln)
    assert codec.parse_line(line).vtag_orig == 0x39300000


BARE_DCCP = "-A -t 299 -u SEEN_REPLY -s 10.0.0.1 -d 10.0.0.2 -r 10.0.0.2 -q 10.0.0.1 -p dccp"


def test_bare_dccp_line_is_a_portless_entry() -> None:
    # What conntrack(8) prints for DCCP under the generic tracker (Linux >= 6.16).
    e = codec.parse_line(BARE_DCCP + " --mark 100", mark=100)
    assert (e.proto, e.sport, e.dport, e.reply_sport, e.reply_dport, e.state, e.dccp_role) == \
        (PROTO_DCCP, None, None, None, None, None, None)
    # Save writes it in the form conntrack --load-file takes, which reads back the same way
    # on such a kernel (ports 0 and a state the generic tracker ignores).
    line = codec.render_line(e)
    assert line == BARE_DCCP + codec.DCCP_PORTLESS and codec.text_problem(e) is None
    assert codec.render_line(codec.parse_line(line)) == line


@pytest.mark.parametrize("partial", ["--sport 1 --dport 2", "--state OPEN --role client"])
def test_partial_dccp_lines_are_still_refused(partial: str) -> None:
    with pytest.raises(CodecError, match=r"needs --|missing --"):
        codec.parse_line(BARE_DCCP + " " + partial)


BAD = [
    ("-D -s 1.2.3.4 -d 1.2.3.5 -p tcp", "only create lines"),
    ("-F", "only create lines"),
    ("-U -t 5 -s 1.2.3.4 -d 1.2.3.5 -p tcp", "only create lines"),
    ("hello", "does not start with -A"),
    ("-A -t 5 -s 1.1.1.1 -d 2.2.2.2 -r 2.2.2.2 -q 1.1.1.1", "missing -p"),
    ("-A -s 1.1.1.1 -d 2.2.2.2 -r 2.2.2.2 -q 1.1.1.1 -p 50", "missing -t"),
    ("-A -t 5 -s 1.1.1.1 -d 2.2.2.2 -r 2.2.2.2 -q 1.1.1.1 -p tcp --sport 1 --dport 2", "needs --state|missing --state"),
    ("-A -t 5 -s 1.1.1.1 -d 2.2.2.2 -r 2.2.2.2 -q 1.1.1.1 -p udp --sport 1 --dport 70000", "out of range"),
    ("-A -t 5 -s 1.1.1.300 -d 2.2.2.2 -r 2.2.2.2 -q 1.1.1.1 -p 50", "not an IPv4 or IPv6"),
    ("-A -t 5 -s 1.1.1.1 -d ::2 -r ::2 -q 1.1.1.1 -p 50", "both IPv4 and IPv6"),
    ("-A -t 5 -t 6 -s 1.1.1.1 -d 2.2.2.2 -r 2.2.2.2 -q 1.1.1.1 -p 50", "given twice"),
    ("-A -t 5 -s 1.1.1.1 -d 2.2.2.2 -r 2.2.2.2 -q 1.1.1.1 -p 50 -F", "second command"),
    ("-A -t 5 -s 1.1.1.1 -d 2.2.2.2 -r 2.2.2.2 -q 1.1.1.1 -p 50 --zap 1", "unknown option"),
    ("-A -t 5 -s 1.1.1.1 -d 2.2.2.2 -r 2.2.2.2 -q 1.1.1.1 -p udp --sport 1 --dport 2 --state X",
     "not valid with -p udp"),
    ("-A -t 5 -u ASSURED,BOGUS -s 1.1.1.1 -d 2.2.2.2 -r 2.2.2.2 -q 1.1.1.1 -p 50", "unknown status"),
    ("-A -t 99999999999 -s 1.1.1.1 -d 2.2.2.2 -r 2.2.2.2 -q 1.1.1.1 -p 50", "not a decimal|out of range"),
    ("-A -t -5 -s 1.1.1.1 -d 2.2.2.2 -r 2.2.2.2 -q 1.1.1.1 -p 50", "not a decimal"),
    ("-A -t 5 -u UNSET -s 192.0.2.1 -d 192.0.2.139 -r 192.0.2.139 -q 192.0.2.1 -p sctp --sport 7 --dport 7 "
     "--reply-port-src 7 --reply-port-dst 7 --state (null) --orig-vtag 1 --reply-vtag 2", "unknown value"),
    ("-A -t 5 -s 1.1.1.1 -d 2.2.2.2 -r 2.2.2.2 -q 1.1.1.1 -p icmp --icmp-type 3 --icmp-code 0", "cannot be created"),
    ("-A -t 5 -s ::1 -d ::2 -r ::2 -q ::1 -p icmp --icmp-type 8 --icmp-code 0", "with IPv6 addresses"),
    ("-A -t 5 -s 1.1.1.1 -d 2.2.2.2 -r 2.2.2.2 -g 2.2.2.3 -q 1.1.1.1 -p 50", "-r and -g"),
    ("-A -t 5 -w 1 --orig-zone 2 -s 1.1.1.1 -d 2.2.2.2 -r 2.2.2.2 -q 1.1.1.1 -p 50", "directional zone"),
    ("-A -t 5 -s 1.1.1.1 -d 2.2.2.2 -r 2.2.2.2 -q 1.1.1.1 -p", "needs a value"),
    ("-A -t 5 -s 1.1.1.1 -d 2.2.2.2 -r 2.2.2.2 -p 50", "missing -q/-n"),
]


@pytest.mark.parametrize(("line", "reason"), BAD)
def test_bad_lines_refused_with_reason(line: str, reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        codec.parse_line(line, mark=100)


def _entry(i: int) -> Entry:
    return codec.parse_line(
        "-A -t 431999 -u SEEN_REPLY,ASSURED -s 10.0.%d.%d -d 192.0.2.1 -r 192.0.2.1 -q 10.0.%d.%d "
        "-p tcp --sport %d --dport 443 --reply-port-src 443 --reply-port-dst %d --state ESTABLISHED"
        % (i // 250, i % 250, i // 250, i % 250, 1024 + i % 60000, 1024 + i % 60000))


def test_encode_text_has_suffix_and_newlines() -> None:
    p = codec.encode_text([_entry(1), _entry(2)], 100)
    lines = p.data.decode().split("\n")
    assert lines[-1] == "" and len(lines) == 3
    assert all(ln.endswith(" --mark 100") for ln in lines[:2])
    assert (p.sent, p.left_out) == (2, 0)


def test_encode_text_empty_is_one_nul_byte() -> None:
    assert codec.encode_text([], 100) == codec.TextPayload(b"\x00", 0, 0)


@pytest.mark.parametrize("limit", [1, 100, 1000, 4096, MAX_PAYLOAD])
def test_encode_text_never_exceeds_limit(limit: int) -> None:
    entries = [_entry(i) for i in range(6000)]
    p = codec.encode_text(entries, 123456789, limit)
    assert 1 <= len(p.data) <= limit
    assert p.sent + p.left_out == len(entries)
    if p.sent:
        # counting every byte, including the suffix and newline
        assert len(p.data) == sum(len(ln) + 1 for ln in p.data.decode().splitlines())


def test_fit_is_the_longest_run_of_whole_lines_within_the_limit() -> None:
    # fit() cuts with searches over the bytes; the reference is a running total.
    rnd = random.Random(5)
    rendered = [codec.render_line(_entry(i)) + "x" * rnd.randrange(0, 40) for i in range(300)]
    lines = codec.join_lines(rendered, 100)
    sizes = list(itertools.accumulate(len(ln) + len(" --mark 100\n") for ln in rendered))
    assert lines.count == 300 and len(lines.data) == sizes[-1]
    limits = [0, 1, sizes[0] - 1, sizes[0], sizes[0] + 1, sizes[-1] - 1, sizes[-1], sizes[-1] + 7]
    limits += [s + d for s in rnd.sample(sizes, 40) for d in (-1, 0, 1)]
    for limit in limits:
        n = bisect.bisect_right(sizes, limit)
        assert codec.fit(lines, limit) == ((sizes[n - 1] if n else 0), n), limit
        text = codec.cut(lines, limit)
        assert (text.sent, text.left_out) == (n, 300 - n)
        assert text.data == (lines.data[:sizes[n - 1]] if n else NO_STATE)


def test_join_rests_is_join_lines() -> None:
    entries = [_entry(i) for i in range(50)]
    rests = [codec.render_rest(e).encode("ascii") for e in entries]
    assert codec.join_rests([e.timeout or 0 for e in entries], rests, 7) == codec.join_lines(
        map(codec.render_line, entries), 7)


def test_decode_payload_nothing() -> None:
    for data in (b"", b"\x00", b"\n", b"x"):
        d = codec.decode_payload(data, 100)
        assert (d.entries, d.refused) == ([], 0)


def test_decode_payload_refuses_line_by_line() -> None:
    good = example_lines()[0] + " --mark 100"
    data = "\n".join([good, "-F", good.replace("--mark 100", "--mark 7"), "# comment", "", good,
                      "-A \x01", "-D " + good[3:]]).encode() + b"\n\xff\xfe\n"
    d = codec.decode_payload(data, 100)
    assert len(d.entries) == 2
    assert d.refused == 5
    reasons = " | ".join(r.reason for r in d.samples)
    assert "only create lines" in reasons and "not this VM's mark" in reasons
    assert "control characters" in reasons and "not ASCII" in reasons
