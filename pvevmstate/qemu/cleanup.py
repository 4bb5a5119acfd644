"""After the helper's process ended: remove a QEMU object it could not remove.

A helper that is killed (SIGKILL, the OOM killer) leaves its ``dbus-vmstate``
object in QEMU. The next migration of that VM without a helper then carries a
section the destination does not expect, and the destination QEMU exits
(seen with qemu-server's Perl helper). The unit runs ``pve-dbus-vmstate --cleanup
VMID`` as ``ExecStopPost=``, after every end of the helper: after a clean exit
there is nothing left, and a QEMU that is gone has nothing to remove either.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .. import messages
from ..errors import QMPError

if TYPE_CHECKING:  # the daemon module pulls in sdbus; --cleanup's quick exit needs none of it
    from ..daemon import Settings

log = logging.getLogger(__name__)


def needed(environ: Mapping[str, str]) -> bool:
    """Whether the helper may have left its object: not when it exited cleanly.

    systemd tells ExecStopPost how the main process ended (``EXIT_CODE``:
    ``exited``, ``killed`` or ``dumped``; ``EXIT_STATUS``: the status or the
    signal). A helper that exited 0 ran its own teardown, and one that exited
    2 never started (a bad VMID); then the cleanup stays silent, so such a
    start still leaves exactly one journal line. Exit status 1 is a fatal
    end, which an unexpected error can cause after the object was added, so
    it is looked for. Run by hand (no ``EXIT_CODE``), it always looks.
    """
    if environ.get("EXIT_CODE", "killed") != "exited":
        return True
    return environ.get("EXIT_STATUS") == "1"


def run(settings: Settings) -> int:
    """Remove the VM's ``pve-vmstate`` object if QEMU still has it.

    :param settings: the VMID, the QMP socket and timeout, as the helper had them
    :returns: 0 always (a cleanup that cannot reach QEMU has nothing to clean);
        what happened is in the journal
    """
    vmid = settings.vmid
    qemu = settings.qemu_object("")  # removing needs no bus address
    try:
        removed = asyncio.run(qemu.remove())
    except QMPError as err:
        log.info(messages.CLEANUP_NOTHING, vmid, err)
        return 0
    if removed:
        log.warning(messages.CLEANUP_REMOVED, vmid)
    else:
        log.info(messages.CLEANUP_NONE_LEFT, vmid)
    return 0
