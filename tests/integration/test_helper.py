"""The helper process end to end: private system bus, real conntrack tables in
throw-away namespaces, conntrack(8) as the reference."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from pvevmstate import messages
from pvevmstate.dbus.api import VMSTATE_NAME, helper_id
from pvevmstate.model import IPS_SRC_NAT_DONE
from pvevmstate.payload import MAX_PAYLOAD
from tests import client
from tests.support import (
    REPO,
    HelperFactory,
    NetnsFactory,
    PrivateBus,
    conntrack_table,
    example_lines,
    helper_command,
    realistic_lines,
    save_lines,
    start_bus,
    strip_timeout,
    synthetic_lines,
    timeouts,
    wait_until,
)

VMID = 100


def test_save_equals_conntrack_save_plus_mark(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    ns = netns_factory()
    ns.load(example_lines(), mark=VMID)
    ns.load(synthetic_lines(50, seed=2), mark=200)
    ns.load(synthetic_lines(20, seed=3, base=5000))  # mark 0
    helper = helper_factory(ns, VMID, "--linger", "30")

    assert client.get_id(client.vm(VMID)) == helper_id(VMID)
    data = client.save(client.vm(VMID))
    reference = [ln + " --mark %d" % VMID for ln in ns.save_lines(VMID)]
    got = save_lines(data)
    assert len(got) == len(reference) == 38
    assert sorted(map(strip_timeout, got)) == sorted(map(strip_timeout, reference))
    ref_t = timeouts(reference)
    for key, t in timeouts(got).items():
        assert abs(ref_t[key] - t) <= 3
    assert client.count(client.vm(VMID)) == 38
    assert "Save: 38 entries with mark 100, sent 38" in helper.journal()


def test_save_flush_load_restores_entries(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    ns = netns_factory()
    ns.load(example_lines(), mark=VMID)
    ns.load(synthetic_lines(300, seed=4), mark=VMID)
    ns.load(synthetic_lines(100, seed=5), mark=300)
    before = ns.save_lines(VMID)
    others_before = sorted(map(strip_timeout, ns.save_lines(300)))

    src = helper_factory(ns, VMID)
    data = client.save(client.vm(VMID))
    client.quit_helper(client.vm(VMID))
    assert src.wait_exit() == 0

    ns.flush_mark(VMID)
    assert ns.save_lines(VMID) == []
    dst = helper_factory(ns, VMID)
    client.load(client.vm(VMID), data)
    assert client.count(client.vm(VMID)) == len(before) == 338
    after = ns.save_lines(VMID)
    assert sorted(map(strip_timeout, after)) == sorted(map(strip_timeout, before))
    t_before = timeouts(before)
    for key, t in timeouts(after).items():
        assert 0 <= t_before[key] - t <= 5
    assert sorted(map(strip_timeout, ns.save_lines(300))) == others_before
    assert "created 338 entries with mark 100, refused 0, failed 0" in dst.journal()


def test_load_into_another_namespace_like_a_migration(netns_factory: NetnsFactory,
                                                      helper_factory: HelperFactory) -> None:
    source, target = netns_factory(), netns_factory()
    source.load(synthetic_lines(200, seed=6, v6_share=0.3), mark=VMID)
    target.load(synthetic_lines(30, seed=7, base=50000), mark=555)
    target_other = sorted(map(strip_timeout, target.save_lines(555)))

    helper_factory(source, VMID)
    data = client.save(client.vm(VMID))
    client.quit_helper(client.vm(VMID))
    wait_until(lambda: not client.has_owner(client.vm(VMID)), 10, "source helper gone")

    helper_factory(target, VMID)
    client.load(client.vm(VMID), data)
    assert sorted(map(strip_timeout, target.save_lines(VMID))) == \
        sorted(map(strip_timeout, source.save_lines(VMID)))
    assert sorted(map(strip_timeout, target.save_lines(555))) == target_other


def test_perl_helper_payload_loads(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    # What the Perl helper sends: conntrack -L --mark VMID -o save, " --mark VMID" appended.
    source, target = netns_factory(), netns_factory()
    source.load(example_lines(), mark=VMID)
    perl = "".join(ln + " --mark %d\n" % VMID for ln in source.save_lines(VMID)).encode()

    helper = helper_factory(target, VMID)
    client.load(client.vm(VMID), perl)
    assert sorted(map(strip_timeout, target.save_lines(VMID))) == \
        sorted(map(strip_timeout, source.save_lines(VMID)))
    assert client.count(client.vm(VMID)) == 38
    assert "refused 0, failed 0" in helper.journal()


@pytest.mark.parametrize("nothing", [b"\x00", b"", b"\n"])
def test_perl_nothing_payload(netns_factory: NetnsFactory, helper_factory: HelperFactory, nothing: bytes) -> None:
    ns = netns_factory()
    helper_factory(ns, VMID)
    client.load(client.vm(VMID), nothing)
    assert ns.save_lines() == []
    assert client.count(client.vm(VMID)) == 0


def test_hostile_lines_are_refused_and_touch_nothing_else(netns_factory: NetnsFactory,
                                                          helper_factory: HelperFactory) -> None:
    ns = netns_factory()
    victims = synthetic_lines(20, seed=8)
    ns.load(victims, mark=200)
    ns.load(synthetic_lines(5, seed=9, base=9000))  # mark 0
    table_before = sorted(map(strip_timeout, ns.save_lines()))

    good = "-A -t 500 -u ASSURED -s 198.51.100.1 -d 198.51.100.2 -r 198.51.100.2 -q 198.51.100.1 " \
           "-p udp --sport 1000 --dport 2000 --reply-port-src 2000 --reply-port-dst 1000"
    hostile = [
        "-F",
        "-D --mark 200",
        "-D " + victims[0][3:],
        "-U -t 5 --mark 200",
        victims[1] + " --mark 200",   # foreign mark
        victims[2] + " --mark 0",     # foreign mark
        victims[3],                   # no mark, but the tuple exists with mark 200: EEXIST, unchanged
        "-A -t 5 -u EXPECTED -s 1.2.3.4 -d 1.2.3.5 -r 1.2.3.5 -q 1.2.3.4 -p udp --sport 1 --dport 2",
        "-A -t 5 -s 1.2.3.4 -d 1.2.3.5 -r 1.2.3.5 -q 1.2.3.4 -p udp --sport 99999 --dport 2",
        "-A -t 5 -s 1.2.3.999 -d 1.2.3.5 -r 1.2.3.5 -q 1.2.3.4 -p 50",
        good + " -m 200",
        "garbage \x00\xff",
        good + " --mark %d" % VMID,
    ]
    helper = helper_factory(ns, VMID)
    client.load(client.vm(VMID), "\n".join(hostile).encode("latin-1"))

    assert sorted(map(strip_timeout, ns.save_lines(VMID))) == [strip_timeout(good)]
    others_after = sorted(ln for ln in map(strip_timeout, ns.save_lines()) if ln != strip_timeout(good))
    assert others_after == table_before
    assert client.count(client.vm(VMID)) == 1
    journal = helper.journal()
    assert "only create lines (-A) are accepted, not -F" in journal
    assert "is not this VM's mark 100" in journal
    assert "EEXIST" in journal and "EBUSY" in journal
    assert "created 1 entries" in journal


def test_empty_table_gives_one_byte(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    ns = netns_factory()
    ns.load(synthetic_lines(10), mark=200)
    helper_factory(ns, VMID)
    assert client.save(client.vm(VMID)) == b"\x00"
    assert client.count(client.vm(VMID)) == 0


def test_text_format_over_one_mib_is_capped(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    # --format text: what the Perl helper can read, so at most ~5,000 entries.
    ns = netns_factory()
    lines = synthetic_lines(8000, seed=10, v6_share=0.6)
    ns.load(lines, mark=VMID)
    helper = helper_factory(ns, VMID, "--format", "text")
    data = client.save(client.vm(VMID))
    assert 1_000_000 < len(data) <= MAX_PAYLOAD
    sent = save_lines(data)
    assert client.count(client.vm(VMID)) == len(sent) < 8000
    assert "left out %d" % (8000 - len(sent)) in helper.journal()
    assert "Save: left out by class: " in helper.journal()


def test_auto_format_carries_everything_in_its_compact_section(netns_factory: NetnsFactory,
                                                               helper_factory: HelperFactory) -> None:
    ns, target = netns_factory(), netns_factory()
    ns.load(realistic_lines(20_000, seed=11, min_timeout=900), mark=VMID)
    ns.load(synthetic_lines(300, seed=12), mark=200)
    helper_factory(ns, VMID)
    data = client.save(client.vm(VMID))
    assert data.startswith(b"#PVCT-HYBRID ") and len(data) <= MAX_PAYLOAD
    assert client.count(client.vm(VMID)) == 20_000
    client.quit_helper(client.vm(VMID))
    dst = helper_factory(target, VMID)
    client.load(client.vm(VMID), data)
    assert client.count(client.vm(VMID)) == 20_000
    assert sorted(map(strip_timeout, target.save_lines(VMID))) == sorted(map(strip_timeout, ns.save_lines(VMID)))
    assert target.save_lines(200) == []
    assert "created 20000 entries" in dst.journal()


def test_quit_ends_the_helper_and_releases_names(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    helper = helper_factory(netns_factory(), VMID)
    unique = client.owner(client.vm(VMID))
    assert unique in client.queued_owners()
    client.quit_helper(client.vm(VMID))
    assert helper.wait_exit() == 0
    assert not client.has_owner(client.vm(VMID))
    assert unique not in client.queued_owners()
    assert messages.EXITING % (VMID, "Quit called") in helper.journal()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_the_helper(netns_factory: NetnsFactory, helper_factory: HelperFactory, sig: int) -> None:
    helper = helper_factory(netns_factory(), VMID)
    helper.signal(sig)
    assert helper.wait_exit() == 0
    assert not client.has_owner(client.vm(VMID))
    assert messages.EXITING % (VMID, signal.Signals(sig).name) in helper.journal()


def test_exits_by_itself_after_work_and_linger(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    helper = helper_factory(netns_factory(), VMID, "--linger", "0.5")
    client.save(client.vm(VMID))
    assert helper.wait_exit(10) == 0
    assert messages.EXITING % (VMID, "work done") in helper.journal()


def test_second_helper_replaces_the_first(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    ns = netns_factory()
    first = helper_factory(ns, VMID)
    first_unique = client.owner(client.vm(VMID))
    second = helper_factory(ns, VMID)
    assert first.wait_exit() == 0
    assert messages.TAKEN_OVER % (VMID, client.vm(VMID)) in first.journal()
    second_unique = client.owner(client.vm(VMID))
    assert second_unique != first_unique
    owners = client.queued_owners()
    assert first_unique not in owners and second_unique in owners
    assert [client.get_id(o) for o in owners].count(helper_id(VMID)) == 1
    assert "replacing the stale helper %s" % first_unique in second.journal()


def test_helpers_of_two_vms_queue_and_keep_to_their_entries(netns_factory: NetnsFactory,
                                                            helper_factory: HelperFactory) -> None:
    ns = netns_factory()
    ns.load(synthetic_lines(40, seed=11), mark=100)
    ns.load(synthetic_lines(60, seed=12, base=20000), mark=101)
    helper_factory(ns, 100)
    helper_factory(ns, 101)
    assert len(client.queued_owners()) >= 2
    assert len(save_lines(client.save(client.vm(100)))) == 40
    lines101 = save_lines(client.save(client.vm(101)))
    assert len(lines101) == 60 and all(ln.endswith(" --mark 101") for ln in lines101)


@pytest.mark.parametrize("bad", ["", "abc", "0100", "99", "1000000000", "100 extra", "-5", "1e3", "\u0661\u0660\u0660"])
def test_bad_vmid_exits_2_with_one_line(bad: str, tmp_path: Any) -> None:
    # The bus address points nowhere: the check happens before touching any bus.
    env = dict(os.environ, PYTHONPATH=str(REPO), DBUS_SYSTEM_BUS_ADDRESS="unix:path=%s/none" % tmp_path)
    proc = subprocess.run([sys.executable, "-m", "pvevmstate", *bad.split(" ")] if bad else
                          [sys.executable, "-m", "pvevmstate", ""],
                          env=env, capture_output=True, timeout=30, check=False)
    assert proc.returncode == 2
    err = proc.stderr.decode().splitlines()
    assert len(err) == 1 and err[0].startswith("<3>pve-dbus-vmstate: ")


def test_no_bus_exits_1(netns_factory: NetnsFactory, tmp_path: Any) -> None:
    ns = netns_factory()
    env = dict(os.environ, PYTHONPATH=str(REPO), DBUS_SYSTEM_BUS_ADDRESS="unix:path=%s/none" % tmp_path)
    proc = subprocess.run(helper_command(ns, "100"), env=env, capture_output=True, timeout=30, check=False)
    assert proc.returncode == 1
    assert "<3>cannot connect to the system bus" in proc.stderr.decode()


def test_vmstate_queue_is_what_qemu_sees(netns_factory: NetnsFactory, helper_factory: HelperFactory,
                                         system_bus: PrivateBus) -> None:
    # QEMU walks ListQueuedOwners(org.qemu.VMState1) and reads Id from each owner.
    ns = netns_factory()
    helper_factory(ns, 100)
    helper_factory(ns, 102)
    ids = {client.get_id(o) for o in client.queued_owners()}
    assert {"pve-vmstate-100", "pve-vmstate-102"} <= ids
    assert VMSTATE_NAME == "org.qemu.VMState1"


def test_lost_bus_ends_the_helper_with_an_error(netns_factory: NetnsFactory, helper_factory: HelperFactory,
                                                tmp_path: Any) -> None:
    bus = start_bus(tmp_path / "doomed-bus")
    try:
        helper = helper_factory(netns_factory(), VMID, bus=bus)
        bus.proc.kill()
        bus.proc.wait()
        assert helper.wait_exit(10) == 1
        assert "<3>stopping: the connection to the system bus was lost" in helper.journal()
    finally:
        bus.stop()


def test_introspection_shows_both_interfaces(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    helper_factory(netns_factory(), VMID)
    out = subprocess.run(["busctl", "--system", "introspect", client.vm(VMID), "/org/qemu/VMState1"],
                         capture_output=True, check=True, timeout=30).stdout.decode()
    for member in ("org.qemu.VMState1", ".Save", ".Load", ".Id", "com.proxmox.VMStateHelper",
                   ".Quit", ".NumMigratedEntries"):
        assert member in out


def kernel_entries(ns: Any, mark: int) -> list[Any]:
    """The namespace's entries with ``mark`` as our netlink code reads them."""
    with conntrack_table(ns) as table:
        return sorted(table.dump(mark), key=lambda e: (e.orig_src, e.sport or 0))


