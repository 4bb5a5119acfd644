"""QEMU reads the Id of every helper on the bus during any VM's migration: a helper
busy with a big Save must not hold up those reads, its own or another's."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from sdbus import SdBus

from pvevmstate import messages
from pvevmstate.dbus.api import VMSTATE_PATH, VMState1Interface
from tests import client
from tests.support import HelperFactory, NetnsFactory, realistic_lines

#: What the issue asks: an Id read answers within 50 ms, whatever the helper is doing.
ID_DEADLINE_MS = 50.0
ENTRIES = 50_000


async def _sample(bus: SdBus, names: list[str], done: Callable[[], bool],
                  limit: float = math.inf) -> dict[str, list[float]]:
    """Read each helper's Id in turn, in ms, until ``done()`` (or ``limit`` seconds)."""
    proxies = {name: VMState1Interface.new_proxy(name, VMSTATE_PATH, bus) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    give_up = time.monotonic() + limit
    while not done() and time.monotonic() < give_up:
        for name, proxy in proxies.items():
            t0 = time.perf_counter()
            await proxy.id.get_async()
            samples[name].append((time.perf_counter() - t0) * 1e3)
        await asyncio.sleep(0.005)
    return samples


async def _ids_during_save(busy: str, other: str) -> tuple[bytes, dict[str, list[float]]]:
    bus = client.open_bus()
    try:
        saving = asyncio.ensure_future(VMState1Interface.new_proxy(busy, VMSTATE_PATH, bus).save())
        # Let the Save reach the helper before sampling.
        await asyncio.sleep(0.01)
        samples = await _sample(bus, [busy, other], saving.done)
        return bytes(await saving), samples
    finally:
        bus.close()


def test_id_answers_within_50_ms_during_a_50000_entry_save(netns_factory: NetnsFactory,
                                                           helper_factory: HelperFactory) -> None:
    ns = netns_factory()
    ns.load(realistic_lines(ENTRIES, seed=21, min_timeout=900), mark=100)
    helper_factory(ns, 100)
    helper_factory(ns, 101)
    data, samples = asyncio.run(_ids_during_save(client.vm(100), client.vm(101)))
    assert data.startswith(b"#PVCT-HYBRID 1 50000 ")  # the Save really carried the 50,000 entries
    _check(samples, "the Save")


async def _ids_until(names: list[str], done: Callable[[], bool], limit: float) -> dict[str, list[float]]:
    bus = client.open_bus()
    try:
        return await _sample(bus, names, done, limit)
    finally:
        bus.close()


def test_id_answers_within_50_ms_during_background_dumps_and_a_cached_save(
        netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    # The background dumps for Save's cache run while QEMU may read any
    # helper's Id; the first is the costliest (every entry encoded).
    ns = netns_factory()
    ns.load(realistic_lines(ENTRIES, seed=22, min_timeout=900), mark=100)
    helper = helper_factory(ns, 100, "--cache-interval", "0.5")
    helper_factory(ns, 101)
    warm = messages.head(messages.CACHE_WARM)
    samples = asyncio.run(_ids_until([client.vm(100), client.vm(101)], lambda: warm in helper.journal(), 60))
    assert warm in helper.journal()
    _check(samples, "the first background dump")
    data, samples = asyncio.run(_ids_during_save(client.vm(100), client.vm(101)))
    assert data.startswith(b"#PVCT-HYBRID 1 50000 ")
    assert "50000 of them encoded ahead" in helper.journal()
    _check(samples, "the Save")


def _check(samples: dict[str, list[float]], during: str) -> None:
    for name, times in samples.items():
        # Enough reads landed inside it to mean something.
        assert len(times) >= 5, "only %d Id reads of %s during %s" % (len(times), name, during)
        assert max(times) <= ID_DEADLINE_MS, "%s during %s: slowest Id read %.1f ms (%s)" % (
            name, during, max(times), ", ".join("%.1f" % t for t in sorted(times)[-5:]))
