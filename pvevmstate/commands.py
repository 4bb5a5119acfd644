"""Subcommands: a word in the place of the VMID (``pve-dbus-vmstate decode FILE``).

``pve-dbus-vmstate VMID [options]`` is what the unit runs and stays exactly
as it is; a subcommand is recognised only as the first argument and only by
its name, which can never be a VMID, so the VMID parser never sees it. A
subcommand is loaded only when it runs (or when --help describes it): what
it does not need, such as the D-Bus and netlink layers, is never imported.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

EXIT_USAGE = 2
# Proxmox VMIDs: 100 .. 999999999, written without leading zeros.
_VMID = re.compile(r"[1-9][0-9]{2,8}")


class Parser(argparse.ArgumentParser):
    """A parser whose usage errors are one line at error priority (for the journal)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, "<3>%s: %s\n" % (self.prog, message))


def vmid(text: str) -> int:
    """Parse a VMID as systemd passes it (``%i``).

    :raises argparse.ArgumentTypeError: unless it is an integer 100..999999999
    """
    if not _VMID.fullmatch(text):
        raise argparse.ArgumentTypeError(
            "invalid VMID %r: expected a whole number from 100 to 999999999" % text[:64])
    return int(text)


@dataclass(frozen=True, slots=True)
class Command:
    """One subcommand: what --help says of it, its parser, and what runs it."""

    summary: str
    parser: Callable[[], argparse.ArgumentParser]
    run: Callable[[argparse.Namespace], int]


def _decode_parser() -> argparse.ArgumentParser:
    from . import decode

    return decode.build_parser()


def _decode_run(args: argparse.Namespace) -> int:
    from . import decode

    return decode.run(args)


def _preview_parser() -> argparse.ArgumentParser:
    from . import preview

    return preview.build_parser()


def _preview_run(args: argparse.Namespace) -> int:
    from . import preview

    return preview.run(args)


#: Name -> subcommand, in the order --help and the man page list them.
COMMANDS: dict[str, Command] = {
    "decode": Command("print a captured Save payload as conntrack save lines, with its format, count and "
                      "refused lines (no root, no bus, no netlink)", _decode_parser, _decode_run),
    "preview": Command("what a migration of VM VMID would carry now: its entries by class and, for each "
                       "--format, bytes, entries that fit, what a Perl destination would receive (root; "
                       "read-only; no bus, no QEMU)", _preview_parser, _preview_run),
}


def run(argv: Sequence[str]) -> int:
    """Run the subcommand ``argv[0]`` with the rest of ``argv``; returns its exit status."""
    command = COMMANDS[argv[0]]
    return command.run(command.parser().parse_args(argv[1:]))


def describe(parser: argparse.ArgumentParser) -> None:
    """Add the subcommands to the usage and --help of the helper's own ``parser``."""
    usage = [parser.format_usage().removeprefix("usage: ").rstrip()]
    usage += [COMMANDS[name].parser().format_usage().removeprefix("usage: ").rstrip() for name in COMMANDS]
    # argparse %-formats the usage with prog; the lines are already expanded.
    parser.usage = "\n       ".join(usage).replace("%", "%%")
    # A group without arguments: --help prints its title and description.
    parser.add_argument_group(
        "subcommands", "instead of VMID, as the first argument (each has its own --help): "
        + "; ".join("%s: %s" % (name, cmd.summary) for name, cmd in COMMANDS.items()))
