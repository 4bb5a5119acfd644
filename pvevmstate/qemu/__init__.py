"""The VM's QEMU: a small QMP client, the ``dbus-vmstate`` object the helper
adds and removes, and the cleanup after a helper that could not remove it."""
