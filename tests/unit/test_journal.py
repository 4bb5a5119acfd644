"""Native journal entries: the encoding, JOURNAL_STREAM detection, the stderr
fallback, and the fields of the Save and Load lines. A datagram socket the test
binds stands in for journald's (tests/package/boot.sh checks a real journald)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pytest

from pvevmstate import journal, logsetup, payload
from pvevmstate.model import CreateBatch, CreateResult, Entry, TableStats
from pvevmstate.payload import savetext
from pvevmstate.vmstate import VMState
from tests.support import example_lines


def decode(datagram: bytes) -> list[tuple[str, bytes]]:
    """Read a native-protocol datagram back into its fields, as journald does."""
    out = []
    rest = datagram
    while rest:
        head, sep, tail = rest.partition(b"\n")
        assert sep, "field without its newline: %r" % rest
        if b"=" in head:
            key, _, value = head.partition(b"=")
            rest = tail
        else:
            key = head
            (size,) = struct.unpack("<Q", tail[:8])
            value, rest = tail[8:8 + size], tail[8 + size:]
            assert rest[:1] == b"\n", "binary value not followed by a newline"
            rest = rest[1:]
        out.append((key.decode(), value))
    return out


def test_plain_fields_are_key_value_lines() -> None:
    datagram = journal.encode({"MESSAGE": "Save: 3 entries", "PRIORITY": 6, "DURATION_MS": 12.345, "VMID": 100})
    assert datagram == b"MESSAGE=Save: 3 entries\nPRIORITY=6\nDURATION_MS=12.3\nVMID=100\n"


def test_a_value_with_a_newline_uses_the_binary_safe_form() -> None:
    datagram = journal.encode({"MESSAGE": "two\nlines", "REASON": "x=y"})
    assert datagram == b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n" + b"REASON=x=y\n"
    assert decode(datagram) == [("MESSAGE", b"two\nlines"), ("REASON", b"x=y")]


def test_text_that_is_not_utf8_is_escaped_not_fatal() -> None:
    assert journal.encode({"MESSAGE": "bad \udcff"}) == b"MESSAGE=bad \\udcff\n"


@pytest.mark.parametrize("key", ["", "vmid", "_PID", "1ST", "A-B", "A=B", "ÄB", "A" * 65])
def test_field_names_journald_would_not_take_are_refused(key: str) -> None:
    with pytest.raises(ValueError, match="invalid journal field name"):
        journal.encode({key: 1})


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths hold at most 107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="pvj") as name:
        yield Path(name)


@dataclass
class Journald:
    """A bound datagram socket where journald's would be."""

    path: str
    sock: socket.socket

    def entries(self) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        while True:
            try:
                datagram = self.sock.recv(1 << 20)
            except BlockingIOError:
                return out
            fields = decode(datagram)
            assert len({k for k, _ in fields}) == len(fields), "a field twice: %r" % fields
            out.append({k: v.decode() for k, v in fields})


@pytest.fixture
def journald(short_dir: Path) -> Iterator[Journald]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(short_dir / "socket")
    sock.bind(path)
    sock.setblocking(False)
    try:
        yield Journald(path, sock)
    finally:
        sock.close()


def journal_stream(stream: TextIO) -> dict[str, str]:
    """The environment systemd gives a unit whose stderr is ``stream``."""
    st = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": "%d:%d" % (st.st_dev, st.st_ino)}


@pytest.fixture
def stderr(tmp_path: Path) -> Iterator[TextIO]:
    """A file standing for stderr: it has a device and an inode, as journald's stream has."""
    with open(tmp_path / "stderr", "w+", encoding="utf-8") as stream:
        yield stream


@pytest.fixture
def reset_logging() -> Iterator[None]:
    yield
    root = logging.getLogger()
    for handler in root.handlers:
        handler.close()
    root.handlers.clear()


def written(stream: TextIO) -> list[str]:
    stream.flush()
    stream.seek(0)
    return stream.read().splitlines()


def log_some() -> None:
    log = logging.getLogger("t")
    log.info("Save: 3 entries", extra=journal.fields(VMID=100, ENTRIES=3, DURATION_MS=1.25))
    log.warning("plain")
    log.error("e1\ne2", extra=journal.fields(REASON="why"))


def test_journal_stream_must_be_this_very_stream(stderr: TextIO, tmp_path: Path) -> None:
    env = journal_stream(stderr)
    assert journal.stream_is_journal(stderr.fileno(), env)
    with open(tmp_path / "other", "w") as other:
        # Inherited by a child whose stderr is something else: not the journal.
        assert not journal.stream_is_journal(other.fileno(), env)
    st = os.fstat(stderr.fileno())
    for value in ["", "garbage", "%d" % st.st_ino, "%d:%d" % (st.st_dev + 1, st.st_ino),
                  "%d:%d" % (st.st_dev, st.st_ino + 1), "x:y"]:
        assert not journal.stream_is_journal(stderr.fileno(), {"JOURNAL_STREAM": value}), value
    assert not journal.stream_is_journal(stderr.fileno(), {})


