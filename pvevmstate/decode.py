"""``pve-dbus-vmstate decode FILE``: what a captured payload holds, as conntrack save lines.

Reads any payload this helper or the Perl helper writes (``\\x00``, save
text, compact, hybrid) and prints its entries the way ``conntrack -L -o
save`` does, after a header of ``#`` comment lines: the format and its
version, the count, and every refused line or record with its reason (Load
logs only the first twenty). conntrack(8) skips comment lines, so the output
stays loadable with ``conntrack --load-file -``; for the same reason an entry
whose save line conntrack cannot load (no timeout, a state it has no name
for, ...) is printed as a comment saying why.

The mark: the compact format does not carry it (Load gives every entry the
VM's mark), so lines are printed without one unless ``--mark VMID`` is
given; with it, save lines carrying another mark are refused as that VM's
Load refuses them, and every printed line ends in `` --mark VMID``.

Pure: it reads one file and writes text. It needs no root, no bus and no
netlink, and imports nothing of the D-Bus or netlink layers.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import TextIO

from .commands import EXIT_USAGE, Parser
from .errors import CodecError
from .payload import MAX_PAYLOAD, Format, compact, detect, hybrid, savetext

PROG = "pve-dbus-vmstate decode"
EXIT_OK = 0
#: The payload is unusable as a whole: Load would create nothing from it.
EXIT_UNUSABLE = 1
#: conntrack(8) skips comment lines only up to about 8 KiB; ours stay far below.
MAX_COMMENT = 1000


def mark_value(text: str) -> int:
    """Parse ``--mark``: a CONNMARK, 0..4294967295 (a VMID in practice)."""
    if not (text.isascii() and text.isdecimal()) or len(text) > 10 or int(text) > 0xFFFFFFFF:
        raise argparse.ArgumentTypeError("invalid mark %r: expected a whole number from 0 to 4294967295"
                                         % text[:64])
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``decode`` (its --help documents every option)."""
    parser = Parser(
        prog=PROG,
        description="Print a payload that Save wrote (this helper's or the Perl helper's: a single \\x00, save "
                    "text, compact PVCT or hybrid #PVCT-HYBRID) as conntrack save lines, after '#' comment lines "
                    "giving its format and version, the number of entries and every refused line or record "
                    "with its reason; for a hybrid payload also how many save lines a Perl destination would "
                    "create. conntrack(8) skips the comments, so the output loads with 'conntrack --load-file "
                    "-'; entries conntrack cannot load are printed as comments. Needs no root, bus or netlink.",
        epilog="Lines are printed without a mark unless --mark is given: the compact format does not carry "
               "one (Load gives every entry the VM's mark). Exit status: 0 the payload is usable (also when "
               "some lines or records are refused, or it holds nothing), 1 it is unusable as a whole (a compact "
               "payload with a bad header or a corrupt stream, a hybrid one whose compact section and save "
               "lines are both unusable, a payload of which every line or record is refused, more than 1 MiB), "
               "2 bad usage or FILE cannot be read.",
    )
    parser.add_argument("file", metavar="FILE", help="the payload: a file, or - for standard input")
    parser.add_argument("--mark", type=mark_value, metavar="VMID",
                        help="decode as the Load of this VM would: refuse save lines with another --mark, "
                             "and end every printed line in --mark VMID")
    return parser


@dataclass(slots=True)
class Report:
    """What a payload holds, as ``decode`` prints it."""

    format: Format
    size: int
    #: The format and its version, in words.
    description: str = ""
    #: Where the entries were read from (hybrid: the compact section or the save lines).
    source: str = ""
    #: One per entry, in payload order: its save line (without a mark) and,
    #: for a line conntrack(8) cannot load, why not.
    lines: list[tuple[str, str | None]] = field(default_factory=list)
    #: Every refused line or record: (where, reason).
    refused: list[tuple[str, str]] = field(default_factory=list)
    #: The --mark values the save lines carry, and how many lines carry each.
    marks: Counter[int] = field(default_factory=Counter)
    #: Hybrid: the save lines after the compact section, what a Perl
    #: destination's conntrack --load-file creates.
    perl_lines: int | None = None
    #: Whether Load could use the payload at all (exit status 0 or 1).
    usable: bool = True

    @property
    def entries(self) -> int:
        """How many entries the payload yields."""
        return len(self.lines)


