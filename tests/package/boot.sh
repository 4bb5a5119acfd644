#!/bin/bash
# Boots the trixie root that check.sh prepared (with the package installed) as
# a systemd-nspawn container with its own network namespace, and checks the
# unit for real under trixie's systemd, D-Bus and QEMU:
#   - `systemctl start pve-dbus-vmstate@100` returns only once QEMU has the object;
#   - Save works under the unit's hardening; journal priorities are right;
#   - the ready, Save, Load and exit lines reach journald natively with their
#     fields (journalctl -o json), each line once;
#   - `decode` of that Save's payload, as nobody, lists what conntrack -L does;
#   - `pve-dbus-vmstate preview 100` (the /usr/sbin link) counts the same entries;
#   - nobody is refused by the real system bus with the installed policy;
#   - Quit and `systemctl stop` remove the QEMU object;
#   - a start without QEMU and a bad VMID fail with one error line, and the
#     failed instance does not keep the VM's scope loaded (CollectMode);
#   - the environment file: shipped inert, a bad value fails the start with one
#     line, a good one is used;
#   - a killed helper's object is removed by ExecStopPost;
#   - stopping the bus stops the helper first (the order at host shutdown);
#   - `man -w pve-dbus-vmstate` finds the installed page, which renders cleanly.
# Needs root and systemd-nspawn (package systemd-container).
set -euo pipefail
root=${TRIXIE_ROOT:-/var/tmp/pvevmstate-trixie}
machine=pvevmstate-$$

if ! command -v systemd-nspawn >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd-container >/dev/null
fi
chroot "$root" dpkg -s pve-dbus-vmstate qemu-system-x86 dbus systemd-sysv conntrack >/dev/null 2>&1 \
    || { echo "run tests/package/check.sh first: it prepares $root" >&2; exit 1; }

log=$(mktemp)
# trixie's systemd needs the unified cgroup hierarchy.
SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn -D "$root" --boot --register=no --keep-unit \
    --private-network --machine="$machine" > "$log" 2>&1 &
nspawn=$!
leader=""
stop_container() {
    if [ -n "$leader" ]; then kill -s SIGRTMIN+4 "$leader" 2>/dev/null || true; fi
    for _ in $(seq 100); do kill -0 "$nspawn" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$nspawn" 2>/dev/null || true
    wait "$nspawn" 2>/dev/null || true
    rm -f "$log"
}
trap stop_container EXIT
for _ in $(seq 100); do leader=$(pgrep -P "$nspawn" | head -1 || true); [ -n "$leader" ] && break; sleep 0.1; done
[ -n "$leader" ] || { cat "$log"; exit 1; }
ct() { nsenter -t "$leader" -a -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
for _ in $(seq 300); do
    state=$(ct systemctl is-system-running 2>/dev/null || true)
    case $state in running|degraded) break ;; esac
    sleep 0.1
done
echo "container $machine: systemd $(ct systemctl --version | head -1 | cut -d' ' -f2) is $state" >&2

fail() { echo "FAILED: $*" >&2; exit 1; }

echo "--- the man page: installed where man finds it, and it renders without warnings" >&2
page=$(ct man -w pve-dbus-vmstate) || fail "man -w pve-dbus-vmstate finds no page"
[ "$page" = /usr/share/man/man8/pve-dbus-vmstate.8.gz ] || fail "man page at $page"
warnings=$(ct env MANWIDTH=80 man --warnings pve-dbus-vmstate 2>&1 >/dev/null) || fail "man pve-dbus-vmstate"
[ -z "$warnings" ] || fail "man page warnings: $warnings"
rendered=$(ct env MANWIDTH=80 man pve-dbus-vmstate) || fail "man pve-dbus-vmstate"
grep -q '^COMMANDS' <<<"$rendered" || fail "the rendered page has no COMMANDS section"
journal() {  # priority and message of the unit's lines from the helper itself
    ct journalctl -b -u "$1" -o json --no-pager | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("SYSLOG_IDENTIFIER") == "pve-dbus-vmstate":
        print(m.get("PRIORITY"), m.get("MESSAGE"))'
}
fields() {  # $1's entries from the helper, one JSON object a line, checked by the Python in $2
    ct journalctl --sync
    ct journalctl -b -u "$1" -o json --no-pager | python3 -c '
import json, sys
lines = [m for m in map(json.loads, sys.stdin) if m.get("SYSLOG_IDENTIFIER") == "pve-dbus-vmstate"]
def one(prefix):
    found = [m for m in lines if m["MESSAGE"].startswith(prefix)]
    assert len(found) == 1, "%d lines start with %r" % (len(found), prefix)
    return found[0]
def has(m, **want):
    got = {k: m.get(k) for k in want}
    assert got == want, "%s: %r, expected %r" % (m["MESSAGE"], got, want)
'"$2"
}
objects() {  # the QEMU objects of VM $1, over its QMP socket
    ct python3 -c '
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect("/run/qemu-server/%s.qmp" % sys.argv[1]); f = s.makefile("rwb")
f.readline()
for cmd in ({"execute": "qmp_capabilities"}, {"execute": "qom-list", "arguments": {"path": "/objects"}}):
    f.write(json.dumps(cmd).encode() + b"\n"); f.flush(); reply = json.loads(f.readline())
print(" ".join(sorted(o["name"] for o in reply.get("return", []))))' "$1"
}

