"""Where Save and Load spend their time, phase by phase, in-process (no D-Bus).

The profile behind the benchmark's ratios: for N entries (among 3·N others) in a
throw-away namespace it times the kernel's part of the dump (raw receive, no
decoding), decoding into entries, encoding the payload, decoding the payload
into entries (what ``decode`` does) and their create requests (a text
payload's Load), decoding it straight into create requests (a compact or
hybrid payload's Load), and creating them: numbering them and the kernel's part;
then Load end to end, where the two overlap.

    python3 -m tests.bench.phases [N ...]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import cast

from pyroute2 import netns

from pvevmstate import netlink, payload, savecache
from pvevmstate.model import CreateBatch
from pvevmstate.netlink.conntrack import Conntrack
from pvevmstate.payload import Decoded
from pvevmstate.vmstate import VMState
from tests.support import realistic_lines

VMID = 100


def timed(fn: Callable[[], object], repeat: int = 5) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), result


def raw_dump(table: Conntrack) -> int:
    """Receive a mark-filtered dump without decoding it: the kernel's share."""
    # The adapter's own socket: what its dump receives, without the decoding.
    sock, buf = table._sock, table._buf
    sock.send(netlink.dump_request(1, VMID))
    total = 0
    while True:
        n = sock.recv_into(buf)
        total += n
        chunk = netlink.decode_dump(bytes(buf[:n]), n, 1, []) if n < 64 else None
        if chunk is not None and chunk.done:
            return total
        if n >= 16 and int.from_bytes(buf[n - 16 + 4:n - 16 + 6], sys.byteorder) == netlink.NLMSG_DONE:
            return total


def phases(n: int) -> dict[str, float]:
    ns = "pvevmstate-phases-%d" % os.getpid()
    netns.create(ns)
    try:
        lines = realistic_lines(4 * n, seed=n, min_timeout=900)
        for mark, part in ((VMID, lines[:n]), (200, lines[n:])):
            text = "".join("%s --mark %d\n" % (ln, mark) for ln in part).encode()
            subprocess.run(["conntrack", "--load-file", "-"], input=text, check=True,
                           stderr=subprocess.DEVNULL, preexec_fn=lambda: netns.setns(ns))
        netns.pushns(ns)
        try:
            table = Conntrack()
        finally:
            netns.popns()
        out: dict[str, float] = {"entries": n}
        out["kernel dump (receive only)"], _ = timed(lambda: raw_dump(table))
        out["dump + decode"], entries = timed(lambda: table.dump(VMID))
        assert isinstance(entries, list)
        out["decode"] = out["dump + decode"] - out["kernel dump (receive only)"]
        out["encode payload (auto)"], encoded = timed(lambda: payload.encode(entries, VMID))
        assert isinstance(encoded, payload.Payload)
        out["payload bytes"] = len(encoded.data)
        # Save as the helper does it with its cache warm: a background scan,
        # then the dump received in a thread while it is scanned, then assembly.
        background = table.dump_into(VMID, lambda: savecache.Scan(savecache.EMPTY, table.layouts, collect=True))
        assert background is not None
        pieces = background.pieces()
        state = VMState(VMID, table)

        def scan_only() -> savecache.Scan:
            found = table.dump_into(VMID, lambda: savecache.Scan(pieces, table.layouts, ahead=True),
                                        overlap=True)
            assert found is not None
            return found
        out["cached scan (dump overlapped)"], scanned = timed(scan_only)
        assert isinstance(scanned, savecache.Scan)
        out["assemble from the scan"], _ = timed(lambda: payload.encode_sendable(scanned, VMID))
        out["Save, cache warm"], _ = timed(lambda: state._save(pieces))
        out["decode payload into entries"], decoded_any = timed(lambda: payload.decode(encoded.data, VMID))
        decoded = cast(Decoded, decoded_any)
        out["create requests of entries"], _ = timed(lambda: netlink.create_batch(decoded.entries, VMID))
        # What Load does: records straight to numbered create requests, a shape at a time (entries only where needed).
        out["decode payload into requests"], batch_any = timed(
            lambda: payload.Incoming(encoded.data, VMID).batch(range(n), table.reserve_seqs))
        batch = cast(CreateBatch, batch_any)
        assert len(batch) == n

        def into_empty(fn: Callable[[], object]) -> float:
            """ms of ``fn`` run once the VM's entries are deleted."""
            subprocess.run(["conntrack", "-D", "--mark", str(VMID)], check=False, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, preexec_fn=lambda: netns.setns(ns))
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3

        out["kernel create (numbered requests)"] = statistics.median(
            into_empty(lambda: table.create(batch)) for _ in range(3))
        # Load end to end: payload read, each chunk's requests built while a
        # second thread has the kernel create the chunk before.
        out["Load, end to end"] = statistics.median(into_empty(lambda: state._load(encoded.data)) for _ in range(3))
        table.close()
        return out
    finally:
        netns.remove(ns)


def main() -> int:
    sizes = [int(a) for a in sys.argv[1:]] or [5000, 50000]
    for n in sizes:
        for key, value in phases(n).items():
            print("%-28s %10.1f" % (key, value))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
