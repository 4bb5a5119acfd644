"""``pve-dbus-vmstate decode``: every payload kind the helpers write, refusals, exit statuses."""

from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from pvevmstate import __main__ as cli
from pvevmstate import commands, decode, payload
from pvevmstate.payload import compact, hybrid, savetext
from tests.support import REPO, example_lines, realistic_lines

MARK = 100


def examples() -> list[str]:
    """The 38 example save lines as conntrack prints them (no mark)."""
    return [savetext.render_line(savetext.parse_line(ln)) for ln in example_lines()]


def encoded(choice: payload.Choice, lines: list[str] | None = None) -> bytes:
    entries = [savetext.parse_line(ln) for ln in (lines if lines is not None else example_lines())]
    return payload.encode(entries, MARK, fmt=choice).data


def run(tmp_path: Path, data: bytes, *args: str,
        capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], list[str]]:
    """Exit status, header (comment) lines and save lines of ``decode`` on ``data``."""
    path = tmp_path / "payload"
    path.write_bytes(data)
    status = cli.main(["decode", str(path), *args])
    out = capsys.readouterr().out
    assert out.endswith("\n")
    lines = out.splitlines()
    return status, [ln for ln in lines if ln.startswith("#")], [ln for ln in lines if not ln.startswith("#")]


def header_value(header: list[str], key: str) -> str:
    found = [ln.split(": ", 1)[1] for ln in header if ln.startswith("# %s: " % key)]
    assert len(found) == 1, (key, header)
    return found[0]


@pytest.mark.parametrize(("choice", "kind", "fmt"), [
    (payload.Choice.TEXT, payload.Format.TEXT, "save text"),
    (payload.Choice.COMPACT, payload.Format.COMPACT, "compact (PVCT) version 1"),
    (payload.Choice.AUTO, payload.Format.HYBRID, "hybrid (#PVCT-HYBRID) version 1"),
])
def test_every_format_this_helper_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         choice: payload.Choice, kind: payload.Format, fmt: str) -> None:
    data = encoded(choice)
    assert payload.detect(data) == kind
    status, header, lines = run(tmp_path, data, capsys=capsys)
    assert status == 0
    assert header_value(header, "format").startswith(fmt)
    assert header_value(header, "entries").startswith("38")
    assert header_value(header, "refused") == "0"
    # Without --mark, lines as conntrack -L -o save prints them, in payload order.
    assert lines == examples()


def test_hybrid_says_what_a_perl_destination_creates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 6,000 entries: all of them in the compact section, fewer as save lines.
    table = realistic_lines(6000, seed=3, min_timeout=900)
    out = payload.encode([savetext.parse_line(ln) for ln in table], MARK)
    assert out.format == payload.Format.HYBRID and out.text_sent < out.sent == 6000
    status, header, lines = run(tmp_path, out.data, capsys=capsys)
    assert status == 0 and len(lines) == 6000
    assert header_value(header, "entries") == "6000, from the compact section (what this helper's Load reads)"
    perl = [ln for ln in header if ln.startswith("# save lines a Perl destination would create")]
    assert perl == ["# save lines a Perl destination would create (conntrack --load-file skips the compact "
                    "section): %d" % out.text_sent]
    assert header_value(header, "marks on the save lines") == "%d (%d lines)" % (MARK, out.text_sent)


def test_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, header, lines = run(tmp_path, payload.NO_STATE, capsys=capsys)
    assert status == 0 and lines == []
    assert header_value(header, "format") == "nothing to restore (one byte, \\x00)"
    assert header_value(header, "entries") == "0"


