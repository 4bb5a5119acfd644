"""Ten helpers (VMs 100..109) on one bus and one conntrack table, as on a busy host
during parallel migrations, and qemu-server's way of stopping one of them."""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
from typing import Any

import pytest

from pvevmstate.dbus.api import VMSTATE_PATH, VMState1Interface, VMStateHelperInterface
from tests import client
from tests.support import (
    PERL_CALLER,
    Helper,
    HelperFactory,
    NetnsFactory,
    require,
    save_lines,
    synthetic_lines,
    wait_until,
)

VMIDS = list(range(100, 110))


@pytest.fixture
def ten(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> tuple[Any, dict[int, Helper]]:
    ns = netns_factory()
    for i, vmid in enumerate(VMIDS):
        # A different number of entries per VM, so a mix-up shows in the counts.
        ns.load(synthetic_lines(20 + 3 * i, seed=vmid, base=1000 * i), mark=vmid)
    ns.load(synthetic_lines(50, seed=7, base=30000), mark=200)
    helpers = {vmid: helper_factory(ns, vmid) for vmid in VMIDS}
    return ns, helpers


async def _save_all(names: list[str]) -> list[bytes]:
    bus = client.open_bus()
    try:
        proxies = [VMState1Interface.new_proxy(n, VMSTATE_PATH, bus) for n in names]
        return [bytes(b) for b in await asyncio.gather(*(p.save() for p in proxies))]
    finally:
        bus.close()


def test_concurrent_saves_each_return_only_their_vm(ten: tuple[Any, dict[int, Helper]]) -> None:
    ns, _helpers = ten
    payloads = asyncio.run(_save_all([client.vm(v) for v in VMIDS]))
    for vmid, data in zip(VMIDS, payloads, strict=True):
        got = sorted(save_lines(data))
        want = sorted("%s --mark %d" % (ln, vmid) for ln in ns.save_lines(mark=vmid))
        assert [ln.split(" -t ")[0] for ln in got] == [ln.split(" -t ")[0] for ln in want]
        assert len(got) == 20 + 3 * VMIDS.index(vmid)
        assert all(ln.endswith(" --mark %d" % vmid) for ln in got)


def test_quit_through_each_vm_name_ends_exactly_that_helper(ten: tuple[Any, dict[int, Helper]]) -> None:
    _ns, helpers = ten
    order = VMIDS[:]
    random.Random(5).shuffle(order)
    for n, vmid in enumerate(order, 1):
        client.quit_helper(client.vm(vmid))
        assert helpers[vmid].wait_exit() == 0
        running = {v for v, h in helpers.items() if h.proc.poll() is None}
        assert running == set(order[n:]), "Quit for VM %d ended %s" % (vmid, set(VMIDS) - running)
        assert not client.has_owner(client.vm(vmid))


def _counts(vmids: list[int]) -> dict[int, int]:
    async def read() -> list[int]:
        bus = client.open_bus()
        try:
            return [int(await VMStateHelperInterface.new_proxy(client.vm(v), VMSTATE_PATH, bus)
                        .num_migrated_entries.get_async()) for v in vmids]
        finally:
            bus.close()
    return dict(zip(vmids, asyncio.run(read()), strict=True))


def test_qemu_server_caller_in_perl_ends_the_right_helper(ten: tuple[Any, dict[int, Helper]]) -> None:
    require(shutil.which("perl") is not None and subprocess.run(
        ["perl", "-MNet::DBus", "-e", "1"], check=False, capture_output=True).returncode == 0,
        "needs Perl's Net::DBus (Debian: libnet-dbus-perl)")
    _ns, helpers = ten
    # Save on every helper first, so that each reports its own count.
    asyncio.run(_save_all([client.vm(v) for v in VMIDS]))
    counts = _counts(VMIDS)
    assert counts == {v: 20 + 3 * i for i, v in enumerate(VMIDS)}
    order = VMIDS[:]
    random.Random(9).shuffle(order)
    for n, vmid in enumerate(order, 1):
        unique = client.owner(client.vm(vmid))
        out = subprocess.run(["perl", str(PERL_CALLER), str(vmid)], capture_output=True, text=True,
                             timeout=90, check=False)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [unique, str(counts[vmid])]
        assert helpers[vmid].wait_exit() == 0
        running = {v for v, h in helpers.items() if h.proc.poll() is None}
        assert running == set(order[n:])
    wait_until(lambda: not any(client.get_id(o).startswith("pve-vmstate-1") for o in client.queued_owners()),
               10, "the queue to hold none of the ten helpers")
    out = subprocess.run(["perl", str(PERL_CALLER), "105"], capture_output=True, text=True, timeout=90, check=False)
    assert out.returncode == 3
