"""Hostile payloads: Load never raises, is bounded in time, and never touches an
entry outside the VM's own mark.

In-process against a real conntrack table in a throw-away namespace (what a D-Bus
Load runs, minus the bus, whose error boundary tests/dbus covers), with entries
of other marks in it; conntrack(8) reads the table before and after.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import struct
import time
import zlib
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvevmstate import vmstate
from pvevmstate.netlink.conntrack import Conntrack
from pvevmstate.payload import MAX_PAYLOAD, compact
from pvevmstate.payload.savetext import parse_line
from tests.support import Netns, NetnsFactory, example_lines, realistic_lines

VMID = 100
FOREIGN_MARKS = (0, 101, 200)
#: No payload, however crafted, may keep Load busy longer than this.
MAX_LOAD_SECONDS = 5.0
#: The fuzz run's size; CI runs at least 100,000.
FUZZ_PAYLOADS = int(os.environ.get("FUZZ_PAYLOADS", "100000"))


class Table:
    """A namespace with entries of other marks, and the VM's Load working on it in-process."""

    def __init__(self, ns: Netns) -> None:
        from pyroute2 import netns
        self.ns = ns
        for i, mark in enumerate(FOREIGN_MARKS):
            ns.load(realistic_lines(40, seed=100 + i, min_timeout=3600), mark=mark)
        self.before = self.foreign()
        netns.pushns(ns.name)
        try:
            self.conntrack = Conntrack()
        finally:
            netns.popns()
        self.vm = vmstate.VMState(VMID, self.conntrack)
        self.loop = asyncio.new_event_loop()

    def foreign(self) -> dict[int, dict[str, int]]:
        """Per foreign mark: each entry (timeout left out) with its timeout."""
        out: dict[int, dict[str, int]] = {}
        for mark in FOREIGN_MARKS:
            out[mark] = {}
            for line in self.ns.save_lines(mark=mark):
                m = re.search(r" -t (\d+)", line)
                assert m is not None
                out[mark][line.replace(m.group(0), "")] = int(m.group(1))
        return out

    def load(self, data: bytes) -> float:
        """One Load; returns its time in seconds. Must not raise."""
        t0 = time.perf_counter()
        self.loop.run_until_complete(self.vm.load(data))
        return time.perf_counter() - t0

    def assert_foreign_untouched(self) -> None:
        after = self.foreign()
        for mark in FOREIGN_MARKS:
            assert after[mark].keys() == self.before[mark].keys(), "entries of mark %d changed" % mark
            raised = [k for k, t in after[mark].items() if t > self.before[mark][k]]
            assert not raised, "entries of mark %d were updated: %s" % (mark, raised[:3])

    def close(self) -> None:
        self.loop.close()
        self.conntrack.close()


@pytest.fixture
def table(netns_factory: NetnsFactory) -> Iterator[Table]:
    # Thousands of refusals would otherwise fill the captured log.
    logger = logging.getLogger("pvevmstate")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    t = Table(netns_factory())
    try:
        yield t
    finally:
        t.close()
        logger.setLevel(level)


# ------------------------------------------------------------ the material

_FOREIGN = realistic_lines(40, seed=100, min_timeout=3600)  # the mark-0 entries, tuples exist
_GOOD = example_lines() + realistic_lines(200, seed=5)
_OPTIONS = ["-A", "-I", "-D", "-F", "-U", "-E", "-L", "--flush", "--delete", "-t", "-u", "-s", "-d", "-r", "-q",
            "-g", "-n", "-p", "--sport", "--dport", "--reply-port-src", "--reply-port-dst", "--state", "--mark",
            "-m", "-w", "--orig-zone", "--reply-zone", "--icmp-type", "--icmp-code", "--icmp-id",
            "--orig-vtag", "--reply-vtag", "--role", "--srckey", "--dstkey", "-c", "--label"]
_VALUES = ["0", "1", "100", "200", "65535", "65536", "4294967295", "4294967296", "99999999999999999999",
           "-1", "1e3", "0x10", "\u0661\u0660\u0660", "", "tcp", "udp", "icmp", "sctp", "gre", "300",
           "ESTABLISHED", "TIME_WAIT", "LISTEN", "(null)", "ASSURED", "EXPECTED", "SEEN_REPLY,ASSURED",
           "UNSET", "10.0.0.1", "10.0.0.256", "::1", "2001:db8::1", "fe80::1%eth0", "1.2.3", "::ffff:1.2.3.4",
           "client", "server"]
_COMPACT = compact.encode([parse_line(ln) for ln in _GOOD[:20]])


def _bomb(count: int, inflated: int) -> bytes:
    return compact.HEADER.pack(compact.MAGIC, compact.VERSION, compact.COMPRESSION_ZLIB, compact.RECORD.size,
                               count) + zlib.compress(b"\0" * inflated, 9)


