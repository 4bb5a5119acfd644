"""Save text that conntrack(8) loads whole (issue 11, item 3): the Perl helper's
Load pipes the payload into ``conntrack --load-file -``, which refuses a whole
file for one line it cannot parse and stops at the first line the kernel
refuses. Real FTP traffic through the kernel's ftp helper, DCCP entries under
the generic tracker (no DCCP tracker since Linux 6.16), and a line-by-line
check of what conntrack(8) accepts against codec.text_problem."""

from __future__ import annotations

import shutil
import subprocess
import sys

from pvevmstate.model import (
    PROTO_DCCP,
)
from pvevmstate.payload import savetext as codec
from tests import client
from tests.corpus import entry_kinds
from tests.support import HelperFactory, Netns, NetnsFactory, example_lines, require, strip_timeout, wait_until

VMID = 100
FTP_PORT = 2121
DATA_CONNECTIONS = 3

# nftables in the test namespace: the ftp helper on the control connection and
# every flow marked as VM 100's (loopback traffic passes the output hook first,
# before the entry is confirmed, so helper and mark are set on the new entry).
RULESET = """
table inet ftptest {
    ct helper ftp-std { type "ftp" protocol tcp; }
    chain out {
        type filter hook output priority 0; policy accept;
        tcp dport %d ct helper set "ftp-std"
        ct mark set %d
    }
}
""" % (FTP_PORT, VMID)

# A tiny FTP server and client over loopback: the client asks PASV, the server
# answers 227 with a listening data port, the client connects to it. The ftp
# helper reads the 227 and expects that data connection, so its entry is
# IPS_EXPECTED. Prints "ready" and keeps every connection open until stdin closes.
FTP_SCRIPT = r"""
import socket, sys, threading
port, n = int(sys.argv[1]), int(sys.argv[2])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen()
held = []

def server():
    ctl, _ = srv.accept()
    held.append(ctl)
    ctl.sendall(b"220 ready\r\n")
    cmds = ctl.makefile("rb")
    for _ in range(n):
        assert cmds.readline().startswith(b"PASV")
        data = socket.socket()
        data.bind(("127.0.0.1", 0))
        data.listen()
        p = data.getsockname()[1]
        ctl.sendall(b"227 Entering Passive Mode (127,0,0,1,%d,%d)\r\n" % (p >> 8, p & 255))
        conn, _ = data.accept()
        conn.sendall(b"x")
        held.extend((data, conn))

thread = threading.Thread(target=server)
thread.start()
cl = socket.create_connection(("127.0.0.1", port))
replies = cl.makefile("rb")
assert replies.readline().startswith(b"220")
for _ in range(n):
    cl.sendall(b"PASV\r\n")
    line = replies.readline().decode()
    assert line.startswith("227 "), line
    nums = [int(x) for x in line[line.index("(") + 1:line.index(")")].split(",")]
    data = socket.create_connection(("127.0.0.1", nums[4] * 256 + nums[5]))
    assert data.recv(1) == b"x"
    held.append(data)
thread.join()
print("ready", flush=True)
sys.stdin.read()
"""


def load_file(ns: Netns, data: bytes) -> subprocess.CompletedProcess[bytes]:
    """``conntrack --load-file -`` as the Perl helper's Load runs it."""
    return ns.run("conntrack", "--load-file", "-", data=data, check=False)


def without_timeouts(lines: list[str]) -> list[str]:
    return sorted(map(strip_timeout, lines))


