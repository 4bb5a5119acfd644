"""Errors nobody planned for, caused for real: one ``<3>`` line, exit 1, no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from pvevmstate import messages
from tests.support import REPO, NetnsFactory, PrivateBus, helper_command, require


@pytest.mark.parametrize(("nofile", "line"), [
    # Python starts, but asyncio cannot make its event loop (epoll and its self-pipe).
    (5, "<3>" + messages.UNEXPECTED % ("pve-dbus-vmstate", "OSError", "[Errno 24] Too many open files")),
    # The loop is there; the ctnetlink socket is one descriptor too many.
    (6, "<3>cannot use the conntrack table: cannot open a ctnetlink socket: EMFILE (Too many open files)"),
])
@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_no_file_descriptor_left(netns_factory: NetnsFactory, system_bus: PrivateBus, nofile: int, line: str,
                                 debug: bool) -> None:
    require(shutil.which("prlimit") is not None, "needs prlimit (util-linux)")
    ns = netns_factory()
    cmd = helper_command(ns, "100", "--qmp-socket", "/nonexistent", *(["--debug"] if debug else []))
    # The limit applies to the helper alone, not to `ip netns exec` before it.
    python = cmd.index("-m") - 1
    cmd[python:python] = ["prlimit", "--nofile=%d" % nofile]
    out = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(REPO), DBUS_SYSTEM_BUS_ADDRESS=system_bus.address),
                         capture_output=True, text=True, timeout=60, check=False)
    lines = out.stderr.splitlines()
    assert out.returncode == 1, out.stderr
    assert [ln for ln in lines if ln.startswith("<3>")] == [line], out.stderr
    # Every line is a journal line with its priority; a traceback only with --debug, at <7>.
    assert all(ln.startswith(("<3>", "<6>", "<7>")) for ln in lines), out.stderr
    assert ("<7>Traceback (most recent call last):" in lines) is (debug and nofile == 5), out.stderr
    assert out.stdout == ""
