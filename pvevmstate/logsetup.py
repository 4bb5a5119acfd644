"""Logging to stderr with sd-daemon priority prefixes, or to journald natively.

journald reads ``<N>`` at the start of each line as its syslog priority and
adds time, PID and unit itself, so lines carry neither. A multi-line message
(a DEBUG traceback) gets the prefix on every line, because journald files each
line as its own record.

When stderr is journald's stream (``JOURNAL_STREAM``), the same lines go to
journald's native socket instead, where the Save, Load, ready and exit lines
carry their fields (:mod:`.journal`); a line that cannot be sent there is
written to stderr as before.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

from . import journal

_PRIORITY = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)


def priority(levelno: int) -> int:
    """Map a logging level to its syslog priority (DEBUG and below are 7)."""
    for level, prio in _PRIORITY:
        if levelno >= level:
            return prio
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>message``, with the prefix repeated on continuation lines."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = "<%d>" % priority(record.levelno)
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class JournalHandler(logging.StreamHandler[TextIO]):
    """Each line of a record as one native journal entry; stderr for what cannot be sent.

    MESSAGE, PRIORITY and SYSLOG_IDENTIFIER are what journald makes of the
    stderr line (``<N>`` prefix, executable name), so ``journalctl`` shows the
    same text; the fields a call gives with :func:`journal.fields` are added
    to its first line. A line journald does not take (no socket, its queue
    full, too big) is written to the stream, with its prefix, as
    :class:`JournalFormatter` would: no line is lost, none is written twice.

    Every record goes this way, not only those with fields: entries from one
    socket stay in order, while journald reads the stream and the datagram
    socket independently and could file a Save line before the warnings
    logged just before it.

    :param stream: stderr (journald's stream)
    :param sender: the native socket
    """

    def __init__(self, stream: TextIO, sender: journal.Sender) -> None:
        super().__init__(stream)
        self.sender = sender

    def emit(self, record: logging.LogRecord) -> None:
        try:
            prio = priority(record.levelno)
            own = getattr(record, journal.ATTRIBUTE, None)
            extra: Mapping[str, journal.FieldValue] = own if isinstance(own, Mapping) else {}
            lines = self.format(record).splitlines() or [""]
            for i, line in enumerate(lines):
                entry: dict[str, journal.FieldValue] = {
                    "MESSAGE": line, "PRIORITY": prio, "SYSLOG_IDENTIFIER": journal.IDENTIFIER}
                if i == 0:
                    # The three above are every line's; a call's fields do not replace them.
                    entry |= {k: v for k, v in extra.items() if k not in entry}
                try:
                    datagram = journal.encode(entry)
                except ValueError:
                    # A bad field name is a bug in a log call: its line still goes out.
                    datagram = b""
                if not (datagram and self.sender.send(datagram)):
                    self.stream.write("<%d>%s%s" % (prio, line, self.terminator))
                    self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sender.close()
        super().close()


def configure(debug: bool = False, stream: TextIO | None = None, *,
              journal_socket: str = journal.SOCKET_PATH, environ: Mapping[str, str] | None = None) -> None:
    """Send this process's log records to stderr (or ``stream``) for journald.

    When that stream is the one ``JOURNAL_STREAM`` names, records go to
    journald's native socket with their fields instead (and not also to the
    stream, or journald would file every line twice).

    :param debug: include DEBUG records (tracebacks live there)
    :param stream: where to write; stderr by default
    :param journal_socket: journald's native socket (tests bind their own)
    :param environ: where ``JOURNAL_STREAM`` is looked up; the process's environment by default
    """
    out = stream if stream is not None else sys.stderr
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):  # io.StringIO and the like
        fd = -1
    handler: logging.StreamHandler[TextIO]
    if fd >= 0 and journal.stream_is_journal(fd, os.environ if environ is None else environ):
        handler = JournalHandler(out, journal.Sender(journal_socket))
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(out)
        handler.setFormatter(JournalFormatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