def _refuse_all(report: Report, reason: str) -> Report:
    report.refused.append(("payload", reason))
    report.usable = False
    return report


def read_save_lines(data: bytes, mark: int | None, report: Report, label: str = "line", collect: bool = True) -> int:
    """Read the save lines of ``data`` into ``report``; returns how many were accepted.

    The same rules as Load's text reader (``savetext.decode_payload``: blank
    and ``#`` lines skipped, every other line an entry or refused with a
    reason, numbered from 1), except that every refusal is kept and that
    without ``mark`` a line's own ``--mark`` is accepted and counted.

    :param label: how a refused line is named (``line``, or ``save line`` in a hybrid payload)
    :param collect: add the accepted lines' entries to ``report.lines`` (not
        for a hybrid payload's save lines when its compact section is read)
    """
    accepted = 0
    for no, chunk in enumerate(data.split(b"\n"), 1):
        raw = chunk.strip()
        if not raw or raw.startswith(b"#"):
            continue
        where = "%s %d" % (label, no)
        if len(raw) > savetext.MAX_LINE:
            report.refused.append((where, "line longer than %d characters" % savetext.MAX_LINE))
            continue
        try:
            line = raw.decode("ascii")
        except UnicodeDecodeError:
            report.refused.append((where, "line is not ASCII text"))
            continue
        if not line.isprintable():
            report.refused.append((where, "line holds control characters"))
            continue
        try:
            e = savetext.parse_line(line, mark)
        except CodecError as err:
            report.refused.append((where, str(err)))
            continue
        accepted += 1
        if e.mark is not None:
            report.marks[e.mark] += 1
        if collect:
            report.lines.append((savetext.render_line(e), savetext.text_problem(e)))
    return accepted


def _read_records(data: bytes, report: Report, label: str) -> None:
    """Put the entries of compact payload ``data`` into ``report``.

    :raises CodecError: when the payload as a whole is unusable
    """
    records = compact.Records(data)
    for i in range(records.count):
        try:
            e = records.entry(i)
        except CodecError as err:
            report.refused.append(("%s %d" % (label, i + 1), str(err)))
            continue
        report.lines.append((savetext.render_line(e), savetext.text_problem(e)))


def _compact_header(data: bytes) -> str:
    if len(data) < compact.HEADER.size:
        return "compact (PVCT), header cut short"
    _magic, version, compression, size, count = compact.HEADER.unpack_from(data)
    return "compact (PVCT) version %d, compression %d%s, %d records of %d bytes" % (
        version, compression, " (zlib)" if compression == compact.COMPRESSION_ZLIB else "", count, size)


def decode_payload(data: bytes, mark: int | None = None) -> Report:
    """Read ``data`` as Load would, keeping everything ``decode`` prints. Never raises for bad input."""
    report = Report(detect(data), len(data))
    if len(data) > MAX_PAYLOAD:
        report.description = "not a payload"
        return _refuse_all(report, "more than %d bytes: QEMU carries at most that" % MAX_PAYLOAD)
    if report.format == Format.NONE:
        report.description = "nothing to restore (%s)" % (
            "empty" if not data else "one byte, %s" % ("\\x00" if data == b"\x00" else repr(data)[2:-1]))
    elif report.format == Format.TEXT:
        report.description = "save text (conntrack -o save lines; the format has no version)"
        report.source = "save lines"
        read_save_lines(data, mark, report)
    elif report.format == Format.COMPACT:
        report.description = _compact_header(data)
        report.source = "compact records"
        try:
            _read_records(data, report, "record")
        except CodecError as err:
            return _refuse_all(report, str(err))
    else:
        _read_hybrid(data, mark, report)
    if report.usable and not report.lines and report.refused:
        report.usable = False  # every line or record refused: nothing to create
    return report


