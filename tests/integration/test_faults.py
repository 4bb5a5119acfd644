"""Faults injected for real: QEMU or its monitor vanishing, the bus dying, dumps
interrupted or overrun, a full table, calls twice, at once or out of order, and
SIGTERM in the middle of a Save. Each time QEMU gets a valid answer, the exit
status and the journal say what happened, and nothing is left behind."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from pvevmstate import messages, netlink
from pvevmstate.dbus.api import VMSTATE_PATH, VMState1Interface
from pvevmstate.errors import ConntrackError
from pvevmstate.netlink import conntrack as conntrack_mod
from pvevmstate.netlink.conntrack import Conntrack, open_netlink_socket
from pvevmstate.payload import NO_STATE
from tests import client
from tests.support import (
    HelperFactory,
    NetnsFactory,
    QemuFactory,
    realistic_lines,
    save_lines,
    start_bus,
    synthetic_lines,
    wait_until,
)

VMID = 100


def _no_trace(qemu: Any) -> None:
    """No QEMU object and no bus name left for the VM."""
    if qemu is not None and qemu.proc.poll() is None:
        assert "pve-vmstate" not in qemu.objects()
    assert not client.has_owner(client.vm(VMID))


# ------------------------------------------------------- QEMU and the bus

def test_qemu_killed_while_the_helper_runs(netns_factory: NetnsFactory, helper_factory: HelperFactory,
                                          qemu_factory: QemuFactory) -> None:
    ns, qemu = netns_factory(), qemu_factory("vm")
    ns.load(synthetic_lines(30, seed=4), mark=VMID)
    helper = helper_factory(ns, VMID, qemu=qemu)
    qemu.proc.kill()
    qemu.proc.wait()
    # Save needs only the table: QEMU's death does not spoil it.
    assert len(save_lines(client.save(client.vm(VMID)))) == 30
    client.quit_helper(client.vm(VMID))
    assert helper.wait_exit() == 0
    assert messages.head(messages.OBJECT_NOT_REMOVED) in helper.journal()
    _no_trace(None)


def test_qmp_socket_removed_while_the_helper_runs(netns_factory: NetnsFactory, helper_factory: HelperFactory,
                                                 qemu_factory: QemuFactory) -> None:
    qemu = qemu_factory("vm")
    helper = helper_factory(netns_factory(), VMID, qemu=qemu)
    os.unlink(qemu.qmp_path)
    helper.signal(signal.SIGTERM)
    assert helper.wait_exit() == 0
    journal = helper.journal()
    assert messages.head(messages.OBJECT_NOT_REMOVED) in journal
    assert str(qemu.qmp_path) in journal  # says which socket it could not reach
    _no_trace(None)


def test_bus_killed_exits_1_and_still_removes_the_object(netns_factory: NetnsFactory, helper_factory: HelperFactory,
                                                         qemu_factory: QemuFactory, tmp_path: Any) -> None:
    bus, qemu = start_bus(tmp_path / "doomed-bus"), qemu_factory("vm")
    try:
        helper = helper_factory(netns_factory(), VMID, bus=bus, qemu=qemu)
        bus.proc.kill()
        bus.proc.wait()
        assert helper.wait_exit(10) == 1
        journal = helper.journal()
        assert journal.count("<3>") == 1 and "<3>stopping: the connection to the system bus was lost" in journal
        # The object would make the next migration of this VM fail: it goes too.
        assert "pve-vmstate" not in qemu.objects()
    finally:
        bus.stop()


# ------------------------------------------------------------- netlink

class FaultySocket:
    """The real netlink socket, with one fault injected into what it receives.

    The kernel still answers every request; only the first datagram of the dump
    is marked interrupted, or the first receive fails with ENOBUFS, as the
    kernel does when the table changes during a dump or the buffer overruns.
    """

    def __init__(self, fault: str) -> None:
        self._sock = open_netlink_socket()
        self._fault = fault
        self.fired = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def recv_into(self, buf: bytearray, nbytes: int = 0, flags: int = 0) -> int:
        if self._fault == "enobufs" and not self.fired:
            self.fired = True
            raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
        n = self._sock.recv_into(buf, nbytes, flags)
        if self._fault == "intr" and not self.fired:
            self.fired = True
            flags_now = int.from_bytes(buf[6:8], "little")
            buf[6:8] = (flags_now | netlink.NLM_F_DUMP_INTR).to_bytes(2, "little")
        return n


@pytest.mark.parametrize("fault", ["intr", "enobufs"])
def test_interrupted_or_overrun_dump_is_restarted(netns_factory: NetnsFactory, fault: str,
                                                  caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from pyroute2 import netns
    ns = netns_factory()
    ns.load(realistic_lines(3000, seed=6, min_timeout=600), mark=VMID)
    ns.load(synthetic_lines(100, seed=7), mark=200)
    netns.pushns(ns.name)
    try:
        faulty = FaultySocket(fault)
        table = Conntrack(faulty)  # type: ignore[arg-type]  # a stand-in with the socket methods Conntrack uses
        # The restart's fresh socket must also be opened inside the namespace.
        real_open = conntrack_mod.open_netlink_socket

        def open_in_ns() -> socket.socket:
            netns.pushns(ns.name)
            try:
                return real_open()
            finally:
                netns.popns()
        monkeypatch.setattr(conntrack_mod, "open_netlink_socket", open_in_ns)
    finally:
        netns.popns()
    with caplog.at_level(logging.WARNING, logger="pvevmstate"):
        entries = table.dump(VMID)
    table.close()
    assert faulty.fired
    assert len(entries) == 3000 and all(e.mark == VMID for e in entries)
    reason = "NLM_F_DUMP_INTR" if fault == "intr" else "ENOBUFS"
    assert any(reason in r.getMessage() and "restarting (attempt 1 of" in r.getMessage() for r in caplog.records)


def test_dump_that_keeps_failing_gives_up_and_save_degrades(netns_factory: NetnsFactory,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from pyroute2 import netns
    ns = netns_factory()
    ns.load(synthetic_lines(50, seed=8), mark=VMID)

    def always_faulty() -> socket.socket:
        netns.pushns(ns.name)
        try:
            return FaultySocket("enobufs")  # type: ignore[return-value]  # stands in for the socket, as above
        finally:
            netns.popns()
    monkeypatch.setattr(conntrack_mod, "open_netlink_socket", always_faulty)
    table = Conntrack()
    with pytest.raises(ConntrackError, match="did not complete after"):
        table.dump(VMID)
    table.close()


def test_full_table_on_load_creates_nothing_and_answers(netns_factory: NetnsFactory,
                                                        helper_factory: HelperFactory) -> None:
    ns = netns_factory()
    # The limit is global (a namespace cannot lower it), the count per namespace.
    # The kernel's default is 262,144 on any machine over 4 GiB: ~4 s to fill.
    limit = int(Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())
    # Fill this namespace's table to the (global) limit with entries the kernel
    # cannot evict early, so that every further create fails: assured, and not
    # TCP in a closing state (the conntrack GC worker drops those, assured or
    # not, once the table is 95 % full; a create then finds room after all).
    closing = ("FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE")
    assured = [ln for ln in realistic_lines(limit * 3 // 2, seed=9, min_timeout=600)
               if "ASSURED" in ln and not any(" --state %s" % st in ln for st in closing)]
    assert len(assured) >= limit
    ns.load(assured[:limit], mark=200)

    def count() -> int:
        return int(ns.run("sysctl", "-n", "net.netfilter.nf_conntrack_count").stdout)
    assert count() >= limit, "the table did not fill: %d of %d" % (count(), limit)
    helper = helper_factory(ns, VMID, "--linger", "0.5")
    payload = "".join("%s --mark %d\n" % (ln, VMID) for ln in synthetic_lines(100, seed=10, base=500000))
    client.load(client.vm(VMID), payload.encode())  # answers: no D-Bus error reaches QEMU
    assert client.count(client.vm(VMID)) == 0, helper.journal()
    assert helper.wait_exit() == 0
    journal = helper.journal()
    # Nothing is even tried: a full table would evict or refuse.
    assert "<4>" + messages.LOAD_TABLE_FULL.split(" %d of")[0] % 100 in journal, journal
    assert "created 0 entries" in journal and "failed 0" in journal and "left out 100" in journal
    assert count() == limit and len(ns.save_lines(VMID)) == 0
    _no_trace(helper.qemu)


# ------------------------------------------------- calls out of the script

async def _both(calls: list[Any]) -> list[Any]:
    return list(await asyncio.gather(*calls))


def _proxy(bus: Any) -> Any:
    return VMState1Interface.new_proxy(client.vm(VMID), VMSTATE_PATH, bus)


def test_save_twice_at_once_then_load_on_the_source(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    ns = netns_factory()
    lines = synthetic_lines(200, seed=11)
    ns.load(lines, mark=VMID)
    helper = helper_factory(ns, VMID, "--linger", "0.5")

    async def run() -> tuple[list[bytes], bytes]:
        bus = client.open_bus()
        try:
            first, second = await _both([_proxy(bus).save(), _proxy(bus).save()])
            third = await _proxy(bus).save()
            # Load on the source, after its Save: every entry is there already.
            await _proxy(bus).load(first)
            return [bytes(first), bytes(second)], bytes(third)
        finally:
            bus.close()
    (first, second), third = asyncio.run(run())
    assert first == second and sorted(save_lines(third)) == sorted(save_lines(first))
    assert len(save_lines(first)) == 200
    assert helper.wait_exit() == 0
    journal = helper.journal()
    assert journal.count("Save: 200 entries") == 3
    assert "kernel refused 200 entries: EEXIST" in journal
    assert len(ns.save_lines(VMID)) == 200
    _no_trace(helper.qemu)


def test_load_twice_at_once_creates_each_entry_once(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    src, dst = netns_factory(), netns_factory()
    src.load(synthetic_lines(300, seed=12), mark=VMID)
    saver = helper_factory(src, VMID)
    data = client.save(client.vm(VMID))
    client.quit_helper(client.vm(VMID))
    assert saver.wait_exit() == 0
    loader = helper_factory(dst, VMID, "--linger", "0.5")

    async def run() -> None:
        bus = client.open_bus()
        try:
            await _both([_proxy(bus).load(data), _proxy(bus).load(data)])
        finally:
            bus.close()
    asyncio.run(run())
    assert len(dst.save_lines(VMID)) == 300
    assert loader.wait_exit() == 0
    journal = loader.journal()
    assert "created 300 entries" in journal and "kernel refused 300 entries: EEXIST" in journal
    _no_trace(loader.qemu)


def test_load_of_nothing_before_any_save(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    ns = netns_factory()
    helper = helper_factory(ns, VMID, "--linger", "0.5")
    client.load(client.vm(VMID), NO_STATE)
    assert client.save(client.vm(VMID)) == NO_STATE  # then a Save: still valid
    assert helper.wait_exit() == 0
    _no_trace(helper.qemu)


def test_sigterm_during_a_save_still_answers_it(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    ns = netns_factory()
    ns.load(realistic_lines(50_000, seed=13, min_timeout=900), mark=VMID)
    helper = helper_factory(ns, VMID)

    async def run() -> bytes:
        bus = client.open_bus()
        try:
            saving = asyncio.ensure_future(_proxy(bus).save())
            await asyncio.sleep(0.1)  # well inside a Save of 50,000 entries
            assert not saving.done()
            helper.signal(signal.SIGTERM)
            return bytes(await saving)
        finally:
            bus.close()
    data = asyncio.run(run())
    assert data.startswith(b"#PVCT-HYBRID ")
    assert helper.wait_exit() == 0
    journal = helper.journal()
    # The stop waits for the Save in flight, then removes the object and exits.
    assert (journal.index(messages.STOPPING % "SIGTERM") < journal.index("Save: 50000 entries")
            < journal.index(messages.head(messages.OBJECT_REMOVED))
            < journal.index(messages.EXITING % (VMID, "SIGTERM")))
    _no_trace(helper.qemu)
    wait_until(lambda: not client.has_owner(client.vm(VMID)), 5, "names released")
