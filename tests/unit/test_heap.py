"""The heap set-up Save relies on: memory touched ahead is reused without page faults, and trimmed back."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pvevmstate import heap
from tests.support import REPO

# Run in a child: the allocator's settings are per process and for good.
_PRELUDE = r"""
import json, resource, sys, threading
from pvevmstate import heap

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
"""

_CHILD = _PRELUDE + r"""
configured = heap.configure() if sys.argv[1] == "configure" else False
prefault = heap.Prefault(16 << 20)
got = {}

def save_thread():  # as Save: the dump's thread touches and frees
    f0, r0 = faults(), rss()
    for _ in range((16 << 20) // heap.SLICE):
        prefault.step()
    got["touched"] = faults() - f0
    prefault.release()  # right away: the last slices border the heap's top
    got["kept"] = rss() - r0

worker = threading.Thread(target=save_thread)
worker.start()
worker.join()
touched, kept = got["touched"], got["kept"]
# As the reply: another thread (the event loop's) allocates.
f1 = faults()
payload = bytes(4 << 20) + b"x"       # what an assembly allocates: MiBs at once
joined = b"".join((payload, payload))
reused = faults() - f1
del payload, joined
r1 = rss()
heap.trim()
print(json.dumps({"configured": configured, "touched": touched, "kept": kept, "reused": reused,
                  "trimmed": r1 - rss()}))
"""


def _child(mode: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], cwd=REPO, capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(REPO)})
    result: dict[str, int] = json.loads(out.stdout)
    return result


@pytest.mark.skipif(heap._libc() is None, reason="not glibc")
def test_memory_touched_ahead_is_reused_then_trimmed() -> None:
    got = _child("configure")
    assert got["configured"]
    pages = (16 << 20) // 4096
    assert got["touched"] >= pages * 0.9
    # Freed, the touched pages stay with the process (no trim on free) ...
    assert got["kept"] >= (16 << 20) * 0.9, got
    # ... and the 12 MiB another thread allocates next come from them, not
    # from new ones.
    assert got["reused"] < 100, got
    assert got["trimmed"] >= (12 << 20) * 0.9, got


@pytest.mark.skipif(heap._libc() is None, reason="not glibc")
def test_without_the_settings_the_same_allocations_fault() -> None:
    # The check above can fail: glibc's defaults map large blocks afresh.
    got = _child("defaults")
    assert got["reused"] > 2000, got


def test_prefault_stops_at_its_size() -> None:
    prefault = heap.Prefault(heap.SLICE * 2 + 1)
    for _ in range(10):
        prefault.step()
    assert prefault.touched == heap.SLICE * 2 + 1 if heap._libc() is not None else prefault.touched == 0
    prefault.release()
    assert prefault.touched == 0
    assert heap.prefault_size(0) == heap.PREFAULT_BASE
    assert heap.prefault_size(10**9) == heap.PREFAULT_MAX


_KEEP_CHILD = _PRELUDE + r"""
heap.configure()
stop = threading.Event()
stop.set()
garbage = [b"x" * (1 << 20) for _ in range(8)]
del garbage
r = rss()
heap.trim(8 << 20, stop)  # Save has begun: neither trimmed nor touched
got = {"stopped_kept": heap.kept(), "stopped_trimmed": r - rss()}
heap.trim(5_194_304)  # not whole slices
got["odd"] = heap.kept()
garbage = [b"x" * (1 << 20) for _ in range(24)]  # what a background dump leaves freed
del garbage
r0 = rss()
heap.trim(keep=8 << 20)
got.update(kept=heap.kept(), mapped=rss() - r0)
heap.trim()
r1 = rss()
heap.trim(keep=8 << 20)
got["remapped"] = rss() - r1
f0 = faults()
prefault = heap.Prefault(14 << 20, heap.kept())  # Save needs more than is kept: the rest ahead
prefault.fill()
got["ahead"] = faults() - f0
prefault.release()
f0 = faults()
assembly = [b"y" * (1 << 20) for _ in range(13)]  # Save's assembly, after the dump
got["reused"] = faults() - f0
del assembly
r2 = rss()
heap.trim()
got["kept_after"] = heap.kept()
got["trimmed"] = r2 - rss()
print(json.dumps(got))
"""


@pytest.mark.skipif(heap._libc() is None, reason="not glibc")
def test_trim_keeps_what_save_will_touch_mapped() -> None:
    out = subprocess.run([sys.executable, "-c", _KEEP_CHILD], cwd=REPO, capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(REPO)})
    got = json.loads(out.stdout)
    # Once Save has begun, a background dump's trim leaves the heap alone ...
    assert got["stopped_kept"] == 0 and got["stopped_trimmed"] < (1 << 20), got
    # ... and what is kept is counted to the byte ...
    assert got["odd"] == 5_194_304, got
    # ... what the dump freed went back, and 8 MiB were mapped again ...
    assert got["kept"] == 8 << 20, got
    assert got["mapped"] <= -(14 << 20), got
    assert (8 << 20) * 0.9 <= got["remapped"] <= (8 << 20) * 1.2, got
    # ... Save's prefault touches only the 6 MiB more it needs, not the
    # memory kept, so that the 13 MiB its assembly allocates take no page faults ...
    assert (6 << 20) // 4096 * 0.9 <= got["ahead"] <= (6 << 20) // 4096 * 1.2, got
    assert got["reused"] < 100, got
    # ... until a trim that keeps nothing (after the answer) gives them back.
    assert got["kept_after"] == 0
    assert got["trimmed"] >= (6 << 20) * 0.9, got


def test_keep_size_is_bounded() -> None:
    assert heap.keep_size(0) == 0
    assert heap.keep_size(5000) == heap.prefault_size(5000)
    assert heap.keep_size(50_000) == heap.KEEP_MAX < heap.prefault_size(50_000)
