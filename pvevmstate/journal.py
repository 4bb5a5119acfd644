"""Structured journal entries through journald's native protocol.

Under journald, the Save, Load, ready and exit lines carry fields besides
MESSAGE and PRIORITY (``VMID``, ``ENTRIES``, ``DURATION_MS``, ...), so that
``journalctl -o json`` gives numbers without parsing text. A log call attaches
them with ``extra=journal.fields(VMID=..., ...)``; every other call is
unaffected.

Written by hand rather than with python3-systemd's ``journal.send``, for the
same reasons as :mod:`.notify`: the protocol is a datagram of ``KEY=value``
lines (under a hundred lines here with the handler), while the binding is one more Debian
dependency and, in a virtualenv, a C extension (systemd-python) that needs
libsystemd's headers and a compiler to install. The binding also sends to a
fixed socket path (tests here bind their own socket) over a blocking socket,
and leaves falling back to stderr to its caller; here a line that cannot go
out at once is written to stderr instead (:class:`.logsetup.JournalHandler`),
so no line is lost and journald being behind never stalls the event loop.

The protocol, as journald documents it: one datagram to
``/run/systemd/journal/socket`` per entry; each field is ``KEY=value\\n``, or,
for a value holding a newline, ``KEY\\n``, the value's length as a
little-endian 64-bit integer, the value, ``\\n``. Keys are upper-case letters,
digits and ``_``, start with a letter here (journald drops client fields
starting with ``_``, which it reserves for what it records itself) and are at
most 64 bytes. An entry too big for one datagram would have to go in a
memfd; entries above :data:`MAX_DATAGRAM` go to stderr instead, which no line
of this helper comes near.
"""

from __future__ import annotations

import os
import re
import socket
import struct
from collections.abc import Mapping
from typing import Final

#: journald's socket for native entries. AF_UNIX under /run, which the unit's
#: RestrictAddressFamilies= and ProtectSystem=strict leave usable (sending to
#: a socket does not write to the read-only file system).
SOCKET_PATH: Final = "/run/systemd/journal/socket"
#: Entries bigger than this go to stderr: well below the default socket send
#: buffer (net.core.wmem_default, about 208 KiB), so no memfd is needed.
MAX_DATAGRAM: Final = 64 * 1024
#: What journalctl shows as the sender and what boot.sh filters on; the
#: stderr stream gets the same from the executable's name.
IDENTIFIER: Final = "pve-dbus-vmstate"
#: The LogRecord attribute that carries a call's fields (see :func:`fields`).
ATTRIBUTE: Final = "journal"

_KEY = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_LE64 = struct.Struct("<Q")

FieldValue = str | int | float


def fields(**values: FieldValue) -> dict[str, object]:
    """The ``extra=`` of a log call whose journal entry carries ``values``.

    ``log.info("...", extra=journal.fields(VMID=100, ENTRIES=3))``; floats
    are written with one decimal, as the text lines write milliseconds.
    """
    return {ATTRIBUTE: dict(values)}


def _text(value: FieldValue) -> str:
    if isinstance(value, float):
        return "%.1f" % value
    return str(value)


def encode(entry: Mapping[str, FieldValue]) -> bytes:
    """One native-protocol datagram holding ``entry``'s fields in order.

    :raises ValueError: for a key journald would not accept as given
    """
    out = bytearray()
    for key, value in entry.items():
        if not _KEY.fullmatch(key):
            raise ValueError("invalid journal field name %r" % key)
        # A log line may hold anything (a peer's bus name, a refused line's
        # text): never fail on it, as the stderr stream does not either.
        data = _text(value).encode("utf-8", "backslashreplace")
        name = key.encode("ascii")
        if b"\n" in data:
            out += name + b"\n" + _LE64.pack(len(data)) + data + b"\n"
        else:
            out += name + b"=" + data + b"\n"
    return bytes(out)


def stream_is_journal(fd: int, environ: Mapping[str, str]) -> bool:
    """Whether ``fd`` is the stream systemd connected to journald for us.

    systemd sets ``JOURNAL_STREAM=DEVICE:INODE`` for a unit whose output goes
    to the journal; it is inherited by children whose stderr may be something
    else (a pipe, a terminal), so it counts only if ``fd`` is that very socket.
    """
    value = environ.get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


class Sender:
    """A non-blocking datagram socket to journald.

    Non-blocking: a journald that is behind must not stall the event loop
    that answers QEMU; the caller writes the line to stderr instead.

    :param path: journald's socket (tests bind their own)
    """

    def __init__(self, path: str = SOCKET_PATH) -> None:
        self.path = path
        self._sock: socket.socket | None = None

    def send(self, datagram: bytes) -> bool:
        """Send one entry; whether journald has it (``False``: no socket, EAGAIN, too big, ...)."""
        if len(datagram) > MAX_DATAGRAM:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX,
                                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            # Not connected: sendto() finds journald again after it restarted.
            self._sock.sendto(datagram, self.path)
        except OSError:
            return False
        return True

    def close(self) -> None:
        """Close the socket (a later send opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
