#!/bin/bash
# Installs what the helper and its tests need on a Debian machine (idempotent):
# Debian packages for the real components, and a virtualenv with the Python
# dependencies. Must run as root (apt-get; the tests need network namespaces).
#
#   VENV=DIR                 virtualenv to use (default: .venv in the checkout)
#   PYROUTE2_VERSION=X.Y.Z   pin pyroute2 (CI also runs against trixie's 0.7.7)
#   SDBUS_VERSION=X.Y.Z      pin sdbus
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${VENV:-.venv}
packages=(dbus-daemon conntrack iproute2 nftables systemd qemu-system-x86 libnet-dbus-perl python3 python3-venv python3-pip
          man-db)  # man-db (with groff-base): tests/unit/test_manpage.py renders the man page
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
pins=()
[ -n "${PYROUTE2_VERSION:-}" ] && pins+=("pyroute2==$PYROUTE2_VERSION")
[ -n "${SDBUS_VERSION:-}" ] && pins+=("sdbus==$SDBUS_VERSION")
"$venv/bin/pip" install -q --disable-pip-version-check -e ".[test]" "${pins[@]}"
"$venv/bin/python" -c 'import pyroute2, sdbus; print("python deps ready: pyroute2", pyroute2.__version__)' >&2