def test_perl_helpers_payload_and_mark(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # What the Perl helper sends: conntrack's save lines plus " --mark VMID".
    perl = "".join(ln + " --mark %d\n" % MARK for ln in example_lines()).encode()
    status, header, lines = run(tmp_path, perl, capsys=capsys)
    assert status == 0 and lines == examples()
    assert header_value(header, "marks on the save lines") == "100 (38 lines)"
    assert any("printed without a mark" in ln for ln in header)
    status, header, lines = run(tmp_path, perl, "--mark", str(MARK), capsys=capsys)
    assert status == 0 and lines == [ln + " --mark 100" for ln in examples()]
    # As VM 101's Load would read it: every line carries another VM's mark.
    status, header, lines = run(tmp_path, perl, "--mark", "101", capsys=capsys)
    assert status == 1 and lines == []
    assert header_value(header, "refused") == "38"
    assert "# refused line 1: --mark 100 is not this VM's mark 101" in header
    assert "# unusable as a whole: Load would create nothing from it" in header


def test_every_refused_line_with_its_reason_as_load_reads_them(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    good = example_lines()
    bad = ["-D -s 10.0.0.%d -d 10.0.0.2 -p tcp" % i for i in range(25)]
    mixed = [ln + " --mark 100" for ln in good[:10]] + bad + ["-A -t 5 -s 10.0.0.1 -p udp", "#x", ""] \
        + [ln + " --mark 100" for ln in good[10:]] + ["-A -t 1 --mark 100 -s 1.2.3.4 -d 1.2.3.5 -p tcp --bogus 1"]
    data = ("\n".join(mixed) + "\n").encode()
    status, header, lines = run(tmp_path, data, "--mark", str(MARK), capsys=capsys)
    assert status == 0 and len(lines) == 38
    refused = [ln for ln in header if ln.startswith("# refused ")]
    # All 27 refusals, not Load's 20 samples; numbered as Load numbers them.
    load = savetext.decode_payload(data, MARK)
    assert header_value(header, "refused") == "27" and load.refused == 27 and len(refused) == 27
    assert refused[:20] == ["# refused line %d: %s" % (r.line_no, r.reason) for r in load.samples]
    assert refused[0] == "# refused line 11: only create lines (-A) are accepted, not -D"
    assert refused[-1] == "# refused line 67: unknown option '--bogus'"
    assert lines == [savetext.render_line(e) + " --mark 100" for e in load.entries]


def test_compact_records_refused_one_by_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recs = compact.records([savetext.parse_line(ln) for ln in example_lines()])
    recs[4] = b"\x07" + recs[4][1:]  # an unknown address family
    data = compact.encode_records(recs)
    status, header, lines = run(tmp_path, data, capsys=capsys)
    assert status == 0 and len(lines) == 37
    assert header_value(header, "refused") == "1"
    assert "# refused record 5: unknown address family 7" in header


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda d: d[:4] + b"\x02" + d[5:], "unknown compact payload version 2"),
    (lambda d: d[:8] + (999).to_bytes(4, "little") + d[12:], "compact payload holds"),
    (lambda d: d[:12] + zlib.compress(b"x" * 10), "compact payload holds"),
    (lambda d: d[:-9], "compact payload"),
])
def test_compact_unusable_as_a_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     damage: object, reason: str) -> None:
    assert callable(damage)
    status, header, lines = run(tmp_path, damage(encoded(payload.Choice.COMPACT)), capsys=capsys)
    assert status == 1 and lines == []
    assert header_value(header, "refused payload").startswith(reason)
    assert "# unusable as a whole: Load would create nothing from it" in header


def damaged_section(data: bytes) -> bytes:
    """A hybrid payload whose compact section fails its checksum."""
    at = data.index(b"\n#") + 5
    return data[:at] + (b"A" if data[at:at + 1] != b"A" else b"B") + data[at + 1:]


def test_hybrid_falls_back_to_its_save_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = damaged_section(encoded(payload.Choice.AUTO))
    with pytest.raises(Exception, match="checksum"):
        hybrid.unarmor(data)
    status, header, lines = run(tmp_path, data, capsys=capsys)
    # As Load does: the save lines after the section, the most important first.
    assert status == 0 and sorted(lines) == sorted(examples())
    assert header_value(header, "refused compact section").endswith("reading its save lines instead")
    assert header_value(header, "entries").startswith("38, from the save lines")


