"""pve-dbus-vmstate: carries a VM's conntrack state through QEMU live migration."""

__version__ = "0.1.0"
