#!/bin/bash
# The whole test suite: sets everything up (tests/setup.sh), then lint, types
# and pytest (unit, private-bus and namespace tests; root needed for the
# latter). Extra arguments go to pytest. LINT=0 skips ruff and mypy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
venv=${VENV:-.venv}
if [ "${LINT:-1}" = 1 ]; then
    "$venv/bin/ruff" check pvevmstate tests
    "$venv/bin/mypy"
fi
exec "$venv/bin/python" -m pytest "$@"
