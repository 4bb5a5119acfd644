"""Real-component test support: private system bus, namespaces, QEMU, helper processes.

Nothing here touches the host's own bus or conntrack table: every bus is a
private ``dbus-daemon`` of type system, every table lives in a throw-away
network namespace, and every process is stopped by its PID.
"""

from __future__ import annotations

import compileall
import contextlib
import importlib.util
import itertools
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest

from pvevmstate import messages

if TYPE_CHECKING:  # the bus tests import this module and need no netlink
    from pvevmstate.netlink.conntrack import Conntrack

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "tests" / "data" / "examples.save"
_counter = itertools.count()
#: qemu-server's way of stopping a VM's helper, in Perl with Net::DBus (see the file).
PERL_CALLER = REPO / "tests" / "data" / "qemu-server-stop.pl"


def byte_compile(*trees: Path) -> None:
    """Byte-compile the helper's modules (of this checkout and ``trees``) and,
    in a virtualenv, the libraries it imports: as they are installed.

    Installed, the helper and python3-pyroute2 and python3-sdbus are
    byte-compiled (their postinst runs py3compile), and pip compiles what it
    installs. A checkout run under ``PYTHONDONTWRITEBYTECODE=1`` is not, nor a
    virtualenv whose ``__pycache__`` directories were removed (this machine's
    was by benchmark run 49): every helper the tests or the benchmark
    start then compiles what it imports, which here took ~150 ms (its own
    modules) and ~130 ms (pyroute2's and sdbus's) from exec to the names held.
    ``compileall`` writes the files whatever that variable says, and skips
    those already up to date. Libraries outside a virtualenv are left alone:
    a distribution's are its package's business (and root could write there).
    """
    dirs = [REPO / "pvevmstate", *(tree / "pvevmstate" for tree in trees)]
    venv = Path(sys.prefix)
    if sys.prefix != sys.base_prefix:
        for name in ("pyroute2", "sdbus"):
            spec = importlib.util.find_spec(name)
            for location in (spec.submodule_search_locations or []) if spec is not None else []:
                if Path(location).resolve().is_relative_to(venv.resolve()):
                    dirs.append(Path(location))
    for directory in dirs:
        if os.access(directory, os.W_OK):
            compileall.compile_dir(str(directory), quiet=2)


def require(condition: bool, why: str) -> None:
    """Skip unless ``condition``; under CI=true a missing requirement fails instead."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true, yet this test cannot run: " + why)
    pytest.skip(why)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (CAP_NET_ADMIN) for network namespaces")
    for tool in ("ip", "conntrack", "dbus-daemon", "busctl"):
        require(shutil.which(tool) is not None, "needs %s" % tool)


def wait_until(predicate: object, timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``predicate`` (a callable) until true; fail the test after ``timeout``."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(interval)


# ------------------------------------------------------------------ processes


def spawn_logged(cmd: list[str], log: Path, env: dict[str, str], **popen: Any) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with its stdout and stderr in ``log`` (its journal) and no stdin."""
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, **popen)


