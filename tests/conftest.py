"""Session-wide fixtures: one private system bus for the whole run."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.perl_helper import perl_helper_factory
from tests.support import (
    PrivateBus,
    byte_compile,
    helper_factory,
    netns_factory,
    node_factory,
    nodes,
    qemu_factory,
    require,
    start_bus,
)

__all__ = ["helper_factory", "netns_factory", "node_factory", "nodes", "perl_helper_factory", "qemu_factory",
           "system_bus"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """The helpers the tests start import byte-compiled modules, as installed ones do."""
    byte_compile()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by what they use, so ``-m "not netns"`` runs without root."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & {"netns_factory", "node_factory", "nodes", "rig"}:
            item.add_marker(pytest.mark.netns)
        if fixtures & {"system_bus", "helper_factory", "node_factory", "nodes", "rig", "_bus"}:
            item.add_marker(pytest.mark.bus)


@pytest.fixture(scope="session")
def system_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBus]:
    """A private dbus-daemon of type system; DBUS_SYSTEM_BUS_ADDRESS points at it."""
    require(shutil.which("dbus-daemon") is not None, "needs dbus-daemon")
    bus = start_bus(Path(tmp_path_factory.mktemp("bus")))
    old = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
    try:
        yield bus
    finally:
        bus.stop()
        if old is None:
            os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
        else:
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = old
