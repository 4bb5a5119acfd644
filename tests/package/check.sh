#!/bin/bash
# Builds the Debian package in a Debian trixie (Proxmox VE 9) root and checks it
# there: dpkg-buildpackage with debhelper/dh-python/pybuild, lintian, install
# with trixie's python3-sdbus and python3-pyroute2, switching from qemu-server's
# unit and back (dpkg diversion), systemd-analyze verify and security (exposure
# <= 2.5), and trixie's system bus config loading the installed policy file (a
# helper on it gets its names, root may call it, nobody may not; broken copies of
# the policy fail that check).
#
#   TRIXIE_ROOT=DIR   where the trixie root lives (made with debootstrap if missing,
#                     reused afterwards; default /var/tmp/pvevmstate-trixie)
#   OUT=DIR           where the built .deb and lintian's output go (default ./build-deb)
# Needs root (debootstrap, chroot). Touches nothing of the host but those two dirs.
set -euo pipefail
cd "$(dirname "$0")/../.."
src=$PWD
root=${TRIXIE_ROOT:-/var/tmp/pvevmstate-trixie}
out=${OUT:-$src/build-deb}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root_packages=(debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools
            python3-pytest python3-sdbus python3-pyroute2 dbus-daemon lintian dpkg-dev fakeroot
            systemd git build-essential
            # for boot.sh, which runs the installed unit under this root's systemd
            dbus systemd-sysv qemu-system-x86 conntrack
            # the build's tests/unit/test_manpage.py renders the page; boot.sh looks it up with man -w
            man-db)

step() { printf '\n=== %s\n' "$*" >&2; }

if ! command -v debootstrap >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi
if [ ! -x "$root/usr/bin/apt-get" ]; then
    step "debootstrap trixie into $root"
    rm -rf "$root"
    debootstrap --variant=minbase trixie "$root" "$mirror" >/dev/null
fi

