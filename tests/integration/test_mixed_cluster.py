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

What each direction delivers (measured on this 2-core machine, conntrack
1.4.7, QEMU 7.2), 800 / 6,000 entries:
- Perl source -> our destination: 800 / 5,262 arrive: everything the Perl
  helper sent (158,924 / 1,048,484 bytes, in dump order); the Perl side prints
  4 / 5 lines; its NumMigratedEntries is the count's last digit: 0 / 0.
- our source (auto, the hybrid payload) -> Perl destination: 800 / 4,592
  arrive, every assured established entry among them (the save lines after the
  compact section, most important first); the Perl side prints 3 lines and no
  pack warning. Before issue 13, auto sent the binary compact payload at
  6,000: 0 arrived and the Perl side printed a pack warning per byte above
  127 (~44,800 then; ~38,600 for today's compact payload, below).
- our source (--format text) -> Perl destination at 6,000: 5,146 arrive, every
  assured established entry among them; 3 Perl lines.
- Our payloads fed straight to the Perl helper's Load and to conntrack
  --load-file (1.4.7 and trixie's 1.4.8 alike): text 800 / 5,154 of 6,000;
  auto 800 / 4,601; compact 0 (exit 2, 2 stderr lines; through the Perl
  helper 5,891 / 38,626 pack warnings for 12,854 / 78,680 bytes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from pvevmstate.payload import MAX_PAYLOAD
from tests import client
from tests.perl_helper import (
    PERL_POLICY,
    TRIXIE_ROOT,
    PerlHelper,
    PerlHelperFactory,
    conntrack_version,
    load_with,
    qemu_server_stop,
    require_trixie_root,
)
from tests.support import (
    Helper,
    HelperFactory,
    Netns,
    NetnsFactory,
    Node,
    NodeFactory,
    Qemu,
    QemuFactory,
    marked,
    migration_qemus,
    realistic_lines,
    require,
    start_migration,
    strip_timeout,
    wait_migration,
    wait_until,
)

VMID = 100
SUFFIX = " --mark %d\n" % VMID
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
    node: NodeFactory
    qemu: QemuFactory
    ours: HelperFactory
    perl: PerlHelperFactory


@pytest.fixture
def rig(tmp_path: Path, node_factory: NodeFactory, qemu_factory: QemuFactory, helper_factory: HelperFactory,
        perl_helper_factory: PerlHelperFactory) -> Rig:
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
    # The Perl helper's own bug (its size check ignores the appended mark): in
    # ~5 % of 6,000-entry tables
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


def test_our_auto_source_to_perl_destination_6000(rig: Rig) -> None:
    # Before the hybrid payload, auto sent compact at 6,000: the Perl side
    # restored 0 and printed a pack warning per byte above 127 (~38,600 for
    # the 78,680 bytes of --format compact here). Now (issue 13):
    expected, got, _src_count, dst = our_to_perl(rig, 6000, "auto")
    assert len(got) >= 4500
    assert established(expected) <= set(got)  # the most important first
    # listening, restored N bytes, shutting down: as at 800, nothing more.
    assert len(dst.lines()) == 3, "%d lines, e.g. %s" % (len(dst.lines()), dst.lines()[:3])
    assert dst.pack_warnings() == 0


# ------------------------------------------------------------------ payloads, without a migration
#
# Cheaper than a migration, and the same bytes: what our Save returns in each
# format, handed to the Perl helper's Load (the stand-in) and to
# ``conntrack --load-file -`` itself, the host's 1.4.7 and trixie's 1.4.8.

FORMATS = ("text", "compact", "auto")
# One table per size, saved once in each format, shared by the tests below
# (bytes and the table's entries only; every test loads into a fresh namespace).
_payloads: dict[tuple[int, str], tuple[bytes, list[str]]] = {}


def our_payload(n: int, fmt: str, netns_factory: NetnsFactory, helper_factory: HelperFactory) -> tuple[bytes,
                list[str]]:
    """Our helper's Save of a table of ``n`` in format ``fmt``, and the table's entries (stripped)."""
    if (n, fmt) not in _payloads:
        ns = netns_factory()
        expected = stripped(fill(ns, n, seed=80 + n))
        for f in FORMATS:
            helper = helper_factory(ns, VMID, "--format", f)
            _payloads[(n, f)] = (client.save(client.vm(VMID)), expected)
            helper.stop()
    return _payloads[(n, fmt)]


def loaded(ns: Netns) -> list[str]:
    everything = ns.save_lines()
    mine = stripped(ns.save_lines(VMID))
    assert len(everything) == len(mine), "entries without mark %d" % VMID
    return mine


CASES = [pytest.param(800, "text"), pytest.param(6000, "text"), pytest.param(800, "compact"),
         pytest.param(6000, "compact"), pytest.param(800, "auto"), pytest.param(6000, "auto")]
#: At 6,000, how many a Perl destination must create: text fills 1 MiB with
#: save lines; auto (hybrid) first carries every entry in its compact section.
AT_LEAST = {"text": 4800, "auto": 4500}


def save_line_count(payload: bytes) -> int:
    """Lines conntrack(8) creates entries from: not the hybrid payload's comments."""
    return sum(1 for ln in payload.split(b"\n") if ln and not ln.startswith(b"#"))


@pytest.mark.parametrize(("n", "fmt"), CASES)
def test_perl_load_of_our_payload(n: int, fmt: str, netns_factory: NetnsFactory, helper_factory: HelperFactory,
                                  perl_helper_factory: PerlHelperFactory) -> None:
    payload, expected = our_payload(n, fmt, netns_factory, helper_factory)
    target = netns_factory()
    perl: PerlHelper = perl_helper_factory(target, VMID)
    client.load(perl.unique_name(), payload)
    wait_until(lambda: "restore" in perl.journal(), 30, "the Perl helper's Load to log its end")
    got = loaded(target)
    assert set(got) <= set(expected)
    if fmt == "compact":
        # Binary by design (clusters where every node runs this helper): the
        # Perl side restores nothing and prints one warning per byte above 127.
        assert got == []
        assert perl.pack_warnings() > len(payload) // 4
        assert "<4>failed to restore conntrack state" in perl.journal()
        return
    assert len(got) == n if n == 800 else AT_LEAST[fmt] <= len(got) < n
    assert len(got) == save_line_count(payload)  # every line our text carries, not one less
    assert established(expected) <= set(got)  # the most important first
    # listening, restored: nothing else (compact at 6,000: ~38,600 lines).
    assert len(perl.lines()) <= 2, perl.lines()[:5]
    assert perl.pack_warnings() == 0


@pytest.mark.parametrize("conntrack", ["host", "trixie"])
@pytest.mark.parametrize(("n", "fmt"), CASES)
def test_conntrack_load_file_reads_our_payload(n: int, fmt: str, conntrack: str, netns_factory: NetnsFactory,
                                               helper_factory: HelperFactory) -> None:
    root = None
    if conntrack == "trixie":
        require_trixie_root()
        root = TRIXIE_ROOT
    ns = netns_factory()
    version = conntrack_version(ns, root)
    if conntrack == "trixie":
        assert version == "v1.4.8"
    else:  # the issue asks for both: on a host with another conntrack, 1.4.7 would go untested
        require(version == "v1.4.7", "needs conntrack 1.4.7 (Debian bookworm, Proxmox VE 8) on the host, "
                                     "not %s" % version)
    payload, expected = our_payload(n, fmt, netns_factory, helper_factory)
    out = load_with(ns, payload, root)
    got = loaded(ns)
    assert set(got) <= set(expected)
    if fmt == "compact":
        assert got == [] and out.returncode != 0
        return
    assert out.returncode == 0, out.stderr[:500]
    assert out.stderr.decode(errors="replace").splitlines() == []
    assert len(got) == n if n == 800 else AT_LEAST[fmt] <= len(got) < n
    assert len(got) == save_line_count(payload)
    assert established(expected) <= set(got)


def test_perl_helper_save_ignores_its_suffix_in_the_size_check(netns_factory: NetnsFactory,
                                                               perl_helper_factory: PerlHelperFactory) -> None:
    # The stand-in must keep the original's bug: its check counts each line
    # without " --mark VMID\n". With 5,500 save lines of exactly 190 bytes it
    # takes 5,191 of them (5,190 * 202 + 190 <= 1 MiB), i.e. 5,191 * 202 =
    # 1,048,582 bytes: 6 over what QEMU accepts (the destination would exit).
    # The migrations above avoid such tables; this pins the bug down itself.
    ns = netns_factory()
    ns.load(["-A -t 99000 -u SEEN_REPLY,ASSURED -s 10.1.%d.%d -d 192.0.2.100 -r 192.0.2.100 -q 10.1.%d.%d "
             "-p tcp --sport 40000 --dport 22 --reply-port-src 22 --reply-port-dst 40000 --state ESTABLISHED"
             % (100 + i // 100, 100 + i % 100, 100 + i // 100, 100 + i % 100) for i in range(5500)], mark=VMID)
    assert {len(ln) for ln in ns.save_lines(VMID)} == {190}
    perl: PerlHelper = perl_helper_factory(ns, VMID)
    payload = client.save(perl.unique_name())
    assert len(payload) == 5191 * (190 + len(SUFFIX)) == MAX_PAYLOAD + 6
    assert payload.count(b"\n") == 5191
    assert "<6>transferring %d bytes of conntrack state" % len(payload) in perl.lines()
    assert "<4>conntrack state too large, ignoring further entries" in perl.lines()
    assert client.count(perl.unique_name()) == 0  # 5,500: its one-digit count
