"""The one error hierarchy of pvevmstate.

Every error raised by this package derives from :class:`VMStateError`; adapters
wrap system errors exactly once (``raise ... from err``) so the cause stays
attached for the DEBUG traceback while the message stays readable.
"""

from __future__ import annotations

import errno as _errno


class VMStateError(Exception):
    """Base class of every error this package raises on purpose."""


class CodecError(VMStateError):
    """A payload or a save line could not be converted."""


class ConntrackError(VMStateError):
    """Netlink conntrack operation failed.

    :param message: what was being done
    :param code: positive errno value, when the kernel gave one
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code

    def __str__(self) -> str:
        base = super().__str__()
        if self.code is None:
            return base
        return "%s: %s" % (base, errno_text(self.code))


class BusError(VMStateError):
    """The D-Bus connection or a name request failed."""


class QMPError(VMStateError):
    """Talking to QEMU's monitor failed (connection broke, garbage, no session)."""


class QMPConnectError(QMPError):
    """QEMU's monitor is not there, refused us, or did not greet in time."""


class QMPTimeoutError(QMPError):
    """QEMU did not answer a command in time."""


class QMPExecuteError(QMPError):
    """QEMU answered a command with an error.

    :param command: the QMP command
    :param error_class: QEMU's error class, e.g. ``GenericError``
    :param desc: QEMU's description
    """

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__("%s: %s (%s)" % (command, desc, error_class))
        self.command = command
        self.error_class = error_class
        self.desc = desc


def errno_text(code: int) -> str:
    """Render an errno value as ``NAME (text)``, e.g. ``EEXIST (File exists)``."""
    import os

    name = _errno.errorcode.get(code, "E%d" % code)
    return "%s (%s)" % (name, os.strerror(code))
