"""``decode`` of payloads a real helper's Save returned, against conntrack(8) on the same table."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from tests import client
from tests.support import REPO, example_lines, strip_timeout, synthetic_lines

VMID = 100


def decode(data: bytes, *args: str) -> tuple[int, list[str], list[str]]:
    """Exit status, header lines and save lines of ``python -m pvevmstate decode -``."""
    done = subprocess.run([sys.executable, "-m", "pvevmstate", "decode", "-", *args], input=data, cwd=REPO,
                          capture_output=True, timeout=120, check=False)
    assert done.stderr == b""
    lines = done.stdout.decode("ascii").splitlines()
    return done.returncode, [ln for ln in lines if ln.startswith("#")], [ln for ln in lines if not ln.startswith("#")]


@pytest.mark.parametrize(("fmt", "kind"), [("auto", "hybrid"), ("text", "save text"), ("compact", "compact")])
def test_decoded_save_equals_conntrack_list(netns_factory: Any, helper_factory: Any, fmt: str, kind: str) -> None:
    ns = netns_factory()
    ns.load(example_lines(), mark=VMID)
    ns.load(synthetic_lines(300, seed=7), mark=VMID)
    ns.load(synthetic_lines(40, seed=8, base=3000), mark=101)
    helper_factory(ns, VMID, "--format", fmt)
    data = client.save(client.vm(VMID))
    reference = sorted(strip_timeout(ln) for ln in ns.save_lines(VMID))
    assert len(reference) == 338

    status, header, lines = decode(data)
    assert status == 0
    assert "# format: " + kind in "\n".join(header)
    assert "# entries: 338" in "\n".join(header) and "# refused: 0" in header
    assert sorted(map(strip_timeout, lines)) == reference

    # With --mark, the output is what conntrack --load-file takes (the header
    # is comments): loaded into an empty table it gives the same entries.
    status, _, marked = decode(data, "--mark", str(VMID))
    assert status == 0 and all(ln.endswith(" --mark %d" % VMID) for ln in marked)
    fresh = netns_factory()
    fresh.conntrack("--load-file", "-", data=subprocess.run(
        [sys.executable, "-m", "pvevmstate", "decode", "-", "--mark", str(VMID)], input=data, cwd=REPO,
        capture_output=True, timeout=120, check=True).stdout)
    assert sorted(strip_timeout(ln) for ln in fresh.save_lines(VMID)) == reference
