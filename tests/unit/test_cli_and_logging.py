"""Command line validation and journal-friendly log lines."""

from __future__ import annotations

import io
import logging

import pytest

from pvevmstate import __main__ as cli
from pvevmstate import cleanup, logsetup


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