def test_compact_keeps_what_the_text_drops(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    # A port-only source NAT (the save text shows the port but not the NAT)
    # and the kernel's TCP window scale and flags.
    source, target, via_text = netns_factory(), netns_factory(), netns_factory()
    source.conntrack("-I", "-s", "10.0.0.1", "-d", "192.0.2.1", "-p", "tcp", "--sport", "1000", "--dport", "443",
                     "--state", "ESTABLISHED", "-u", "SEEN_REPLY,ASSURED", "-t", "900",
                     "--src-nat", "10.0.0.1:2000", "--mark", str(VMID))
    source.load(synthetic_lines(50, seed=13), mark=VMID)
    helper_factory(source, VMID, "--format", "compact")
    data = client.save(client.vm(VMID))
    assert data.startswith(b"PVCT")
    client.quit_helper(client.vm(VMID))
    helper_factory(target, VMID)
    client.load(client.vm(VMID), data)
    want, got = kernel_entries(source, VMID), kernel_entries(target, VMID)
    assert len(got) == len(want) == 51

    def essentials(e: Any) -> tuple[Any, ...]:
        return (e.orig_src, e.orig_dst, e.reply_src, e.reply_dst, e.sport, e.dport, e.reply_sport, e.reply_dport,
                e.status, e.state, e.tcp_wscale_orig, e.tcp_wscale_reply, e.tcp_flags_orig, e.tcp_flags_reply)

    assert [essentials(e) for e in got] == [essentials(e) for e in want]
    nat = [e for e in got if e.reply_dport == 2000]
    assert len(nat) == 1 and nat[0].status & IPS_SRC_NAT_DONE
    # The same entry through the save text loses its NAT binding.
    via_text.load([ln for ln in source.save_lines(VMID) if "--reply-port-dst 2000" in ln], mark=VMID)
    (text_entry,) = kernel_entries(via_text, VMID)
    assert text_entry.reply_dport == 2000 and not text_entry.status & IPS_SRC_NAT_DONE
