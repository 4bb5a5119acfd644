"""``pve-dbus-vmstate preview VMID``: what a migration of the VM would carry, now.

Read-only: one mark-filtered dump of the conntrack table of the current
network namespace (the host's, run on a host), then the payload each format
would make of it. It creates, changes and deletes no entry, and touches
neither the bus nor QEMU, so it runs while no helper and no migration runs,
and while one does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from . import payload
from .model import IPS_EXPECTED, Entry
from .payload import priority


@dataclass(frozen=True, slots=True)
class FormatPreview:
    """What one ``--format`` would send."""

    format: str
    bytes: int
    #: Entries this helper's Load would receive.
    sent: int
    #: Entries a destination running the Perl helper would create.
    perl_receives: int
    left_out: dict[str, int]
    encode_ms: float


@dataclass(frozen=True, slots=True)
class Preview:
    """The VM's entries now, and each format's payload of them."""

    vmid: int
    entries: int
    by_class: dict[str, int]
    #: Helper-made (expected) entries: never sent, no kernel creates one.
    expected: int
    dump_ms: float
    formats: list[FormatPreview] = field(default_factory=list)

    def as_json(self) -> str:
        """One JSON object, for scripts."""
        return json.dumps(asdict(self), sort_keys=True)

    def as_text(self) -> str:
        """What an administrator reads."""
        out = ["VM %d: %d conntrack entries with mark %d (dump %.1f ms)" % (
            self.vmid, self.entries, self.vmid, self.dump_ms)]
        out += ["  %-16s %d" % (c, self.by_class.get(c, 0)) for c in priority.CLASSES]
        if self.expected:
            out.append("  %-16s %d (never sent: no kernel creates them)" % ("expected", self.expected))
        out.append("")
        out.append("%-8s %10s %10s %14s %11s  %s"
                   % ("format", "bytes", "fit", "Perl receives", "encode ms", "left out"))
        for f in self.formats:
            left = ", ".join("%d %s" % (f.left_out[c], c) for c in priority.CLASSES if f.left_out.get(c))
            out.append("%-8s %10d %10d %14d %11.1f  %s" % (
                f.format, f.bytes, f.sent, f.perl_receives, f.encode_ms, left or "-"))
        out.append("(limit %d bytes; auto is the default, see --format)" % payload.MAX_PAYLOAD)
        return "\n".join(out)


def _perl_receives(out: payload.Payload) -> int:
    if out.format == payload.Format.HYBRID:
        return out.text_sent
    if out.format == payload.Format.TEXT:
        return out.sent
    return 0


def make(vmid: int, dump: Callable[[int], Sequence[Entry]]) -> Preview:
    """Dump the VM's entries once and encode them in every format.

    :param vmid: the VM (its entries carry this mark)
    :param dump: the table's mark-filtered dump (``Conntrack.dump``)
    :raises VMStateError: when the table cannot be read
    """
    t0 = time.perf_counter()
    entries = dump(vmid)
    dump_ms = (time.perf_counter() - t0) * 1000
    by_class = Counter(priority.CLASSES[priority.priority_class(e)] for e in entries)
    expected = sum(1 for e in entries if (e.status or 0) & IPS_EXPECTED)
    formats = []
    for choice in payload.Choice:
        t0 = time.perf_counter()
        out = payload.encode(entries, vmid, fmt=choice)
        ms = (time.perf_counter() - t0) * 1000
        left = Counter(out.left_out)
        formats.append(FormatPreview(choice.value, len(out.data), out.sent, _perl_receives(out),
                                     dict(left), round(ms, 1)))
    return Preview(vmid, len(entries), dict(by_class), expected, round(dump_ms, 1), formats)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``preview`` (its --help documents every option)."""
    from .commands import Parser, vmid

    parser = Parser(
        prog="pve-dbus-vmstate preview",
        description="Dump VM VMID's conntrack entries (CONNMARK == VMID) from the table of the current "
                    "network namespace (the host's) and print what a migration would carry now: the "
                    "entries by priority class and, for each --format, the payload's bytes, how many "
                    "entries fit, how many a destination running the Perl helper would create, what "
                    "would be left out by class, and how long the dump and each encoding took. Read-only: "
                    "it creates, changes and deletes no entry and touches neither the bus nor QEMU.",
        epilog="Needs root (CAP_NET_ADMIN, for netlink). Exit status: 0 printed, 1 the table cannot be "
               "read, 2 bad usage.",
    )
    parser.add_argument("vmid", type=vmid, metavar="VMID", help="the VM (100..999999999)")
    parser.add_argument("--json", action="store_true", help="print the same as one JSON object, for scripts")
    return parser


def run(args: argparse.Namespace) -> int:
    """``preview``: 0 printed, 1 the table cannot be read."""
    from .errors import VMStateError
    from .netlink.conntrack import Conntrack

    try:
        table = Conntrack()
        try:
            found = make(args.vmid, table.dump)
        finally:
            table.close()
    except VMStateError as err:
        sys.stderr.write("<3>pve-dbus-vmstate preview: cannot read the conntrack table: %s\n" % err)
        return 1
    print(found.as_json() if args.json else found.as_text())
    return 0