mounts=()
cleanup() {
    for ((i=${#mounts[@]}-1; i>=0; i--)); do umount -l "${mounts[i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
for m in proc sys dev dev/pts; do
    mount --bind "/$m" "$root/$m"
    mounts+=("$root/$m")
done
in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }

if [ "$(cat "$root/.pvevmstate-deps" 2>/dev/null)" != "${root_packages[*]}" ]; then
    step "install build dependencies and what boot.sh needs in trixie"
    in_root apt-get update -qq
    in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${root_packages[@]}" >/dev/null
    echo "${root_packages[*]}" > "$root/.pvevmstate-deps"
fi

step "copy the source tree (git ls-files) into the trixie root"
rm -rf "$root/build"
mkdir -p "$root/build/pve-dbus-vmstate"
git ls-files -z --cached --others --exclude-standard | grep -zv '^build-deb/' \
    | xargs -0 cp --parents -t "$root/build/pve-dbus-vmstate"

step "dpkg-buildpackage -us -uc -b"
in_root sh -c 'cd /build/pve-dbus-vmstate && dpkg-buildpackage -us -uc -b' > "$root/build/build.log" 2>&1 || {
    tail -50 "$root/build/build.log"; exit 1; }
deb=$(cd "$root/build" && ls pve-dbus-vmstate_*_all.deb)
mkdir -p "$out"
cp "$root/build/$deb" "$root/build/build.log" "$out/"
echo "built $deb" >&2
in_root dpkg-deb -c "/build/$deb" | awk '{print $1, $6}' >&2

step "lintian (must report no error and no warning)"
in_root sh -c 'cd /build && lintian --info --display-info --fail-on error,warning pve-dbus-vmstate_*.changes' \
    | tee "$out/lintian.txt" >&2

step "switch from qemu-server's unit (stand-in package) to this one and back"
# A stand-in for qemu-server: a package owning the Perl helper's unit file.
standin=$root/build/standin
mkdir -p "$standin/DEBIAN" "$standin/usr/lib/systemd/system"
printf 'Package: qemu-server-standin\nVersion: 1\nArchitecture: all\nMaintainer: test <test@example.org>\nDescription: owns the Perl helper unit\n' \
    > "$standin/DEBIAN/control"
printf '[Service]\nExecStart=/usr/libexec/qemu-server/dbus-vmstate %%i\n' \
    > "$standin/usr/lib/systemd/system/pve-dbus-vmstate@.service"
in_root dpkg-deb -b /build/standin /build/standin.deb >/dev/null
unit=/usr/lib/systemd/system/pve-dbus-vmstate@.service
in_root dpkg -i /build/standin.deb >/dev/null
in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "/build/$deb" >/dev/null
grep -q '^ExecStart=/usr/libexec/pve-dbus-vmstate %i' "$root$unit"
grep -q 'qemu-server/dbus-vmstate' "$root$unit.perl-helper"
echo "installed: the unit runs /usr/libexec/pve-dbus-vmstate; qemu-server's is diverted" >&2
in_root dpkg -r pve-dbus-vmstate >/dev/null
grep -q 'qemu-server/dbus-vmstate' "$root$unit"
[ ! -e "$root$unit.perl-helper" ]
! in_root dpkg-divert --list | grep -q pve-dbus-vmstate
echo "removed: qemu-server's unit is back, no diversion left" >&2
in_root dpkg -r qemu-server-standin >/dev/null
in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "/build/$deb" >/dev/null
in_root dpkg -s python3-sdbus python3-pyroute2 | grep -E '^(Package|Version)' >&2

step "the installed helper runs with trixie's python3-sdbus and python3-pyroute2"
in_root /usr/libexec/pve-dbus-vmstate --version
in_root python3 -c 'import sdbus, pyroute2, pvevmstate.daemon; print("pyroute2", pyroute2.__version__)'
set +e
in_root /usr/libexec/pve-dbus-vmstate 12 2> "$root/build/badvmid.err"; rc=$?
set -e
cat "$root/build/badvmid.err" >&2
[ "$rc" = 2 ] && [ "$(wc -l < "$root/build/badvmid.err")" = 1 ] && grep -q '^<3>' "$root/build/badvmid.err"

step "systemd-analyze verify and security --offline=true (the instance qemu-server starts)"
# The commands as written in the issue, run from the source tree in the trixie
# root (where /usr/libexec/pve-dbus-vmstate now exists), then security once
# more with the host's systemd.
in_root sh -c 'cd /build/pve-dbus-vmstate && systemd-analyze verify systemd/pve-dbus-vmstate@100.service' \
    > "$root/build/verify.txt" 2>&1 || true
cat "$root/build/verify.txt" >&2
[ ! -s "$root/build/verify.txt" ]
echo "verify: clean" >&2
exposure() {  # prints the level, fails above 2.5
    local level
    level=$(sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
    echo "exposure $level ($1)" >&2
    awk -v l="$level" 'BEGIN { exit !(l != "" && l <= 2.5) }'
}
in_root sh -c 'cd /build/pve-dbus-vmstate && systemd-analyze security --offline=true --no-pager systemd/pve-dbus-vmstate@100.service' \
    | tee "$out/security.txt" | exposure "systemd $(in_root systemctl --version | head -1 | cut -d' ' -f2), trixie"
if command -v systemd-analyze >/dev/null; then
    systemd-analyze security --offline=true --no-pager systemd/pve-dbus-vmstate@100.service \
        | exposure "systemd $(systemctl --version | head -1 | cut -d' ' -f2), this host"
fi

step "trixie's system bus config loads the installed policy: the helper gets its names, root may call it, nobody may not"
# The root's own system.conf with only the socket, user, fork and pid file
# changed, and its relative <includedir>system.d</includedir> made absolute:
# a copy in /build would otherwise read /build/system.d and never load the
# installed policy. $1 is the directory included in its place (the installed
# /usr/share/dbus-1/system.d, or a broken copy below). A helper for VM 100 runs
# on that bus with a QEMU of its own; prints why and returns 1 if the policy
# does not do its job. Every process is bounded by timeout(1) and stopped here.
policy_bus() {
    local dir=$1 bus=/build/policy-bus qmp=/build/policy-100.qmp
    local env=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8)
    local busctl=(busctl --address=unix:path=$bus)
    local id=(get-property com.proxmox.VMStateHelper.VM100 /org/qemu/VMState1 org.qemu.VMState1 Id)
    local daemon qemu helper why="" out owner queued rc
    sed -e "s|<listen>.*</listen>|<listen>unix:path=$bus</listen>|" \
        -e '/<user>/d' -e '/<fork\/>/d' -e '/<pidfile>/d' \
        -e "s|<includedir>system.d</includedir>|<includedir>$dir</includedir>|" \
        "$root/usr/share/dbus-1/system.conf" > "$root/build/system.conf"
    grep -q "<includedir>$dir</includedir>" "$root/build/system.conf" \
        || { echo "system.conf has no <includedir>system.d</includedir> to replace" >&2; return 1; }
    rm -f "$root$bus" "$root$qmp" "$root"/build/policy-*.out "$root"/build/policy-*.err
    chroot "$root" "${env[@]}" timeout 60 dbus-daemon --config-file=/build/system.conf --nofork --nopidfile \
        --print-address=1 > "$root/build/policy-bus.out" 2> "$root/build/policy-bus.err" &
    daemon=$!
    chroot "$root" "${env[@]}" timeout 60 qemu-system-x86_64 -machine none -nodefaults -display none \
        -serial none -monitor none -qmp "unix:$qmp,server=on,wait=off" > "$root/build/policy-qemu.err" 2>&1 &
    qemu=$!
    for _ in $(seq 100); do grep -q unix: "$root/build/policy-bus.out" && [ -S "$root$qmp" ] && break; sleep 0.1; done
    if ! grep -q unix: "$root/build/policy-bus.out"; then
        why="dbus-daemon refused the configuration: $(cat "$root/build/policy-bus.err")"
    elif [ ! -S "$root$qmp" ]; then
        why="QEMU did not start: $(cat "$root/build/policy-qemu.err")"
    else
        chmod 0666 "$root$bus"  # anyone may connect; the policy decides the rest
        chroot "$root" "${env[@]}" DBUS_SYSTEM_BUS_ADDRESS="unix:path=$bus" timeout 60 \
            /usr/libexec/pve-dbus-vmstate 100 --qmp-socket "$qmp" 2> "$root/build/policy-helper.err" &
        helper=$!
        for _ in $(seq 150); do
            grep -q ' ready: ' "$root/build/policy-helper.err" && break
            kill -0 "$helper" 2>/dev/null || break
            sleep 0.1
        done
        if ! grep -q ' ready: ' "$root/build/policy-helper.err"; then
            why="the helper did not get ready: $(grep '^<3>' "$root/build/policy-helper.err")"
        elif ! out=$(in_root "${busctl[@]}" "${id[@]}" 2>&1) || [ "$out" != 's "pve-vmstate-100"' ]; then
            why="root may not read the helper's Id: $out"
        elif ! owner=$(in_root "${busctl[@]}" call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus \
                       GetNameOwner s com.proxmox.VMStateHelper.VM100 2>&1) \
             || ! queued=$(in_root "${busctl[@]}" call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus \
                       ListQueuedOwners s org.qemu.VMState1 2>&1) \
             || [ "$queued" != "as 1 ${owner#s }" ]; then
            why="org.qemu.VMState1 is not queued by the helper ($owner): $queued"
        elif out=$(in_root setpriv --reuid=nobody --regid=nogroup --clear-groups "${busctl[@]}" "${id[@]}" 2>&1) \
             || ! echo "$out" | grep -q "Access denied"; then
            why="nobody may read the helper's Id: $out"
        elif ! in_root "${busctl[@]}" call com.proxmox.VMStateHelper.VM100 /org/qemu/VMState1 \
                 com.proxmox.VMStateHelper Quit; then
            why="root may not call Quit"
        fi
        for _ in $(seq 100); do kill -0 "$helper" 2>/dev/null || break; sleep 0.1; done
        kill "$helper" 2>/dev/null || true
        rc=0; wait "$helper" || rc=$?
        [ -n "$why" ] || [ "$rc" = 0 ] || why="the helper exited with $rc after Quit: $(cat "$root/build/policy-helper.err")"
    fi
    kill "$qemu" "$daemon" 2>/dev/null || true
    wait "$qemu" "$daemon" 2>/dev/null || true
    [ -n "$why" ] || ! grep -q "$policy" "$root/build/policy-bus.err" \
        || why="dbus-daemon warned about the policy"
    [ -z "$why" ] || { echo "$why" >&2; return 1; }
}
policy=com.proxmox.VMStateHelper.conf
[ -f "$root/usr/share/dbus-1/system.d/$policy" ]
policy_bus /usr/share/dbus-1/system.d
echo "the installed /usr/share/dbus-1/system.d/$policy does its job on trixie's dbus-daemon" >&2

step "the same check fails with a broken copy of the policy"
broken=$root/build/broken-system.d
while IFS='|' read -r what edit expected; do
    rm -rf "$broken"
    cp -a "$root/usr/share/dbus-1/system.d" "$broken"
    sed -i -e "$edit" "$broken/$policy"
    ! cmp -s "$broken/$policy" "$root/usr/share/dbus-1/system.d/$policy" || { echo "$what: edit changed nothing" >&2; exit 1; }
    if why=$(policy_bus /build/broken-system.d 2>&1); then
        echo "FAILED: the check passed with a policy where $what" >&2; exit 1
    fi
    echo "$why" | grep -q -- "$expected" || { echo "FAILED: $what: unexpected reason: $why" >&2; exit 1; }
    echo "$what: refused ($(echo "$why" | head -1))" >&2
done <<'EOF'
root may not own the names|/<policy user="root">/,/<\/policy>/{/allow own/d}|the helper did not get ready: <3>D-Bus start-up failed
the file is not well-formed XML|s,</busconfig>,<policy,|the helper did not get ready: <3>D-Bus start-up failed
root may not call the helper|/<policy user="root">/,/<\/policy>/{/allow send_/d}|root may not read the helper's Id
everybody may call the helper|s,<policy context="default">,&<allow send_destination_prefix="com.proxmox.VMStateHelper"/>,|nobody may read the helper's Id
EOF
rm -rf "$broken"

step "package checks passed: $out/$deb"
