"""The lifecycle lines of the journal, as format strings.

Administrators, ``tests/package/boot.sh`` and the tests read these lines, so
their wording is kept in one place: the code logs them from here and the
tests build what they expect from here, so changing a line is one edit and
no test depends on a copy of its text. (Under journald the same lines also
carry fields, which scripts should prefer: see the README's "Journal fields".)
"""

from __future__ import annotations

READY = "helper for VM %d ready: Id %s, bus names %s and %s, unique name %s, QEMU %s"
STOPPING = "stopping: %s"
EXITING = "helper for VM %d exiting: %s"
ALREADY_STOPPING = ("already stopping (%s), ignoring %s until every pending Save/Load is answered "
                    "(at most %.0f s) and the QEMU object is removed; SIGKILL ends the helper at once")
REPLACED_LEFT_OVER = "replaced a left-over dbus-vmstate object in the QEMU of VM %d"
OBJECT_REMOVED = "removed the dbus-vmstate object from QEMU: %s"
OBJECT_NOT_REMOVED = "could not remove the dbus-vmstate object from QEMU (%s): %s"
TAKEN_OVER = "a newer helper for VM %d took over %s"
CLEANUP_NOTHING = "cleanup: nothing removed from the QEMU of VM %d: %s"
CLEANUP_REMOVED = "cleanup: removed the dbus-vmstate object the helper of VM %d left behind"
CLEANUP_NONE_LEFT = "cleanup: the QEMU of VM %d holds no dbus-vmstate object"
UNEXPECTED = "%s: unexpected error: %s: %s"
LOAD_TABLE_FULL = "Load: left out %d entries to keep the conntrack table below %d of its %d (it held %d): %s"
CACHE_WARM = "Save's cache is warm: %d entries encoded ahead by a background dump of %.0f ms (%.0f ms CPU)"
LOAD_REMAPPED = ("Load: %d entries created with another NAT mapping: the one they had is held "
                 "by another entry on this host")


def head(fmt: str) -> str:
    """The fixed text of ``fmt`` before its first conversion: what a test can look for."""
    return fmt.split("%", 1)[0]
