"""Save through fresh helpers of two source trees, alternating: is B faster than A?

One throw-away namespace holds N entries with the VM's mark among 3·N others
(the benchmark's table); each round starts a helper from tree A and one from
tree B, in alternating order, lets each warm its cache as a helper waiting
for Save does, times one Save through a private bus, and times the kernel's
own dump once. A change of a few milliseconds is smaller than this machine's
drift between two benchmark runs, not than the difference within a pair.

    python3 -m tests.bench.ab N ROUNDS TREE_A TREE_B

Each tree is a checkout, byte-compiled here as installed, with the libraries
the helper imports (``support.byte_compile``); the helper runs from the
tree's directory. Prints medians of Save as the caller sees it
("save"), as its journal line gives it ("inside"), the difference ("gap"), the
kernel's dump, and in how many pairs B was the faster.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pyroute2 import netns

from pvevmstate import messages
from pvevmstate.dbus.api import VMSTATE_PATH, VMState1Interface, helper_bus_name
from tests import client
from tests.bench import bench
from tests.support import byte_compile, realistic_lines, start_bus, start_qemu

Sample = tuple[float, float]  # Save as the caller sees it, and inside the helper (ms)


async def rounds(n: int, count: int, trees: list[Path]) -> tuple[dict[Path, list[Sample]], list[float]]:
    work = Path(tempfile.mkdtemp(prefix="pvevmstate-ab-"))
    ns = "pvevmstate-ab-%d" % os.getpid()
    netns.create(ns)
    bus = start_bus(work / "bus")
    qemu = start_qemu(work, "ab")
    conn = client.open_bus(bus.address)
    samples: dict[Path, list[Sample]] = {t: [] for t in trees}
    kernel: list[float] = []
    try:
        lines = realistic_lines(4 * n, seed=n, min_timeout=900)
        bench.load_table(ns, lines[:n], bench.VMID)
        for i, mark in enumerate(bench.OTHER_MARKS):
            bench.load_table(ns, lines[n:][i::len(bench.OTHER_MARKS)], mark)
        for r in range(count):
            for tree in trees if r % 2 == 0 else trees[::-1]:
                os.chdir(tree)  # (``python -m`` puts the directory first on the helper's path)
                helper, _, _ = await bench.start_helper(ns, bus, qemu, work / ("helper-%d.log" % r), conn,
                                                        repo=tree)
                try:
                    while messages.head(messages.CACHE_WARM) not in helper.log.read_text():
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(0.3)
                    proxy = VMState1Interface.new_proxy(helper_bus_name(bench.VMID), VMSTATE_PATH, conn)
                    t0 = time.perf_counter()
                    await proxy.save()
                    took = (time.perf_counter() - t0) * 1e3
                    samples[tree].append((took, bench.save_duration(helper.log.read_text())))
                finally:
                    helper.stop()
                kernel.append(bench.kernel_dump_ms(ns, bench.VMID))
    finally:
        conn.close()
        qemu.stop()
        bus.stop()
        netns.remove(ns)
    return samples, kernel


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entries", type=int)
    parser.add_argument("rounds", type=int)
    parser.add_argument("trees", type=Path, nargs=2)
    args = parser.parse_args()
    trees = [t.resolve() for t in args.trees]
    byte_compile(*trees)
    samples, kernel = asyncio.run(rounds(args.entries, args.rounds, trees))
    med = statistics.median
    for label, tree in zip("AB", trees, strict=True):
        got = samples[tree]
        print("%s %-40s save %.1f  inside %.1f  gap %.1f  ms (median of %d)" % (
            label, tree, med(s for s, _ in got), med(i for _, i in got), med(s - i for s, i in got), len(got)))
    print("kernel-only dump %.1f ms (median of %d)" % (med(kernel), len(kernel)))
    a, b = samples[trees[0]], samples[trees[1]]
    print("pairs where B was faster: save %d of %d, inside %d of %d" % (
        sum(y[0] < x[0] for x, y in zip(a, b, strict=True)), len(a),
        sum(y[1] < x[1] for x, y in zip(a, b, strict=True)), len(a)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
