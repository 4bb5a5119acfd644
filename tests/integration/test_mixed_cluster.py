"""A cluster upgraded node by node: this helper on one node, qemu-server's Perl helper on the other.

The Perl side is tests/data/perl-helper.pl, a stand-in that does on the wire and
with conntrack(8) what qemu-server's helper does (see its header). Migrations are
real: two nodes (private policy bus + namespace each), a source QEMU and an
``-incoming`` destination QEMU, a helper per node, ended the way qemu-server
ends them (tests/data/qemu-server-stop.pl: NumMigratedEntries, then Quit).

Tables are ``realistic_lines`` rather than ``synthetic_lines``: what a Perl
helper carries of 6,000 entries depends on how long the save lines are (its cut
is at 1 MiB of text), and realistic_lines has the length mix of a busy VM
(random peers, 10 % IPv6), which the measured ~5,060 of 6,000 refers to;
synthetic_lines are shorter and more uniform. Timeouts are kept away from
digit boundaries (see ``steady_lines``) so that every save line keeps its
length while a test runs: the Perl helper's cut can then be predicted exactly
from a dump taken before the migration.

What each direction delivers today (this machine, conntrack 1.4.7, QEMU 7.2,
before issue 13's hybrid payload), 800 / 6,000 entries:
- Perl source -> our destination: 800 / ~5,300 (all the Perl helper sent, in
  dump order, ~1 MiB); the Perl side prints 4 / 5 lines; its
  NumMigratedEntries is the count's last digit: 0 / 0.
- our source (auto) -> Perl destination: 800 (text fits) / 0: auto sends the
  binary compact payload at 6,000, conntrack --load-file rejects it and the
  Perl side prints ~39,000 pack warnings plus its own lines (issue 13).
- our source (--format text) -> Perl destination at 6,000: ~5,300 (the most
  important first), 3 lines on the Perl side.
(Exact figures of a run are in the report of the branch that added this file;
the assertions below are the contract.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pvevmstate.codec import MAX_PAYLOAD
from tests.perl_helper import PERL_POLICY, PerlHelper, qemu_server_stop
from tests.support import (
    Helper,
    Netns,
    Node,
    Qemu,
    marked,
    migration_qemus,
    realistic_lines,
    start_migration,
    strip_timeout,
    wait_migration,
    wait_until,
)

Factory = Any
VMID = 100
SUFFIX = " --mark %d\n" % VMID
ISSUE_13 = pytest.mark.xfail(strict=True, reason="issue 13: hybrid payload not yet built")


def steady_lines(n: int, seed: int) -> list[str]:
    """``realistic_lines`` whose timeouts keep their number of digits for five minutes.

    No entry expires during a test (at least 600 s), and none counts down
    across 1,000, 10,000 or 100,000 (they are moved 300 s above), so the
    length of each save line, and with it where the Perl helper cuts, stays put.
    """
    def steady(m: re.Match[str]) -> str:
        t = int(m.group(1))
        for boundary in (1000, 10000, 100000):
            if boundary <= t < boundary + 300:
                t = boundary + 300
        return " -t %d " % t
    return [re.sub(r" -t (\d+) ", steady, ln) for ln in realistic_lines(n, seed=seed, min_timeout=600)]


def fill(ns: Netns, n: int, seed: int) -> list[str]:
    """The VM's ``n`` entries plus another VM's, which must stay home; returns the VM's dump, in dump order."""
    ns.load(steady_lines(n, seed), mark=VMID)
    ns.load(steady_lines(50, seed + 1000), mark=VMID + 1)
    return ns.save_lines(VMID)


def perl_cut(dump: list[str]) -> list[str]:
    """The lines the Perl helper's Save sends of ``dump``: its size check leaves out the suffix."""
    text, sent = 0, []
    for line in dump:
        if text + len(line) > MAX_PAYLOAD:
            break
        text += len(line) + len(SUFFIX)
        sent.append(line)
    return sent


def stripped(lines: list[str]) -> list[str]:
    return sorted(strip_timeout(ln) for ln in lines)


def established(lines: list[str]) -> set[str]:
    """The entries that matter most: assured, established TCP."""
    return {ln for ln in lines if "--state ESTABLISHED" in ln and "ASSURED" in ln}


@dataclass
class Rig:
    """What a mixed migration needs: nodes, QEMUs, both kinds of helper."""

    tmp_path: Path
    node: Factory
    qemu: Factory
    ours: Factory
    perl: Factory


@pytest.fixture
def rig(tmp_path: Path, node_factory: Factory, qemu_factory: Factory, helper_factory: Factory,
        perl_helper_factory: Factory) -> Rig:
    return Rig(tmp_path, node_factory, qemu_factory, helper_factory, perl_helper_factory)


def settle(dst_qemu: Qemu) -> None:
    """What qemu-server does once the source completed: resume the destination; it must run."""
    wait_until(lambda: dst_qemu.status() != "inmigrate", 60, "the destination to leave inmigrate")
    dst_qemu.qmp("cont")
    assert dst_qemu.status() == "running"


def arrived(target: Node) -> list[str]:
    """The VM's entries on the target; every entry there must carry the VM's mark."""
    everything = target.ns.save_lines()
    mine = marked(target, VMID)
    assert len(everything) == len(mine), "entries without mark %d on the target" % VMID
    return mine


# ------------------------------------------------------------------ Perl source -> our destination