ct mkdir -p /run/qemu-server
ct systemd-run --quiet --unit=qemu-vm100 --slice=qemu qemu-system-x86_64 -machine none -nodefaults \
    -display none -qmp unix:/run/qemu-server/100.qmp,server=on,wait=off
for _ in $(seq 100); do ct test -S /run/qemu-server/100.qmp && break; sleep 0.1; done

echo "--- systemctl start pve-dbus-vmstate@100" >&2
ct systemctl start pve-dbus-vmstate@100 || fail "start"
# Returning means ready, and ready means QEMU has the object.
objects 100 | grep -w pve-vmstate >/dev/null || fail "no pve-vmstate object after start returned"
[ "$(ct systemctl show -P Slice pve-dbus-vmstate@100)" = qemu.slice ] || fail "slice"
journal pve-dbus-vmstate@100 | grep '^6 helper for VM 100 ready: ' >/dev/null || fail "ready line at priority 6"

echo "--- Save under the unit's hardening; nobody refused by the installed policy" >&2
printf -- '-A -t 600 -s 10.0.0.%d -d 192.0.2.1 -p tcp --sport 4000 --dport 443 --state ESTABLISHED -u ASSURED --mark 100\n' \
    1 2 3 | ct conntrack --load-file -
saved=$(ct busctl --json=short call com.proxmox.VMStateHelper.VM100 /org/qemu/VMState1 org.qemu.VMState1 Save) \
    || fail "Save"
journal pve-dbus-vmstate@100 | grep '^6 Save: 3 entries with mark 100, sent 3' >/dev/null || fail "Save line"
echo "--- decode: that Save's payload, by the installed helper as nobody, equals conntrack -L" >&2
decoded=$(printf '%s' "$saved" | python3 -c 'import json, sys; sys.stdout.buffer.write(bytes(json.load(sys.stdin)["data"][0]))' \
    | ct setpriv --reuid=nobody --regid=nogroup --clear-groups /usr/libexec/pve-dbus-vmstate decode --mark 100 -) \
    || fail "decode exited with $?"
grep -q '^# format: hybrid' <<<"$decoded" || fail "decode: not hybrid: $decoded"
grep -q '^# entries: 3, ' <<<"$decoded" || fail "decode: not 3 entries: $decoded"
[ "$(grep -v '^#' <<<"$decoded" | sed -e 's/ -t [0-9]*//' -e 's/ --mark 100$//' | sort)" \
  = "$(ct conntrack -L --mark 100 -o save 2>/dev/null | sed 's/ -t [0-9]*//' | sort)" ] || fail "decode: $decoded"
echo "--- preview through /usr/sbin: the host table's 3 entries of VM 100, read-only" >&2
previewed=$(ct pve-dbus-vmstate preview 100 --json) || fail "preview exited with $?"
python3 -c 'import json, sys; p = json.loads(sys.argv[1]); assert p["entries"] == 3, p
assert {f["format"]: f["sent"] for f in p["formats"]} == {"auto": 3, "text": 3, "compact": 3}, p' "$previewed" \
    || fail "preview: $previewed"
[ "$(ct conntrack -L --mark 100 2>/dev/null | wc -l)" = 3 ] || fail "preview changed the table"
for call in "org.qemu.VMState1 Save" "com.proxmox.VMStateHelper Quit"; do
    # shellcheck disable=SC2086
    out=$(ct setpriv --reuid=nobody --regid=nogroup --clear-groups busctl call \
        com.proxmox.VMStateHelper.VM100 /org/qemu/VMState1 $call 2>&1) && fail "nobody may call $call"
    echo "$out" | grep "Access denied" >/dev/null || fail "nobody: $out"
