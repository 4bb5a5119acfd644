"""The helper loads pyroute2's socket class, not the whole library.

pyroute2's package ``__init__`` imports every part of it (~20 MiB of the
helper's memory, ~0.2 s of its start). Each case runs in a fresh
interpreter, as the helper does: what is imported first decides.
"""

from __future__ import annotations

import subprocess
import sys

from tests.support import REPO


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_the_adapter_loads_the_socket_class_only() -> None:
    out = _run(
        "import sys\n"
        "from pvevmstate.netlink import conntrack\n"
        "print(conntrack._NFCTSocket.__module__, 'pyroute2' in sys.modules, 'pyroute2.iproute' in sys.modules)\n"
    )
    assert out == "pyroute2.netlink.nfnetlink.nfctsocket False False"


def test_the_socket_class_works_and_pyroute2_stays_importable_whole() -> None:
    # A netlink socket needs no privilege to be opened; a later import of
    # pyroute2 runs its real __init__ and shares the class loaded before.
    out = _run(
        "from pvevmstate.netlink import conntrack\n"
        "s = conntrack._NFCTSocket(); print(s.fileno() > 0); s.close()\n"
        "import pyroute2\n"
        "print(pyroute2.NFCTSocket is conntrack._NFCTSocket, hasattr(pyroute2, 'IPRoute'))\n"
    )
    assert out.split() == ["True", "True", "True"]


def test_a_loaded_pyroute2_is_used_as_it_is() -> None:
    out = _run(
        "import pyroute2\n"
        "from pvevmstate.netlink import conntrack\n"
        "print(conntrack._NFCTSocket is pyroute2.NFCTSocket)\n"
    )
    assert out == "True"