@pytest.mark.usefixtures("reset_logging")
def test_under_journald_lines_go_to_the_socket_with_their_fields(stderr: TextIO, journald: Journald) -> None:
    logsetup.configure(stream=stderr, journal_socket=journald.path, environ=journal_stream(stderr))
    log_some()
    # Not also on stderr: journald would file every line twice.
    assert written(stderr) == []
    base = {"SYSLOG_IDENTIFIER": "pve-dbus-vmstate"}
    assert journald.entries() == [
        {"MESSAGE": "Save: 3 entries", "PRIORITY": "6", **base, "VMID": "100", "ENTRIES": "3", "DURATION_MS": "1.2"},
        {"MESSAGE": "plain", "PRIORITY": "4", **base},
        # One entry per line as on stderr; the fields go with the first.
        {"MESSAGE": "e1", "PRIORITY": "3", **base, "REASON": "why"},
        {"MESSAGE": "e2", "PRIORITY": "3", **base},
    ]


@pytest.mark.usefixtures("reset_logging")
def test_a_call_cannot_replace_message_or_priority(stderr: TextIO, journald: Journald) -> None:
    logsetup.configure(stream=stderr, journal_socket=journald.path, environ=journal_stream(stderr))
    logging.getLogger("t").info("m", extra=journal.fields(MESSAGE="other", PRIORITY=0, VMID=100))
    assert journald.entries() == [{"MESSAGE": "m", "PRIORITY": "6", "SYSLOG_IDENTIFIER": "pve-dbus-vmstate",
                                   "VMID": "100"}]


@pytest.mark.usefixtures("reset_logging")
def test_outside_journald_stderr_is_as_before(stderr: TextIO, journald: Journald) -> None:
    logsetup.configure(stream=stderr, journal_socket=journald.path, environ={})
    log_some()
    assert written(stderr) == ["<6>Save: 3 entries", "<4>plain", "<3>e1", "<3>e2"]
    assert journald.entries() == []


@pytest.mark.usefixtures("reset_logging")
def test_no_socket_falls_back_to_stderr(stderr: TextIO, short_dir: Path) -> None:
    logsetup.configure(stream=stderr, journal_socket=str(short_dir / "missing"), environ=journal_stream(stderr))
    log_some()
    assert written(stderr) == ["<6>Save: 3 entries", "<4>plain", "<3>e1", "<3>e2"]


@pytest.mark.usefixtures("reset_logging")
def test_a_bad_field_name_or_a_huge_line_still_reaches_stderr(stderr: TextIO, journald: Journald) -> None:
    logsetup.configure(stream=stderr, journal_socket=journald.path, environ=journal_stream(stderr))
    log = logging.getLogger("t")
    log.info("bad field", extra={journal.ATTRIBUTE: {"lower": 1}})
    log.info("x" * journal.MAX_DATAGRAM)
    log.info("fine")
    assert written(stderr) == ["<6>bad field", "<6>" + "x" * journal.MAX_DATAGRAM]
    assert [e["MESSAGE"] for e in journald.entries()] == ["fine"]


@pytest.mark.usefixtures("reset_logging")
def test_a_full_journald_queue_loses_no_line(stderr: TextIO, journald: Journald) -> None:
    # Nobody reads the socket: once its queue is full, sends fail with EAGAIN
    # at once (max_dgram_qlen or the send buffer; not block) and those lines
    # go to stderr; each line exactly once.
    logsetup.configure(stream=stderr, journal_socket=journald.path, environ=journal_stream(stderr))
    log = logging.getLogger("t")
    n = 3000
    for i in range(n):
        log.info("line %d", i)
    sent = [e["MESSAGE"] for e in journald.entries()]
    fell_back = [line.removeprefix("<6>") for line in written(stderr)]
    assert sent and fell_back, (len(sent), len(fell_back))
    assert sorted(sent + fell_back) == sorted("line %d" % i for i in range(n))


class Table:
    """Just enough of the conntrack table for one Save and one Load."""

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries

    def dump(self, mark: int) -> list[Entry]:
        return self.entries

    def reserve_seqs(self, n: int) -> int:
        return 1

    def create(self, batch: CreateBatch) -> CreateResult:
        result = CreateResult()
        result.created = len(batch) - 1
        result.failed[17] = 1  # EEXIST
        return result

    def stats(self) -> TableStats:
        return TableStats(0, 262144)

    def close(self) -> None:
        pass


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.fields: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        own = getattr(record, journal.ATTRIBUTE, None)
        if isinstance(own, dict):
            self.fields.append(own)


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("pvevmstate")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize("fmt", [payload.Choice.TEXT, payload.Choice.AUTO])
def test_save_and_load_lines_carry_their_numbers(records: Records, fmt: payload.Choice) -> None:
    entries = [savetext.parse_line(ln) for ln in example_lines()]
    state = VMState(100, Table(entries), fmt=fmt)
    saved = asyncio.run(state.save())
    data = saved.encoded.data
    expected = {"VMID": 100, "ENTRIES": len(entries), "SENT": saved.encoded.sent,
                "LEFT_OUT": saved.encoded.left_out_total, "BYTES": len(data), "FORMAT": saved.encoded.format.value,
                "DURATION_MS": saved.ms, "CACHED": saved.cached}
    if fmt == payload.Choice.AUTO:
        assert saved.encoded.format == payload.Format.HYBRID
        expected["TEXT_SENT"] = saved.encoded.text_sent
    assert records.fields == [expected]
    assert saved.encoded.sent > 1

    records.fields.clear()
    loaded = asyncio.run(state.load(data))
    assert records.fields == [{
        "VMID": 100, "BYTES": len(data), "LINES": loaded.lines, "CREATED": saved.encoded.sent - 1, "REFUSED": 0,
        "FAILED": 1, "UNKNOWN": 0, "LEFT_OUT": 0, "DURATION_MS": loaded.ms, "FORMAT": saved.encoded.format.value}]