done
ct busctl call com.proxmox.VMStateHelper.VM100 /org/qemu/VMState1 org.qemu.VMState1 Load ay 3 0x2d 0x46 0x0a \
    || fail "Load"
journal pve-dbus-vmstate@100 | grep '^4 Load: line 1 refused' >/dev/null || fail "refused line at priority 4"

echo "--- Quit ends the helper and removes the object" >&2
ct busctl call com.proxmox.VMStateHelper.VM100 /org/qemu/VMState1 com.proxmox.VMStateHelper Quit
for _ in $(seq 100); do ct systemctl is-active -q pve-dbus-vmstate@100 || break; sleep 0.1; done
ct systemctl is-active -q pve-dbus-vmstate@100 && fail "still active after Quit"
objects 100 | grep -w pve-vmstate >/dev/null && fail "object left after Quit"
journal pve-dbus-vmstate@100 | grep '^6 helper for VM 100 exiting: Quit called' >/dev/null || fail "exit line"

echo "--- structured journal: the ready, Save, Load and exit lines carry their numbers; no line twice" >&2
# One run of the unit so far: each of these lines is there once, every line
# came over the native socket (_TRANSPORT=journal; a stderr line would be
# stdout) and none is there twice.
fields pve-dbus-vmstate@100 '
ready = one("helper for VM 100 ready: ")
has(ready, VMID="100", HELPER_ID="pve-vmstate-100")
assert ready["UNIQUE_NAME"].startswith(":") and "unique name %s," % ready["UNIQUE_NAME"] in ready["MESSAGE"], ready
save = one("Save: ")
has(save, PRIORITY="6", VMID="100", ENTRIES="3", SENT="3", LEFT_OUT="0", FORMAT="hybrid", TEXT_SENT="3")
assert int(save["BYTES"]) > 3 and " in %s bytes as hybrid" % save["BYTES"] in save["MESSAGE"], save
assert float(save["DURATION_MS"]) >= 0, save
load = one("Load: 3 bytes")
has(load, PRIORITY="4", VMID="100", BYTES="3", LINES="1", CREATED="0", REFUSED="1", FAILED="0", UNKNOWN="0",
    LEFT_OUT="0", FORMAT="text")
assert float(load["DURATION_MS"]) >= 0, load
has(one("helper for VM 100 exiting: "), PRIORITY="6", VMID="100", REASON="Quit called", EXIT_STATUS="0")
messages = [m["MESSAGE"] for m in lines]
assert len(set(messages)) == len(messages), "a line twice: %r" % messages
assert {m["_TRANSPORT"] for m in lines} == {"journal"}, [(m["_TRANSPORT"], m["MESSAGE"]) for m in lines]
' || fail "journal fields"

echo "--- started through systemd's StartUnit over D-Bus (the activation path)" >&2
ct busctl call org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager \
    StartUnit ss pve-dbus-vmstate@100.service replace >/dev/null || fail "StartUnit"
for _ in $(seq 100); do ct systemctl is-active -q pve-dbus-vmstate@100 && break; sleep 0.1; done
objects 100 | grep -w pve-vmstate >/dev/null || fail "no object after StartUnit"
ct test -f "$(ct systemctl show -P Documentation pve-dbus-vmstate@100 | sed 's|^file://||')" || fail "Documentation="

echo "--- systemctl stop removes the object" >&2
ct systemctl stop pve-dbus-vmstate@100
objects 100 | grep -w pve-vmstate >/dev/null && fail "object left after systemctl stop"

echo "--- no QEMU: the start fails, one error line, nothing holds the VM's scope" >&2
ct systemctl start pve-dbus-vmstate@101 2>/dev/null && fail "start without QEMU succeeded"
[ "$(journal pve-dbus-vmstate@101 | grep -c '^3 ')" = 1 ] || fail "one error line"
journal pve-dbus-vmstate@101 | grep '^3 cannot register with the QEMU of VM 101' >/dev/null || fail "error line"
fields pve-dbus-vmstate@101 '
has(one("helper for VM 101 exiting: "), VMID="101", REASON="not registered with QEMU", EXIT_STATUS="1")
' || fail "exit fields after a failed start"
[ -z "$(ct systemctl list-units --all --no-legend pve-dbus-vmstate@101.service 101.scope)" ] \
    || fail "failed instance still loaded, holding 101.scope"
