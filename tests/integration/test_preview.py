"""``pve-dbus-vmstate preview VMID``: read-only, against a real table in a
throw-away namespace, with conntrack(8) as the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support import REPO, NetnsFactory, realistic_lines, strip_timeout, synthetic_lines

VMID = 100


def preview(ns_name: str, *args: str) -> subprocess.CompletedProcess[str]:
    # No bus at all: preview must not need one.
    env = dict(os.environ, PYTHONPATH=str(REPO), DBUS_SYSTEM_BUS_ADDRESS="unix:path=/nonexistent")
    return subprocess.run(["ip", "netns", "exec", ns_name, sys.executable, "-m", "pvevmstate", "preview",
                           str(VMID), *args], env=env, capture_output=True, text=True, timeout=120, check=False)


def test_preview_counts_what_conntrack_lists_and_changes_nothing(netns_factory: NetnsFactory) -> None:
    ns = netns_factory()
    ns.load(realistic_lines(6000, seed=21, min_timeout=900), mark=VMID)
    ns.load(synthetic_lines(300, seed=22), mark=101)
    before = sorted(map(strip_timeout, ns.save_lines()))
    out = preview(ns.name, "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["entries"] == len(ns.save_lines(VMID)) == 6000
    assert sum(got["by_class"].values()) == 6000
    formats = {f["format"]: f for f in got["formats"]}
    assert set(formats) == {"auto", "text", "compact"}
    assert formats["auto"]["sent"] == 6000 and formats["auto"]["perl_receives"] >= 4500
    assert formats["compact"]["perl_receives"] == 0 and formats["compact"]["sent"] == 6000
    assert formats["text"]["sent"] == formats["text"]["perl_receives"] < 6000
    assert all(1 <= f["bytes"] <= 1 << 20 for f in formats.values())
    assert sum(formats["text"]["left_out"].values()) == 6000 - formats["text"]["sent"]
    # Read-only: the table is as it was (timeouts aside).
    assert sorted(map(strip_timeout, ns.save_lines())) == before


def test_preview_as_text_names_each_format(netns_factory: NetnsFactory) -> None:
    ns = netns_factory()
    ns.load(synthetic_lines(40, seed=23), mark=VMID)
    out = preview(ns.name)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("VM 100: 40 conntrack entries with mark 100")
    for fmt in ("auto", "text", "compact"):
        assert any(line.split()[:1] == [fmt] for line in out.stdout.splitlines()), out.stdout
