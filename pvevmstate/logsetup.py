"""Logging to stderr with sd-daemon priority prefixes.

journald reads ``<N>`` at the start of each line as its syslog priority and
adds time, PID and unit itself, so lines carry neither. A multi-line message
(a DEBUG traceback) gets the prefix on every line, because journald files each
line as its own record.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

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


def configure(debug: bool = False, stream: TextIO | None = None) -> None:
    """Send this process's log records to stderr (or ``stream``) for journald.

    :param debug: include DEBUG records (tracebacks live there)
    :param stream: where to write; stderr by default
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JournalFormatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
