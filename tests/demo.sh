#!/bin/bash
# Sets everything up (tests/setup.sh) and runs a real QEMU live migration of VM 100 with its
# conntrack state between two network namespaces, each with its own private system bus.
# Needs root (network namespaces); touches neither the host's bus nor its table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
exec "${VENV:-.venv}/bin/python" -m tests.demo