@pytest.mark.parametrize("n", [800, 6000])
def test_perl_source_to_our_destination(n: int, rig: Rig) -> None:
    source, target = rig.node("source", PERL_POLICY), rig.node("target")
    # The Perl helper's own bug (PROTOCOL.md §4): in ~5 % of 6,000-entry tables
    # its payload ends a few bytes over 1 MiB and the destination QEMU exits,
    # whichever helper runs there. Not what this test is about: such a table
    # (the dump order differs from namespace to namespace) is replaced by
    # another one before the migration.
    for attempt in range(10):
        dump = fill(source.ns, n, seed=40 + n + 100 * attempt)
        sent = perl_cut(dump)
        size = sum(len(ln) + len(SUFFIX) for ln in sent)
        if size <= MAX_PAYLOAD:
            break
        source.ns.conntrack("-F")
    assert size <= MAX_PAYLOAD
    expected = stripped(dump)
    src_qemu, dst_qemu, uri = migration_qemus(VMID, rig.tmp_path, rig.qemu)
    src: PerlHelper = rig.perl(source.ns, VMID, bus=source.bus, qemu=src_qemu)
    dst: Helper = rig.ours(target.ns, VMID, "--linger", "60", bus=target.bus, qemu=dst_qemu)

    start_migration(src_qemu, uri)
    status = wait_migration(src_qemu)
    assert status == "completed", (src_qemu.migration(), src.lines(), dst.journal())
    settle(dst_qemu)
    # Our destination removes its object once QEMU has left inmigrate.
    wait_until(lambda: "pve-vmstate" not in dst_qemu.objects(), 30, "object removal on the destination")
    # qemu-server: the local helper first, then the remote one.
    _, src_count = qemu_server_stop(VMID, source.bus)
    _, dst_count = qemu_server_stop(VMID, target.bus)
    assert src.wait_exit() == 0, src.journal()
    assert dst.wait_exit() == 0, dst.journal()
    assert dst_qemu.proc.poll() is None and dst_qemu.status() == "running"

    got = arrived(target)
    assert set(got) <= set(expected)
    # Exactly what the Perl helper sent, all of it: 800 of 800, ~5,300 of 6,000 in dump order.
    assert got == stripped(sent)
    assert len(got) == n if n == 800 else 4800 <= len(got) < n
    assert dst_count == len(got)
    assert "transferring %d bytes of conntrack state" % size in src.journal()
    # Its one-digit count: the last digit of conntrack's "N flow entries".
    assert src_count == len(dump) % 10
    lines = src.lines()
    assert not [ln for ln in lines if not ln.startswith(("<6>", "<4>"))], lines
    # listening, received, transferring, shutting down; plus "too large" when it cut.
    assert len(lines) == (4 if n == 800 else 5), lines


# ------------------------------------------------------------------ our source -> Perl destination


def our_to_perl(rig: Rig, n: int, fmt: str) -> tuple[list[str], list[str], int, PerlHelper]:
    """Migrate a table of ``n`` from our helper (``--format fmt``) to the Perl stand-in.

    Returns the source's entries, what arrived, our source's NumMigratedEntries and the stand-in.
    """
    source, target = rig.node("source"), rig.node("target", PERL_POLICY)
    expected = stripped(fill(source.ns, n, seed=60 + n))
    src_qemu, dst_qemu, uri = migration_qemus(VMID, rig.tmp_path, rig.qemu)
    src: Helper = rig.ours(source.ns, VMID, "--linger", "60", "--format", fmt, bus=source.bus, qemu=src_qemu)
    dst: PerlHelper = rig.perl(target.ns, VMID, bus=target.bus, qemu=dst_qemu)

    start_migration(src_qemu, uri)
    status = wait_migration(src_qemu)
    assert status == "completed", (src_qemu.migration(), src.journal(), dst.lines()[-5:])
    settle(dst_qemu)
    # The Perl helper leaves its object in place until Quit removes it.
    assert "pve-vmstate" in dst_qemu.objects()
    _, src_count = qemu_server_stop(VMID, source.bus)
    _, dst_count = qemu_server_stop(VMID, target.bus)
    assert src.wait_exit() == 0, src.journal()
    assert dst.wait_exit() == 0, dst.journal()
    assert "pve-vmstate" not in dst_qemu.objects()
    assert dst_qemu.proc.poll() is None and dst_qemu.status() == "running"
    assert dst_count == 0  # the Perl helper never counts on a destination

    got = arrived(target)
    assert set(got) <= set(expected)
    return expected, got, src_count, dst


def test_our_source_to_perl_destination_800(rig: Rig) -> None:
    expected, got, src_count, dst = our_to_perl(rig, 800, "auto")
    assert got == expected
    assert src_count == 800
    # listening, restored N bytes, shutting down.
    assert len(dst.lines()) == 3, dst.lines()
    assert "restored" in dst.journal()


def test_our_text_source_to_perl_destination_6000(rig: Rig) -> None:
    expected, got, src_count, dst = our_to_perl(rig, 6000, "text")
    # As many as fit in 1 MiB counting every byte, about what the Perl helper itself would carry.
    assert 4800 <= len(got) < 6000
    assert src_count == len(got)
    assert established(expected) <= set(got)
    assert len(dst.lines()) == 3, dst.lines()
    assert dst.pack_warnings() == 0


@ISSUE_13
def test_our_auto_source_to_perl_destination_6000(rig: Rig) -> None:
    # Today: auto sends compact at 6,000; the Perl side restores 0 and prints
    # ~39,000 pack warnings. The target of issue 13 follows.
    expected, got, _src_count, dst = our_to_perl(rig, 6000, "auto")
    assert len(got) >= 4500
    assert established(expected) <= set(got)  # the most important first
    assert len(dst.lines()) <= 5, "%d lines, e.g. %s" % (len(dst.lines()), dst.lines()[:3])
