"""Command line: ``pve-dbus-vmstate VMID`` (what ``pve-dbus-vmstate@VMID`` runs)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from . import __version__, commands, logsetup, messages

if TYPE_CHECKING:  # the payload package is imported when a parser is built, not for --cleanup's quick exit
    from .payload import Choice

EXIT_FAILURE = 1
EXIT_USAGE = 2
PROG = "pve-dbus-vmstate"
log = logging.getLogger("pvevmstate")


_Parser = commands.Parser
vmid = commands.vmid


def seconds(text: str) -> float:
    """Parse a non-negative number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError("invalid duration %r: expected 0 to 86400 seconds" % text[:64])
    return value


def reserve(text: str) -> float:
    """Parse the share of the conntrack table Load leaves free, 5 to 50 percent."""
    from .vmstate import MIN_TABLE_RESERVE

    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not MIN_TABLE_RESERVE <= value <= 50:
        raise argparse.ArgumentTypeError("invalid reserve %r: expected %g to 50 (percent)"
                                         % (text[:64], MIN_TABLE_RESERVE))
    return value


#: Where the unit reads the host's settings (``EnvironmentFile=-``: optional).
ENVIRONMENT_FILE = "/etc/default/pve-dbus-vmstate"
#: Option -> the environment variable that sets its default. qemu-server
#: starts the unit with the VMID only, so a host's choices live in the
#: environment file; an option given on the command line still wins.
ENVIRONMENT: dict[str, str] = {
    "--format": "PVE_DBUS_VMSTATE_FORMAT",
    "--table-reserve": "PVE_DBUS_VMSTATE_TABLE_RESERVE",
    "--linger": "PVE_DBUS_VMSTATE_LINGER",
    "--cache-interval": "PVE_DBUS_VMSTATE_CACHE_INTERVAL",
    "--qmp-timeout": "PVE_DBUS_VMSTATE_QMP_TIMEOUT",
    "--debug": "PVE_DBUS_VMSTATE_DEBUG",
}
_BOOLEANS = {"1": True, "yes": True, "true": True, "on": True, "0": False, "no": False, "false": False, "off": False}