ct systemd-run --quiet --scope --unit=101 --slice=qemu true || fail "scope 101 blocked"

echo "--- bad VMID: exit 2, one error line" >&2
ct systemctl start pve-dbus-vmstate@12 2>/dev/null && fail "bad VMID started"
journal pve-dbus-vmstate@12 | grep "^3 pve-dbus-vmstate: argument VMID: invalid VMID '12'" >/dev/null || fail "bad VMID line"
[ "$(journal pve-dbus-vmstate@12 | wc -l)" = 1 ] || fail "one line for a bad VMID"
ct journalctl -b -u pve-dbus-vmstate@12 --no-pager | grep 'status=2/INVALIDARGUMENT' >/dev/null || fail "exit status 2"

echo "--- the environment file: shipped inert; a bad value fails the start with one line naming it; a good one is used" >&2
ct test -f /etc/default/pve-dbus-vmstate || fail "no /etc/default/pve-dbus-vmstate"
[ -z "$(ct grep -v -e '^#' -e '^$' /etc/default/pve-dbus-vmstate)" ] || fail "the shipped environment file sets something"
ct cp /etc/default/pve-dbus-vmstate /etc/default/pve-dbus-vmstate.orig
ct sh -c 'echo PVE_DBUS_VMSTATE_FORMAT=bogus >> /etc/default/pve-dbus-vmstate'
ct systemctl start pve-dbus-vmstate@102 2>/dev/null && fail "started with a bad environment file"
[ "$(journal pve-dbus-vmstate@102 | wc -l)" = 1 ] || fail "one line for a bad environment file"
journal pve-dbus-vmstate@102 | grep "^3 pve-dbus-vmstate: PVE_DBUS_VMSTATE_FORMAT='bogus' (/etc/default/pve-dbus-vmstate" \
    >/dev/null || fail "the bad variable's line"
ct sh -c 'cp /etc/default/pve-dbus-vmstate.orig /etc/default/pve-dbus-vmstate; echo PVE_DBUS_VMSTATE_FORMAT=compact >> /etc/default/pve-dbus-vmstate'
ct systemctl start pve-dbus-vmstate@100 || fail "start with format compact"
ct busctl call com.proxmox.VMStateHelper.VM100 /org/qemu/VMState1 org.qemu.VMState1 Save >/dev/null || fail "Save"
journal pve-dbus-vmstate@100 | grep '^6 Save: 3 entries with mark 100, sent 3 in [0-9]* bytes as compact' >/dev/null \
    || fail "format from the environment file not used"
ct systemctl stop pve-dbus-vmstate@100
ct mv /etc/default/pve-dbus-vmstate.orig /etc/default/pve-dbus-vmstate

echo "--- a killed helper: ExecStopPost removes the object it left" >&2
ct systemctl start pve-dbus-vmstate@100 || fail "start before the kill"
# The main process only, as the OOM killer would (systemctl kill would also
# kill the ExecStopPost process it starts).
ct kill -9 "$(ct systemctl show -P MainPID pve-dbus-vmstate@100)"
# Not just "not active": ExecStopPost runs while the unit is deactivating.
for _ in $(seq 100); do
    case $(ct systemctl show -P ActiveState pve-dbus-vmstate@100) in inactive|failed) break ;; esac
    sleep 0.1
done
objects 100 | grep -w pve-vmstate >/dev/null && fail "object left after a killed helper"
journal pve-dbus-vmstate@100 | grep '^4 cleanup: removed the dbus-vmstate object the helper of VM 100 left' >/dev/null \
    || fail "cleanup line"

# Last: it takes the bus away.
echo "--- shutdown order: stopping the bus stops the helper first" >&2
ct systemctl start pve-dbus-vmstate@100 || fail "start before stopping the bus"
ct systemctl stop dbus.socket dbus.service
ct systemctl is-active -q pve-dbus-vmstate@100 && fail "the helper outlived the bus"
journal pve-dbus-vmstate@100 | grep 'connection to the system bus was lost' >/dev/null && fail "the bus went first"
journal pve-dbus-vmstate@100 | tail -n 1 | grep '^6 helper for VM 100 exiting: SIGTERM' >/dev/null || fail "clean exit"
objects 100 | grep -w pve-vmstate >/dev/null && fail "object left when the bus stopped"

echo "unit checks passed under systemd in a booted trixie container" >&2
