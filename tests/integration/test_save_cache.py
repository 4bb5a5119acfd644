"""Save's cache against real kernel tables: it never changes what Save sends.

The cached and the uncached Save read the very same dump datagrams here
(recorded once), so the comparison is exact, timeouts included: a cache made
from an earlier dump of the table, after entries changed state, NAT, labels,
status, timeout, or came and went, gives the payload a Save without cache
gives, in a fixed case and in whatever cases a property test draws. Then the
helper itself: background dumps under churn, and Save still matches a fresh
dump.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvevmstate import messages, netlink, payload, savecache
from pvevmstate.model import IPS_ASSURED, PROTO_TCP, PROTO_UDP, TCP_STATE_ESTABLISHED, Entry
from pvevmstate.netlink.conntrack import Conntrack
from pvevmstate.payload import savetext
from tests import client
from tests.support import (
    HelperFactory,
    Netns,
    NetnsFactory,
    conntrack_table,
    realistic_lines,
    strip_timeout,
    wait_until,
)

VMID = 100


class Recorder:
    """A dump sink that keeps the datagrams, to scan them more than once."""

    def __init__(self) -> None:
        self.datagrams: list[tuple[bytes, int, int]] = []

    def feed(self, buf: bytes, size: int, seq: int) -> netlink.DumpChunk:
        self.datagrams.append((buf, size, seq))
        return netlink.walk_dump(buf, size, seq, lambda *_: None)


def record(table: Conntrack) -> list[tuple[bytes, int, int]]:
    rec = table.dump_into(VMID, Recorder)
    assert rec is not None
    return rec.datagrams


def scan(datagrams: list[tuple[bytes, int, int]], pieces: savecache.Pieces, collect: bool = False,
         layouts: netlink.LayoutCache | None = None, ahead: bool = False) -> savecache.Scan:
    s = savecache.Scan(pieces, layouts or netlink.LayoutCache(), collect, ahead=ahead)
    for buf, size, seq in datagrams:
        s.feed(buf, size, seq)
    return s


def with_labels(ns: Netns) -> None:
    # The kernel keeps labels only where a ruleset uses them.
    ns.run("nft", "-f", "-", data=b"table ip t {\n chain c {\n type filter hook prerouting priority 0;\n"
                                   b" ct label 5 counter\n }\n}\n")


def tuple_args(e: Entry) -> list[str]:
    return ["-s", socket.inet_ntoa(e.orig_src), "-d", socket.inet_ntoa(e.orig_dst), "-p", str(e.proto),
            "--sport", str(e.sport), "--dport", str(e.dport)]


def changed(e: Entry, how: str, i: int) -> Entry:
    """``e`` as it is after a change of kind ``how``, same original tuple."""
    if how == "state":
        return dataclasses.replace(e, state=7 if e.state == TCP_STATE_ESTABLISHED else TCP_STATE_ESTABLISHED)
    if how == "nat":
        # SNAT to another address and port: the reply tuple changes.
        return dataclasses.replace(e, reply_dst=socket.inet_aton("198.18.0.%d" % (i % 250 + 1)),
                                   reply_dport=20000 + i)
    if how == "labels":
        return dataclasses.replace(e, labels=(1 << (i % 120)).to_bytes(16, "little"))
    if how == "status":
        return dataclasses.replace(e, status=(e.status or 0) ^ IPS_ASSURED)
    raise AssertionError(how)


@pytest.mark.parametrize(("fmt", "limit"), [
    (payload.Choice.AUTO, payload.MAX_PAYLOAD),
    (payload.Choice.COMPACT, payload.MAX_PAYLOAD),
    (payload.Choice.AUTO, 40_000),  # not everything fits: priority order and left out by class
    (payload.Choice.TEXT, payload.MAX_PAYLOAD),
])
def test_cache_never_changes_the_payload(netns_factory: NetnsFactory, fmt: payload.Choice, limit: int) -> None:
    ns = netns_factory()
    with_labels(ns)
    lines = realistic_lines(3000, seed=7, min_timeout=900)
    ns.load(lines, mark=VMID)
    ns.load(realistic_lines(500, seed=8), mark=200)
    with conntrack_table(ns) as table:
        before = record(table)
        # One layout cache, as one socket's dumps have: a message of a layout
        # not learned yet is decoded in full, even when its pieces are cached.
        layouts = netlink.LayoutCache()
        background = scan(before, savecache.EMPTY, collect=True, layouts=layouts)
        pieces = background.pieces()
        assert len(pieces) == 3000 and background.hits == 0

        # Change the table between the background dump and Save.
        entries = [e for e in table.dump(VMID)
                   if e.family == socket.AF_INET and e.proto in (PROTO_TCP, PROTO_UDP) and e.sport is not None]
        tcp = [e for e in entries if e.proto == PROTO_TCP and e.state is not None]
        udp = [e for e in entries if e.proto == PROTO_UDP]
        kinds = {"state": tcp[0:40], "nat": tcp[40:70], "labels": tcp[70:90], "status": udp[0:30]}
        gone = udp[30:80]
        remade = [changed(e, how, i) for how, group in kinds.items() for i, e in enumerate(group)]
        for e in [*remade, *gone]:
            ns.conntrack("-D", *tuple_args(e))
        new = [dataclasses.replace(e, orig_src=socket.inet_aton("10.200.%d.%d" % (i // 250, i % 250 + 1)),
                                   reply_dst=socket.inet_aton("10.200.%d.%d" % (i // 250, i % 250 + 1)))
               for i, e in enumerate(udp[80:180])]
        result = table.create(netlink.create_batch([*remade, *new], VMID))
        assert result.created == len(remade) + len(new) and not result.failed, result
        # Only the timeout of others: they stay cached, with the new timeout.
        aged = udp[180:230]
        for e in aged:
            ns.conntrack("-U", *tuple_args(e), "-t", "4321")

        after = record(table)

    # Save's scan makes the priority keys as the datagrams come (ahead); a
    # scan without makes them at the end.
    cached = scan(after, pieces, layouts=layouts, ahead=True)
    assert cached.ready_segments() is None  # changed: every column compressed afresh
    uncached = scan(after, savecache.EMPTY, ahead=True)
    reference = [e for buf, size, seq in after for e in _decoded(buf, size, seq)]
    want = payload.encode(reference, VMID, limit, fmt)
    got_cached = payload.encode_sendable(cached, VMID, limit, fmt)
    got_uncached = payload.encode_sendable(uncached, VMID, limit, fmt)
    assert got_uncached.data == want.data
    assert got_cached.data == want.data
    assert payload.encode_sendable(scan(after, pieces, layouts=layouts), VMID, limit, fmt).data == want.data
    assert (got_cached.sent, got_cached.left_out, got_cached.text_sent) == (want.sent, want.left_out, want.text_sent)
    # Every changed or new entry was encoded afresh; every other one came from
    # the cache, the aged ones too.
    fresh = len(remade) + len(new)
    assert len(cached) == 3000 - len(gone) + len(new)
    assert cached.hits == len(cached) - fresh
    # The aged entries carry their new timeout (seconds pass between the
    # updates and the dump).
    sent = {(e.orig_src, e.sport, e.proto): e.timeout for e in reference}
    assert all(4300 <= (sent[(e.orig_src, e.sport, e.proto)] or 0) <= 4321 for e in aged)


def _delete_lines(entries: list[Entry]) -> bytes:
    """``conntrack --load-file`` lines that delete each entry, found by its original tuple."""
    return "".join("-D %s\n" % " ".join(tuple_args(e)) for e in entries).encode()


def test_cache_never_changes_the_payload_whatever_changed(netns_factory: NetnsFactory) -> None:
    """The property: for any table, any mix of entries that changed state, NAT,
    labels, status or timeout, came or went between the background dump and
    Save, and any format and byte limit, the cached Save sends what the
    uncached one sends. One namespace, flushed and filled afresh per example."""
    ns = netns_factory()
    with_labels(ns)

    @settings(max_examples=int(os.environ.get("HYPOTHESIS_CACHE_EXAMPLES", "25")), deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def cached_equals_uncached(data: st.DataObject) -> None:
        n = data.draw(st.integers(1, 600), label="entries")
        seed = data.draw(st.integers(0, 1 << 16), label="seed")
        ns.conntrack("-F")
        ns.load(realistic_lines(n, seed=seed, min_timeout=900), mark=VMID)
        ns.load(realistic_lines(30, seed=seed + (1 << 17), min_timeout=900), mark=200)
        with conntrack_table(ns) as table:
            layouts = netlink.LayoutCache()
            pieces = scan(record(table), savecache.EMPTY, collect=True, layouts=layouts).pieces()
            everything = table.dump(VMID)
            pool = [e for e in everything
                    if e.family == socket.AF_INET and e.proto in (PROTO_TCP, PROTO_UDP) and e.sport is not None]
            # In tuple order, not the kernel's (its hash is seeded per boot and
            # namespace): the same draws pick the same entries when replayed.
            pool.sort(key=lambda e: (e.orig_src, e.orig_dst, e.proto, e.sport or 0, e.dport or 0))
            data.draw(st.randoms(use_true_random=False), label="order").shuffle(pool)

            def take(kind: str, tcp: bool = False) -> list[Entry]:
                """Up to 12 entries not taken yet (TCP ones with a state, if ``tcp``)."""
                room = [e for e in pool if not tcp or (e.proto == PROTO_TCP and e.state is not None)]
                got = room[:data.draw(st.integers(0, min(12, len(room))), label=kind)]
                for e in got:
                    pool.remove(e)
                return got

            remade = [changed(e, how, i) for how in ("state", "nat", "labels")
                      for i, e in enumerate(take(how, tcp=True))]
            remade += [changed(e, "status", i) for i, e in enumerate(take("status"))]
            gone, aged = take("gone"), take("aged")
            new = [dataclasses.replace(e, orig_src=socket.inet_aton("10.200.0.%d" % (i + 1)),
                                       reply_dst=socket.inet_aton("10.200.0.%d" % (i + 1)))
                   for i, e in enumerate(take("new template"))]
            if remade or gone:
                lines = _delete_lines([*remade, *gone])
                if ns.run("conntrack", "--load-file", "-", data=lines, check=False).returncode:
                    # As with -U below, a batch may fail where each line alone
                    # does not; whether they are gone is checked below.
                    for line in lines.decode().splitlines():
                        ns.run("conntrack", *line.split(), check=False)
            if remade or new:
                result = table.create(netlink.create_batch([*remade, *new], VMID))
                assert result.created == len(remade) + len(new) and not result.failed, result
            if aged:
                timeout = data.draw(st.integers(1000, 400_000), label="new timeout")
                # One conntrack -U each: several -U lines in one --load-file
                # fail now and then (1.4.7: "Protocol error"), each alone not.
                for e in aged:
                    ns.conntrack("-U", *tuple_args(e), "-t", str(timeout))
            after = record(table)

        fmt = data.draw(st.sampled_from(list(payload.Choice)), label="format")
        limit = data.draw(st.one_of(st.just(payload.MAX_PAYLOAD), st.integers(1, 60_000)), label="limit")
        reference = [e for buf, size, seq in after for e in _decoded(buf, size, seq)]
        want = payload.encode(reference, VMID, limit, fmt)
        cached = scan(after, pieces, layouts=layouts, ahead=True)
        # The cache was used: every entry but the changed and new ones came from it.
        assert len(cached) == len(everything) - len(gone) + len(new)
        assert cached.hits == len(cached) - len(remade) - len(new)
        for got in (payload.encode_sendable(cached, VMID, limit, fmt),
                    payload.encode_sendable(scan(after, savecache.EMPTY, ahead=True), VMID, limit, fmt)):
            assert got.data == want.data
            assert (got.sent, got.left_out, got.text_sent) == (want.sent, want.left_out, want.text_sent)

    cached_equals_uncached()


@pytest.mark.parametrize("fmt", [payload.Choice.AUTO, payload.Choice.COMPACT])
def test_an_unchanged_table_is_sent_with_its_cached_compression(netns_factory: NetnsFactory,
                                                                fmt: payload.Choice) -> None:
    ns = netns_factory()
    ns.load(realistic_lines(3000, seed=11, min_timeout=900), mark=VMID)
    with conntrack_table(ns) as table:
        layouts = netlink.LayoutCache()
        pieces = scan(record(table), savecache.EMPTY, collect=True, layouts=layouts).pieces()
        assert pieces.segments is not None
        # Only timeouts change: the columns Save compresses afresh.
        for e in [e for e in table.dump(VMID) if e.proto == PROTO_UDP and e.family == socket.AF_INET][:50]:
            ns.conntrack("-U", *tuple_args(e), "-t", "4321")
        after = record(table)
    cached = scan(after, pieces, layouts=layouts, ahead=True)
    assert cached.ready_segments() is pieces.segments
    reference = [e for buf, size, seq in after for e in _decoded(buf, size, seq)]
    assert payload.encode_sendable(cached, VMID, payload.MAX_PAYLOAD, fmt).data == payload.encode(
        reference, VMID, payload.MAX_PAYLOAD, fmt).data
    # The next generation takes them over without compressing them again.
    assert scan(after, pieces, collect=True, layouts=layouts).pieces().segments is pieces.segments


def _decoded(buf: bytes, size: int, seq: int) -> list[Entry]:
    out: list[Entry] = []
    netlink.decode_dump(buf, size, seq, out, netlink.LayoutCache())
    return out


def _churn(ns: Netns, stop: threading.Event, rounds: list[int]) -> None:
    """Add, delete and update entries of the VM until ``stop``."""
    i = 0
    while not stop.is_set():
        i += 1
        src = "10.77.%d.%d" % (i // 250 % 250, i % 250 + 1)
        ns.conntrack("-I", "-s", src, "-d", "192.0.2.9", "-p", "tcp", "--sport", "4000", "--dport", "443",
                     "--state", "ESTABLISHED", "-u", "SEEN_REPLY,ASSURED", "-t", "3000", "--mark", str(VMID))
        if i % 3 == 0:
            old = "10.77.%d.%d" % ((i - 2) // 250 % 250, (i - 2) % 250 + 1)
            subprocess.run(["ip", "netns", "exec", ns.name, "conntrack", "-D", "-s", old, "-p", "tcp"],
                           capture_output=True, check=False)
        if i % 5 == 0:
            ns.run("conntrack", "-U", "-s", src, "-p", "tcp", "--state", "TIME_WAIT", check=False)
        rounds[0] = i


def test_save_under_churn_matches_a_fresh_dump(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    ns = netns_factory()
    ns.load(realistic_lines(2000, seed=11, min_timeout=900), mark=VMID)
    ns.load(realistic_lines(300, seed=12), mark=200)
    helper = helper_factory(ns, VMID, "--cache-interval", "0.2", "--debug")
    stop, rounds = threading.Event(), [0]
    churn = threading.Thread(target=_churn, args=(ns, stop, rounds))
    churn.start()
    try:
        wait_until(lambda: helper.journal().count("background dump ") >= 5, 60, "background dumps under churn")
    finally:
        stop.set()
        churn.join()
    assert rounds[0] > 10
    data = client.save(client.vm(VMID))
    fresh = sorted(strip_timeout(ln + " --mark %d" % VMID) for ln in ns.save_lines(VMID))
    decoded = payload.decode(data, VMID)
    assert not decoded.refused
    got = sorted(strip_timeout(savetext.render_line(e) + " --mark %d" % VMID) for e in decoded.entries)
    assert got == fresh
    journal = helper.journal()
    m = re.search(r"Save: (\d+) entries .* (\d+) of them encoded ahead", journal)
    assert m is not None, journal
    assert int(m.group(1)) == len(fresh) and 0 < int(m.group(2)) <= len(fresh)
    # Nothing in the background after Save: no dump began once Save had.
    time.sleep(1.0)
    journal = helper.journal()
    assert "background dump " not in journal[journal.index("Save: "):], journal


def _rss_mib(pid: int) -> float:
    with open("/proc/%d/statm" % pid) as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def test_what_save_allocated_is_given_back_while_the_helper_lingers(netns_factory: NetnsFactory,
                                                                    helper_factory: HelperFactory) -> None:
    # Save maps memory ahead and the heap keeps what is freed (pvevmstate.heap):
    # once the answer is out, the helper trims, and waits for its exit
    # with about the memory it waited for Save with.
    ns = netns_factory()
    ns.load(realistic_lines(20_000, seed=31, min_timeout=900), mark=VMID)
    helper = helper_factory(ns, VMID, "--cache-interval", "0.2", "--linger", "60")
    wait_until(lambda: messages.head(messages.CACHE_WARM) in helper.journal(), 60, "a warm cache")
    time.sleep(0.5)
    idle = _rss_mib(helper.proc.pid)
    assert len(client.save(client.vm(VMID))) > 1
    wait_until(lambda: "work done" in helper.journal(), 10, "the work-done line")
    deadline = time.monotonic() + 5  # (the trim comes daemon.AFTER_ANSWER after the answer)
    while (after := _rss_mib(helper.proc.pid)) > idle + 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after <= idle + 6, (idle, after)


def test_overlapped_dump_gets_what_a_plain_one_gets(netns_factory: NetnsFactory) -> None:
    # Save receives in a second thread while it scans; the entries must be
    # the same, in the same order, and the socket usable afterwards.
    ns = netns_factory()
    ns.load(realistic_lines(20_000, seed=21, min_timeout=900), mark=VMID)
    ns.load(realistic_lines(2_000, seed=22, min_timeout=900), mark=200)
    with conntrack_table(ns) as table:
        plain = record(table)
        rec = table.dump_into(VMID, Recorder, overlap=True)
        assert rec is not None
        overlapped = rec.datagrams
        assert len(overlapped) > 50  # (where the kernel cuts datagrams may differ)
        got = [dataclasses.replace(e, timeout=0) for buf, size, seq in overlapped for e in _decoded(buf, size, seq)]
        want = [dataclasses.replace(e, timeout=0) for buf, size, seq in plain for e in _decoded(buf, size, seq)]
        assert got == want and len(got) == 20_000
        assert table.stats().count == 22_000  # the socket answers the next request


def test_save_overtakes_a_background_dump(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    # Save comes while the first background dump (every entry encoded) still
    # runs: it answers from its own dump, the background one is abandoned and
    # nothing of it lingers.
    ns = netns_factory()
    ns.load(realistic_lines(30_000, seed=31, min_timeout=900), mark=VMID)
    helper = helper_factory(ns, VMID, "--cache-interval", "0.3", "--debug")
    time.sleep(0.8)
    assert "Save's cache is warm" not in helper.journal()  # the first dump still runs
    data = client.save(client.vm(VMID))
    decoded = payload.decode(data, VMID)
    fresh = sorted(strip_timeout(ln + " --mark %d" % VMID) for ln in ns.save_lines(VMID))
    got = sorted(strip_timeout(savetext.render_line(e) + " --mark %d" % VMID) for e in decoded.entries)
    assert got == fresh and len(got) == 30_000
    time.sleep(1.5)
    journal = helper.journal()
    assert "Save: 30000 entries" in journal and "Save's cache is warm" not in journal, journal
    assert "<3>" not in journal and "background dump 1" not in journal, journal
    client.quit_helper(client.vm(VMID))
    assert helper.wait_exit() == 0
