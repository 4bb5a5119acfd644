"""An unexpected error ends the helper with one ``<3>`` line and exit status 1."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from pvevmstate import __main__ as cli
from pvevmstate import daemon, messages
from pvevmstate.errors import ConntrackError
from pvevmstate.netlink.conntrack import Conntrack

EMFILE_LINE = "<3>" + messages.UNEXPECTED % ("pve-dbus-vmstate", "OSError", "[Errno 24] Too many open files")


@pytest.fixture(autouse=True)
def _process_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """main() sets up the process (signals, unraisable hook, logging): give pytest its own back."""
    handlers = {sig: signal.getsignal(sig) for sig in daemon.STOP_SIGNALS}
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        root.handlers[:], root.level = saved


def _fail_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    async def run(self: daemon.Daemon) -> int:
        # What an exhausted descriptor table does somewhere deep down.
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    monkeypatch.setattr(daemon.Daemon, "run", run)


def test_unexpected_error_is_one_error_line_and_exit_1(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    _fail_to_start(monkeypatch)
    assert cli.main(["100", "--qmp-socket", "/nonexistent"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [EMFILE_LINE]


def test_unexpected_error_with_debug_has_the_traceback_at_debug(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    _fail_to_start(monkeypatch)
    assert cli.main(["100", "--qmp-socket", "/nonexistent", "--debug"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert [ln for ln in lines if ln.startswith("<3>")] == [
        EMFILE_LINE]
    assert "<7>Traceback (most recent call last):" in lines
    assert any(ln.startswith("<7>") and "raise OSError(errno.EMFILE" in ln for ln in lines)
    # Every line carries a priority: nothing reaches the journal unprefixed.
    assert all(ln.startswith(("<3>", "<7>")) for ln in lines), lines


class _BrokenSocket:
    """A socket whose every option call fails, as one whose descriptor went bad."""

    def __init__(self) -> None:
        self.closed = False

    def getsockopt(self, *args: Any) -> int:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    def close(self) -> None:
        self.closed = True


def test_conntrack_open_wraps_os_errors() -> None:
    # The daemon catches only its own errors around opening the table; an
    # OSError there would reach main as "unexpected".
    sock = _BrokenSocket()
    with pytest.raises(ConntrackError, match="EBADF"):
        Conntrack(sock)  # type: ignore[arg-type]  # a stand-in socket whose getsockopt fails
    assert sock.closed