def stop_process(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, and SIGKILL after ``grace`` seconds: by its PID, never by name."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ bus


BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow send_type="method_call"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow send_type="signal"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
  </policy>
{extra}
</busconfig>
"""


@dataclass
class PrivateBus:
    """A private dbus-daemon of type system."""

    directory: Path
    address: str
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        stop_process(self.proc, 5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_bus(directory: Path, extra_config: str = "") -> PrivateBus:
    """Start ``dbus-daemon`` with a system-type config in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    sock = directory / "system_bus_socket"
    conf = directory / "bus.conf"
    conf.write_text(BUS_CONF.format(socket=sock, extra=extra_config))
    proc = subprocess.Popen(
        ["dbus-daemon", "--config-file=%s" % conf, "--nofork", "--nopidfile", "--print-address=1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    if not line:
        proc.wait(5)
        raise RuntimeError("dbus-daemon did not start (exit %s)" % proc.returncode)
    return PrivateBus(directory, line, proc)


POLICY = REPO / "dbus" / "com.proxmox.VMStateHelper.conf"
SYSTEM_CONF = Path("/usr/share/dbus-1/system.conf")


def start_policy_bus(directory: Path, policy: Path = POLICY, strict: bool = False) -> PrivateBus:
    """Start ``dbus-daemon`` with the machine's own system.conf, including ``policy``
    the way the system bus includes /usr/share/dbus-1/system.d.

    Only the parts that would touch the host are changed: the socket (in a
    directory everyone may enter, for the non-root clients), no user switch,
    no fork or pid file, and only ``policy`` in the include directory.
    dbus-daemon skips a file in an include directory that it cannot parse,
    with a warning; ``strict`` includes ``policy`` with ``<include>`` instead,
    which makes such a file fatal. Either way a warning about the file fails.
    """
    require(SYSTEM_CONF.exists(), "needs %s (package dbus-daemon)" % SYSTEM_CONF)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    includes = directory / "system.d"
    includes.mkdir(exist_ok=True)
    shutil.copy(policy, includes / policy.name)
    sock = directory / "system_bus_socket"
    conf = SYSTEM_CONF.read_text()
    conf = re.sub(r"<listen>.*?</listen>", "<listen>unix:path=%s</listen>" % sock, conf)
    conf = re.sub(r"<user>.*?</user>|<fork/>|<pidfile>.*?</pidfile>", "", conf)
    conf = re.sub(r"<include [^>]*>/etc/dbus-1/[^<]*</include>", "", conf)
    conf = re.sub(r"<includedir>[^<]*</includedir>", "", conf)
    include = ("<include>%s</include>" % (includes / policy.name) if strict
               else "<includedir>%s</includedir>" % includes)
    conf = conf.replace("</busconfig>", include + "\n</busconfig>")
    (directory / "system.conf").write_text(conf)
    log = directory / "dbus-daemon.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            ["dbus-daemon", "--config-file=%s" % (directory / "system.conf"), "--nofork", "--nopidfile",
             "--print-address=1"], stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    problem = ("refused the configuration" if not line
               else "skipped the policy" if policy.name in log.read_text() else "")
    if problem:
        bus = PrivateBus(directory, line, proc)
        bus.stop()
        raise RuntimeError("dbus-daemon %s: %s" % (problem, log.read_text().strip()))
    # Everyone may connect; the policy decides what they may do.
    sock.chmod(0o777)
    return PrivateBus(directory, line, proc)


# ------------------------------------------------------------------ netns


@dataclass
class Netns:
    """A throw-away network namespace with its own conntrack table."""

    name: str

    def run(self, *cmd: str, data: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], input=data,
                              capture_output=True, check=check, timeout=300)

    def conntrack(self, *args: str, data: bytes | None = None) -> str:
        return self.run("conntrack", *args, data=data).stdout.decode()

    def load(self, lines: list[str], mark: int | None = None) -> None:
        """Create entries with conntrack(8) (``--mark`` appended, as 1.4.7 needs it last)."""
        suffix = " --mark %d" % mark if mark is not None else ""
        text = "".join(line + suffix + "\n" for line in lines)
        self.conntrack("--load-file", "-", data=text.encode())

    def save_lines(self, mark: int | None = None) -> list[str]:
        args = ["-L", "-o", "save"] + (["--mark", str(mark)] if mark is not None else [])
        return [ln for ln in self.conntrack(*args).splitlines() if ln]

    def flush_mark(self, mark: int) -> None:
        self.run("conntrack", "-D", "--mark", str(mark), check=False)


@pytest.fixture
def netns_factory() -> Iterator[NetnsFactory]:
    from pyroute2 import netns

    require_root()
    made: list[str] = []

    def make() -> Netns:
        name = "pvevmstate-%d-%d" % (os.getpid(), next(_counter))
        netns.create(name)
        made.append(name)
        return Netns(name)

    try:
        yield make
    finally:
        for name in made:
            netns.remove(name)

# ------------------------------------------------------------------ qemu


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


class QMPSession:
    """A blocking QMP client for the tests, independent of the helper's own client."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError:
            self.sock.close()
            raise
        self.file = self.sock.makefile("rwb")
        greeting = json.loads(self.file.readline())
        assert "QMP" in greeting, greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise QMPFailed("%s: %s" % (command, reply["error"]))
            return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class QMPFailed(Exception):
    """QEMU answered a test's command with an error."""


@dataclass
class Qemu:
    """A QEMU process with a QMP socket, stopped by its PID."""

    name: str
    proc: subprocess.Popen[bytes]
    qmp_path: Path
    log: Path

    def qmp(self, command: str, **arguments: Any) -> Any:
        session = QMPSession(self.qmp_path)
        try:
            return session.execute(command, **arguments)
        finally:
            session.close()

    def objects(self) -> set[str]:
        return {o["name"] for o in self.qmp("qom-list", path="/objects")} - {"type"}

    def status(self) -> str:
        return str(self.qmp("query-status")["status"])

    def migration(self) -> dict[str, Any]:
        reply: dict[str, Any] = self.qmp("query-migrate")
        return reply

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_qemu(directory: Path, name: str, *, machine: str = "none", incoming: str | None = None,
               paused: bool = False) -> Qemu:
    """Start ``qemu-system-x86_64`` without display or devices.

    ``machine="none"`` is enough for the helper to register; migration tests
    use ``pc`` with a little RAM, on KVM when /dev/kvm works, else TCG.
    """
    exe = shutil.which("qemu-system-x86_64")
    require(exe is not None, "needs qemu-system-x86 (qemu-system-x86_64)")
    assert exe is not None
    directory.mkdir(parents=True, exist_ok=True)
    qmp_path = directory / ("%s.qmp" % name)
    log = directory / ("%s.qemu.log" % name)
    cmd = [exe, "-name", name, "-nodefaults", "-display", "none", "-serial", "none", "-monitor", "none",
           "-qmp", "unix:%s,server=on,wait=off" % qmp_path]
    if machine == "none":
        cmd += ["-machine", "none"]
    else:
        cmd += ["-machine", machine, "-m", "64"]
        cmd += ["-accel", "kvm", "-accel", "tcg"] if kvm_usable() else ["-accel", "tcg"]
    if incoming:
        cmd += ["-incoming", incoming]
    if paused:
        cmd += ["-S"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    qemu = Qemu(name, proc, qmp_path, log)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError("QEMU %s exited with %s: %s" % (name, proc.returncode, log.read_text()))
        # The socket file appears at bind(), before QEMU listens, and QEMU may
        # accept before its monitor runs: up means it greeted.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(5)
            try:
                probe.connect(str(qmp_path))
                return b'"QMP"' in probe.recv(4096)
            except (FileNotFoundError, ConnectionRefusedError, TimeoutError):
                return False
    wait_until(up, 30, "QEMU %s to open its QMP socket" % name)
    return qemu


@pytest.fixture
def qemu_factory(tmp_path: Path) -> Iterator[QemuFactory]:
    """Start QEMUs for a test; all are killed by PID afterwards."""
    started: list[Qemu] = []

    def start(name: str, **kwargs: Any) -> Qemu:
        qemu = start_qemu(tmp_path / "qemu", "%s-%d" % (name, next(_counter)), **kwargs)
        started.append(qemu)
        return qemu

    try:
        yield start
    finally:
        for qemu in started:
            qemu.stop()


# ------------------------------------------------------------------ helper


@dataclass
class HelperProcess:
    """A helper process a test started (this one or the Perl stand-in); its output is its journal."""

    vmid: int
    proc: subprocess.Popen[bytes]
    log: Path

    #: What failures call it.
    what = "helper"

    def journal(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_exit(self, timeout: float = 15) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail("%s %d still running after %.0f s:\n%s" % (self.what, self.vmid, timeout, self.journal()))

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        """SIGTERM, and SIGKILL after 10 s: by its PID, never by name."""
        stop_process(self.proc, 10)


@dataclass
class Helper(HelperProcess):
    """This helper, started the way systemd would, inside a namespace."""

    env: dict[str, str] = field(default_factory=dict)
    qemu: Qemu | None = None

    def wait_ready(self, timeout: float = 15) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail("helper %d exited with %s before it was ready:\n%s"
                            % (self.vmid, self.proc.returncode, self.journal()))
            return ready_line(self.vmid) in self.journal()
        wait_until(ready, timeout, "helper %d to be ready" % self.vmid)


def helper_command(ns: Netns | None, vmid: str, *args: str) -> list[str]:
    cmd = [sys.executable, "-m", "pvevmstate", vmid, *args]
    return (["ip", "netns", "exec", ns.name] if ns is not None else []) + cmd


@pytest.fixture
def helper_factory(tmp_path: Path, system_bus: PrivateBus, qemu_factory: QemuFactory) -> Iterator[HelperFactory]:
    """Start helpers; each registers with ``qemu`` or, by default, a QEMU of its own."""
    started: list[Helper] = []

    def start(ns: Netns, vmid: int, *args: str, ready: bool = True, bus: PrivateBus | None = None,
              qemu: Qemu | None = None) -> Helper:
        if qemu is None:
            qemu = qemu_factory("vm%d" % vmid)
        assert qemu is not None
        env = dict(os.environ, PYTHONPATH=str(REPO),
                   DBUS_SYSTEM_BUS_ADDRESS=(bus or system_bus).address)
        log = tmp_path / ("helper-%d-%d.log" % (vmid, next(_counter)))
        proc = spawn_logged(helper_command(ns, str(vmid), "--qmp-socket", str(qemu.qmp_path), *args), log, env)
        helper = Helper(vmid, proc, log, env, qemu)
        started.append(helper)
        if ready:
            helper.wait_ready()
        return helper

    try:
        yield start
    finally:
        for helper in started:
            helper.stop()


def run_cleanup(qemu: Qemu, vmid: int = 100, exit_code: str = "killed", exit_status: str = "9") -> tuple[int, str]:
    """``pve-dbus-vmstate --cleanup VMID`` as the unit's ExecStopPost runs it: (status, stderr)."""
    out = subprocess.run(helper_command(None, str(vmid), "--cleanup", "--qmp-socket", str(qemu.qmp_path)),
                         env=dict(os.environ, PYTHONPATH=str(REPO), EXIT_CODE=exit_code,
                                  EXIT_STATUS=exit_status),
                         capture_output=True, text=True, timeout=30, check=False)
    return out.returncode, out.stderr


# ------------------------------------------------------------------ nodes and migrations


MIGRATION_TIMEOUT = 120


@dataclass
class Node:
    """One Proxmox host: its system bus and its conntrack table."""

    name: str
    bus: PrivateBus
    ns: Netns


# ------------------------------------------------------------------ fixture types


class NetnsFactory(Protocol):
    """``netns_factory()``: a fresh namespace, removed after the test."""

    def __call__(self) -> Netns: ...


class QemuFactory(Protocol):
    """``qemu_factory(name, **start_qemu options)``: a QEMU, killed after the test."""

    def __call__(self, name: str, **kwargs: Any) -> Qemu: ...


class HelperFactory(Protocol):
    """``helper_factory(ns, vmid, *options)``: this helper, started as systemd would."""

    def __call__(self, ns: Netns, vmid: int, *args: str, ready: bool = True, bus: PrivateBus | None = None,
                 qemu: Qemu | None = None) -> Helper: ...


class NodeFactory(Protocol):
    """``node_factory(name, policy)``: a host: its policy bus and its namespace."""

    def __call__(self, name: str, policy: Path = ...) -> Node: ...


@pytest.fixture
def node_factory(tmp_path: Path, netns_factory: NetnsFactory) -> Iterator[NodeFactory]:
    """Nodes: ``make(name, policy=POLICY)``, a policy bus with that policy file and a namespace each."""
    made: list[PrivateBus] = []

    def make(name: str, policy: Path = POLICY) -> Node:
        bus = start_policy_bus(tmp_path / ("bus-" + name), policy)
        made.append(bus)
        return Node(name, bus, netns_factory())

    try:
        yield make
    finally:
        for bus in made:
            bus.stop()


@pytest.fixture
def nodes(node_factory: NodeFactory) -> tuple[Node, Node]:
    """Two nodes running this helper, "source" and "target"."""
    return node_factory("source"), node_factory("target")


def migration_qemus(vmid: int, tmp_path: Path, qemu_factory: QemuFactory) -> tuple[Qemu, Qemu, str]:
    """A running source QEMU and a destination QEMU waiting in ``-incoming`` on a unix socket."""
    uri = "unix:%s" % (tmp_path / ("migrate-%d.sock" % vmid))
    src_qemu = qemu_factory("src%d" % vmid, machine="pc")
    dst_qemu = qemu_factory("dst%d" % vmid, machine="pc", incoming=uri, paused=True)
    assert dst_qemu.status() == "inmigrate"
    return src_qemu, dst_qemu, uri


def start_migration(src_qemu: Qemu, uri: str) -> None:
    src_qemu.qmp("migrate-set-parameters", **{"max-bandwidth": 1 << 30, "downtime-limit": 1000})
    src_qemu.qmp("migrate", uri=uri)


def wait_migration(src_qemu: Qemu, what: str = "migration") -> str:
    """Wait until the source QEMU reports an end state; return it."""
    done = {"completed", "failed", "cancelled"}
    wait_until(lambda: src_qemu.migration().get("status") in done, MIGRATION_TIMEOUT, what, interval=0.1)
    return str(src_qemu.migration()["status"])


def marked(node: Node, vmid: int) -> list[str]:
    """The node's entries with mark ``vmid`` as save lines, timeouts stripped, sorted."""
    return sorted(strip_timeout(ln) for ln in node.ns.save_lines(vmid))


# ------------------------------------------------------------------ client


@contextlib.contextmanager
def conntrack_table(ns: Netns) -> Iterator[Conntrack]:
    """The namespace's conntrack table, through the helper's own netlink code."""
    from pyroute2 import netns

    from pvevmstate.netlink.conntrack import Conntrack

    netns.pushns(ns.name)
    try:
        table = Conntrack()
    finally:
        netns.popns()
    try:
        yield table
    finally:
        table.close()


def ready_line(vmid: int) -> str:
    """What the helper's journal says once it is ready (the fixed part)."""
    return messages.READY.split(" Id ")[0] % vmid


def save_lines(data: bytes) -> list[str]:
    """The save lines of a payload (text or hybrid), without comment lines."""
    assert data.endswith(b"\n")
    return [ln for ln in data.decode("ascii").splitlines() if ln and not ln.startswith("#")]


def strip_timeout(line: str) -> str:
    return re.sub(r" -t \d+", "", line)


def timeouts(lines: list[str]) -> dict[str, int]:
    out = {}
    for line in lines:
        m = re.search(r" -t (\d+)", line)
        assert m is not None, line
        out[strip_timeout(line)] = int(m.group(1))
    return out


def example_lines() -> list[str]:
    return [ln for ln in EXAMPLES.read_text().splitlines() if ln and not ln.startswith("#")]


def synthetic_lines(n: int, seed: int = 1, v6_share: float = 0.1, base: int = 0) -> list[str]:
    """``n`` distinct, loadable save lines in a realistic mix (TCP, UDP, ICMP; some IPv6)."""
    rnd = random.Random(seed)
    lines = []
    for i in range(base, base + n):
        a, b = divmod(i, 250)
        v6 = rnd.random() < v6_share
        src = "2001:db8:%x::%x" % (a + 1, b + 1) if v6 else "10.%d.%d.%d" % (a // 250 % 250, a % 250, b + 1)
        dst = "2001:db8:ffff::1" if v6 else "192.0.2.1"
        sport = 1024 + i % 60000
        kind = rnd.random()
        if kind < 0.8:
            state, status, t = ("ESTABLISHED", "SEEN_REPLY,ASSURED", 431999) if kind < 0.7 else \
                ("TIME_WAIT", "SEEN_REPLY,ASSURED", 119)
            lines.append("-A -t %d -u %s -s %s -d %s -r %s -q %s -p tcp --sport %d --dport 443 "
                         "--reply-port-src 443 --reply-port-dst %d --state %s"
                         % (t, status, src, dst, dst, src, sport, sport, state))
        elif kind < 0.97 or v6:
            lines.append("-A -t 119 -u SEEN_REPLY -s %s -d %s -r %s -q %s -p udp --sport %d --dport 53 "
                         "--reply-port-src 53 --reply-port-dst %d" % (src, dst, dst, src, sport, sport))
        else:
            lines.append("-A -t 29 -u SEEN_REPLY -s %s -d %s -r %s -q %s -p icmp --icmp-type 8 "
                         "--icmp-code 0 --icmp-id %d" % (src, dst, dst, src, i % 65536))
    return lines


_OTHER_TCP = (("SYN_SENT", 120, ""), ("SYN_RECV", 60, ""), ("FIN_WAIT", 120, "SEEN_REPLY,ASSURED"),
              ("CLOSE_WAIT", 60, "SEEN_REPLY,ASSURED"), ("LAST_ACK", 30, "SEEN_REPLY,ASSURED"),
              ("TIME_WAIT", 120, "SEEN_REPLY,ASSURED"), ("CLOSE", 10, "SEEN_REPLY,ASSURED"))


def realistic_lines(n: int, seed: int = 1, min_timeout: int = 1) -> list[str]:
    """``n`` distinct save lines as one busy VM has them, for sizes and the benchmark.

    About 70 % assured established TCP, 10 % TCP in other states, 15 % UDP
    (half of it assured), 3 % ICMP, the rest TCP again; 10 % IPv6. The VM has
    two IPv4 addresses and one IPv6 address; peers are random addresses,
    ephemeral ports random, remaining timeouts spread as on a live host
    (refreshed flows near the maximum, idle ones anywhere below). Timeouts
    below ``min_timeout`` are raised to it, so a long run loses no entries.
    """
    rnd = random.Random(seed)
    local4, local6 = ("10.10.0.5", "10.10.1.5"), "2001:db8:10::5"
    seen: set[tuple[str, str, int, int]] = set()
    lines: list[str] = []
    while len(lines) < n:
        v6 = rnd.random() < 0.10
        if v6:
            local = local6
            peer = "2001:db8:%x:%x::%x" % (rnd.getrandbits(16), rnd.getrandbits(16), rnd.getrandbits(16) | 1)
        else:
            local = local4[rnd.random() < 0.2]
            peer = "%d.%d.%d.%d" % (rnd.randint(1, 223), rnd.getrandbits(8), rnd.getrandbits(8), rnd.randint(1, 254))
        kind = rnd.random()
        inbound = rnd.random() < 0.6
        ephemeral = rnd.randint(32768, 60999)
        if kind < 0.82:
            proto, service = "tcp", rnd.choice((443, 443, 443, 80, 22, 8006) if inbound else (443, 443, 80, 22, 25))
        elif kind < 0.97:
            proto, service = "udp", rnd.choice((53, 123, 443, 51820))
            inbound = inbound and service == 51820
        else:
            proto, service = "icmp", 0
        src, dst, sport, dport = (peer, local, ephemeral, service) if inbound else (local, peer, ephemeral, service)
        key = (src, dst, sport, dport) if proto != "icmp" else (src, dst, ephemeral, -1)
        if key in seen:
            continue
        seen.add(key)
        tuples = "-s %s -d %s -r %s -q %s" % (src, dst, dst, src)
        if proto == "icmp":
            icmp = "-p icmpv6 --icmpv6-type 128 --icmpv6-code 0 --icmpv6-id" if v6 else \
                "-p icmp --icmp-type 8 --icmp-code 0 --icmp-id"
            lines.append("-A -t %d -u SEEN_REPLY %s %s %d" % (max(min_timeout, rnd.randint(1, 30)), tuples, icmp,
                                                              ephemeral))
            continue
        ports = "--sport %d --dport %d --reply-port-src %d --reply-port-dst %d" % (sport, dport, dport, sport)
        if proto == "udp":
            assured = rnd.random() < 0.5
            timeout = rnd.randint(1, 180) if assured else rnd.randint(1, 30)
            lines.append("-A -t %d -u %s %s -p udp %s" % (max(min_timeout, timeout),
                                                            "SEEN_REPLY,ASSURED" if assured else "SEEN_REPLY",
                                                            tuples, ports))
            continue
        if rnd.random() < 0.70 / 0.82:
            state, status = "ESTABLISHED", "SEEN_REPLY,ASSURED"
            timeout = rnd.randint(431000, 432000) if rnd.random() < 0.7 else rnd.randint(1, 432000)
        else:
            state, limit, status = rnd.choice(_OTHER_TCP)
            timeout = rnd.randint(1, limit)
        flags = "-u %s " % status if status else ""
        lines.append("-A -t %d %s%s -p tcp %s --state %s" % (max(min_timeout, timeout), flags, tuples, ports, state))
    return lines
