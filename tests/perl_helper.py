"""The Perl helper's stand-in (tests/data/perl-helper.pl) and conntrack(8) of other versions.

A mixed cluster runs qemu-server's Perl helper on some nodes and this helper on
others; these start the stand-in the way systemd would, inside a node's
namespace on the node's bus, and stop it by its PID. qemu-server's own way of
ending a helper (walk the queue, read NumMigratedEntries, Quit) is
tests/data/qemu-server-stop.pl.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from tests import client
from tests.support import (
    REPO,
    HelperProcess,
    Netns,
    PrivateBus,
    Qemu,
    QemuFactory,
    require,
    spawn_logged,
    wait_until,
)

PERL_HELPER = REPO / "tests" / "data" / "perl-helper.pl"
QEMU_SERVER_STOP = REPO / "tests" / "data" / "qemu-server-stop.pl"
# The bus policy of a node that runs the Perl helper (node_factory(name, PERL_POLICY)).
PERL_POLICY = REPO / "tests" / "data" / "qemu-server-policy.conf"
TRIXIE_ROOT = Path(os.environ.get("TRIXIE_ROOT", "/var/tmp/pvevmstate-trixie"))
# The one line per byte above 127 that Perl's pack('c*') prints in the Perl helper's Load.
PACK_WARNING = "Character in 'c' format wrapped in pack"
_counter = itertools.count()


def require_perl() -> None:
    require(shutil.which("perl") is not None and subprocess.run(
        ["perl", "-MNet::DBus", "-MJSON::PP", "-e", "1"], check=False, capture_output=True).returncode == 0,
        "needs perl with Net::DBus (Debian: libnet-dbus-perl) and JSON::PP")


@dataclass
class PerlHelper(HelperProcess):
    """A running stand-in; its stdout and stderr together are its journal."""

    bus: PrivateBus
    qemu: Qemu

    what = "Perl helper"

    def lines(self) -> list[str]:
        return self.journal().splitlines()

    def pack_warnings(self) -> int:
        return sum(PACK_WARNING in ln for ln in self.lines())

    def unique_name(self) -> str:
        """Its unique name among the queued owners with its Id (how QEMU and qemu-server find it)."""
        for owner in client.queued_owners(address=self.bus.address):
            try:
                if client.get_id(owner, address=self.bus.address) == "pve-vmstate-%d" % self.vmid:
                    return owner
            except Exception:  # an owner that left meanwhile, or one without the property
                continue
        raise LookupError("no queued owner with Id pve-vmstate-%d" % self.vmid)

    def wait_ready(self, timeout: float = 15) -> None:
        """Ready as the original reports it to systemd: Id queued and the QEMU object added."""
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail("Perl helper %d exited with %s before it was ready:\n%s"
                            % (self.vmid, self.proc.returncode, self.journal()))
            try:
                self.unique_name()
            except LookupError:
                return False
            return "pve-vmstate" in self.qemu.objects()
        wait_until(ready, timeout, "Perl helper %d to be queued and registered" % self.vmid, interval=0.05)


class PerlHelperFactory(Protocol):
    """``perl_helper_factory(ns, vmid, bus=..., qemu=...)``: the Perl stand-in, stopped after the test."""

    def __call__(self, ns: Netns, vmid: int, *, bus: PrivateBus | None = None, qemu: Qemu | None = None,
                 ready: bool = True) -> PerlHelper: ...


@pytest.fixture
def perl_helper_factory(tmp_path: Path, system_bus: PrivateBus,
                        qemu_factory: QemuFactory) -> Iterator[PerlHelperFactory]:
    """Start stand-ins: ``start(ns, vmid, bus=..., qemu=...)``; each is stopped by its PID at the end."""
    require_perl()
    started: list[PerlHelper] = []

    def start(ns: Netns, vmid: int, *, bus: PrivateBus | None = None, qemu: Qemu | None = None,
              ready: bool = True) -> PerlHelper:
        if qemu is None:
            qemu = qemu_factory("perl%d" % vmid)
        assert qemu is not None
        bus = bus or system_bus
        log = tmp_path / ("perl-helper-%d-%d.log" % (vmid, next(_counter)))
        # restore_signals=False: the child inherits Python's SIG_IGN for
        # SIGPIPE, as a unit started by systemd has it (IgnoreSIGPIPE=yes is
        # the default and qemu-server's unit keeps it). With SIGPIPE at its
        # default, a Load whose input conntrack(8) stops reading early (a
        # binary payload over the pipe's 64 KiB) kills the Perl helper in the
        # middle of the call, and the destination QEMU exits on the NoReply.
        proc = spawn_logged(["ip", "netns", "exec", ns.name, "perl", str(PERL_HELPER), str(vmid), str(qemu.qmp_path)],
                            log, dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address), restore_signals=False)
        helper = PerlHelper(vmid, proc, log, bus, qemu)
        started.append(helper)
        assert sigpipe_ignored(proc.pid), "the Perl helper must run with SIGPIPE ignored, as under systemd"
        if ready:
            helper.wait_ready()
        return helper

    try:
        yield start
    finally:
        for helper in started:
            helper.stop()


def sigpipe_ignored(pid: int) -> bool:
    """Whether ``pid`` ignores SIGPIPE (``ip netns exec`` execs the command in place: same PID)."""
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGPIPE - 1)))
    return False


def qemu_server_stop(vmid: int, bus: PrivateBus) -> tuple[str, int]:
    """End a VM's helper (ours or the Perl one) as qemu-server does: (unique name, NumMigratedEntries)."""
    out = subprocess.run(["perl", str(QEMU_SERVER_STOP), str(vmid)], capture_output=True, text=True, timeout=90,
                         check=False, env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus.address))
    assert out.returncode == 0, out.stderr
    unique, count = out.stdout.split()
    return unique, int(count)


# ------------------------------------------------------------------ conntrack(8) versions


def require_trixie_root() -> None:
    """Trixie's conntrack 1.4.8 lives in the root tests/package/check.sh debootstraps."""
    require((TRIXIE_ROOT / "usr" / "sbin" / "conntrack").exists(),
            "needs trixie's conntrack in %s (made by tests/package/check.sh)" % TRIXIE_ROOT)


def conntrack_version(ns: Netns, root: Path | None = None) -> str:
    return _conntrack(ns, root, "--version").stdout.decode().split()[1]


def load_with(ns: Netns, data: bytes, root: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """``conntrack --load-file -`` in ``ns``: the host's, or the one in the chroot ``root``.

    The Perl helper pipes its payload into exactly this; a non-zero exit is
    part of what is measured, so it is returned, not raised.
    """
    return _conntrack(ns, root, "--load-file", "-", data=data)


def _conntrack(ns: Netns, root: Path | None, *args: str, data: bytes | None = None) -> \
        subprocess.CompletedProcess[bytes]:
    if root is None:
        cmd = ["conntrack", *args]
    else:
        # conntrack 1.4.8 opens /dev/stdin for "-": a symlink into /proc,
        # which the root only has while tests/package/check.sh runs. A proc
        # mount in a mount namespace of its own leaves no trace behind.
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t proc proc "$0/proc" && exec chroot "$0" conntrack "$@"', str(root), *args]
    return subprocess.run(["ip", "netns", "exec", ns.name, *cmd], input=data,
                          capture_output=True, check=False, timeout=300)
