"""Command line validation and journal-friendly log lines."""

from __future__ import annotations

import argparse
import io
import logging
import re

import pytest

from pvevmstate import __main__ as cli
from pvevmstate import logsetup
from pvevmstate.qemu import cleanup
from tests.support import REPO


@pytest.mark.parametrize("text", ["100", "101", "4711", "999999999"])
def test_good_vmids(text: str) -> None:
    assert cli.vmid(text) == int(text)


@pytest.mark.parametrize("text", ["", "abc", "0100", "99", "1000000000", "-100", "+100", " 100", "100\n", "1e3"])
def test_bad_vmids(text: str) -> None:
    with pytest.raises(Exception, match="invalid VMID"):
        cli.vmid(text)


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    # Every argument the parser has, not a list kept by hand: its name and its
    # help text (with %(default)s filled in) appear in --help. Whitespace is
    # ignored, since argparse wraps the text.
    parser = cli.build_parser()
    formatter = parser._get_formatter()
    flat = "".join(out.split())
    actions = parser._actions
    assert {a.dest for a in actions} >= {"vmid", "linger", "format", "qmp_socket", "qmp_timeout", "cleanup",
                                         "debug", "version"}
    for action in actions:
        names = action.option_strings or [str(action.metavar)]
        help_text = formatter._expand_help(action) if action.help else ""
        assert help_text.strip(), "%s has no help" % names[0]
        for name in names:
            assert name in out, name
        assert "".join(help_text.split()) in flat, names[0]
    assert "DBUS_SYSTEM_BUS_ADDRESS" in out


def test_usage_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["100", "--linger", "-1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("<3>pve-dbus-vmstate: ")


def test_priority_prefixes_on_every_line() -> None:
    stream = io.StringIO()
    logsetup.configure(debug=True, stream=stream)
    try:
        log = logging.getLogger("t")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e1\ne2")
        log.critical("c")
    finally:
        logging.getLogger().handlers.clear()
    assert stream.getvalue().splitlines() == ["<7>d", "<6>i", "<4>w", "<3>e1", "<3>e2", "<2>c"]


def test_console_script_points_at_main() -> None:
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["pve-dbus-vmstate"] == "pvevmstate.__main__:main"


def test_cleanup_is_silent_after_a_helper_that_exited(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # As ExecStopPost after a bad VMID: the helper's one error line stays the only one.
    monkeypatch.setenv("EXIT_CODE", "exited")
    assert cli.main(["--cleanup", "12"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("environ", "needed"), [
    ({}, True), ({"EXIT_CODE": "killed"}, True), ({"EXIT_CODE": "dumped"}, True),
    ({"EXIT_CODE": "exited", "EXIT_STATUS": "0"}, False), ({"EXIT_CODE": "exited", "EXIT_STATUS": "2"}, False),
    ({"EXIT_CODE": "exited", "EXIT_STATUS": "1"}, True),
])
def test_cleanup_needed_unless_the_helper_exited(environ: dict[str, str], needed: bool) -> None:
    assert cleanup.needed(environ) is needed


def _parse(environ: dict[str, str], *argv: str) -> argparse.Namespace:
    parser = cli.build_parser()
    cli.apply_environment(parser, environ)
    return parser.parse_args(["100", *argv])


def test_environment_sets_defaults_and_the_command_line_wins() -> None:
    environ = {"PVE_DBUS_VMSTATE_FORMAT": "text", "PVE_DBUS_VMSTATE_TABLE_RESERVE": "20",
               "PVE_DBUS_VMSTATE_LINGER": "5", "PVE_DBUS_VMSTATE_CACHE_INTERVAL": "0.5",
               "PVE_DBUS_VMSTATE_QMP_TIMEOUT": "3", "PVE_DBUS_VMSTATE_DEBUG": "yes"}
    args = _parse(environ)
    assert (args.format, args.table_reserve, args.linger, args.cache_interval, args.qmp_timeout, args.debug) == (
        "text", 20.0, 5.0, 0.5, 3.0, True)
    args = _parse(environ, "--format", "compact", "--table-reserve", "7")
    assert (args.format, args.table_reserve) == ("compact", 7.0)
    plain = _parse({"PVE_DBUS_VMSTATE_FORMAT": "", "PVE_DBUS_VMSTATE_DEBUG": "0"})
    assert (plain.format, plain.debug) == ("auto", False)


def test_every_environment_variable_names_an_option() -> None:
    options = {o for a in cli.build_parser()._actions for o in a.option_strings}
    assert set(cli.ENVIRONMENT) <= options


def test_every_environment_variable_is_in_the_readme_and_the_shipped_file() -> None:
    """The README's table of the environment file and the file the package
    ships (every line commented out) name each variable, with its option."""
    readme = (REPO / "README.md").read_text()
    table = set(re.findall(r"^  \| `(PVE_DBUS_VMSTATE_\w+)` \| `(--[\w-]+)` \|", readme, re.MULTILINE))
    assert table == {(variable, option) for option, variable in cli.ENVIRONMENT.items()}
    shipped = (REPO / "debian" / "pve-dbus-vmstate.default").read_text()
    assert not [ln for ln in shipped.splitlines() if ln and not ln.startswith("#")]
    assert set(re.findall(r"^#(PVE_DBUS_VMSTATE_\w+)=", shipped, re.MULTILINE)) == set(cli.ENVIRONMENT.values())


@pytest.mark.parametrize(("name", "value"), [
    ("PVE_DBUS_VMSTATE_FORMAT", "binary"), ("PVE_DBUS_VMSTATE_TABLE_RESERVE", "80"),
    ("PVE_DBUS_VMSTATE_LINGER", "-1"), ("PVE_DBUS_VMSTATE_CACHE_INTERVAL", "often"),
    ("PVE_DBUS_VMSTATE_QMP_TIMEOUT", "soon"), ("PVE_DBUS_VMSTATE_DEBUG", "2"),
])
def test_bad_environment_value_is_one_line_naming_it(name: str, value: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        _parse({name: value})
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("<3>pve-dbus-vmstate: %s=%r (/etc/default/pve-dbus-vmstate"
                                                    % (name, value)), err