def start_ftp(ns: Netns) -> subprocess.Popen[bytes]:
    require(shutil.which("nft") is not None, "needs nft (package nftables)")
    ns.run("ip", "link", "set", "lo", "up")
    ns.run("nft", "-f", "-", data=RULESET.encode())
    proc = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-c", FTP_SCRIPT, str(FTP_PORT),
                             str(DATA_CONNECTIONS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    if proc.stdout.readline() != b"ready\n":
        proc.kill()
        proc.communicate()
        raise AssertionError("the FTP exchange failed (exit %s)" % proc.returncode)
    return proc


def test_text_payload_with_ftp_and_dccp_loads_whole(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    source = netns_factory()
    ftp = start_ftp(source)
    try:
        source.load(example_lines(), mark=VMID)
        # DCCP under the generic tracker: created with ports and state, kept as
        # protocol 33 without them; conntrack(8) prints a bare "-p dccp".
        for i in range(1, 6):
            source.conntrack("-I", "-t", "3000", "-u", "SEEN_REPLY", "-s", "10.33.0.%d" % i, "-d", "192.0.2.33",
                             "-p", "dccp", "--sport", str(5000 + i), "--dport", "5004", "--state", "OPEN",
                             "--role", "client", "--mark", str(VMID))
        dumped = source.save_lines(VMID)
        expected = [ln for ln in dumped if " -u EXPECTED" in ln]
        dccp = [ln for ln in dumped if ln.endswith(" -p dccp")]
        # The premise: the real FTP flow made expected entries, the DCCP ones
        # are port-less, and conntrack(8) chokes on its own save output.
        assert len(expected) == DATA_CONNECTIONS and len(dccp) == 5, dumped
        assert len(dumped) == 38 + 1 + DATA_CONNECTIONS + 5  # examples, FTP control, data, DCCP
        perl_payload = "".join(ln + " --mark %d\n" % VMID for ln in dumped).encode()
        assert load_file(netns_factory(), perl_payload).returncode != 0

        helper = helper_factory(source, VMID, "--format", "text")
        data = client.save(client.vm(VMID))
        client.quit_helper(client.vm(VMID))
        assert helper.wait_exit() == 0
    finally:
        ftp.communicate(timeout=10)  # closes its stdin: it ends
    lines = data.decode().splitlines()
    creatable = [ln for ln in dumped if ln not in expected]
    assert len(lines) == len(creatable)
    assert not any("EXPECTED" in ln for ln in lines)
    # (iii) the journal counts what was left out and why.
    journal = helper.journal()
    assert "Save: left out %d expected (helper-made) entries, which no kernel can create" % DATA_CONNECTIONS \
        in journal, journal
    assert "sent %d " % len(creatable) in journal

    # (i) conntrack --load-file takes the whole payload and creates every entry.
    perl_side = netns_factory()
    out = load_file(perl_side, data)
    assert out.returncode == 0, out.stderr.decode()
    assert without_timeouts(perl_side.save_lines(VMID)) == without_timeouts(creatable)

    # (ii) so does this helper's Load ...
    ours = netns_factory()
    dst = helper_factory(ours, VMID)
    client.load(client.vm(VMID), data)
    assert without_timeouts(ours.save_lines(VMID)) == without_timeouts(creatable), dst.journal()
    assert "created %d entries with mark %d, refused 0, failed 0" % (len(creatable), VMID) in dst.journal()
    client.quit_helper(client.vm(VMID))
    assert dst.wait_exit() == 0

    # ... and the Perl helper's payload too: bare "-p dccp" lines are created,
    # only the expected ones fail (the kernel refuses them, EBUSY).
    from_perl = netns_factory()
    dst = helper_factory(from_perl, VMID)
    client.load(client.vm(VMID), perl_payload)
    assert without_timeouts(from_perl.save_lines(VMID)) == without_timeouts(creatable)
    assert "created %d entries with mark %d, refused 0, failed %d" % (len(creatable), VMID, DATA_CONNECTIONS) \
        in dst.journal(), dst.journal()


# ------------------------------------------------ what conntrack(8) accepts, line by line






def test_save_writes_only_lines_conntrack_loads(netns_factory: NetnsFactory) -> None:
    """codec.text_problem against conntrack(8) 1.4.7 itself, one line per file."""
    ns = netns_factory()
    disagree = []
    loaded = 0
    for e in entry_kinds():
        line = codec.render_line(e)
        accepted = load_file(ns, (line + " --mark %d\n" % VMID).encode()).returncode == 0
        loaded += accepted
        problem = codec.text_problem(e)
        # Never a line conntrack refuses; and nothing it loads left out, except
        # DCCP IGNORE/INVALID, which only this kernel's generic tracker takes
        # (a DCCP tracker refuses them).
        if problem is None and not accepted:
            disagree.append("refused by conntrack, yet Save would send it: " + line)
        if accepted and problem is not None and not (e.proto == PROTO_DCCP and (e.state or 0) >= 8):
            disagree.append("loaded by conntrack, yet Save leaves it out (%s): %s" % (problem, line))
        if problem is None:
            # And this helper's Load reads every line Save writes, to the same line.
            assert codec.render_line(codec.parse_line(line, VMID)) == line
    assert disagree == []
    # Exit 0 meant created (every entry has its own addresses, so none existed).
    assert len(ns.save_lines(VMID)) == loaded >= sum(codec.text_problem(e) is None for e in entry_kinds())


def test_load_creates_bare_dccp_lines(netns_factory: NetnsFactory, helper_factory: HelperFactory) -> None:
    # What a Perl source (conntrack -L -o save) sends for generic-tracker DCCP.
    ns = netns_factory()
    lines = ["-A -t 500 -u SEEN_REPLY -s 10.33.1.%d -d 192.0.2.33 -r 192.0.2.33 -q 10.33.1.%d -p dccp" % (i, i)
             for i in range(1, 4)]
    helper = helper_factory(ns, VMID)
    client.load(client.vm(VMID), "".join(ln + " --mark %d\n" % VMID for ln in lines).encode())
    wait_until(lambda: "Load:" in helper.journal(), 10, "the Load journal line")
    assert without_timeouts(ns.save_lines(VMID)) == without_timeouts(lines)
    assert "created 3 entries with mark 100, refused 0, failed 0" in helper.journal()