def apply_environment(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Take option defaults from ``environ`` (:data:`ENVIRONMENT`).

    A bad value ends the process with exit status 2 and one ``<3>`` line
    naming the variable and the file, before anything else happens.
    """
    for action in parser._actions:
        name = next((ENVIRONMENT[o] for o in action.option_strings if o in ENVIRONMENT), None)
        text = environ.get(name, "").strip() if name else ""
        if not name or not text:
            continue
        try:
            if action.nargs == 0:  # a flag
                if text.lower() not in _BOOLEANS:
                    raise argparse.ArgumentTypeError("expected 1 or 0 (yes/no, true/false, on/off)")
                value: object = _BOOLEANS[text.lower()]
            else:
                value = action.type(text) if callable(action.type) else text
                if action.choices is not None and value not in action.choices:
                    raise argparse.ArgumentTypeError(
                        "expected one of %s" % ", ".join(map(str, action.choices)))
        except argparse.ArgumentTypeError as err:
            parser.exit(EXIT_USAGE, "<3>%s: %s=%r (%s or the unit's environment): %s\n"
                        % (parser.prog, name, text[:64], ENVIRONMENT_FILE, err))
        parser.set_defaults(**{action.dest: value})


def payload_choice(text: str) -> Choice:
    """Parse what Save is to send (``--format``)."""
    from .payload import Choice

    try:
        return Choice(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "invalid format %r: expected one of %s" % (text[:64], ", ".join(Choice))) from None


def build_parser() -> argparse.ArgumentParser:
    """The command line parser (``--help`` documents every option)."""
    from .daemon import DEFAULT_LINGER
    from .payload import Choice
    from .qemu.qmp import DEFAULT_TIMEOUT
    from .vmstate import DEFAULT_TABLE_RESERVE
    from .warmer import INTERVAL as WARM_INTERVAL

    parser = _Parser(
        prog=PROG,
        description="Carry a VM's conntrack entries (CONNMARK == VMID) through a QEMU live "
                    "migration: serves org.qemu.VMState1 on the system bus for QEMU's "
                    "dbus-vmstate object. Normally started as pve-dbus-vmstate@VMID.service.",
        epilog="Defaults come from the environment (the unit reads " + ENVIRONMENT_FILE + "): "
               + ", ".join("%s for %s" % (var, opt) for opt, var in ENVIRONMENT.items())
               + "; an option given here wins. "
               "The system bus is taken from DBUS_SYSTEM_BUS_ADDRESS when set. Exit status: "
               "0 clean end, 1 fatal error (no bus, no netlink, names not obtainable, QEMU not "
               "reachable or refusing the object, or any unexpected error), 2 bad usage.",
    )
    parser.add_argument("vmid", type=vmid, metavar="VMID",
                        help="the VM (100..999999999); its entries carry this CONNMARK")
    parser.add_argument("--linger", type=seconds, default=DEFAULT_LINGER, metavar="SECONDS",
                        help="stay this long after a Save or Load was answered, so the caller can "
                             "read NumMigratedEntries and call Quit (default: %(default)g)")
    parser.add_argument("--format", type=payload_choice, choices=list(Choice), default=Choice.AUTO,
                        help="what Save sends: auto, the hybrid format every destination reads (this "
                             "helper's compact records in comment lines, then save lines for a Perl "
                             "destination, most important first); text, only save lines (the Perl "
                             "helper's format); compact, only binary records, for the most entries "
                             "where every node runs this helper (default: %(default)s); Load reads "
                             "all of them")
    parser.add_argument("--table-reserve", type=reserve, default=DEFAULT_TABLE_RESERVE, metavar="PERCENT",
                        help="Load leaves this share of nf_conntrack_max free (5 to 50 percent), so that "
                             "the kernel evicts no other entries to make room; what does not fit is left "
                             "out, least important first (default: %(default)g)")
    parser.add_argument("--cache-interval", type=seconds, default=WARM_INTERVAL, metavar="SECONDS",
                        help="while waiting for Save, dump the VM's entries in the background at most "
                             "this often (and within a tenth of one core) and keep them encoded, so that "
                             "Save, inside the VM's downtime, encodes only what changed; 0 turns this "
                             "off (default: %(default)g)")
    parser.add_argument("--qmp-socket", metavar="PATH",
                        help="the VM's QMP monitor socket (default: /var/run/qemu-server/VMID.qmp)")
    parser.add_argument("--qmp-timeout", type=seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="give up on a QMP step (connect, greeting, command) after this long; the "
                             "monitor serves one client at a time (default: %(default)g)")
    parser.add_argument("--cleanup", action="store_true",
                        help="do not serve: remove the VM's dbus-vmstate object from QEMU if a helper "
                             "that ended without removing it (killed) left it there; the unit runs this "
                             "as ExecStopPost")
    parser.add_argument("--debug", action="store_true", help="log at debug level, with tracebacks")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)

    commands.describe(parser)
    return parser


def _unraisable(info: sys.UnraisableHookArgs) -> None:
    # Errors Python cannot raise (in __del__, e.g. of an event loop whose
    # creation failed half-way) follow the error that caused them, which had
    # its journal line: a traceback here would only be noise, except for --debug.
    log.debug("ignored in %r: %s", info.object, info.exc_value,
              exc_info=info.exc_value if info.exc_value is not None else False)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and of ``python3 -m pvevmstate``.

    Whatever goes wrong ends here with one ``<3>`` line and exit status 1
    (a traceback only with ``--debug``, at debug priority), the way firewalld
    guards its main: the journal must say what failed, not where.
    """
    from .qemu import cleanup

    argv = sys.argv[1:] if argv is None else argv

    if argv and argv[0] in commands.COMMANDS:
        # A word that is never a VMID: dispatched before the VMID parser,
        # and without loading the daemon, D-Bus or netlink modules.
        return commands.run(argv)
    if "--cleanup" in argv and not cleanup.needed(os.environ):
        return 0  # before parsing: a bad VMID already had its one journal line
    parser = build_parser()
    apply_environment(parser, os.environ)
    args = parser.parse_args(argv)
    logsetup.configure(debug=args.debug)
    sys.unraisablehook = _unraisable
    try:
        return _run(args)
    except Exception as err:
        log.error(messages.UNEXPECTED, PROG, type(err).__name__, err)
        log.debug("unexpected error", exc_info=True)
        return EXIT_FAILURE


def _run(args: argparse.Namespace) -> int:
    from .daemon import Daemon, Settings
    from .qemu import cleanup

    settings = Settings(vmid=args.vmid, linger=args.linger, qmp_socket=args.qmp_socket or "",
                        qmp_timeout=args.qmp_timeout, payload_format=args.format,
                        table_reserve=args.table_reserve, cache_interval=args.cache_interval)
    if args.cleanup:
        return cleanup.run(settings)
    # Loaded here, before the event loop takes its descriptors: with none
    # left, the netlink socket is what fails, with the error that says so.
    from . import heap
    from .netlink.conntrack import Conntrack

    heap.configure()  # before any thread: one arena for all of them

    # The background dumps' socket needs no more than a dump's datagram (at
    # most 32 KiB) of buffer: memory the helper holds while it waits.
    daemon = Daemon(settings, backend_factory=Conntrack,
                    scan_factory=lambda: Conntrack(buffer_size=64 << 10))
    # Until the daemon's loop handles it, SIGINT ends the process as SIGTERM
    # does (nothing is registered yet) instead of raising KeyboardInterrupt;
    # this also keeps asyncio's runner from installing its own SIGINT handler.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        # The runner's loop exists before the coroutine does: a loop that
        # cannot be made (no file descriptors left) leaves no unawaited one.
        with asyncio.Runner() as runner:
            return runner.run(daemon.run())
    except KeyboardInterrupt:
        # Only possible in the instant between the loop giving SIGINT back and
        # the daemon ignoring it, after its teardown: the work is done.
        return daemon.exit_status


if __name__ == "__main__":
    sys.exit(main())