def test_hybrid_unusable_when_section_and_save_lines_are(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = damaged_section(encoded(payload.Choice.AUTO))
    section = data[:data.index(b"\n-A ") + 1]
    for rest in (b"", b"-F\n-A -t 1\n"):
        status, header, lines = run(tmp_path, section + rest, capsys=capsys)
        assert status == 1 and lines == []
        assert "# unusable as a whole: Load would create nothing from it" in header


def test_output_loads_with_conntrack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An entry conntrack --load-file refuses (no timeout: an offloaded flow)
    # travels in the compact format; decode prints it as a comment, so that
    # conntrack(8) does not reject the whole output for it.
    entries = [savetext.parse_line(ln) for ln in example_lines()]
    entries[0].timeout = None
    status, header, lines = run(tmp_path, compact.encode(entries), "--mark", "100", capsys=capsys)
    assert status == 0 and len(lines) == 37
    assert header_value(header, "entries conntrack --load-file cannot load, printed as comments") == "1"
    assert [ln for ln in header if ln.startswith("# not loadable by conntrack (no timeout (offloaded)): -A -u ")]
    for line in lines:
        assert savetext.text_problem(savetext.parse_line(line, MARK)) is None


def test_too_big_is_no_payload(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, header, _ = run(tmp_path, b"#" * (payload.MAX_PAYLOAD + 1), capsys=capsys)
    assert status == 1
    assert header_value(header, "refused payload").startswith("more than 1048576 bytes")


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["decode"], ["decode", "x", "y"], ["decode", "--mark", "-1", "x"], ["decode", "--bogus", "x"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2, argv
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("<3>pve-dbus-vmstate decode: "), argv
    assert cli.main(["decode", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == "<3>pve-dbus-vmstate decode: cannot read %s: No such file or directory\n" \
        % (tmp_path / "missing")


@pytest.mark.parametrize("argv", [["12"], ["decoded"], ["--debug", "decode", "x"], ["Decode"]])
def test_anything_else_is_still_a_vmid(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    # What the unit runs is unchanged: only a subcommand's name, first, is one.
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("<3>pve-dbus-vmstate: argument VMID: invalid VMID "), err


def test_help_names_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in commands.COMMANDS:
        assert "pve-dbus-vmstate %s [-h]" % name in out
        assert "%s:" % name in out.split()
    with pytest.raises(SystemExit) as exc:
        cli.main(["decode", "--help"])
    assert exc.value.code == 0
    assert "Lines are printed without a mark unless --mark is given" in capsys.readouterr().out


# The check runs in the same process as decode: sdbus and pyroute2 are
# installed here, so importing them anywhere on decode's path would show.
_NO_BUS_NO_NETLINK = """
import sys
from pvevmstate.__main__ import main
status = main(sys.argv[1:])
sys.stdout.flush()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("sdbus", "pyroute2")
                or m in ("pvevmstate.daemon", "pvevmstate.service", "pvevmstate.vmstate"))
print("loaded:", loaded, file=sys.stderr)
sys.exit(status)
"""


def test_standard_input_without_bus_or_netlink() -> None:
    data = encoded(payload.Choice.AUTO)
    done = subprocess.run([sys.executable, "-c", _NO_BUS_NO_NETLINK, "decode", "-"], input=data,
                          capture_output=True, cwd=REPO, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.decode() == "loaded: []\n"
    out = done.stdout.decode().splitlines()
    assert out[0] == "# pve-dbus-vmstate decode: standard input, %d bytes" % len(data)
    assert [ln for ln in out if not ln.startswith("#")] == examples()


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "payload"
    path.write_bytes(payload.encode([savetext.parse_line(ln) for ln in realistic_lines(5000, seed=4)],
                                    MARK, fmt=payload.Choice.COMPACT).data)
    proc = subprocess.Popen([sys.executable, "-m", "pvevmstate", "decode", str(path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"# pve-dbus-vmstate decode: ")
    proc.stdout.close()  # as `| head -1` does
    with proc.stderr:
        err = proc.stderr.read()
    assert proc.wait(60) == 0 and err == b"", err


def test_decode_reads_text_as_load_does() -> None:
    # decode keeps its own line loop (every refusal, an optional mark): it must
    # agree with Load's reader on what it accepts and refuses.
    data = b"\n".join([b"-A -t 1 -s 1.2.3.4 -d 1.2.3.5 -r 1.2.3.5 -q 1.2.3.4 -p udp --sport 1 --dport 2 --mark 100",
                       b"", b"  # comment", b"-A \xff", b"-A\x01", b"x" * 5000, b"-U -s 1.2.3.4",
                       b"\t-A -t 2 -s ::1 -d ::2 -r ::2 -q ::1 -p tcp --sport 1 --dport 2 --state ESTABLISHED\r",
                       b"-A -t 1 -s 1.2.3.4 -d 1.2.3.5 -r 1.2.3.5 -q 1.2.3.4 -p udp --sport 1 --dport 2 --mark 7",
                       b"\x00"])
    report = decode.decode_payload(data, MARK)
    load = savetext.decode_payload(data, MARK)
    assert [(w, r) for w, r in report.refused] == [("line %d" % s.line_no, s.reason) for s in load.samples]
    assert [ln for ln, _ in report.lines] == [savetext.render_line(e) for e in load.entries]
    assert len(report.lines) == 2 and len(report.refused) == 6
