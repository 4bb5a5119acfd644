"""What a reply's size alone costs on the bus: the floor under every Save.

A stub peer on a private ``dbus-daemon`` (the benchmark's kind of bus) answers
a method with N bytes already in memory; the caller times the call, as the
benchmark times Save. dbus-daemon reads a connection at most 2,048 bytes a
read, two reads a turn of its main loop, and forwards a message only once it
has all of it, so the cost grows with the size, whatever the peer does: the
difference between 1 MiB and 16 bytes is the share of a Save at 5,000
entries (a ~1 MiB hybrid payload) that no helper can make smaller.

    python3 -m tests.bench.relay [--repeat R] [SIZE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sdbus import DbusInterfaceCommonAsync, dbus_method_async, sd_bus_open_system

from tests import client
from tests.support import REPO, start_bus, stop_process

NAME = "org.pvevmstate.BenchRelay"
PATH = "/org/pvevmstate/BenchRelay"


class Relay(DbusInterfaceCommonAsync, interface_name="org.pvevmstate.BenchRelay"):
    """Answers ``Get(n)`` with ``n`` bytes made before the call."""

    def __init__(self, data: bytes = b"") -> None:
        super().__init__()
        self._data = data

    @dbus_method_async(input_signature="u", result_signature="ay")
    async def get(self, n: int) -> bytes:
        return self._data[:n]


async def serve(largest: int) -> None:
    bus = sd_bus_open_system()
    relay = Relay(bytes(range(256)) * (largest // 256 + 1))
    relay.export_to_dbus(PATH, bus)
    await bus.request_name_async(NAME, 0)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def measure(address: str, sizes: list[int], repeat: int) -> dict[int, list[float]]:
    conn = client.open_bus(address)
    proxy = Relay.new_proxy(NAME, PATH, conn)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    try:
        for _ in range(repeat):
            for n in sizes:  # interleaved: the machine's speed drifts
                t0 = time.perf_counter()
                got = bytes(await proxy.get(n))
                times[n].append((time.perf_counter() - t0) * 1e3)
                assert len(got) == n
                await asyncio.sleep(0.05)
    finally:
        conn.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("sizes", type=int, nargs="*", default=[16, 1 << 20])
    args = parser.parse_args()
    if args.serve is not None:
        asyncio.run(serve(args.serve))
        return 0
    with tempfile.TemporaryDirectory(prefix="pvevmstate-relay-") as work:
        bus = start_bus(Path(work) / "bus")
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address, PYTHONPATH=str(REPO))
        peer = subprocess.Popen([sys.executable, "-m", "tests.bench.relay", "--serve", str(max(args.sizes))],
                                cwd=REPO, env=env, stdout=subprocess.PIPE)
        try:
            assert peer.stdout is not None
            if peer.stdout.readline().strip() != b"ready":
                raise RuntimeError("the stub peer did not start")
            times = asyncio.run(measure(bus.address, args.sizes, args.repeat))
        finally:
            stop_process(peer, 5)
            bus.stop()
    print("| reply bytes | median ms | min ms |")
    print("|---|---|---|")
    for n, ms in times.items():
        print("| %d | %.2f | %.2f |" % (n, statistics.median(ms), min(ms)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
