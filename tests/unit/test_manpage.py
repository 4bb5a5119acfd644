"""pve-dbus-vmstate(8) against the command line: written by hand, held to the parsers here.

Every option and positional of the helper's parser is documented under
OPTIONS, every subcommand under COMMANDS with all of its own, and nothing is
documented there that the parsers do not have; the same for the environment
variables. groff must render the page without a warning.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess

import pytest

from pvevmstate import __main__ as cli
from pvevmstate import commands
from tests.support import REPO, require

PAGE = REPO / "docs" / "pve-dbus-vmstate.8"


def sections(text: str, macro: str) -> dict[str, list[str]]:
    """The page's lines under each ``.SH`` (or ``.SS``) heading."""
    out: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith(macro + " "):
            current = out.setdefault(line[len(macro) + 1:].strip('"'), [])
        else:
            current.append(line)
    return out


def roff_text(line: str) -> str:
    """A roff line as text: font escapes and macro names dropped, ``\\-`` a hyphen."""
    line = re.sub(r"\\f[BIRP]", "", line).replace("\\-", "-")
    return re.sub(r"^\.[A-Z]+ ?", "", line).replace('"', "")


def documented(lines: list[str]) -> tuple[set[str], set[str]]:
    """The options and the positionals (upper-case words) in the tags of ``.TP`` entries."""
    options: set[str] = set()
    positionals: set[str] = set()
    for i, line in enumerate(lines[:-1]):
        if line == ".TP":
            tag = roff_text(lines[i + 1])
            options |= set(re.findall(r"(?<![\w-])--?[a-z][a-z-]*", tag))
            if re.fullmatch(r"\.I [A-Z]+", lines[i + 1]):
                positionals.add(tag)
    return options, positionals


def parser_arguments(parser: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    options = {o for a in parser._actions for o in a.option_strings}
    positionals = {str(a.metavar) for a in parser._actions if not a.option_strings}
    return options, positionals


def page() -> str:
    return PAGE.read_text()


def test_options_of_the_helper() -> None:
    options, positionals = documented(sections(page(), ".SH")["OPTIONS"])
    assert (options, positionals) == parser_arguments(cli.build_parser())


def test_every_subcommand_and_its_options() -> None:
    text = sections(page(), ".SH")["COMMANDS"]
    subsections = sections("\n".join(text), ".SS")
    assert list(subsections) == list(commands.COMMANDS)
    for name, command in commands.COMMANDS.items():
        assert documented(subsections[name]) == parser_arguments(command.parser()), name


def test_synopsis_names_every_option_and_subcommand() -> None:
    synopsis = " ".join(roff_text(ln) for ln in sections(page(), ".SH")["SYNOPSIS"])
    every = set().union(*(parser_arguments(c.parser())[0] for c in commands.COMMANDS.values()),
                        parser_arguments(cli.build_parser())[0])
    assert {o for o in every if o not in synopsis} == set()
    for name in commands.COMMANDS:
        assert re.search(r"\.B %s$" % name, page(), re.M), name


def test_environment_variables() -> None:
    env = sections(page(), ".SH")["ENVIRONMENT"]
    tags = {roff_text(env[i + 1]) for i, ln in enumerate(env[:-1]) if ln == ".TP"}
    assert tags == set(cli.ENVIRONMENT.values()) | {"DBUS_SYSTEM_BUS_ADDRESS"}
    for option, variable in cli.ENVIRONMENT.items():
        at = env.index(".B %s" % variable)
        assert roff_text(env[at + 1]) == option + ":", variable
    assert set(re.findall(r"PVE_DBUS_VMSTATE_\w+", page())) == set(cli.ENVIRONMENT.values())
    assert cli.ENVIRONMENT_FILE.replace("-", "\\-") in "\n".join(env)


def test_renders_without_warnings() -> None:
    require(shutil.which("groff") is not None, "needs groff (Debian: groff-base)")
    done = subprocess.run(["groff", "-man", "-ww", "-z", str(PAGE)], capture_output=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, b"")
    if shutil.which("man") is not None:  # man-db's check, the one lintian runs
        done = subprocess.run(["man", "--warnings", "-l", str(PAGE)], capture_output=True, timeout=60,
                              check=False, env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        assert (done.returncode, done.stderr) == (0, b"")


@pytest.mark.parametrize("section", ["SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS", "THE UNIT", "ENVIRONMENT",
                                     "D-BUS INTERFACE", "PAYLOAD FORMATS", "EXIT STATUS", "JOURNAL", "FILES",
                                     "DIAGNOSTICS"])
def test_has_section(section: str) -> None:
    assert section in sections(page(), ".SH")


def test_names_this_version() -> None:
    from pvevmstate import __version__

    assert '"pve-dbus-vmstate %s"' % __version__ in page().splitlines()[3]