_BOMBS = [
    _bomb(1000, 64 << 20),  # claims 1,000 records, inflates to 64 MiB
    _bomb(compact.MAX_RECORDS, 512 << 20),  # the most records, and far more bytes
    _bomb(compact.MAX_RECORDS, compact.MAX_RECORDS * compact.RECORD.size),  # exact size, all zero records
    _bomb(0xFFFFFFFF, 1 << 20),  # an absurd count
]
_SEPARATORS = [b"\n" * MAX_PAYLOAD, b" " * MAX_PAYLOAD, b"\r\n" * (MAX_PAYLOAD // 2), b"\0" * MAX_PAYLOAD,
               b"\n -A" * (MAX_PAYLOAD // 4), b"#" + b"x" * (MAX_PAYLOAD - 1)]


def _mutated_line(rnd: random.Random) -> str:
    toks = rnd.choice(_GOOD).split()
    for _ in range(rnd.randint(1, 3)):
        i = rnd.randrange(len(toks))
        roll = rnd.random()
        if roll < 0.5:
            toks[i] = rnd.choice(_VALUES)
        elif roll < 0.8:
            toks.insert(i, rnd.choice(_OPTIONS))
        else:
            del toks[i]
            if not toks:
                toks = ["-A"]
    return " ".join(toks)


def _line(rnd: random.Random) -> str:
    roll = rnd.random()
    if roll < 0.35:
        return _mutated_line(rnd)
    if roll < 0.5:  # the VM's own mark: may be created
        return rnd.choice(_GOOD) + rnd.choice(["", " --mark %d" % VMID])
    if roll < 0.65:  # a foreign mark, or a tuple that exists with one
        line = rnd.choice(_FOREIGN + _GOOD)
        return line + rnd.choice([" --mark 0", " --mark 200", " -m 101", " --mark 4294967295", ""])
    if roll < 0.8:  # other commands, aimed at the foreign entries
        victim = rnd.choice(_FOREIGN)
        return rnd.choice(["-F", "-D", "-U", "--flush", "-E", "-D --mark 200", "-U -t 5 --mark 0",
                           "-D " + victim[3:], "-U " + victim[3:], "-I " + victim[3:] + " --mark 200"])
    return " ".join(rnd.choice(_OPTIONS + _VALUES) for _ in range(rnd.randint(0, 30)))


def _compact_mutation(rnd: random.Random) -> bytes:
    data = bytearray(_COMPACT)
    roll = rnd.random()
    if roll < 0.3:
        return bytes(data[:rnd.randrange(len(data))])
    if roll < 0.6:
        for _ in range(rnd.randint(1, 8)):
            i = rnd.randrange(len(data))
            data[i] ^= 1 << rnd.randrange(8)
        return bytes(data)
    if roll < 0.8:  # header fields
        offset, code, top = rnd.choice([(4, "B", 0xFF), (5, "B", 0xFF), (6, "H", 0xFFFF), (8, "I", 0xFFFFFFFF)])
        value = rnd.choice([0, 1, 2, 129, 131, 255, 65535, 200001, top])
        struct.pack_into("<" + code, data, offset, min(value, top))
        return bytes(data)
    # A valid stream of random records.
    n = rnd.randint(1, 20)
    raw = bytes(rnd.getrandbits(8) for _ in range(n * compact.RECORD.size))
    return compact.HEADER.pack(compact.MAGIC, 1, 1, compact.RECORD.size, n) + zlib.compress(raw)


def payloads(n: int, seed: int) -> Iterator[bytes]:
    """``n`` hostile payloads of every kind the issue names, deterministic per seed."""
    rnd = random.Random(seed)
    for i in range(n):
        if i % 5000 == 0:
            yield _BOMBS[(i // 5000) % len(_BOMBS)]
            continue
        if i % 20000 == 1:
            yield _SEPARATORS[(i // 20000) % len(_SEPARATORS)]
            continue
        roll = rnd.random()
        if roll < 0.25:
            yield rnd.randbytes(rnd.randint(0, 2048))
        elif roll < 0.4:
            yield _compact_mutation(rnd)
        else:
            sep = rnd.choice(["\n", "\n", "\r\n", "\n\n", " \n"])
            text = sep.join(_line(rnd) for _ in range(rnd.randint(1, 6)))
            yield text.encode("utf-8", "surrogateescape")[:MAX_PAYLOAD]


# ------------------------------------------------------------------ tests


def test_fuzz_run_of_load(table: Table) -> None:
    slowest, count = 0.0, 0
    for count, data in enumerate(payloads(FUZZ_PAYLOADS, seed=2026), 1):
        slowest = max(slowest, table.load(data))
        if count % 20000 == 0:
            table.assert_foreign_untouched()
            # Keep the VM's own entries few: the fuzz creates some, legitimately.
            table.ns.flush_mark(VMID)
    assert count == FUZZ_PAYLOADS
    assert slowest <= MAX_LOAD_SECONDS, "one Load took %.1f s" % slowest
    table.assert_foreign_untouched()


def test_bombs_and_separators_are_bounded(table: Table) -> None:
    for data in _BOMBS + _SEPARATORS:
        assert table.load(data) <= MAX_LOAD_SECONDS
    table.assert_foreign_untouched()


_line_strategy = st.lists(st.one_of(st.sampled_from(_OPTIONS), st.sampled_from(_VALUES),
                                    st.text(max_size=12)), max_size=30).map(" ".join)
_payload_strategy = st.one_of(
    st.binary(max_size=4096),
    st.lists(st.one_of(_line_strategy, st.sampled_from(_GOOD + _FOREIGN)), max_size=8).map(
        lambda lines: "\n".join(lines).encode("utf-8", "surrogateescape")),
    st.builds(lambda cut, flips: bytes(
        b ^ flips.get(i, 0) for i, b in enumerate(_COMPACT[:cut])),
        st.integers(0, len(_COMPACT)), st.dictionaries(st.integers(0, len(_COMPACT) - 1), st.integers(1, 255),
                                                      max_size=6)),
)


def test_property_load_never_raises_nor_touches_other_marks(table: Table) -> None:
    @settings(max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "400")), deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_payload_strategy)
    def load_is_safe(data: bytes) -> None:
        assert table.load(data) <= MAX_LOAD_SECONDS
        # The VM's own Save afterwards still works and holds only its own mark.
        saved = table.conntrack.dump(VMID)
        assert all(e.mark == VMID for e in saved)

    load_is_safe()
    table.assert_foreign_untouched()