def _read_hybrid(data: bytes, mark: int | None, report: Report) -> None:
    end = data.find(b"\n", 0, hybrid.MAX_HEADER + 1)
    header = data[:end if end >= 0 else hybrid.MAX_HEADER].decode("ascii", "replace")
    fields = header[len(hybrid.MAGIC):].split(" ")
    if len(fields) == 4:
        report.description = ("hybrid (#PVCT-HYBRID) version %s, a compact section of %s records in %s bytes "
                              "(CRC-32 %s) then save lines" % tuple(fields))
    else:
        report.description = "hybrid (#PVCT-HYBRID), header line %r" % header
    try:
        section = hybrid.unarmor(data)
        report.description += "; its compact section: " + _compact_header(section)
        _read_records(section, report, "record")
        report.source = "the compact section (what this helper's Load reads)"
    except CodecError as err:
        # Load falls back to the save lines after the section: so does decode.
        report.refused.append(("compact section", "%s; reading its save lines instead" % err))
        report.source = "the save lines (the compact section is unusable; Load reads these instead)"
        report.perl_lines = read_save_lines(data, mark, report, "save line")
        report.usable = report.perl_lines > 0
        return
    report.perl_lines = read_save_lines(data, mark, report, "save line", collect=False)


def _comment(text: str) -> str:
    # One line however odd the input: conntrack(8) must see it as a comment.
    text = "".join(c if c.isprintable() else "?" for c in text)
    return "# " + text[:MAX_COMMENT] + "\n"


def write_report(report: Report, name: str, mark: int | None, out: TextIO) -> None:
    """Print ``report``: its header as ``#`` comment lines, then one save line per entry."""
    out.write(_comment("pve-dbus-vmstate decode: %s, %d bytes" % (name, report.size)))
    out.write(_comment("format: %s" % report.description))
    if report.source:
        out.write(_comment("entries: %d, from %s" % (report.entries, report.source)))
    else:
        out.write(_comment("entries: %d" % report.entries))
    if report.perl_lines is not None:
        out.write(_comment("save lines a Perl destination would create (conntrack --load-file skips the compact "
                           "section): %d" % report.perl_lines))
    if report.marks:
        out.write(_comment("marks on the save lines: %s" % ", ".join(
            "%d (%d lines)" % (m, n) for m, n in sorted(report.marks.items()))))
    if report.entries:
        if mark is None:
            out.write(_comment("printed without a mark (the compact format carries none; Load gives every "
                               "entry the VM's mark): --mark VMID appends one"))
        else:
            out.write(_comment("printed with --mark %d" % mark))
    unloadable = sum(1 for _line, problem in report.lines if problem is not None)
    if unloadable:
        out.write(_comment("entries conntrack --load-file cannot load, printed as comments: %d" % unloadable))
    out.write(_comment("refused: %d" % len(report.refused)))
    for where, reason in report.refused:
        out.write(_comment("refused %s: %s" % (where, reason)))
    if not report.usable:
        out.write(_comment("unusable as a whole: Load would create nothing from it"))
    suffix = "" if mark is None else " --mark %d" % mark
    for line, problem in report.lines:
        if problem is None:
            out.write(line + suffix + "\n")
        else:
            out.write(_comment("not loadable by conntrack (%s): %s%s" % (problem, line, suffix)))


def read_input(name: str) -> bytes:
    """The bytes of FILE (``-``: standard input), at most one byte more than a payload may hold.

    :raises OSError: when it cannot be read
    """
    if name == "-":
        return sys.stdin.buffer.read(MAX_PAYLOAD + 1)
    with open(name, "rb") as f:
        return f.read(MAX_PAYLOAD + 1)


def run(args: argparse.Namespace) -> int:
    """``decode``: exit status 0 (usable), 1 (unusable as a whole) or 2 (FILE cannot be read)."""
    try:
        data = read_input(args.file)
    except OSError as err:
        sys.stderr.write("<3>%s: cannot read %s: %s\n" % (PROG, args.file, err.strerror or err))
        return EXIT_USAGE
    report = decode_payload(data, args.mark)
    try:
        write_report(report, "standard input" if args.file == "-" else args.file, args.mark, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        # A reader that stopped early (| head): no traceback, and none at
        # exit either when Python flushes stdout once more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK if report.usable else EXIT_UNUSABLE
