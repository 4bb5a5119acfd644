#!/bin/bash
# The whole test suite: sets everything up (tests/setup.sh), then lint, types,
# the Debian package checks in a Debian trixie root (tests/package/check.sh:
# build, lintian, install, systemd-analyze), pytest (unit, private-bus,
# namespace and QEMU tests; root needed for the latter), then
# tests/package/boot.sh: the unit under trixie's systemd in a container.
# Extra arguments go to pytest. LINT=0 skips ruff and mypy, PACKAGE=0 the
# package checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
venv=${VENV:-.venv}
if [ "${LINT:-1}" = 1 ]; then
    "$venv/bin/ruff" check pvevmstate tests
    "$venv/bin/mypy"
fi
# The package build first: it also prepares the Debian trixie root whose
# conntrack 1.4.8 the payload tests load with (tests/integration/test_mixed_cluster.py).
if [ "${PACKAGE:-1}" = 1 ]; then
    bash tests/package/check.sh
fi
"$venv/bin/python" -m pytest "$@"
if [ "${PACKAGE:-1}" = 1 ]; then
    bash tests/package/boot.sh
fi
