"""After the helper's process ended: remove a QEMU object it could not remove.

A helper that is killed (SIGKILL, the OOM killer) leaves its ``dbus-vmstate``
object in QEMU. The next migration of that VM without a helper then carries a
section the destination does not expect, and the destination QEMU exits
(shared/docs/PROTOCOL.md §3). The unit runs ``pve-dbus-vmstate --cleanup
VMID`` as ``ExecStopPost=``, after every end of the helper: after a clean exit
there is nothing left, and a QEMU that is gone has nothing to remove either.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from .dbus_api import helper_id
from .errors import QMPError
from .qemu import QemuObject
from .qmp import QMPClient

log = logging.getLogger(__name__)


def needed(environ: Mapping[str, str]) -> bool:
    """Whether the helper may have left its object: not when it exited by itself.

    systemd tells ExecStopPost how the main process ended (``EXIT_CODE``:
    ``exited``, ``killed`` or ``dumped``). A helper that exited ran its own
    teardown, or never registered (a bad VMID, no QEMU); then the cleanup
    stays silent, so such a start still leaves exactly one journal line. Run
    by hand (no ``EXIT_CODE``), it always looks.
    """
    return environ.get("EXIT_CODE", "killed") != "exited"


def run(vmid: int, qmp_socket: str, timeout: float) -> int:
    """Remove VM ``vmid``'s ``pve-vmstate`` object if QEMU still has it.

    :returns: 0 always (a cleanup that cannot reach QEMU has nothing to clean);
        what happened is in the journal
    """
    qemu = QemuObject(qmp_socket, "", helper_id(vmid), lambda path: QMPClient(path, timeout))
    try:
        removed = asyncio.run(qemu.remove())
    except QMPError as err:
        log.info("cleanup: nothing removed from the QEMU of VM %d: %s", vmid, err)
        return 0
    if removed:
        log.warning("cleanup: removed the dbus-vmstate object the helper of VM %d left behind", vmid)
    else:
        log.info("cleanup: the QEMU of VM %d holds no dbus-vmstate object", vmid)
    return 0
